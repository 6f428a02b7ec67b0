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


def curves(runs: Path, suite: str, labels: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, student top-1) pairs per method from the runs' metrics.jsonl."""
    out = {}
    for label in labels:
        path = runs / f"{suite}-{label}" / "metrics.jsonl"
        if not path.exists():
            continue
        points = [(r["step"], r["eval/student_top1"]) for r in map(json.loads, path.read_text().splitlines())
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
    labels = [(o or {}).get("label", m) for m, o in spec["methods"].items()]
    runs, results = Path(args.runs), HERE / "results"
    results.mkdir(exist_ok=True)

    data = curves(runs, args.suite, labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in data.items():
        steps, top1 = zip(*points)
        ax.plot(steps, [100 * t for t in top1], marker="o", label=label)
    ax.set_xlabel("step")
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
