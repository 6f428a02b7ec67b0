"""One-class CIFAR-10 with MKD: one class is normal, the other nine anomalous; ten runs, per-class and mean ROC-AUC.

    OMP_NUM_THREADS=1 python experiments/anomaly_cifar10.py            # writes experiments/results/anomaly-cifar10.*

1. The source network is a CIFAR-style classifier trained on the labelled Tiny-ImageNet validation archive
   resized to 32x32 (a weak, offline stand-in for ImageNet pre-training), with the existing command
   `mosaic train-teacher`; skipped when its run folder already holds model.safetensors.
2. For each CIFAR-10 class: a fresh cloner is fitted on that class's 5,000 training images by
   `mosaic anomaly fit ... normal_class=<k>` (an engine run of method=mkd, one run folder per class under
   --runs), then the 10,000 test images are scored; the source features of the test set are computed once
   and shared by the ten cloners. "loss first -> last" are the first and last logged losses (means over
   20 steps).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mosaic.anomaly.cli import fit_config  # noqa: E402
from mosaic.anomaly.mkd import build_mkd, load_mkd, score_images, source_targets  # noqa: E402
from mosaic.anomaly.roc import roc_auc  # noqa: E402
from mosaic.data import load_image_set  # noqa: E402
from mosaic.engine import train  # noqa: E402

PAPER_MEAN_AUROC = 87.18  # Salehi et al. 2021, CIFAR-10 one-class, ImageNet-pretrained VGG-16 source


def train_source(folder: Path, *, arch: str, epochs: int) -> dict:
    """Train the source on tiny-imagenet-val with `mosaic train-teacher` unless `folder` already has a model."""
    command = ["train-teacher", "train=tiny-imagenet-val", "test=tiny-imagenet-val", f"student.arch={arch}",
               f"epochs={epochs}", f"name={folder.name}", f"out_dir={folder.parent}", "cpu=true", "progress=false"]
    if not (folder / "model.safetensors").is_file():
        from mosaic.cli import main

        if main(command) != 0:
            raise SystemExit("training the source failed")
    results = json.loads((folder / "results.json").read_text())
    return {"command": "mosaic " + " ".join(command), "arch": results["student"], "epochs": epochs,
            "wall_s": results["wall_s"], "train_top1": results.get("student_top1")}


def fit_class(k: int, *, args: argparse.Namespace) -> tuple[Path, dict, list[float]]:
    """Fit a fresh cloner on normal class k with `mosaic anomaly fit`; returns its run folder, results and losses."""
    folder = Path(args.runs) / f"class-{k}"
    items = [f"source={args.source}", "data=cifar10", f"normal_class={k}", f"cloner={args.cloner}",
             f"layers={args.layers}", f"adapter={str(args.adapter).lower()}", f"lambda_dir={args.lambda_dir}",
             f"epochs={args.epochs}", f"batch_size={args.batch_size}", f"lr={args.lr}", f"seed={k}", "cpu=true",
             "progress=false", f"out={folder}", "overwrite=true"]
    results = train(fit_config(items))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return folder, results, [r["loss"] for r in records if "loss" in r]


def markdown(rows: list[dict], *, args: argparse.Namespace, source: dict, wall_s: float, command: str) -> str:
    """The results page: setup, per-class table, mean, and the gap to the paper."""
    mean = sum(r["auroc"] for r in rows) / len(rows)
    top1 = f"{100 * source['train_top1']:.1f}%" if source["train_top1"] is not None else "n/a"
    lines = [
        "# One-class CIFAR-10 with MKD (multi-resolution knowledge distillation)",
        "",
        f"Made by `{command}` on a CPU shared with other jobs (1 thread); anomaly part wall time "
        f"{wall_s / 60:.1f} min, source training {source['wall_s'] / 60:.1f} min (measured separately by the "
        "training run itself, `results.json`).",
        "",
        "Protocol: one class is normal; its 5,000 CIFAR-10 training images train the cloner; all 10,000 test "
        "images are scored (1,000 normal, 9,000 anomalous); score = per-image MKD loss; ROC-AUC in %.",
        "",
        f"- source: `{source['arch']}` trained {source['epochs']} epochs on the labelled Tiny-ImageNet validation "
        f"archive resized to 32x32 (`{source['command']}`); top-1 on its own training images {top1} (no held-out "
        "set). **This is a weak stand-in for ImageNet pre-training** (10k images instead of 1.28M, 32x32, a "
        "0.59M-parameter network, a few epochs on a CPU).",
        f"- cloner: `{args.cloner}`, randomly initialised; critical layers source `{args.layers}` paired by "
        f"spatial size; 1x1 adapters: {args.adapter}; lambda_dir {args.lambda_dir}; Adam lr {args.lr}, "
        f"batch {args.batch_size}, {args.epochs} epochs, no augmentation.",
        "",
        "| normal class | AUROC | cloner fit (s) | loss first -> last |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['class']} | {r['auroc']:.2f} | {r['fit_s']:.0f} | {r['loss_first']:.4f} -> "
                     f"{r['loss_last']:.4f} |")
    lines += [
        f"| **mean** | **{mean:.2f}** | | |",
        "",
        f"The paper reports {PAPER_MEAN_AUROC} mean AUROC on CIFAR-10 with an ImageNet-pretrained VGG-16 source "
        f"and a longer cloner schedule; this run is {PAPER_MEAN_AUROC - mean:.1f} points below it. The gap is "
        "expected and mostly the source: MKD only transfers what the source's features separate, and this "
        "source saw 10k small images for a few epochs. Far fewer cloner epochs, a small CNN cloner with 1x1 "
        f"adapters instead of a width-matched VGG cloner, and only the critical layers `{args.layers}` (the "
        "cloner has no deeper level to pair with the source's more semantic ones) add to it. The numbers show "
        "that the pipeline runs end to end, not what MKD reaches with a real pre-trained source.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="runs/anomaly-source-cnn_small", help="source run folder")
    parser.add_argument("--source-arch", default="cnn_small")
    parser.add_argument("--source-epochs", type=int, default=6)
    parser.add_argument("--cloner", default="cnn_tiny")
    parser.add_argument("--layers", default="layer1,layer2", help="source critical layers")
    parser.add_argument("--adapter", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lambda-dir", type=float, default=0.01)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--classes", type=int, nargs="*", default=list(range(10)), help="normal classes to run")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for anomaly-cifar10.{md,csv}")
    parser.add_argument("--runs", default="runs/anomaly-cifar10", help="parent of the per-class run folders")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python " + " ".join(["experiments/anomaly_cifar10.py", *sys.argv[1:]])
    torch.manual_seed(0)

    source = train_source(Path(args.source), arch=args.source_arch, epochs=args.source_epochs)
    t0 = time.time()
    train = load_image_set("cifar10", split="train", image_size=32)
    test = load_image_set("cifar10", split="test", image_size=32)
    pair = dict(cloner=args.cloner, layers=args.layers, adapter=args.adapter, lambda_dir=args.lambda_dir)
    shared = source_targets(build_mkd(args.source, **pair), test.images)  # the same frozen source for all runs
    rows = []
    for k in args.classes:
        folder, results, losses = fit_class(k, args=args)
        scores = score_images(load_mkd(folder), test.images, targets=shared)
        auroc = 100 * roc_auc(scores, test.labels != k)
        rows.append({"class": test.classes[k], "auroc": auroc, "fit_s": results["wall_s"],
                     "loss_first": losses[0], "loss_last": losses[-1],
                     "normal_train": int((train.labels == k).sum()), "test": len(test)})
        print(f"{test.classes[k]:12s} AUROC {auroc:6.2f}  (fit {results['wall_s']:.0f}s, "
              f"elapsed {time.time() - t0:.0f}s)", flush=True)
    wall = time.time() - t0
    mean = sum(r["auroc"] for r in rows) / len(rows)
    print(f"mean AUROC {mean:.2f} over {len(rows)} classes; anomaly part {wall:.0f}s, source {source['wall_s']:.0f}s")

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "anomaly-cifar10.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "auroc": round(r["auroc"], 2)} for r in rows)
    (out / "anomaly-cifar10.md").write_text(markdown(rows, args=args, source=source, wall_s=wall, command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
