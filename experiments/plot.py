"""Plots next to a suite's table: student top-1 against steps per method, and each method's image samples.

    python experiments/plot.py cpu-small [--runs runs]
    -> experiments/results/<suite>-curves.png and <suite>-samples.png (needs the [plot] extra: matplotlib)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def curves(runs: Path, suite: str, labels: list[str]) -> dict[str, list[tuple[float, float]]]:
    """(fraction of the run's steps, student top-1) pairs per method from the runs' metrics.jsonl.

    Suites give every method the same budget in student updates, but a step holds a different
    number of updates per method, so curves are drawn against the fraction of the budget.
    """
    out = {}
    for label in labels:
        folder = runs / f"{suite}-{label}"
        if not (folder / "metrics.jsonl").exists():
            continue
        steps = yaml.safe_load((folder / "config.yaml").read_text())["steps"]
        points = [(r["step"] / steps, r["eval/student_top1"])
                  for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                  if "eval/student_top1" in r]
        if points:
            out[label] = points
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--runs", default="runs", help="parent folder of the run folders")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    spec = yaml.safe_load((HERE / "suites" / f"{args.suite}.yaml").read_text())
    from suite import labels_of
    labels = labels_of(spec)
    runs, results = Path(args.runs), HERE / "results"
    results.mkdir(exist_ok=True)

    data = curves(runs, args.suite, labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in data.items():
        steps, top1 = zip(*points)
        ax.plot(steps, [100 * t for t in top1], marker="o", label=label)
    ax.set_xlabel("fraction of the training budget (equal student updates)")
    ax.set_ylabel("student top-1 (%)")
    ax.set_title(args.suite)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / f"{args.suite}-curves.png", dpi=120)
    print(f"wrote {results / f'{args.suite}-curves.png'}")

    grids = [(label, runs / f"{args.suite}-{label}" / "samples" / "final.png") for label in labels]
    grids = [(label, p) for label, p in grids if p.exists()]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.3), squeeze=False)
        for ax, (label, path) in zip(axes[0], grids):
            ax.imshow(Image.open(path))
            ax.set_title(label)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(results / f"{args.suite}-samples.png", dpi=100)
        print(f"wrote {results / f'{args.suite}-samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
