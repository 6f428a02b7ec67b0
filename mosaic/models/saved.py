"""Saved models: `save_model` / `load_model` (safetensors + a JSON twin) and `load_classifier` for any classifier checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import WEIGHTS_NAME, _weights_file, load_state
from .errors import CheckpointError
from .factory import create_model
from .utils import unwrap_model

__all__ = ["load_classifier", "load_model", "save_model", "META_KEYS"]

PathLike = Union[str, os.PathLike]

# keys the JSON twin written by save_model always holds
META_KEYS = ("arch", "num_classes", "in_chans", "image_size", "mean", "std")


def _meta_from_model(model: nn.Module) -> Dict[str, Any]:
    """Best-effort metadata read off a timm-style model (used to fill keys the caller left out)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    meta: Dict[str, Any] = {}
    if cfg.get("architecture"):
        meta["arch"] = cfg["architecture"]
    if hasattr(model, "num_classes"):
        meta["num_classes"] = int(model.num_classes)
    in_chans = getattr(model, "in_chans", None) or (cfg["input_size"][0] if "input_size" in cfg else None)
    if in_chans is not None:
        meta["in_chans"] = int(in_chans)
    if "input_size" in cfg:
        meta["image_size"] = int(cfg["input_size"][-1])
    for k in ("mean", "std"):
        if k in cfg:
            meta[k] = [float(v) for v in cfg[k]]
    if getattr(model, "create_kwargs", None):  # options create_model gave the constructor (img_size, patch_size, ...)
        meta["model_kwargs"] = dict(model.create_kwargs)
    return meta


def _json_twin(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_model(model: nn.Module, path: PathLike, *, meta: Dict[str, Any]) -> None:
    """Write the weights to `path` (.safetensors, or a folder that gets model.safetensors) and meta to a JSON twin.

    `meta` should hold arch, num_classes, in_chans, image_size, mean and std; keys left out are filled from
    the model's pretrained_cfg where possible, and extra keys (classes, top1, ...) are kept as they are.
    An optional `model_kwargs` dict (e.g. {"drop_rate": 0.3}) is passed back to create_model by load_model;
    by default it holds the options create_model built the model with (its `create_kwargs`, img_size included).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"save_model writes safetensors; give a path ending in .safetensors or a folder, got {path}"
        )
    target = unwrap_model(model)
    full = {**_meta_from_model(target), **meta}
    absent = [k for k in META_KEYS if k not in full]
    if absent:
        raise CheckpointError(f"save_model meta is missing {absent}; pass them in meta=...")
    if hasattr(target, "num_classes") and int(full["num_classes"]) != target.num_classes:
        raise CheckpointError(
            f"meta says num_classes={full['num_classes']} but the model has {target.num_classes} outputs; fix meta"
        )
    try:
        text = json.dumps(full, indent=2, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"save_model meta must be JSON-serialisable: {e}") from e

    from safetensors.torch import save_file

    # clone so that tensors sharing storage (tied weights, views) can be written by safetensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in target.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "arch": str(full["arch"])})
    os.replace(tmp, path)
    twin = _json_twin(path)
    tmp = twin.with_name(twin.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, twin)


def load_model(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a model written by `save_model` (file or run folder) and return (model in eval mode, meta).

    The architecture comes from the JSON twin; `arch` / `num_classes` / `in_chans` override it, and are
    required when the weights have no JSON twin.
    """
    weights = _weights_file(Path(path))
    twin = _json_twin(weights)
    meta: Dict[str, Any] = {}
    if twin.is_file():
        try:
            meta = json.loads(twin.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"metadata file {twin} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"metadata file {twin} must hold a JSON object, got {type(meta).__name__}")
    elif arch is None:
        raise CheckpointError(
            f"no metadata file {twin} next to {weights}, so the architecture is unknown; pass arch=... and "
            "num_classes=... to load_model, or build the model with create_model and use load_state"
        )
    overrides = dict(arch=arch, num_classes=num_classes, in_chans=in_chans)
    meta.update({k: v for k, v in overrides.items() if v is not None})
    absent = [k for k in ("arch", "num_classes") if k not in meta]
    if absent:
        raise CheckpointError(f"cannot rebuild the model from {weights}: {absent} unknown; pass them to load_model")
    model = create_model(
        meta["arch"],
        num_classes=int(meta["num_classes"]),
        in_chans=int(meta.get("in_chans", 3)),
        **dict(meta.get("model_kwargs") or {}),
    )
    load_state(model, weights)
    return model.to(device).eval(), meta


def load_classifier(checkpoint: PathLike, *, arch: Optional[str] = None, num_classes: Optional[int] = None,
                    in_chans: int = 3, default_classes: Optional[int] = None, image_size: Optional[int] = None,
                    kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a classifier from our safetensors+JSON pair, a run folder, or any state_dict file given its arch.

    Unlike `load_model`, an `arch` / `num_classes` / `kwargs` that contradicts the JSON twin is an error,
    not an override. `default_classes` (the data's class count) is used for a bare state_dict when
    num_classes is not given; `image_size` and the timm options `kwargs` (teacher.kwargs) build a bare
    state_dict's network.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' not found")
    twin = path / "model.json" if path.is_dir() else path.with_suffix(".json")
    if twin.is_file():
        model, meta = load_model(path)
        if arch is not None and arch != meta["arch"]:
            raise CheckpointError(f"checkpoint '{path}' holds a {meta['arch']}, but arch={arch} was asked for")
        if num_classes is not None and num_classes != meta["num_classes"]:
            raise CheckpointError(f"checkpoint '{path}' has {meta['num_classes']} classes, but num_classes={num_classes}")
        recorded = meta.get("model_kwargs") or {}
        differ = {k: v for k, v in (kwargs or {}).items() if recorded.get(k) != v}
        if differ:
            raise CheckpointError(f"checkpoint '{path}' was built with options {recorded}, but teacher.kwargs "
                                  f"asks for {differ}: drop teacher.kwargs (model.json records the options)")
        return model, meta
    num_classes = num_classes or default_classes
    if arch is None or num_classes is None:
        raise CheckpointError(f"checkpoint '{path}' has no model.json beside it: give its architecture and "
                              f"class count (teacher.arch=..., teacher.num_classes=...)")
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                         where="teacher.kwargs", **(kwargs or {}))
    load_state(model, path)
    return model.eval(), {"arch": arch, "num_classes": num_classes, "in_chans": in_chans}
