"""The regime map's cells as `mosaic inspect` sees them: mosaic/regime_cells.json, the evidence behind its advice.

For each measured cell (a teacher and a pool on which MosaicKD and KD on the pool were compared), this
trains or reuses the cell's teacher as its suite does, runs `mosaic inspect` on the cell's pool with the
CIFAR-10 test set beside it, and stores the statistics with the cell's measured winner, read from the
committed results CSVs (MosaicKD - KD in points, mean over the seeds the CSV holds for both rows). An
inspect folder already in --out (runs/inspect-<suite>-<row>) is read, not made again.

    python experiments/regime_pools.py               # writes mosaic/regime_cells.json and results/regime-pools.md
    python experiments/regime_pools.py --out /tmp/r  # run folders (teachers, inspect output) elsewhere
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

TIE = 0.5  # points: a smaller margin is a tie (seeds of these recipes spread by 0.1 to 0.8), KD then is the cheaper pick
STATS = ("pool_size", "num_classes", "counts", "rarest_share", "commonest_share", "rarest_ratio", "coverage_entropy",
         "mean_max_prob")


@dataclass(frozen=True)
class Cell:
    """A measured cell: the suite and row whose teacher and pool it uses, and where its winner was measured."""
    name: str
    suite: str                # the suite whose teacher (and data) the cell uses
    row: str                  # the row of that suite whose data.* overrides give the pool
    results: str              # committed CSV holding the comparison
    mosaic_rows: tuple[str, ...]
    kd_rows: tuple[str, ...]
    note: str


CELLS = (
    Cell("one-epoch teacher, 10k near pool", "regime-t1", "mosaic-10k", "cpu-small-600.csv", ("mosaic",),
         ("kd_ood",), "600 steps, seed 0"),
    Cell("one-epoch teacher, 1k near pool", "regime-t1", "mosaic-1k", "regime-t1.csv", ("mosaic-1k",),
         ("kd_ood-1k",), "400 steps, seed 0"),
    Cell("one-epoch teacher, 1k far pool", "regime-t1", "mosaic-far", "regime-t1.csv", ("mosaic-far",),
         ("kd_ood-far",), "400 steps, seed 0"),
    Cell("three-epoch teacher, 10k near pool", "regime-t3", "mosaic-10k", "cpu-t3-full.csv", ("mosaic",),
         ("kd_ood",), "1,000 steps, seeds 0-2"),
    Cell("three-epoch teacher, 1k near pool", "regime-t3", "mosaic-1k", "cpu-small-t3-ood1k.csv",
         ("mosaic", "mosaic-s1"), ("kd_ood", "kd_ood-s1"), "1,000 steps, seeds 0-1"),
    Cell("three-epoch teacher, 1k far pool", "regime-t3", "mosaic-far", "regime-t3.csv", ("mosaic-far",),
         ("kd_ood-far",), "400 steps, seed 0"),
    Cell("WRN-40-2 teacher (paper pair), 10k near pool", "cpu-wrn", "mosaic", "cpu-wrn.csv", ("mosaic",),
         ("kd_ood",), "1,440 steps at 64 + 64, seeds {seeds}"),
)


def measured(cell: Cell, results: Path) -> tuple[float, float]:
    """(MosaicKD - KD in points, the teacher top-1 of those runs) from the cell's committed CSV.

    With a seed column, only the seeds both rows have count (a comparison stopped half-way stays paired).
    """
    rows = suite_lib.read_rows(results / cell.results)
    if not rows:
        raise SystemExit(f"no committed {results / cell.results}")
    if "seed" in rows[0]:
        rows = [r for r in rows if r["seed"] in set(paired_seeds(cell, rows))]

    def mean(labels):
        vals = [float(r["student_top1"]) for r in rows if r["method"] in labels]
        if not vals:
            raise SystemExit(f"{cell.results} has no rows {labels}")
        return 100 * sum(vals) / len(vals)
    teacher = next(float(r["teacher_top1"]) for r in rows if r["method"] in cell.mosaic_rows)
    return round(mean(cell.mosaic_rows) - mean(cell.kd_rows), 2), teacher


def winner_of(margin: float) -> str:
    """mosaic, kd_ood, or tie when MosaicKD - KD is within TIE points."""
    return "mosaic" if margin >= TIE else "kd_ood" if margin <= -TIE else "tie"


def paired_seeds(cell: Cell, rows: list[dict]) -> list[str]:
    """The seeds at which both the MosaicKD and the KD rows of a cell were run."""
    def seeds(labels):
        return {r["seed"] for r in rows if r["method"] in labels}
    return sorted(seeds(cell.mosaic_rows) & seeds(cell.kd_rows), key=int)


def note_of(cell: Cell, results: Path) -> str:
    """The cell's note, with the seeds the comparison holds filled in."""
    rows = suite_lib.read_rows(results / cell.results)
    return cell.note.format(seeds=",".join(paired_seeds(cell, rows)) if rows and "seed" in rows[0] else "")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="parent folder of teachers and inspect output (default: runs)")
    parser.add_argument("--results", default=str(HERE / "results"), help="the committed results CSVs")
    parser.add_argument("--cells", default=str(HERE.parent / "mosaic" / "regime_cells.json"))
    args = parser.parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    cells, lines = [], ["# The regime map's cells as `mosaic inspect` sees them", "",
                        "`python experiments/regime_pools.py` (writes mosaic/regime_cells.json, read by "
                        "`mosaic inspect`'s advice). Teachers retrained here with their suites' recipes; "
                        "`teacher then` is the top-1 of the teacher the comparison was made with.", "",
                        "| cell | winner | MosaicKD - KD | measured | pool | rarest ratio | coverage | mean top p | "
                        "teacher here | teacher then |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for cell in CELLS:
        margin, teacher_then = measured(cell, results)
        report = inspect_cell(cell, out_dir=out)
        stats = {k: report[k] for k in STATS}
        here = report["test"]["teacher_top1"]
        winner, note = winner_of(margin), note_of(cell, results)
        cells.append({"name": cell.name, "winner": winner, "mosaic_minus_kd": margin,
                      "source": f"experiments/results/{cell.results} ({note})", "pool": report["pool"],
                      "teacher_top1_here": round(here, 4), "teacher_top1_then": teacher_then, "stats": stats})
        lines.append(f"| {cell.name} | {winner} | {margin:+.2f} | {cell.results}, {note} | "
                     f"{stats['pool_size']} | "
                     f"{stats['rarest_ratio']:.3f} | {stats['coverage_entropy']:.3f} | {stats['mean_max_prob']:.3f} | "
                     f"{100 * here:.2f} | {100 * teacher_then:.2f} |")
        print(lines[-1], flush=True)
    Path(args.cells).write_text(json.dumps({"made_by": "python experiments/regime_pools.py", "cells": cells},
                                           indent=1) + "\n")
    (results / "regime-pools.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.cells} and {results / 'regime-pools.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
