"""Experiment configs and suites stay valid as the code changes."""
from pathlib import Path

import sys

import pytest
import yaml

from mosaic.cli import TEACHER_BASE, _resolve

EXP = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXP))
from suite import as_overrides as items  # noqa: E402


@pytest.mark.parametrize("path", sorted((EXP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_resolve(path):
    cfg = _resolve([str(path)])
    assert cfg["steps"] > 0 and cfg["method"] in cfg


@pytest.mark.parametrize("path", sorted((EXP / "suites").glob("*.yaml")), ids=lambda p: p.name)
def test_suites_resolve(path):
    spec = yaml.safe_load(path.read_text())
    _resolve(items({**spec.get("data", {}), **spec["teacher"]}), TEACHER_BASE)
    for method, overrides in spec["methods"].items():
        overrides = dict(overrides or {})
        overrides.pop("label", None)
        cfg = _resolve(items({**spec.get("data", {}), **spec.get("common", {}), "method": method, **overrides}))
        assert cfg["method"] == overrides.get("method", method)  # a row may run a method under its own name


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
