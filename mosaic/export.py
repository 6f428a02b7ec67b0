"""Export a trained run's model to ONNX or TorchScript, checked against PyTorch on the run's test images.

    mosaic export runs/mosaic-cnn_tiny --format onnx          # -> runs/mosaic-cnn_tiny/model.onnx
    mosaic export runs/mosaic-cnn_tiny --format torchscript   # -> runs/mosaic-cnn_tiny/model.torchscript.pt

The exported model takes normalised float32 images shaped (batch, channels, size, size):
x = (pixels / 255 - mean) / std per channel, and returns logits (batch, classes). Mean, std,
image size, channels, class names and arch are stored inside the file (ONNX metadata_props,
TorchScript extra file `model.json`), so a deployer does not have to guess them.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT = "float32 images (batch, channels, size, size), normalised: (pixels / 255 - mean) / std per channel"
EXTRA = "pip install mosaic-kd[export]"


class ExportError(ValueError):
    """A model that cannot be exported, or whose export does not reproduce PyTorch's outputs."""


def find_weights(run: str | Path) -> Path:
    """The model.safetensors of a run folder (or the file itself), with its model.json beside it."""
    path = Path(run)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not path.exists():
        raise ExportError(f"'{path}' does not exist: give a run folder holding model.safetensors and model.json")
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise ExportError(f"no model.safetensors in '{path}': export a finished run's folder (training writes "
                          f"model.safetensors and model.json at the end)")
    if not weights.with_suffix(".json").is_file():
        raise ExportError(f"no {weights.with_suffix('.json').name} beside '{weights}': the export needs the "
                          f"model's arch and normalisation from it")
    return weights


def deploy_meta(meta: dict, *, source: Path) -> dict[str, Any]:
    """What a deployer needs to feed the exported model: normalisation, sizes, class names, arch."""
    absent = [k for k in ("arch", "num_classes", "image_size", "mean", "std") if meta.get(k) is None]
    if absent:
        raise ExportError(f"{source} lacks {absent}: the export records the normalisation, so re-save the model "
                          f"with them (save_model(..., meta=...))")
    return {"arch": meta["arch"], "num_classes": int(meta["num_classes"]), "in_chans": int(meta.get("in_chans", 3)),
            "image_size": int(meta["image_size"]), "mean": [float(v) for v in meta["mean"]],
            "std": [float(v) for v in meta["std"]], "classes": meta.get("classes"), "input": INPUT,
            "output": "logits (batch, num_classes)", "source": str(source)}


def check_images(folder: Path, meta: dict, *, batch: int, log=print) -> tuple[Tensor, str]:
    """`batch` normalised test images of the run's data.test (decoded as the engine does), or random ones."""
    from mosaic.augment import to_float
    from mosaic.data import DataError
    from mosaic.data import load_split

    size, chans = meta["image_size"], meta["in_chans"]
    try:
        import yaml
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        if not cfg["data"]["test"]:
            raise DataError("the run's config has no data.test")
        cfg = {**cfg, "data": {**cfg["data"], "download": False}}
        test = load_split(cfg, "test", image_size=size, channels=chans)
        x, where = to_float(test.images[:batch]), f"{min(batch, len(test))} test images of {test.name}"
    except (DataError, OSError, KeyError, TypeError) as err:
        log(f"note: the run's test set cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__});"
            f" checking on {batch} random images instead")
        x = torch.rand(batch, chans, size, size, generator=torch.Generator().manual_seed(0))
        where = f"{batch} random images"
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    return (x - mean) / std, where


def require_onnx():
    """The onnx and onnxruntime modules, or one error line naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({err}): {EXTRA}") from None
    return onnx, onnxruntime


def to_onnx(model: nn.Module, x: Tensor, path: Path, *, meta: dict, opset: int) -> Tensor:
    """Write `model` as ONNX (dynamic batch axis, metadata_props) and return onnxruntime's outputs for x."""
    onnx, ort = require_onnx()
    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is the legacy one
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as err:  # noqa: BLE001 - any exporter failure becomes one line
        raise ExportError(f"torch.onnx.export failed for {meta['arch']} at opset {opset}: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.doc_string = f"mosaic-kd {meta['arch']}: input {INPUT}"
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def to_torchscript(model: nn.Module, x: Tensor, path: Path, *, meta: dict) -> Tensor:
    """Write `model` traced to TorchScript (extra file model.json), reload it and return its outputs for x."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (x,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"model.json": json.dumps(meta, indent=2)})
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"TorchScript tracing failed for {meta['arch']}: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    with torch.no_grad():
        return loaded(x)


def export(run: str | Path, *, fmt: str = "onnx", opset: int = 17, batch: int = 16, tolerance: float = 1e-4,
           log=print) -> dict[str, Any]:
    """Export a run's model next to its model.safetensors and check it on test images; returns a report."""
    from mosaic.models import load_model

    if fmt not in FILES:
        raise ExportError(f"unknown format '{fmt}': choose one of {sorted(FILES)}")
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    weights = find_weights(run)
    model, raw = load_model(weights)
    model = model.float().eval()
    meta = deploy_meta(raw, source=weights.with_suffix(".json"))
    log(f"normalisation from {meta['source']}: mean={meta['mean']} std={meta['std']}, "
        f"{meta['image_size']}x{meta['image_size']}, {meta['in_chans']} channel(s), arch {meta['arch']}")
    x, where = check_images(weights.parent, meta, batch=batch, log=log)
    with torch.no_grad():
        expected = model(x)
    path = weights.parent / FILES[fmt]
    got = (to_onnx(model, x, path, meta=meta, opset=opset) if fmt == "onnx"
           else to_torchscript(model, x, path, meta=meta))
    diff = float((got.float() - expected).abs().max())
    log(f"wrote {path}; max abs difference to PyTorch on {where}: {diff:.3g}")
    if not diff <= tolerance:
        path.unlink(missing_ok=True)  # never leave a file behind that does not reproduce the model
        raise ExportError(f"the {fmt} export of {weights} differs from PyTorch by {diff:.3g} (> tolerance "
                          f"{tolerance:g}) on {where}, so it was removed; try another --opset or raise --tolerance")
    log(f"its input: {INPUT} (recorded in the file with the class names)")
    return {"path": str(path), "format": fmt, "max_abs_diff": diff, "checked_on": where, "meta": meta}
