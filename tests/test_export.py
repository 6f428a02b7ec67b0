"""`mosaic export`: ONNX / TorchScript files that reproduce PyTorch's logits and carry their normalisation."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mosaic.cli import main
from mosaic.models import load_model


@pytest.fixture
def run(tiny_teacher, tmp_path) -> Path:
    """A private copy of the tiny trained run (the export writes next to its model)."""
    return Path(shutil.copytree(tiny_teacher.parent, tmp_path / "run"))


def hand_batch(task: Path, meta: dict, n: int = 5) -> torch.Tensor:
    """n test PNGs normalised by hand: (pixels / 255 - mean) / std."""
    files = sorted((task / "test").rglob("*.png"))[:n]
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files])
    x = (x - np.array(meta["mean"], dtype=np.float32)) / np.array(meta["std"], dtype=np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_onnx_export_matches_pytorch_and_records_normalisation(run, tiny_task, capsys):
    onnx = pytest.importorskip("onnx", reason="the [export] extra (onnx, onnxruntime) is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxruntime) is not installed")
    assert main(["export", str(run), "--format", "onnx", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert f"normalisation from {run / 'model.json'}" in out
    assert "test images of" in out and "random" not in out  # checked on the run's real test set

    model, meta = load_model(run)
    x = hand_batch(tiny_task["task"], meta, n=7)  # another batch size than the export's: dynamic axis
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (7, meta["num_classes"])
    assert np.abs(got - want).max() < 1e-4

    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert json.loads(props["mean"]) == pytest.approx(meta["mean"])
    assert json.loads(props["std"]) == pytest.approx(meta["std"])
    assert json.loads(props["image_size"]) == 16 and json.loads(props["in_chans"]) == 3
    assert json.loads(props["classes"]) == ["class_0", "class_1", "class_2"]
    assert props["arch"] == "cnn_tiny" and "normalised" in props["input"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_reloads_and_matches(run, tiny_task):
    from mosaic.export import export

    report = export(run, fmt="torchscript", batch=3, log=lambda *_: None)
    assert report["path"] == str(run / "model.torchscript.pt") and report["max_abs_diff"] <= 1e-4
    extra = {"model.json": ""}
    loaded = torch.jit.load(str(run / "model.torchscript.pt"), _extra_files=extra)
    saved = json.loads(extra["model.json"])
    model, meta = load_model(run)
    assert saved["mean"] == pytest.approx(meta["mean"]) and saved["std"] == pytest.approx(meta["std"])
    assert saved["classes"] == meta["classes"] and saved["arch"] == "cnn_tiny"
    x = hand_batch(tiny_task["task"], meta, n=6)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() < 1e-4


def test_export_falls_back_to_random_images_with_a_note(run):
    from mosaic.export import export

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["test"] = str(run / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    report = export(run, fmt="torchscript", batch=2, log=lines.append)
    assert report["checked_on"] == "2 random images"
    assert any(line.startswith("note: the run's test set cannot be read") for line in lines)


def test_missing_onnx_names_the_extra(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert main(["export", str(run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install mosaic-kd[export]" in err[0]
    assert not (run / "model.onnx").exists()


def test_folder_without_a_model_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model.safetensors" in err[0]


def test_export_beyond_tolerance_fails_and_leaves_no_file(run, monkeypatch, capsys):
    import mosaic.export as ex

    real = ex.to_torchscript
    monkeypatch.setattr(ex, "to_torchscript", lambda model, x, path, *, meta: real(model, x, path, meta=meta) + 0.5)
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from PyTorch by 0.5 (> tolerance 0.0001)" in err[0]
    assert not (run / "model.torchscript.pt").exists()
