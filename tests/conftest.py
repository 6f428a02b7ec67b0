"""Shared fixtures: a tiny synthetic in-domain task, an OOD folder and a quickly trained teacher."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The suite's networks and images are tiny: one thread beats two (and avoids oversubscription).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_images(folder: Path, n: int, *, size: int, rng: np.random.Generator, mean: np.ndarray | None = None,
                 channels: int = 3, fmt: str = "png") -> None:
    """Write n random images (around `mean` when given) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if mean is None:
            arr = rng.integers(0, 256, size=(size, size, channels))
        else:
            arr = np.clip(mean + rng.normal(0, 40, size=(size, size, channels)), 0, 255)
        arr = arr.astype(np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode="L" if channels == 1 else "RGB")
        img.save(folder / f"{i:04d}.{fmt}")


def make_task(root: Path, *, classes: int = 3, train: int = 24, test: int = 12, ood: int = 48, size: int = 16,
              seed: int = 0, channels: int = 3) -> dict[str, Path]:
    """A labelled train/test ImageFolder whose classes differ in colour (or grey level), plus a flat OOD folder."""
    rng = np.random.default_rng(seed)
    means = rng.integers(30, 226, size=(classes, channels)).astype(float)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            write_images(root / "task" / split / f"class_{c}", n, size=size, rng=rng, mean=means[c],
                         channels=channels)
    write_images(root / "ood", ood, size=size + 8, rng=rng, channels=channels)  # other size: resized on load
    return {"task": root / "task", "ood": root / "ood"}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the decode cache out of the user's home."""
    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, Path]:
    return make_task(tmp_path_factory.mktemp("data"))


def base_overrides(task: dict[str, Path], out_dir: Path, **extra) -> list[str]:
    """Overrides for a fast CPU run on the tiny task."""
    items = {
        "data.train": str(task["task"]), "data.test": str(task["task"]), "data.ood": str(task["ood"]),
        "data.image_size": 16, "out_dir": str(out_dir), "cpu": True, "progress": False,
        "batch_size": 8, "eval_batch_size": 64, "log_every": 1, "eval_every": 0, "sample_every": 0,
        "ckpt_every": 0, "data.cache": False,
        "mixed_precision": "no",  # the same numbers on every CPU; tests/test_precision.py covers bf16 and auto
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_task, tmp_path_factory) -> Path:
    """A cnn_tiny teacher trained for a few steps on the tiny task; returns its model.safetensors."""
    from mosaic.cli import TEACHER_BASE, _resolve
    from mosaic.engine import train

    out = tmp_path_factory.mktemp("runs")
    os.environ.setdefault("MOSAIC_CACHE", str(out / "cache"))
    cfg = _resolve(base_overrides(tiny_task, out, name="teacher", **{"student.arch": "cnn_tiny", "epochs": "null",
                                                                        "steps": 40, "batch_size": 16}),
                   TEACHER_BASE)
    results = train(cfg)
    assert results["student_top1"] > 0.6, results  # colour classes are easy
    return out / "teacher" / "model.safetensors"


def train_killed_at(monkeypatch, method_cls, step: int, cfg: dict) -> None:
    """Run `cfg` until `method_cls.step` is called for `step`, where a simulated kill (KeyboardInterrupt) stops it."""
    from mosaic.engine import train

    real_step = method_cls.step

    def dying_step(self, batch, i):
        if i == step:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, batch, i)

    monkeypatch.setattr(method_cls, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(method_cls, "step", real_step)
