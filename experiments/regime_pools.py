"""The regime map's cells as `mosaic inspect` sees them: mosaic/regime_cells.json, the evidence behind its advice.

For each measured cell (a teacher and a pool on which MosaicKD and KD on the pool were compared), this
trains or reuses the cell's teacher as its suite does, runs `mosaic inspect` on the cell's pool with the
CIFAR-10 test set beside it, and stores the statistics with the cell's measured winner, read from the
committed results CSVs: MosaicKD - KD in points for every seed both rows ran, in every CSV that holds the
cell's recipe (a re-made teacher's runs count as further pairs), their mean, and the winner (a mean of at least
half a point with every pair on the same side; otherwise a tie). An inspect folder already in --out
(runs/inspect-<suite>-<row>) is read, not made again; --reuse-stats takes the statistics from the cells file
instead (only the margins are re-read: for a new run of an existing cell's recipe).

    python experiments/regime_pools.py               # writes mosaic/regime_cells.json and results/regime-pools.md
    python experiments/regime_pools.py --out /tmp/r  # run folders (teachers, inspect output) elsewhere
    python experiments/regime_pools.py --reuse-stats # margins re-read, statistics kept from the cells file
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import suite as suite_lib  # noqa: E402
from mosaic.pool_stats import untaught  # noqa: E402

TIE = 0.5  # points: a smaller mean margin is a tie (seeds here spread by 0.1 to 2.4); KD is then the cheaper pick
STATS = ("pool_size", "num_classes", "counts", "rarest_share", "commonest_share", "rarest_ratio", "coverage_entropy",
         "mean_max_prob")


@dataclass(frozen=True)
class Source:
    """One committed comparison inside a cell: a results CSV and its MosaicKD and KD rows (paired by seed)."""
    results: str  # the CSV under experiments/results
    mosaic: str   # the MosaicKD row's method label
    kd: str       # the KD-on-the-pool row's method label
    seed: str = "0"  # the seed of a CSV without a seed column (older suites named seeds in the row label)


@dataclass(frozen=True)
class Cell:
    """A measured cell: a teacher, a pool and a budget, the suite row that gives the pool, and its comparisons.

    Each source adds one MosaicKD - KD margin per seed both of its rows ran; runs of the same recipe with a
    re-made teacher count as further pairs. The same pool at another budget is another cell.
    """
    name: str
    suite: str    # the suite whose teacher (and data) the cell uses
    row: str      # the row of that suite whose data.* overrides give the pool
    steps: int    # student steps of every run in the cell
    sources: tuple[Source, ...]


CELLS = (
    Cell("one-epoch teacher, 10k near pool, 600 steps", "regime-t1", "mosaic-10k", 600,
         (Source("cpu-small-600.csv", "mosaic", "kd_ood"),)),
    Cell("one-epoch teacher, 1k near pool, 400 steps", "regime-t1", "mosaic-1k", 400,
         (Source("regime-t1.csv", "mosaic-1k", "kd_ood-1k"), Source("regime-t1-ref.csv", "mosaic-1k", "kd_ood-1k"))),
    Cell("one-epoch teacher, 1k near pool, 1,000 steps", "regime-t1", "mosaic-1k", 1000,
         (Source("cpu-small-ood1k.csv", "mosaic", "kd_ood"),
          Source("cpu-small-ood1k.csv", "mosaic-s1", "kd_ood-s1", seed="1"))),
    Cell("one-epoch teacher, 1k far pool, 400 steps", "regime-t1", "mosaic-far", 400,
         (Source("regime-t1.csv", "mosaic-far", "kd_ood-far"),
          Source("regime-t1-ref.csv", "mosaic-far", "kd_ood-far"))),
    Cell("one-epoch teacher, 1k far pool, 1,000 steps", "regime-t1", "mosaic-far", 1000,
         (Source("regime-t1-far1000.csv", "mosaic-far", "kd_ood-far"),)),
    Cell("three-epoch teacher, 10k near pool, 1,000 steps", "regime-t3", "mosaic-10k", 1000,
         (Source("cpu-t3-full.csv", "mosaic", "kd_ood"),)),
    Cell("three-epoch teacher, 1k near pool, 1,000 steps", "regime-t3", "mosaic-1k", 1000,
         (Source("cpu-small-t3-ood1k.csv", "mosaic", "kd_ood"),
          Source("cpu-small-t3-ood1k.csv", "mosaic-s1", "kd_ood-s1", seed="1"))),
    Cell("three-epoch teacher, 1k near pool, 400 steps", "regime-t3", "mosaic-1k", 400,
         (Source("regime-t3.csv", "mosaic-1k", "kd_ood-1k"), Source("regime-t3-ref.csv", "mosaic-1k", "kd_ood-1k"))),
    Cell("three-epoch teacher, 1k far pool, 400 steps", "regime-t3", "mosaic-far", 400,
         (Source("regime-t3.csv", "mosaic-far", "kd_ood-far"),
          Source("regime-t3-ref.csv", "mosaic-far", "kd_ood-far"))),
    Cell("WRN-40-2 teacher (paper pair), 10k near pool, 1,440 steps", "cpu-wrn", "mosaic", 1440,
         (Source("cpu-wrn.csv", "mosaic", "kd_ood"),)),
    Cell("WRN-40-2 teacher (paper pair), 1k far pool, 720 steps", "cpu-wrn-far", "mosaic-far", 720,
         (Source("cpu-wrn-far.csv", "mosaic-far", "kd_ood-far"),)),
)


@dataclass(frozen=True)
class Pair:
    """One seed of one source: MosaicKD and KD on the same teacher, pool and budget."""
    results: str
    seed: str
    mosaic: float        # student top-1, points
    kd: float
    teacher_top1: float  # the teacher those runs distilled, as a fraction
    student: str = ""    # the student's and the teacher's architecture (the CSV's columns)
    teacher: str = ""

    @property
    def margin(self) -> float:
        """MosaicKD - KD in points."""
        return round(self.mosaic - self.kd, 2)


def pairs_of(source: Source, results: Path) -> list[Pair]:
    """The source's seed-paired runs from its committed CSV; a seed only one of the two rows ran is left out."""
    rows = suite_lib.read_rows(results / source.results)
    if not rows:
        raise SystemExit(f"no committed {results / source.results}")

    def by_seed(label: str) -> dict[str, dict]:
        return {r.get("seed", source.seed): r for r in rows if r["method"] == label}
    mosaic, kd = by_seed(source.mosaic), by_seed(source.kd)
    if not mosaic or not kd:
        raise SystemExit(f"{source.results} has no row {source.mosaic if not mosaic else source.kd}")
    return [Pair(source.results, seed, 100 * float(mosaic[seed]["student_top1"]), 100 * float(kd[seed]["student_top1"]),
                 float(mosaic[seed]["teacher_top1"]), mosaic[seed].get("student", ""), mosaic[seed].get("teacher", ""))
            for seed in sorted(set(mosaic) & set(kd), key=int)]


def measured(cell: Cell, results: Path) -> list[Pair]:
    """Every seed-paired MosaicKD / KD comparison of a cell, source by source."""
    return [pair for source in cell.sources for pair in pairs_of(source, results)]


def mean_margin(pairs: list[Pair]) -> float:
    """MosaicKD - KD in points, averaged over the pairs."""
    return round(sum(p.mosaic - p.kd for p in pairs) / len(pairs), 2)


def spread(pairs: list[Pair]) -> float | None:
    """Sample standard deviation (n-1) of the pairs' margins; None for a single pair."""
    if len(pairs) < 2:
        return None
    m = sum(p.margin for p in pairs) / len(pairs)
    return round((sum((p.margin - m) ** 2 for p in pairs) / (len(pairs) - 1)) ** 0.5, 2)


def winner_of(margins: list[float]) -> str:
    """mosaic or kd_ood when the mean margin is at least TIE points and every pair has the same sign; else tie."""
    mean = sum(margins) / len(margins)
    if mean >= TIE and all(m > 0 for m in margins):
        return "mosaic"
    if mean <= -TIE and all(m < 0 for m in margins):
        return "kd_ood"
    return "tie"


def glance_row(cell: Cell, pairs: list[Pair], winner: str) -> str:
    """The cell as one row of the at-a-glance table: teacher, student, pool, budget, both methods' means, margin."""
    teacher, pool, _ = cell.name.split(", ")
    top1 = " / ".join(f"{100 * t:.2f}" for t in sorted({p.teacher_top1 for p in pairs}))
    kd, mosaic = (round(sum(getattr(p, k) for p in pairs) / len(pairs), 2) for k in ("kd", "mosaic"))
    files = ", ".join(f"`{f}`" for f in dict.fromkeys(p.results for p in pairs))
    recipe = teacher.split()[0]  # "one-epoch" / "three-epoch" for the small teachers trained by their suites
    arch = f"{pairs[0].teacher}, {recipe}" if recipe.endswith("-epoch") else pairs[0].teacher
    return (f"| {arch} ({top1}) | {pairs[0].student} | {pool} | "
            f"{cell.steps:,} | {kd:.2f} | {mosaic:.2f} | {mean_margin(pairs):+.2f} | {len(pairs)} | {winner} | {files} |")


GLANCE_HEAD = ["| teacher (top-1) | student | pool | steps | KD on the pool | MosaicKD | margin | seed pairs | winner | "
               "CSV |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]


def describe(pairs: list[Pair]) -> str:
    """Where a cell's pairs come from: each CSV with its seeds."""
    files = dict.fromkeys(p.results for p in pairs)
    return "; ".join(f"{f} seed{'s' if sum(p.results == f for p in pairs) > 1 else ''} "
                     + ",".join(p.seed for p in pairs if p.results == f) for f in files)


def inspect_cell(cell: Cell, *, out_dir: Path) -> dict:
    """`mosaic inspect` of the cell's pool with its suite's teacher (trained first when missing)."""
    from mosaic.cli import _resolve
    from mosaic.inspect_pool import inspect_pool

    folder = out_dir / ("inspect-" + cell.suite + "-" + cell.row)
    if (folder / "inspect.json").exists():  # made earlier by this script: the statistics do not change
        return json.loads((folder / "inspect.json").read_text())
    name, spec = suite_lib.load_spec(cell.suite)
    data = suite_lib.suite_data(spec)
    teacher_dir, _ = suite_lib.ensure_teacher(name, spec, data, out_dir=out_dir)
    pool = {k: v for k, v in spec["methods"][cell.row].items() if k.startswith("data.")}
    items = {**data, **pool, "data.train": None, "teacher": str(teacher_dir / "model.safetensors"), "progress": False}
    return inspect_pool(_resolve(suite_lib.as_overrides(items)), folder)


def reused_stats(path: Path) -> dict[tuple[str, str], dict]:
    """Statistics and teacher top-1 of an earlier cells file, by (suite, row): the pool and teacher they describe."""
    if not path.is_file():
        return {}
    return {(c["suite"], c["row"]): c for c in json.loads(path.read_text())["cells"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="parent folder of teachers and inspect output (default: runs)")
    parser.add_argument("--results", default=str(HERE / "results"), help="the committed results CSVs")
    parser.add_argument("--cells", default=str(HERE.parent / "mosaic" / "regime_cells.json"))
    parser.add_argument("--reuse-stats", action="store_true",
                        help="take each pool's statistics from the cells file already there (same suite and row) "
                             "instead of running inspect: re-reads the margins only, no teacher is trained")
    args = parser.parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    earlier = reused_stats(Path(args.cells)) if args.reuse_stats else {}
    cells, lines = [], ["# The regime map's cells as `mosaic inspect` sees them", "",
                        "`python experiments/regime_pools.py` (writes mosaic/regime_cells.json, read by "
                        "`mosaic inspect`'s advice). Teachers retrained with their suites' recipes for the statistics "
                        + ("(kept from the cells file by --reuse-stats; `teacher here` is that retrained "
                           "teacher's top-1)" if args.reuse_stats else "(`teacher here`: their top-1)")
                        + "; `teacher then` is the top-1 of the teachers the comparisons were made with. A cell is won "
                        f"when the mean margin is at least {TIE} points and every seed pair has the same sign; "
                        "otherwise it is a tie.", "",
                        "| cell | winner | MosaicKD - KD | per pair | measured | pool | rarest ratio | untaught | "
                        "coverage | mean top p | teacher here | teacher then |",
                        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    glance = ["", "## At a glance", "", "Student top-1 (%), the mean over the cell's seed pairs; margin: MosaicKD - KD "
              "on the pool. The README's Results table is this one.", "", *GLANCE_HEAD]
    for cell in CELLS:
        pairs = measured(cell, results)
        if (cell.suite, cell.row) in earlier:
            before = earlier[(cell.suite, cell.row)]
            stats, here, pool = before["stats"], before["teacher_top1_here"], before["pool"]
        else:
            report = inspect_cell(cell, out_dir=out)
            stats, here, pool = {k: report[k] for k in STATS}, round(report["test"]["teacher_top1"], 4), report["pool"]
        margins = [p.margin for p in pairs]
        margin, winner, then = mean_margin(pairs), winner_of(margins), sorted({p.teacher_top1 for p in pairs})
        cells.append({"name": cell.name, "suite": cell.suite, "row": cell.row, "steps": cell.steps, "winner": winner,
                      "mosaic_minus_kd": margin, "margins": margins, "spread": spread(pairs),
                      "source": f"experiments/results: {describe(pairs)}", "pool": pool,
                      "teacher_top1_here": here, "teacher_top1_then": then, "stats": stats})
        lines.append(f"| {cell.name} | {winner} | {margin:+.2f} | {' / '.join(f'{m:+.2f}' for m in margins)} | "
                     f"{describe(pairs)} | {stats['pool_size']} | {stats['rarest_ratio']:.3f} | "
                     f"{len(untaught(stats['counts']))} | {stats['coverage_entropy']:.3f} | {stats['mean_max_prob']:.3f} | "
                     f"{100 * here:.2f} | {' / '.join(f'{100 * t:.2f}' for t in then)} |")
        glance.append(glance_row(cell, pairs, winner))
        print(lines[-1], flush=True)
    Path(args.cells).write_text(json.dumps({"made_by": "python experiments/regime_pools.py", "cells": cells},
                                           indent=1) + "\n")
    (results / "regime-pools.md").write_text("\n".join(lines + glance) + "\n")
    print(f"wrote {args.cells} and {results / 'regime-pools.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
