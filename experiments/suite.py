"""Run a comparison suite: one teacher, then every method on the same student, seed and budget.

    python experiments/suite.py cpu-small            # writes experiments/results/cpu-small.{csv,md}
    python experiments/suite.py demo --out /tmp/x    # what `make demo` runs
    python experiments/suite.py cpu-small --only mosaic kd_ood

A suite is a YAML file in experiments/suites/: `teacher` (overrides for `mosaic
train-teacher`), `common` (overrides for every distillation run) and `methods`
(row name -> overrides; a `method` override runs that method under the row's name, `label`
renames a row, so one method can appear twice). The
teacher run (`teacher_run`, default `<suite>-teacher`) is reused when its model
already exists, so suites with the same teacher section can share it. `teacher_path:
../shared/teachers/NAME` (relative to the repository root) names a teacher trained once for
everyone instead: it is used in place and never trained here (the `teacher` section is then unused).

A row whose run folder holds checkpoints but no results.json (a killed run) resumes from its last
checkpoint; a finished row is run again from scratch.

Seeds: `seeds: [0, 1, 2]` at the top of a suite (a row may override it with its own
`seeds:`), or `--seeds N` on the command line (seeds 0..N-1 for every row, over the file),
runs each row once per seed into `<suite>-<row>-s<seed>` and writes one CSV line per run
(with a `seed` column) and a markdown table of each row's mean ± sample std (n-1) over its
seeds. The teacher is trained once, with its own seed. A suite without seeds keeps its
folder names `<suite>-<row>` and its one-line-per-row tables.

    python experiments/suite.py cpu-16px --seeds 3
    python experiments/suite.py path/to/suite.yaml --out /tmp/runs --results /tmp/tables
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COLUMNS = ["method", "student_top1", "agreement", "teacher_top1", "steps", "student_updates", "student_images", "wall_s",
           "device", "student", "teacher"]
SEED_COLUMNS = ["method", "seed", *COLUMNS[1:]]  # the CSV of a suite with seeds: one line per run
SPREAD = ("student_top1", "agreement")  # reported as mean ± std over seeds; the other numbers as means
PERCENT = ("student_top1", "agreement", "teacher_top1")


class SuiteError(ValueError):
    """A suite file or option that cannot be run as written."""


@dataclass
class Run:
    """One training run of a suite: a row (label, method, overrides) at one seed, in its own folder."""
    label: str
    method: str
    overrides: dict
    seed: int | None  # None: the row has no seeds (its config's own seed, folder without -s)
    folder: str


def load_spec(suite: str) -> tuple[str, dict]:
    """(name, spec) of a suite given by name (experiments/suites/<name>.yaml) or as a path to a YAML file."""
    path = Path(suite)
    if path.suffix not in (".yaml", ".yml"):
        path = HERE / "suites" / f"{suite}.yaml"
    if not path.is_file():
        raise SuiteError(f"no suite file {path}: give a name from experiments/suites/ or a path to a .yaml file")
    return path.stem, yaml.safe_load(path.read_text())


def check_seeds(seeds, *, where: str) -> list[int]:
    """A suite's seed list as ints, or one error line."""
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in seeds) or len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    return seeds


def plan(name: str, spec: dict, *, seeds: int | None = None) -> list[Run]:
    """Every run of a suite in order: one per row, or one per (row, seed) when seeds are set (`seeds`: 0..N-1)."""
    if seeds is not None and seeds < 1:
        raise SuiteError(f"--seeds must be at least 1, got {seeds}")
    top = spec.get("seeds")
    runs = []
    for method, overrides in spec["methods"].items():
        overrides = dict(overrides or {})
        label = overrides.pop("label", method)
        row_seeds = list(range(seeds)) if seeds is not None else overrides.pop("seeds", top)
        overrides.pop("seeds", None)
        if row_seeds is None:
            runs.append(Run(label, method, overrides, None, f"{name}-{label}"))
            continue
        row_seeds = check_seeds(row_seeds, where=f"suite {name}, row {label}")
        if "seed" in overrides:
            raise SuiteError(f"suite {name}, row {label} sets seed: {overrides['seed']}, which clashes with "
                             f"seeds {row_seeds}; drop its seed (or give the row seeds: [{overrides['seed']}])")
        runs += [Run(label, method, {**overrides, "seed": x}, x, f"{name}-{label}-s{x}") for x in row_seeds]
    return runs


def seeded(runs: list[Run]) -> bool:
    """True when a suite's runs carry seeds (tables: one CSV line per run, mean ± std per row)."""
    return any(r.seed is not None for r in runs)


def as_overrides(d: dict) -> list[str]:
    """A dict of config keys -> values as key=value override strings."""
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else ('null' if v is None else v)}"
            for k, v in d.items()]


def offline_data() -> bool:
    """True when the offline archives are reachable through the data root."""
    from mosaic.data import data_root
    root = data_root()
    return (root / "cifar10-jpeg.tar.gz").exists() or (root / "cifar10-jpeg").is_dir()


def run_suite(name: str, *, out_dir: Path, results_dir: Path | None, only: list[str] | None = None,
              seeds: int | None = None, only_seeds: list[int] | None = None) -> list[dict]:
    """Train (or reuse) the suite's teacher, run its rows (at each seed), write the tables; returns one row per run."""
    from mosaic.cli import _resolve
    from mosaic.engine import train

    name, spec = load_spec(name)
    runs = plan(name, spec, seeds=seeds)
    data = suite_data(spec)
    start = time.time()
    teacher_dir, teacher_s = ensure_teacher(name, spec, data, out_dir=out_dir)
    rows = []
    for run in runs:
        if (only and run.label not in only) or (only_seeds is not None and run.seed not in only_seeds):
            continue
        items = {**data, **spec.get("common", {}), "method": run.method, **run.overrides,
                 "teacher": str(teacher_dir / "model.safetensors"), "out_dir": str(out_dir),
                 "name": run.folder, **resume_items(out_dir / run.folder)}
        print(f"[suite] {run.folder}: {' '.join(as_overrides(items))}", flush=True)
        rows.append(row_of(run, train(_resolve(as_overrides(items)))))
    if results_dir is not None:
        footer = ""
        if only or only_seeds is not None:  # keep the committed rows not re-run, in the suite's order
            rows = merge_rows(read_rows(results_dir / f"{name}.csv"), rows, order=labels_of(spec))
        else:
            footer = whole_run_line(time.time() - start, teacher_s=teacher_s)
        write_tables(rows, results_dir / name, title=spec.get("title", name), note=spec.get("note", ""),
                     footer=footer, seeds=seeded(runs))
    return rows


def suite_data(spec: dict) -> dict:
    """The suite's data overrides; without the offline archives (and with internet), CIFAR-100 as the OOD pool."""
    data = dict(spec.get("data", {}))
    if not offline_data() and str(data.get("data.ood", "tiny-imagenet")).startswith("tiny-imagenet"):
        data.update({"data.ood": "cifar100", "data.download": True})
    return data


def ensure_teacher(name: str, spec: dict, data: dict, *, out_dir: Path, run_name: str | None = None,
                   extra: dict | None = None) -> tuple[Path, float | None]:
    """The suite's teacher folder (`teacher_run`, default `<suite>-teacher`), trained first when it has no model.

    Returns the folder and the training time (None when reused). `extra` overrides the teacher section.
    """
    from mosaic.cli import TEACHER_BASE, _resolve
    from mosaic.engine import train

    if spec.get("teacher_path") and run_name is None:  # a shared teacher, used in place and never retrained
        return shared_teacher(name, spec["teacher_path"]), None
    teacher_dir = out_dir / (run_name or spec.get("teacher_run", f"{name}-teacher"))  # suites may share a teacher
    if (teacher_dir / "model.safetensors").exists():
        return teacher_dir, None
    start = time.time()
    cfg = _resolve(as_overrides({**data, **spec["teacher"], **(extra or {}), "out_dir": str(out_dir),
                                 "name": teacher_dir.name, "overwrite": True}), TEACHER_BASE)
    train(cfg)
    seconds = time.time() - start
    print(f"[suite] teacher {teacher_dir.name} trained in {seconds:.0f}s", flush=True)
    return teacher_dir, seconds


def shared_teacher(name: str, path: str) -> Path:
    """The folder of a suite's `teacher_path` (relative to the repository root), checked before any run starts."""
    folder = Path(path) if Path(path).is_absolute() else HERE.parent / path
    if not (folder / "model.safetensors").is_file():
        raise SuiteError(f"suite {name}: teacher_path {path} has no model.safetensors ({folder.resolve()}); "
                         f"shared teachers live in ../shared/teachers beside the checkout (see its README)")
    return folder


def resume_items(folder: Path) -> dict:
    """Overrides that continue a killed run from its last checkpoint, or start the folder afresh."""
    from mosaic.engine.folder import checkpoints
    if not (folder / "results.json").exists() and checkpoints(folder):
        print(f"[suite] {folder.name}: unfinished, resuming from {checkpoints(folder)[-1].name}", flush=True)
        return {"resume": True}
    return {"overwrite": True}


def row_of(run: Run, res: dict) -> dict:
    """A table row (one CSV line) from a run's results."""
    row = {"method": run.label, **({"seed": run.seed} if run.seed is not None else {}),
           **{k: res.get(k) for k in COLUMNS if k != "method"}}
    row["wall_s"] = round(res["wall_s"], 1) if res.get("wall_s") is not None else None
    return row


def collect(name: str, *, out_dir: Path, results_dir: Path, seeds: int | None = None) -> list[dict]:
    """Rebuild a suite's tables from the results.json of its run folders (runs made in several processes)."""
    name, spec = load_spec(name)
    runs = plan(name, spec, seeds=seeds)
    # a run whose folder is gone (made on another machine) keeps its committed line
    committed = {(r["method"], str(r.get("seed", ""))): r for r in read_rows(results_dir / f"{name}.csv")}
    rows = []
    for run in runs:
        path = out_dir / run.folder / "results.json"
        old = committed.get((run.label, "" if run.seed is None else str(run.seed)))
        if path.exists():
            rows.append(row_of(run, json.loads(path.read_text())))
        elif old is not None:
            print(f"[suite] no {path}: the committed line kept", flush=True)
            rows.append(old)
        else:
            print(f"[suite] no {path}: row left out", flush=True)
    write_tables(rows, results_dir / name, title=spec.get("title", name), note=spec.get("note", ""),
                 seeds=seeded(runs))
    return rows


def whole_run_line(seconds: float, *, teacher_s: float | None) -> str:
    """The table's last line when every row ran in one process: the suite's wall-clock time."""
    m, s = divmod(round(seconds), 60)
    teacher = (f", of which {teacher_s:.0f} s training the teacher" if teacher_s is not None
               else ", teacher reused")
    return f"Whole suite in one run: {m} min {s} s wall{teacher}."


def labels_of(spec: dict) -> list[str]:
    """Row labels of a suite, in its order."""
    return [(o or {}).get("label", m) for m, o in spec["methods"].items()]


def read_rows(path: Path) -> list[dict]:
    """Rows of a committed results CSV ([] when there is none)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_rows(old: list[dict], new: list[dict], *, order: list[str]) -> list[dict]:
    """Old rows updated by new ones (same method label and seed), sorted in the suite's order, then by seed."""
    def key(r):
        return r["method"], str(r.get("seed", ""))
    by_key = {key(r): r for r in old}
    by_key.update({key(r): r for r in new})
    rank = {label: i for i, label in enumerate(order)}
    return sorted(by_key.values(), key=lambda r: (rank.get(r["method"], len(rank)),
                                                  int(r["seed"]) if r.get("seed") not in (None, "") else -1))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1) of values; std is None below two values, both None for none."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per method label (in first-seen order): the seeds it ran, (mean, std) of each number."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    out = []
    for label, group in groups.items():
        agg = {"method": label, "seeds": ",".join(str(r["seed"]) for r in group if r.get("seed") not in (None, ""))}
        for k in ("student_top1", "agreement", "teacher_top1", "wall_s"):
            agg[k] = mean_std([float(r[k]) for r in group if r.get(k) not in (None, "")])
        agg.update({k: group[0].get(k) for k in ("steps", "student_updates", "student_images", "device", "student",
                                                 "teacher")})
        out.append(agg)
    return out


def markdown(rows: list[dict], *, title: str = "", note: str = "", footer: str = "", seeds: bool = False) -> str:
    """The rows as a markdown table (accuracies in percent); with seeds, each method's mean ± std over its runs."""
    def fmt(key, v):
        if v is None or v == "":
            return "-"
        if isinstance(v, tuple):  # (mean, std) over seeds
            m, sd = (100 * x if x is not None and key in PERCENT else x for x in v)
            digits = 2 if key in PERCENT else 1
            if m is None:
                return "-"
            return f"{m:.{digits}f} ± {sd:.{digits}f}" if key in SPREAD and sd is not None else f"{m:.{digits}f}"
        if key in PERCENT:
            return f"{100 * float(v):.2f}"
        return str(v)
    columns = ["method", "seeds", *COLUMNS[1:]] if seeds else COLUMNS
    shown = aggregate(rows) if seeds else rows
    lines = [f"# {title}", ""] if title else []
    if note:
        lines += [note.strip(), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k in columns) + " |" for r in shown]
    if seeds:
        lines += ["", "student_top1 and agreement: mean ± sample standard deviation (n-1) over the seeds listed "
                      "(no ± for a single seed); teacher_top1 and wall_s: mean per run. One line per run, with "
                      "its seed, in the CSV."]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], stem: Path, *, title: str, note: str, footer: str = "",
                 seeds: bool = False) -> None:
    """Write <stem>.csv (one line per run) and <stem>.md (with seeds: mean ± std per method)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SEED_COLUMNS if seeds else COLUMNS)
        w.writeheader()
        w.writerows(rows)
    Path(f"{stem}.md").write_text(markdown(rows, title=title, note=note, footer=footer, seeds=seeds))
    print(f"[suite] wrote {stem}.csv and {stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="name of a file in experiments/suites/ (without .yaml), or a path to one")
    parser.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    parser.add_argument("--results", default=str(HERE / "results"),
                        help="where the tables go (default: experiments/results)")
    parser.add_argument("--no-tables", action="store_true", help="do not write <results>/<suite>.*")
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument("--seeds", type=int, help="run every row with seeds 0..N-1 (overrides the file's seeds)")
    parser.add_argument("--only-seeds", nargs="*", type=int, help="run only these seeds of the rows")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: rebuild the table from the run folders' results.json (runs whose "
                             "folder is gone keep their committed line)")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        name, spec = load_spec(args.suite)
        seeds = seeded(plan(name, spec, seeds=args.seeds))
        if args.collect:
            rows = collect(args.suite, out_dir=Path(args.out), results_dir=Path(args.results), seeds=args.seeds)
            print(markdown(rows, seeds=seeds))
            return 0
        rows = run_suite(args.suite, out_dir=Path(args.out), only=args.only, seeds=args.seeds,
                         only_seeds=args.only_seeds, results_dir=None if args.no_tables else Path(args.results))
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(markdown(rows, seeds=seeds))
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
