"""Reading weights: `read_state_dict` finds them in common checkpoint layouts, `load_state` loads them with a clear report."""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import CheckpointError
from .utils import unwrap_model

__all__ = ["LoadReport", "load_state", "read_state_dict", "WEIGHT_KEYS", "WEIGHTS_NAME"]

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# keys under which training scripts commonly nest the weights, tried in this order
WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "student", "teacher", "net")
# prefixes added by DistributedDataParallel / DataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_NAME = "model.safetensors"
_SHOW = 8  # how many offending keys an error message lists per kind


@dataclass
class LoadReport:
    """What `load_state` could not match; all empty after a strict load."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)


def _weights_file(path: Path) -> Path:
    """Resolve a run folder to the weights file inside it; check the file exists."""
    if path.is_dir():
        inner = path / WEIGHTS_NAME
        if not inner.is_file():
            raise CheckpointError(f"folder {path} has no {WEIGHTS_NAME}; pass the checkpoint file itself")
        return inner
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _read_file(path: Path) -> Any:
    """Load a .safetensors file or a torch.save file (weights_only first, full unpickling only as a fallback)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"could not read safetensors file {path}: {_first_line(e)}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # a file that merely holds non-tensor Python objects (e.g. an argparse Namespace) is retried below
        if not (isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)):
            why = "not a valid torch.save file" if isinstance(e, pickle.UnpicklingError) else _first_line(e)
            why = why or f"{type(e).__name__}: the file is empty or truncated"
            raise CheckpointError(
                f"could not read checkpoint {path} ({why}); expected a torch.save file or a .safetensors file"
            ) from e
    warnings.warn(
        f"{path} holds Python objects besides tensors and was loaded with weights_only=False; "
        "only load checkpoints you trust",
        stacklevel=4,  # the caller of load_state / read_state_dict
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {_first_line(e)})") from e


def _find_state_dict(obj: Any, where: str, key: Optional[str]) -> StateDict:
    """Dig the tensor dict out of a checkpoint object (plain state_dict, nested dict or pickled module)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if key is not None:
        if not isinstance(obj.get(key), (Mapping, nn.Module)):
            top = sorted(map(str, obj))[:12]
            raise CheckpointError(f"{where} has no weights under {key!r}; its top-level keys are {top}")
        return _find_state_dict(obj[key], f"{where}[{key!r}]", None)
    for k in WEIGHT_KEYS:
        if isinstance(obj.get(k), (Mapping, nn.Module)):
            return _find_state_dict(obj[k], f"{where}[{k!r}]", None)
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(
        f"no weights found in {where}: expected a state_dict or a dict holding one under one of {list(WEIGHT_KEYS)}; "
        f"its top-level keys are {sorted(map(str, obj))[:12]}"
    )


def _strip_prefixes(state: StateDict, model_keys: Mapping[str, Any]) -> StateDict:
    """Remove `module.` / `_orig_mod.` prefixes that every key shares and the model's own keys lack."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path_or_state: Union[PathLike, Mapping[str, Any]], *, key: Optional[str] = None) -> StateDict:
    """Return the weights in a checkpoint file, run folder or in-memory checkpoint dict, as a flat tensor dict.

    `key` picks the nested entry explicitly (e.g. 'teacher'); by default the first of WEIGHT_KEYS present is used.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = _weights_file(Path(path_or_state))
        return _find_state_dict(_read_file(path), str(path), key)
    return _find_state_dict(path_or_state, "the checkpoint", key)


def _describe(report: LoadReport) -> str:
    """One-line summary of the missing, unexpected and shape-mismatched keys (first few of each)."""
    def listing(keys: List[str]) -> str:
        more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return ", ".join(keys[:_SHOW]) + more

    parts = []
    if report.mismatched:
        shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in report.mismatched]
        parts.append(f"{len(report.mismatched)} shape mismatches: {listing(shown)}")
    if report.missing:
        parts.append(f"{len(report.missing)} missing keys: {listing(report.missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected keys: {listing(report.unexpected)}")
    return "; ".join(parts)


def _arch_name(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def _hint(model: nn.Module, report: LoadReport) -> str:
    """The likely cause of a failed load: a different class count when only the classifier differs."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    only_head = head and not report.missing and not report.unexpected and all(
        k.startswith(head + ".") for k, _, _ in report.mismatched
    )
    if only_head:
        theirs, ours = report.mismatched[0][1][0], report.mismatched[0][2][0]
        return (
            f"the checkpoint's classifier has {theirs} classes but the model has {ours}; build the model with "
            f"num_classes={theirs}, or pass strict=False to load everything but the classifier"
        )
    return (
        "the checkpoint is probably for another architecture or class count "
        "(check arch / num_classes, or pass strict=False to load only what fits)"
    )


def load_state(
    model: nn.Module,
    path_or_state: Union[PathLike, Mapping[str, Any]],
    *,
    strict: bool = True,
    key: Optional[str] = None,
) -> LoadReport:
    """Load weights into a built `model` in place and return what did not match.

    Accepts a .pt/.pth/.safetensors file, a run folder holding model.safetensors, or an in-memory dict;
    weights may be nested under 'state_dict' / 'model' / 'model_state_dict' / 'student' / 'teacher' / 'net'
    (or under `key`),
    and DDP `module.` / torch.compile `_orig_mod.` prefixes are stripped. With strict=True any missing,
    unexpected or wrongly shaped tensor raises CheckpointError; with strict=False the tensors that fit are
    loaded and the rest are reported.
    """
    where = str(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else "checkpoint"
    target = unwrap_model(model)
    own = target.state_dict()
    state = _strip_prefixes(read_state_dict(path_or_state, key=key), own)

    report = LoadReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=[
            (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
        ],
    )
    if strict and not report.ok:
        raise CheckpointError(
            f"{where} does not fit {_arch_name(target)}: {_describe(report)} -- {_hint(target, report)}"
        )
    bad = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in state.items() if k in own and k not in bad}
    target.load_state_dict(fitting, strict=False)
    return report
