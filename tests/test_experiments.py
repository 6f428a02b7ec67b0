"""Experiment configs and suites stay valid as the code changes."""
import csv
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mosaic.cli import TEACHER_BASE, _resolve

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))
from suite import as_overrides as items, labels_of  # noqa: E402


@pytest.mark.parametrize("path", sorted((EXP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_resolve(path):
    cfg = _resolve([str(path)])
    assert cfg["steps"] > 0 and cfg["method"] in cfg


@pytest.mark.parametrize("path", sorted((EXP / "suites").glob("*.yaml")), ids=lambda p: p.name)
def test_suites_resolve(path):
    from suite import plan

    spec = yaml.safe_load(path.read_text())
    _resolve(items({**spec.get("data", {}), **spec.get("teacher", {})}), TEACHER_BASE)
    for run in plan(path.stem, spec):
        cfg = _resolve(items({**spec.get("data", {}), **spec.get("common", {}), "method": run.method,
                              **run.overrides}))
        assert cfg["method"] == run.overrides.get("method", run.method)  # a row may run a method under its own name
        if run.seed is not None:
            assert cfg["seed"] == run.seed


def test_suite_table_ends_with_the_whole_run_time():
    from suite import markdown, whole_run_line

    assert whole_run_line(125.4, teacher_s=None) == "Whole suite in one run: 2 min 5 s wall, teacher reused."
    assert whole_run_line(3600, teacher_s=61.6) == ("Whole suite in one run: 60 min 0 s wall, "
                                                   "of which 62 s training the teacher.")
    rows = [{"method": "kd_ood", "student_top1": 0.5254, "agreement": 0.7144, "teacher_top1": 0.6397}]
    text = markdown(rows, title="t", footer=whole_run_line(61, teacher_s=None))
    lines = text.strip().splitlines()
    assert lines[-3].startswith("| kd_ood | 52.54 | 71.44 | 63.97 |")
    assert lines[-1] == "Whole suite in one run: 1 min 1 s wall, teacher reused."
    assert "Whole suite" not in markdown(rows, title="t")


# ----------------------------------------------------------------------------- seeds in suites

def tiny_suite(folder: Path, task: dict, teacher: Path, **extra) -> Path:
    """A one-row suite on the tiny task (supervised: its top-1 moves with the seed at 3 steps), its teacher a copy
    of the tiny trained run; returns the YAML path."""
    shutil.copytree(teacher.parent, folder / "runs" / "tiny-teacher")
    spec = {"teacher_run": "tiny-teacher",
            "data": {"data.train": str(task["task"]), "data.test": str(task["task"]), "data.ood": str(task["ood"]),
                     "data.image_size": 16, "data.cache": False},
            "teacher": {"student.arch": "cnn_tiny"},
            "common": {"student.arch": "cnn_tiny", "steps": 3, "batch_size": 8, "eval_batch_size": 64, "cpu": True,
                       "progress": False, "log_every": 1, "eval_every": 0, "sample_every": 0, "ckpt_every": 0},
            "methods": {"supervised": None}, **extra}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_three_seeds_give_three_runs_and_their_mean_and_sample_std(tiny_task, tiny_teacher, tmp_path):
    from suite import run_suite

    path = tiny_suite(tmp_path, tiny_task, tiny_teacher, seeds=[0, 1, 2])
    runs, tables = tmp_path / "runs", tmp_path / "tables"
    run_suite(str(path), out_dir=runs, results_dir=tables)
    assert sorted(p.name for p in runs.iterdir()) == ["tiny-supervised-s0", "tiny-supervised-s1",
                                                       "tiny-supervised-s2", "tiny-teacher"]
    top1 = []
    for seed in (0, 1, 2):
        assert yaml.safe_load((runs / f"tiny-supervised-s{seed}" / "config.yaml").read_text())["seed"] == seed
        top1.append(json.loads((runs / f"tiny-supervised-s{seed}" / "results.json").read_text())["student_top1"])
    assert len(set(top1)) > 1  # the seeds differ, so the std below is not trivially 0
    mean = (top1[0] + top1[1] + top1[2]) / 3
    std = (((top1[0] - mean) ** 2 + (top1[1] - mean) ** 2 + (top1[2] - mean) ** 2) / 2) ** 0.5  # n-1
    md = (tables / "tiny.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| supervised |"))
    assert row.startswith(f"| supervised | 0,1,2 | {100 * mean:.2f} ± {100 * std:.2f} |")
    assert "sample standard deviation (n-1)" in md
    with open(tables / "tiny.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in lines] == [("supervised", "0"), ("supervised", "1"),
                                                         ("supervised", "2")]
    assert [float(r["student_top1"]) for r in lines] == top1

    # --collect rebuilds the same tables from the run folders (less the whole-run line)
    from suite import main
    assert main([str(path), "--collect", "--out", str(runs), "--results", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tiny.csv").read_text() == (tables / "tiny.csv").read_text()
    assert (tmp_path / "again" / "tiny.md").read_text() == md[:md.index("\n\nWhole suite")] + "\n"

    # --seeds 2 overrides the file's three seeds
    assert main([str(path), "--collect", "--seeds", "2", "--out", str(runs), "--results", str(tmp_path / "two")]) == 0
    with open(tmp_path / "two" / "tiny.csv", newline="") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]
    mean2 = (top1[0] + top1[1]) / 2
    std2 = (((top1[0] - mean2) ** 2 + (top1[1] - mean2) ** 2) / 1) ** 0.5
    assert f"| supervised | 0,1 | {100 * mean2:.2f} ± {100 * std2:.2f} |" in (tmp_path / "two" / "tiny.md").read_text()

    # on another machine the run folders are gone: --collect keeps their committed lines, it does not drop them
    shutil.rmtree(runs / "tiny-supervised-s1")
    assert main([str(path), "--collect", "--out", str(runs), "--results", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tiny.csv").read_text() == (tables / "tiny.csv").read_text()

    # --only-seeds runs just those seeds and merges them into the committed table
    from suite import run_suite as run_again
    run_again(str(path), out_dir=runs, results_dir=tmp_path / "again", only_seeds=[1])
    assert (runs / "tiny-supervised-s1" / "results.json").exists()
    with open(tmp_path / "again" / "tiny.csv", newline="") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_suite_teacher_path_is_used_in_place_and_a_killed_row_resumes(tiny_task, tiny_teacher, tmp_path):
    from suite import SuiteError, run_suite

    path = tiny_suite(tmp_path, tiny_task, tiny_teacher, teacher_path=str(tiny_teacher.parent))
    spec = yaml.safe_load(path.read_text())
    spec["common"]["ckpt_every"] = 2
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "out"
    first = run_suite(str(path), out_dir=runs, results_dir=None)
    assert sorted(p.name for p in runs.iterdir()) == ["tiny-supervised"]  # no teacher trained or copied
    cfg = yaml.safe_load((runs / "tiny-supervised" / "config.yaml").read_text())
    assert Path(cfg["teacher"]["checkpoint"]) == tiny_teacher
    # a killed row: checkpoints, no results.json -> resumed from step 3 (the last checkpoint), not started over
    (runs / "tiny-supervised" / "results.json").unlink()
    again = run_suite(str(path), out_dir=runs, results_dir=None)
    res = json.loads((runs / "tiny-supervised" / "results.json").read_text())
    assert res["resumes"] == 1 and again[0]["student_top1"] == first[0]["student_top1"]
    run_suite(str(path), out_dir=runs, results_dir=None)  # a finished row runs again from scratch
    assert json.loads((runs / "tiny-supervised" / "results.json").read_text())["resumes"] == 0

    spec["teacher_path"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match="teacher_path .*nowhere has no model.safetensors.*shared/teachers"):
        run_suite(str(path), out_dir=runs, results_dir=None)


def test_seed_options_name_the_run_folders():
    from suite import SuiteError, load_spec, plan, seeded

    name, spec = load_spec("cpu-16px-ood1k")  # seed-less, with hand-made -s1 rows: folder names as before
    assert [r.folder for r in plan(name, spec)] == ["cpu-16px-ood1k-mosaic", "cpu-16px-ood1k-mosaic_ref",
                                                    "cpu-16px-ood1k-kd_ood", "cpu-16px-ood1k-mosaic-s1",
                                                    "cpu-16px-ood1k-kd_ood-s1"]
    assert [r.seed for r in plan(name, spec)] == [None] * 5
    for path in sorted((EXP / "suites").glob("*.yaml")):  # every seed-less committed suite keeps <suite>-<label>
        name, spec = load_spec(str(path))
        if seeded(plan(name, spec)):
            continue
        assert [r.folder for r in plan(name, spec)] == [f"{name}-{label}" for label in labels_of(spec)]

    spec = {"seeds": [0, 1, 2], "methods": {"mosaic": None, "kd": {"method": "kd_ood", "seeds": [7]}}}
    assert [(r.folder, r.overrides.get("seed")) for r in plan("x", spec)] == [
        ("x-mosaic-s0", 0), ("x-mosaic-s1", 1), ("x-mosaic-s2", 2), ("x-kd-s7", 7)]  # a row overrides the file
    assert [r.folder for r in plan("x", spec, seeds=2)] == ["x-mosaic-s0", "x-mosaic-s1", "x-kd-s0", "x-kd-s1"]
    with pytest.raises(SuiteError, match="clashes"):
        plan("x", {"seeds": [0, 1], "methods": {"kd": {"seed": 1}}})
    with pytest.raises(SuiteError, match="distinct integers"):
        plan("x", {"seeds": [0, 0], "methods": {"kd": None}})


def test_seed_band_is_mean_min_max_at_shared_steps():
    from plot import band

    x, mean, lo, hi = band([[(0.5, 0.40), (1.0, 0.60)], [(0.5, 0.50), (1.0, 0.80)], [(0.5, 0.30), (1.0, 0.70)]])
    assert x == [0.5, 1.0] and lo == [0.30, 0.60] and hi == [0.50, 0.80]
    assert mean == pytest.approx([0.40, 0.70])
    assert band([[(0.5, 0.4), (1.0, 0.6)], [(1.0, 0.8)]])[:2] == ([1.0], [pytest.approx(0.7)])


def test_committed_cpu_suites_pin_the_precision_they_were_made_in():
    """Tables made in fp32 before mixed_precision=auto re-run as made; the demo runs the defaults."""
    made_with_auto = {"cpu-wrn", "cpu-wrn-probe", "cpu-wrn-far"}  # suites first run after issue 23: no pin
    for path in sorted((EXP / "suites").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if path.stem in made_with_auto:
            assert "mixed_precision" not in spec["common"], path.name
            continue
        if path.stem.startswith(("cpu-", "regime-")):
            for section in ("teacher", "common"):
                assert spec[section]["mixed_precision"] == "no", (path.name, section)
                assert spec[section]["channels_last"] in (True, False), (path.name, section)
    demo = yaml.safe_load((EXP / "suites" / "demo.yaml").read_text())
    assert "mixed_precision" not in demo["teacher"] and "mixed_precision" not in demo["common"]
    assert demo["teacher_run"] != "demo-teacher"  # the fp32 suites' shared teacher keeps its folder


def test_bench_speed_variants_resolve_their_own_precision(tmp_path):
    import bench_speed
    out = tmp_path / "speed.md"
    bench_speed.main(["--teacher", "cnn_tiny", "--student", "cnn_tiny", "--batch", "4", "--image-size", "16",
                      "--ngf", "8", "--ndf", "8", "--reps", "1", "--warmup", "0", "--set", "mosaic.patch_size=8",
                      "--set", "mixed_precision=bf16", "--variant", "fp32: mixed_precision=no channels_last=false",
                      "--out", str(out)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["reference"][0] == "fp32, contiguous"
    assert rows["ours"][0] == "bf16, channels-last convnets"
    assert rows["fp32"][0] == "fp32, contiguous"
    assert "fp32: precision: fp32 (mixed_precision=no: set explicitly)" in out.read_text()


def test_synthesis_cost_times_each_precision(tmp_path):
    import synthesis_cost
    out = tmp_path / "cost.md"
    synthesis_cost.main(["--teacher", "", "--arch", "cnn_tiny", "--batches", "1", "--batch", "4", "--size", "16",
                         "--set", "deepinversion.di_iters=2", "--set", "cmi.g_steps=2", "--set", "fast.g_steps=2",
                         "--set", "cmi.ngf=8", "--set", "fast.ngf=8", "--set", "nayer.g_steps=2", "--set",
                         "nayer.ngf=8", "--set", "nayer.nz=16", "--precisions", "no", "bf16", "--out", str(out)])
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in table]
    assert [(c[0], c[1]) for c in cells] == [
        (m, p) for m in ("deepinversion", "cmi", "fast", "nayer") for p in ("no -> fp32", "bf16 -> bf16")]
    for c in cells:  # s per 1,000 images = s per synthesis / images per synthesis (NAYER: 2 rounds of 4)
        per_synthesis, per_1k = float(c[3]), float(c[4])
        assert per_1k == pytest.approx(per_synthesis / (8 if c[0] == "nayer" else 4) * 1000, rel=0.05, abs=1.5)


def test_precision_study_rows_and_table(tmp_path):
    import precision
    study = precision.Study("kd-x", "cpu-t3-full", "kd_ood", (0, 1), ("x.csv", "y.csv@1"))
    (tmp_path / "x.csv").write_text("method,seed,student_top1,teacher_top1\nkd_ood,0,0.5,0.7\nmosaic,0,0.4,0.7\n")
    (tmp_path / "y.csv").write_text("method,student_top1,teacher_top1\nkd_ood,0.52,0.7\n")
    found = precision.committed_rows(study, tmp_path)
    assert {s: r["student_top1"] for s, r in found.items()} == {0: "0.5", 1: "0.52"}
    assert found[1]["source"] == "committed y.csv"

    def row(p, seed, top1, wall):
        return {"study": precision.STUDIES[0].name, "method": "mosaic", "precision": p, "seed": seed,
                "student_top1": top1, "wall_s": wall}
    rows = [row("no", 0, 0.60, 500), row("no", 1, 0.62, 500), row("auto", 0, 0.61, 200), row("auto", 1, 0.64, 220)]
    precision.write(rows, tmp_path / "p")
    line = next(x for x in (tmp_path / "p.md").read_text().splitlines() if x.startswith(f"| {rows[0]['study']}"))
    # fp32 61.00 ± 1.41, auto 62.50 ± 2.12, diff +1.50 within max(0.5, 1.41, 2.12)
    assert "| 61.00 ± 1.41 | 62.50 ± 2.12 | +1.50 | yes | 0,1 | 500 | 210 |" in line
    precision.write(rows[::2], tmp_path / "one")  # one seed per precision: no spread, the 0.5-point band
    line = next(x for x in (tmp_path / "one.md").read_text().splitlines() if x.startswith(f"| {rows[0]['study']}"))
    assert "| 60.00 | 61.00 | +1.00 | NO | 0 | 500 | 200 |" in line


def test_precision_collect_keeps_rows_whose_run_folders_are_gone(tmp_path):
    """On a new machine the run folders are gone: --collect rebuilds the tables from precision-cpu.csv."""
    import precision
    study = precision.STUDIES[0]
    rows = [{"study": study.name, "method": study.row, "precision": p, "seed": s, "student_top1": top1,
             "wall_s": 100, "source": f"run {precision.folder_of(study, p, s)}"}
            for p, s, top1 in (("no", 0, 0.60), ("auto", 0, 0.59))]
    precision.write(rows, tmp_path / "precision-cpu")
    assert precision.main(["--collect", "--out", str(tmp_path / "runs"), "--results", str(tmp_path)]) == 0
    kept = _csv_rows(tmp_path / "precision-cpu.csv")
    assert [(r["precision"], r["seed"], r["student_top1"]) for r in kept] == [("no", "0", "0.6"), ("auto", "0", "0.59")]
    assert "| 60.00 | 59.00 | -1.00 | NO | 0 |" in (tmp_path / "precision-cpu.md").read_text()


def _csv_rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_regime_cells_hold_the_margins_of_the_committed_tables():
    """mosaic/regime_cells.json (inspect's evidence) agrees with the results CSVs it was made from."""
    import regime_pools
    from mosaic.pool_stats import load_cells

    cells = {c["name"]: c for c in load_cells()}
    assert list(cells) == [c.name for c in regime_pools.CELLS]
    for cell in regime_pools.CELLS:
        pairs = regime_pools.measured(cell, EXP / "results")
        stored = cells[cell.name]
        assert stored["margins"] == [p.margin for p in pairs] and stored["steps"] == cell.steps
        assert stored["mosaic_minus_kd"] == regime_pools.mean_margin(pairs)
        assert stored["winner"] == regime_pools.winner_of(stored["margins"])
    # by hand: cpu-small-t3-ood1k at 1,000 steps, MosaicKD 60.96 / 62.07 against KD 58.68 / 58.42 (seeds 0, 1)
    t3_1k = cells["three-epoch teacher, 1k near pool, 1,000 steps"]
    assert t3_1k["margins"] == [2.28, 3.65] and t3_1k["winner"] == "mosaic"
    # by hand: the three-epoch far pool at 400 steps, regime-t3 seed 0 (46.33 - 45.09) and regime-t3-ref seeds
    # 0 and 1 (43.84 - 46.67, 47.26 - 45.93): the seeds split, so a tie whatever the mean
    t3_far = cells["three-epoch teacher, 1k far pool, 400 steps"]
    assert t3_far["margins"] == [1.24, -2.83, 1.33] and t3_far["winner"] == "tie"
    assert t3_far["mosaic_minus_kd"] == pytest.approx((1.24 - 2.83 + 1.33) / 3, abs=0.006)


def test_regime_cells_file_is_what_the_script_makes_from_the_committed_csvs(tmp_path):
    """--reuse-stats re-reads only the margins: no teacher is trained and the committed file comes out unchanged."""
    import regime_pools

    results = tmp_path / "results"
    results.mkdir()
    for f in (EXP / "results").glob("*.csv"):
        shutil.copy(f, results / f.name)
    cells = tmp_path / "regime_cells.json"
    committed = (EXP.parent / "mosaic" / "regime_cells.json").read_text()
    cells.write_text(committed)
    assert regime_pools.main(["--reuse-stats", "--results", str(results), "--cells", str(cells),
                              "--out", str(tmp_path / "runs")]) == 0
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing inspected
    assert cells.read_text() == committed
    assert (results / "regime-pools.md").read_text() == (EXP / "results" / "regime-pools.md").read_text()


def test_regime_winner_needs_the_mean_and_every_seed_pair():
    from regime_pools import winner_of

    assert winner_of([0.6, 0.7]) == "mosaic"
    assert winner_of([2.0, -0.1]) == "tie"   # mean +0.95, but one seed pair has KD ahead
    assert winner_of([0.4, 0.4]) == "tie"    # every pair ahead, but by less than half a point
    assert winner_of([-0.6]) == "kd_ood"     # one pair: its sign and size
    assert winner_of([-3.0, -0.2]) == "kd_ood"


def test_regime_pairs_match_seeds_and_leave_unpaired_runs_out(tmp_path):
    from regime_pools import Cell, Source, measured, mean_margin, spread

    lines = ["method,seed,student_top1,teacher_top1", "m,0,0.50,0.7", "m,1,0.52,0.7", "m,2,0.60,0.7",
             "k,0,0.49,0.7", "k,1,0.53,0.7"]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.csv").write_text("method,student_top1,teacher_top1\nm-s1,0.55,0.71\nk-s1,0.52,0.71\n")
    cell = Cell("c", "s", "r", 400, (Source("a.csv", "m", "k"), Source("b.csv", "m-s1", "k-s1", seed="1")))
    pairs = measured(cell, tmp_path)
    assert [(p.results, p.seed, p.margin) for p in pairs] == [("a.csv", "0", 1.0), ("a.csv", "1", -1.0),
                                                              ("b.csv", "1", 3.0)]  # seed 2 has no KD run
    assert mean_margin(pairs) == 1.0 and spread(pairs) == 2.0  # margins 1, -1, 3: mean 1, std sqrt(4) = 2
    assert spread(pairs[:1]) is None
    # the at-a-glance row: both methods' means over the pairs (m 50, 52, 55; k 49, 53, 52) and the margin
    from regime_pools import glance_row
    named = Cell("three-epoch teacher, 1k far pool, 400 steps", "s", "r", 400, cell.sources)
    row = glance_row(named, [replace(p, student="cnn_tiny", teacher="cnn_small") for p in pairs], "tie")
    assert row == ("| cnn_small, three-epoch (70.00 / 71.00) | cnn_tiny | 1k far pool | 400 | 51.33 | 52.33 | +1.00 | 3 "
                   "| tie | `a.csv`, `b.csv` |")


def test_readme_results_table_is_the_cells_table():
    """The README's MosaicKD-against-KD table is regime-pools.md's at-a-glance table, row for row."""
    import regime_pools

    made = (EXP / "results" / "regime-pools.md").read_text().split("## At a glance\n")[1]
    table = [line for line in made.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(regime_pools.CELLS)  # head, rule, a row per cell
    readme = (EXP.parent / "README.md").read_text()
    assert "\n".join(table) in readme
