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
        assert cfg["method"] == method
