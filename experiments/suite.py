"""Run a comparison suite: one teacher, then every method on the same student, seed and budget.

    python experiments/suite.py cpu-small            # writes experiments/results/cpu-small.{csv,md}
    python experiments/suite.py demo --out /tmp/x    # what `make demo` runs
    python experiments/suite.py cpu-small --only mosaic kd_ood

A suite is a YAML file in experiments/suites/: `teacher` (overrides for `mosaic
train-teacher`), `common` (overrides for every distillation run) and `methods`
(row name -> overrides; a `method` override runs that method under the row's name, `label`
renames a row, so one method can appear twice). The
teacher run (`teacher_run`, default `<suite>-teacher`) is reused when its model
already exists, so suites with the same teacher section can share it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COLUMNS = ["method", "student_top1", "agreement", "teacher_top1", "steps", "wall_s", "device", "student", "teacher"]


def as_overrides(d: dict) -> list[str]:
    """A dict of config keys -> values as key=value override strings."""
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else ('null' if v is None else v)}"
            for k, v in d.items()]


def offline_data() -> bool:
    """True when the offline archives are reachable through the data root."""
    from mosaic.data import data_root
    root = data_root()
    return (root / "cifar10-jpeg.tar.gz").exists() or (root / "cifar10-jpeg").is_dir()


def run_suite(name: str, *, out_dir: Path, results_dir: Path | None, only: list[str] | None = None) -> list[dict]:
    """Train (or reuse) the suite's teacher, run its methods, write the tables; returns the rows."""
    from mosaic.cli import TEACHER_BASE, _resolve
    from mosaic.engine import train

    spec = yaml.safe_load((HERE / "suites" / f"{name}.yaml").read_text())
    data = dict(spec.get("data", {}))
    if not offline_data():  # with internet: torchvision CIFAR-10 in-domain, CIFAR-100 as OOD
        data.update({"data.ood": "cifar100", "data.download": True})
    teacher_dir = out_dir / spec.get("teacher_run", f"{name}-teacher")  # suites may share a teacher
    start = time.time()
    teacher_s = None
    if not (teacher_dir / "model.safetensors").exists():
        cfg = _resolve(as_overrides({**data, **spec["teacher"], "out_dir": str(out_dir), "name": teacher_dir.name,
                               "overwrite": True}), TEACHER_BASE)
        train(cfg)
        teacher_s = time.time() - start
        print(f"[suite] teacher trained in {teacher_s:.0f}s", flush=True)
    rows = []
    for method, overrides in spec["methods"].items():
        if only and method not in only:
            continue
        overrides = dict(overrides or {})
        label = overrides.pop("label", method)
        items = {**data, **spec.get("common", {}), "method": method, **(overrides or {}),
                 "teacher": str(teacher_dir / "model.safetensors"), "out_dir": str(out_dir),
                 "name": f"{name}-{label}", "overwrite": True}
        print(f"[suite] {label}: {' '.join(as_overrides(items))}", flush=True)
        res = train(_resolve(as_overrides(items)))
        rows.append({"method": label, **{k: res.get(k) for k in COLUMNS if k != "method"}})
        rows[-1]["wall_s"] = round(res["wall_s"], 1)
    if results_dir is not None:
        footer = ""
        if only:  # keep the committed rows of the methods not re-run, in the suite's order
            rows = merge_rows(read_rows(results_dir / f"{name}.csv"), rows, order=labels_of(spec))
        else:
            footer = whole_run_line(time.time() - start, teacher_s=teacher_s)
        write_tables(rows, results_dir / name, title=spec.get("title", name), note=spec.get("note", ""),
                     footer=footer)
    return rows


def collect(name: str, *, out_dir: Path, results_dir: Path) -> list[dict]:
    """Rebuild a suite's table from the results.json of its run folders (runs made in several processes)."""
    spec = yaml.safe_load((HERE / "suites" / f"{name}.yaml").read_text())
    rows = []
    for label in labels_of(spec):
        path = out_dir / f"{name}-{label}" / "results.json"
        if path.exists():
            res = json.loads(path.read_text())
            rows.append({"method": label, **{k: res.get(k) for k in COLUMNS if k != "method"}})
    write_tables(rows, results_dir / name, title=spec.get("title", name), note=spec.get("note", ""))
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
    """Old rows updated by new ones (same method label), sorted in the suite's order."""
    by_label = {r["method"]: r for r in old}
    by_label.update({r["method"]: r for r in new})
    rank = {label: i for i, label in enumerate(order)}
    return sorted(by_label.values(), key=lambda r: rank.get(r["method"], len(rank)))


def markdown(rows: list[dict], *, title: str = "", note: str = "", footer: str = "") -> str:
    """The rows as a markdown table (accuracies in percent)."""
    def fmt(key, v):
        if v is None or v == "":
            return "-"
        if key in ("student_top1", "agreement", "teacher_top1"):
            return f"{100 * float(v):.2f}"
        return str(v)
    lines = [f"# {title}", ""] if title else []
    if note:
        lines += [note.strip(), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], stem: Path, *, title: str, note: str, footer: str = "") -> None:
    """Write <stem>.csv and <stem>.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    Path(f"{stem}.md").write_text(markdown(rows, title=title, note=note, footer=footer))
    print(f"[suite] wrote {stem}.csv and {stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="name of a file in experiments/suites/ (without .yaml)")
    parser.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    parser.add_argument("--no-tables", action="store_true", help="do not write experiments/results/<suite>.*")
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: rebuild the table from the run folders' results.json")
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.collect:
        print(markdown(collect(args.suite, out_dir=Path(args.out), results_dir=HERE / "results")))
        return 0
    rows = run_suite(args.suite, out_dir=Path(args.out), only=args.only,
                     results_dir=None if args.no_tables else HERE / "results")
    print()
    print(markdown(rows))
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
