"""fp32 against mixed_precision=auto on the same suite rows, seeds and teacher: experiments/results/precision-cpu.*

    python experiments/precision.py                       # every study row, both precisions, missing runs only
    python experiments/precision.py --only fast-cpu-small --precisions auto
    python experiments/precision.py --collect             # tables from the run folders and committed rows

Each study row is one row of a committed suite (its data, teacher and options as the suite file says,
with the suite's pinned `mixed_precision: "no"` replaced by the precision under test). The suite's
teacher is trained in fp32 as the suite trains it and shared by both precisions; the `teacher-*` rows
train that teacher recipe itself in each precision. An fp32 run the suite's committed CSV already holds
(same row and seed) is taken from there, marked `committed <file>`, when this machine's fp32 teacher has
the committed teacher's top-1 (the same teacher); `--fresh` runs it instead. A run folder that holds a
results.json is reused, so the study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import suite as suite_lib  # noqa: E402  (experiments/ is no package)

COLUMNS = ["study", "method", "precision", "seed", "student_top1", "agreement", "teacher_top1", "steps", "wall_s",
           "resolved", "channels_last", "device", "source"]


@dataclass(frozen=True)
class Study:
    """One study row: a suite row (or the suite's teacher recipe when `row` is None) at these seeds."""
    name: str
    suite: str
    row: str | None
    seeds: tuple[int, ...]
    committed: tuple[str, ...] = ()  # CSVs in experiments/results holding this row's fp32 runs ("file@seed": a
                                     # CSV without a seed column made at that seed; without @: its seed column or 0)


STUDIES = [
    Study("mosaic-cpu-t3-full", "cpu-t3-full", "mosaic", (0, 1, 2), ("cpu-t3-full.csv",)),
    Study("kd_ood-cpu-t3-full", "cpu-t3-full", "kd_ood", (0, 1, 2), ("cpu-t3-full.csv",)),
    Study("mosaic-regime-t3-far", "regime-t3", "mosaic-far", (0, 1, 2), ("regime-t3.csv",)),
    Study("kd_ood-regime-t3-far", "regime-t3", "kd_ood-far", (0, 1, 2), ("regime-t3.csv",)),
    Study("fast-cpu-small", "cpu-small", "fast", (0, 1, 2), ("cpu-small.csv", "cpu-small-datafree-s1.csv@1")),
    Study("teacher-t3", "cpu-t3-full", None, (0,)),
]
PRECISIONS = ("no", "auto")


def folder_of(study: Study, precision: str, seed: int) -> str:
    return f"precision-{study.name}-{precision}-s{seed}"


def committed_rows(study: Study, results: Path) -> dict[int, dict]:
    """The fp32 runs of the study's row in its committed suite CSVs, by seed (a CSV without seeds: seed 0)."""
    found = {}
    for entry in study.committed:
        name, _, at = entry.partition("@")
        for r in suite_lib.read_rows(results / name):
            if r["method"] == study.row:
                seed = int(at or r.get("seed") or 0)
                found.setdefault(seed, {**r, "source": f"committed {name}"})
    return found


def row_from(study: Study, precision: str, seed: int, res: dict, source: str) -> dict:
    p = res.get("precision", {})
    return {"study": study.name, "method": study.row or "supervised teacher", "precision": precision, "seed": seed,
            "student_top1": res.get("student_top1"), "agreement": res.get("agreement"),
            "teacher_top1": res.get("teacher_top1"), "steps": res.get("steps"),
            "wall_s": round(res["wall_s"], 1) if res.get("wall_s") is not None else None,
            "resolved": p.get("mixed_precision", "no"), "channels_last": p.get("channels_last", ""),
            "device": res.get("device"), "source": source}


def run_one(study: Study, precision: str, seed: int, *, out_dir: Path, results: Path, fresh: bool,
            dry: bool) -> dict | None:
    """The study's run at (precision, seed): reused, taken from a committed CSV, or trained now (unless `dry`)."""
    from mosaic.cli import _resolve
    from mosaic.engine import train

    name, spec = suite_lib.load_spec(study.suite)
    data = suite_lib.suite_data(spec)
    folder = out_dir / folder_of(study, precision, seed)
    if study.row is None:  # the teacher recipe itself, at this precision
        if precision == "no":
            teacher_dir, _ = (suite_lib.ensure_teacher(name, spec, data, out_dir=out_dir) if not dry else
                              (out_dir / spec.get("teacher_run", f"{name}-teacher"), None))
            path = teacher_dir / "results.json"
            return row_from(study, precision, seed, json.loads(path.read_text()), f"run {teacher_dir.name}") \
                if path.exists() else None
        if not (folder / "results.json").exists():
            if dry:
                return None
            suite_lib.ensure_teacher(name, spec, data, out_dir=out_dir, run_name=folder.name,
                                     extra={"mixed_precision": precision, "channels_last": "auto", "seed": seed})
        return row_from(study, precision, seed, json.loads((folder / "results.json").read_text()),
                        f"run {folder.name}")
    if (folder / "results.json").exists():
        return row_from(study, precision, seed, json.loads((folder / "results.json").read_text()),
                        f"run {folder.name}")
    teacher_dir = out_dir / spec.get("teacher_run", f"{name}-teacher")
    if precision == "no" and not fresh and seed in committed_rows(study, results):
        old = committed_rows(study, results)[seed]
        if not dry:  # the same teacher: this machine's fp32 teacher has the committed teacher's top-1
            teacher_dir, _ = suite_lib.ensure_teacher(name, spec, data, out_dir=out_dir)
            here = json.loads((teacher_dir / "results.json").read_text())["student_top1"]
            if abs(float(old["teacher_top1"]) - here) > 1e-4:
                raise SystemExit(f"the fp32 teacher trained here has top-1 {here:.4f}, the committed "
                                 f"{old['source']} used {float(old['teacher_top1']):.4f}: run with --fresh")
        return {"study": study.name, "method": study.row, "precision": "no", "seed": seed,
                "student_top1": old["student_top1"], "agreement": old["agreement"],
                "teacher_top1": old["teacher_top1"], "steps": old["steps"], "wall_s": old["wall_s"],
                "resolved": "no", "channels_last": spec["common"].get("channels_last", ""), "device": old["device"],
                "source": old["source"]}
    if dry:
        return None
    teacher_dir, _ = suite_lib.ensure_teacher(name, spec, data, out_dir=out_dir)
    runs = {r.label: r for r in suite_lib.plan(name, spec, seeds=None)}
    run = runs[study.row]
    overrides = {**data, **spec.get("common", {}), "method": run.method, **run.overrides,
                 "mixed_precision": precision, "channels_last": "auto" if precision == "auto" else
                 spec["common"].get("channels_last", False), "seed": seed,
                 "teacher": str(teacher_dir / "model.safetensors"), "out_dir": str(out_dir),
                 "name": folder.name, "overwrite": True}
    print(f"[precision] {folder.name}: {' '.join(suite_lib.as_overrides(overrides))}", flush=True)
    res = train(_resolve(suite_lib.as_overrides(overrides)))
    return row_from(study, precision, seed, res, f"run {folder.name}")


def write(rows: list[dict], stem: Path) -> None:
    """precision-cpu.csv (one line per run) and .md (per study and precision: mean ± std, the difference)."""
    rank = {s.name: i for i, s in enumerate(STUDIES)}
    rows = sorted(rows, key=lambda r: (rank.get(r["study"], len(rank)), PRECISIONS.index(r["precision"])
                                       if r["precision"] in PRECISIONS else 9, int(r["seed"])))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# fp32 against mixed_precision=auto (2 CPU cores)", "",
             "Each study row is a committed suite row at the same seeds, teacher and options; `auto` resolves to",
             "bf16 autocast + channels-last on this CPU (see the `resolved` column of precision-cpu.csv). Top-1 in",
             "percent, mean ± sample std over the seeds; diff = auto - fp32; within = |diff| <= max(0.5, fp32 std,",
             "auto std). Wall time: mean seconds per run, a by-product and not a benchmark (runs may share the",
             "cores with other work; side-by-side speed ratios are in speed-cpu.md)."]
    if any(not str(r.get("source", "")).startswith("run ") for r in rows):
        lines.append("Rows whose `source` is a committed CSV were timed on an earlier machine of this kind.")
    lines += ["",
             "| study | fp32 top-1 | auto top-1 | diff | within | seeds | fp32 wall s | auto wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for study in STUDIES:
        got = {p: [r for r in rows if r["study"] == study.name and r["precision"] == p] for p in PRECISIONS}
        if not all(got.values()):
            continue
        stats = {p: suite_lib.mean_std([100 * float(r["student_top1"]) for r in got[p]]) for p in PRECISIONS}
        walls = {p: suite_lib.mean_std([float(r["wall_s"]) for r in got[p] if r["wall_s"] not in (None, "")])[0]
                 for p in PRECISIONS}
        diff = stats["auto"][0] - stats["no"][0]
        tol = max([0.5, *(s for _, s in stats.values() if s is not None)])
        seeds = sorted({int(r["seed"]) for p in PRECISIONS for r in got[p]})

        def fmt(ms):
            return f"{ms[0]:.2f}" + (f" ± {ms[1]:.2f}" if ms[1] is not None else "")
        lines.append(f"| {study.name} | {fmt(stats['no'])} | {fmt(stats['auto'])} | {diff:+.2f} | "
                     f"{'yes' if abs(diff) <= tol else 'NO'} | {','.join(map(str, seeds))} | "
                     f"{walls['no']:.0f} | {walls['auto']:.0f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[precision] wrote {stem}.csv and {stem}.md", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    parser.add_argument("--results", default=str(HERE / "results"), help="where precision-cpu.* go")
    parser.add_argument("--only", nargs="*", help="study rows to run (default: all)")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--fresh", action="store_true", help="run fp32 rows the committed CSVs already hold")
    parser.add_argument("--collect", action="store_true", help="train nothing: tables from what exists")
    args = parser.parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    known = {s.name for s in STUDIES}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown study rows {unknown}: choose from {sorted(known)}")
    rows, t0 = [], time.time()
    seeds = sorted({x for study in STUDIES for x in study.seeds})
    # seed 0 of every study row (both precisions) first, then seed 1...: a stopped study leaves pairs on every row
    order = [(study, seed, precision) for seed in seeds for study in STUDIES if seed in study.seeds
             for precision in PRECISIONS]
    # rows already in precision-cpu.csv stand for runs whose folders are gone (a new machine): nothing is lost
    prior = {(r["study"], r["precision"], int(r["seed"])): r
             for r in suite_lib.read_rows(results / "precision-cpu.csv")}
    for study, seed, precision in order:
        chosen = ((not args.only or study.name in args.only) and precision in args.precisions
                  and (args.seeds is None or seed in args.seeds))
        if (study.name, precision, seed) in prior and not (out / folder_of(study, precision, seed)).exists():
            row = prior[(study.name, precision, seed)]
        else:
            row = run_one(study, precision, seed, out_dir=out, results=results, fresh=args.fresh,
                          dry=args.collect or not chosen)
        if row is not None:
            rows.append(row)
            if not args.collect and chosen:
                write(rows, results / "precision-cpu")  # after every run: a kill loses nothing
    write(rows, results / "precision-cpu")
    print(f"[precision] {len(rows)} runs in the tables, {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
