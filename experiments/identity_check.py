"""Bit-identity check for refactors: short supervised, MosaicKD, kd_ood and DAFL runs on a synthetic task.

    python experiments/identity_check.py /tmp/ident            # one sha256 per run over the student's tensors
    python experiments/identity_check.py /tmp/ident --defaults-of f15308c

Run it on two commits (from each one's repository root) and compare the lines: a change that should not
change behaviour leaves every hash as it was. `--defaults-of f15308c` spells out the defaults that later
work changed on purpose (kd_ood's budget, DAFL's generator head), so the comparison is at equal defaults.
The hash covers every tensor's name, dtype, shape and bytes, in sorted order.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OLD_DEFAULTS = {"f15308c": {"kd_ood": {"kd_ood.student_steps": 1, "kd_ood.update_batches": 1},
                            "dafl": {"dafl.head": "sigmoid", "dafl.bn_eps": 1.0e-5}}}


def make_task(root: Path) -> None:
    """Three colour classes of 16x16 images (24 train, 12 test each) and 48 random 24x24 OOD images."""
    rng = np.random.default_rng(0)
    means = rng.integers(30, 226, size=(3, 3)).astype(float)
    for split, n in (("train", 24), ("test", 12)):
        for c in range(3):
            folder = root / "task" / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(means[c] + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    (root / "ood").mkdir(parents=True, exist_ok=True)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)).save(root / "ood" / f"{i:04d}.png")


def weights_hash(path: Path) -> str:
    """sha256 over a safetensors file's tensors (names, dtypes, shapes, bytes) in sorted order."""
    from safetensors.torch import load_file

    state, h = load_file(str(path)), hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a fresh folder for the data, the cache and the runs")
    p.add_argument("--defaults-of", choices=sorted(OLD_DEFAULTS), help="spell out an older commit's defaults")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ["MOSAIC_CACHE"] = str(args.out / "cache")
    make_task(args.out / "data")
    from mosaic.cli import TEACHER_BASE, _resolve
    from mosaic.engine import train

    data = args.out / "data"
    base = {"data.train": data / "task", "data.test": data / "task", "data.ood": data / "ood", "data.image_size": 16,
            "out_dir": args.out / "runs", "cpu": True, "progress": False, "batch_size": 8, "eval_batch_size": 64,
            "log_every": 1, "eval_every": 5, "sample_every": 0, "ckpt_every": 5, "data.cache": False}
    old = OLD_DEFAULTS.get(args.defaults_of, {})

    def run(name: str, base_cfg: dict | None = None, **extra) -> None:
        items = {**base, "name": name, **extra, **old.get(name, {})}
        cfg = _resolve([f"{k}={v}" for k, v in items.items()], base_cfg)
        res = train(cfg)
        print(f"{name:12s} top1={res.get('student_top1')} sha256="
              f"{weights_hash(args.out / 'runs' / name / 'model.safetensors')}", flush=True)

    run("supervised", TEACHER_BASE, **{"student.arch": "cnn_tiny", "epochs": "null", "steps": 20, "batch_size": 16})
    teacher = args.out / "runs" / "supervised" / "model.safetensors"
    for method in ("mosaic", "kd_ood", "dafl"):
        run(method, method=method, teacher=teacher, **{"student.arch": "cnn_tiny", "steps": 12})


if __name__ == "__main__":
    main()
