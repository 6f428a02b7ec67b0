"""Plots next to a suite's table: student top-1 against steps per method, and each method's image samples.

    python experiments/plot.py cpu-small [--runs runs] [--seeds N]
    -> experiments/results/<suite>-curves.png and <suite>-samples.png (needs the [plot] extra: matplotlib)

A suite with seeds (see suite.py) gets one curve per method: the mean over its seeds, with
a band from the lowest to the highest seed at each evaluation. A suite's `reference_curves` (label,
total iterations, [iteration, top-1] points) and `reference_lines` (label, top-1) are drawn in grey
for context: figures measured elsewhere, named as such in their labels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def curve(folder: Path) -> list[tuple[float, float]]:
    """(fraction of the run's steps, student top-1) pairs from a run folder's metrics.jsonl ([] without one).

    Suites give every method the same budget in student updates, but a step holds a different
    number of updates per method, so curves are drawn against the fraction of the budget.
    """
    if not (folder / "metrics.jsonl").exists():
        return []
    steps = yaml.safe_load((folder / "config.yaml").read_text())["steps"]
    return [(r["step"] / steps, r["eval/student_top1"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "eval/student_top1" in r]


def curves(runs: Path, plan) -> dict[str, list[list[tuple[float, float]]]]:
    """Per row label, the curves of its runs (one per seed) that have evaluations."""
    out: dict[str, list[list[tuple[float, float]]]] = {}
    for run in plan:
        points = curve(runs / run.folder)
        if points:
            out.setdefault(run.label, []).append(points)
    return out


def band(seed_curves: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, min, max) over the seeds' curves, at the x every curve has (a seed cut short drops later x)."""
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in seed_curves)))
    values = [[dict(c)[x] for c in seed_curves] for x in common]
    return common, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="name of a file in experiments/suites/ (without .yaml), or a path to one")
    parser.add_argument("--runs", default="runs", help="parent folder of the run folders")
    parser.add_argument("--seeds", type=int, help="the suite was run with --seeds N")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from suite import load_spec, plan
    name, spec = load_spec(args.suite)
    runs_plan = plan(name, spec, seeds=args.seeds)
    runs, results = Path(args.runs), HERE / "results"
    results.mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    several = False
    for label, seed_curves in curves(runs, runs_plan).items():
        x, mean, lo, hi = band(seed_curves)
        line, = ax.plot(x, [100 * t for t in mean], marker="o",
                        label=label if len(seed_curves) == 1 else f"{label} (mean of {len(seed_curves)} seeds)")
        if len(seed_curves) > 1:
            several = True
            ax.fill_between(x, [100 * t for t in lo], [100 * t for t in hi], color=line.get_color(), alpha=0.2)
    for ref in spec.get("reference_curves", []):  # points measured elsewhere, drawn for context only
        total = ref["total"]
        ax.plot([i / total for i, _ in ref["points"]], [t for _, t in ref["points"]], linestyle=":", marker="s",
                color="grey", label=ref["label"])
    for ref in spec.get("reference_lines", []):
        ax.axhline(ref["top1"], linestyle="--", linewidth=0.8, color="grey")
        ax.text(0.01, ref["top1"] + 0.3, ref["label"], transform=ax.get_yaxis_transform(), fontsize=7,
                color="dimgrey")  # x in axes fractions, y in top-1
    ax.set_xlabel("fraction of the training budget (equal student updates)")
    ax.set_ylabel("student top-1 (%)")
    ax.set_title(name + (" (band: lowest to highest seed)" if several else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(results / f"{name}-curves.png", dpi=120)
    print(f"wrote {results / f'{name}-curves.png'}")

    grids = {}  # one sample grid per row: its first seed's
    for run in runs_plan:
        path = runs / run.folder / "samples" / "final.png"
        if run.label not in grids and path.exists():
            grids[run.label] = path
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.3), squeeze=False)
        for ax, (label, path) in zip(axes[0], grids.items()):
            ax.imshow(Image.open(path))
            ax.set_title(label)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(results / f"{name}-samples.png", dpi=100)
        print(f"wrote {results / f'{name}-samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
