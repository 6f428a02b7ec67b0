"""Experiment trackers through Accelerate (`log_with=`): they get exactly what metrics.jsonl gets, at the same steps."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from accelerate.tracking import GeneralTracker

from conftest import base_overrides
from mosaic.cli import _resolve
from mosaic.engine import train

KD_OOD = {"method": "kd_ood", "student.arch": "cnn_tiny", "steps": 6, "log_every": 2, "eval_every": 3}


class MemoryTracker(GeneralTracker):
    """A tracker that keeps what it is given in memory."""
    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.started, self.finished, self.config, self.logged = False, False, None, []

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        self.started = True

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append({"step": step, **values})

    def finish(self) -> None:
        self.finished = True


def test_a_tracker_gets_exactly_the_metrics_lines(tiny_task, tiny_teacher, tmp_path):
    tracker = MemoryTracker()
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), **KD_OOD))
    train({**cfg, "log_with": [tracker]})
    folder = tmp_path / "r"
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3, 4, 6, 6]  # losses every 2 steps, evaluation at 3 and the end
    assert tracker.logged == lines
    assert tracker.started and tracker.finished
    # the flattened config, scalars only: dotted keys, null and lists as JSON
    assert tracker.config["student.arch"] == "cnn_tiny" and tracker.config["teacher.mean"] == "null"
    assert tracker.config["steps"] == 6 and tracker.config["log_with"] == '["memory"]'
    assert yaml.safe_load((folder / "config.yaml").read_text())["log_with"] == ["memory"]
    assert not (folder / "tensorboard").exists()


def test_a_run_that_dies_mid_way_still_closes_its_trackers(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    """A step that raises (divergence, disk full, a bug) ends the trackers before the error goes on up."""
    from baselines.classic.kd import KD

    real = KD.step

    def step(self, batch, i):
        if i == 3:
            raise RuntimeError("boom at step 4")
        return real(self, batch, i)

    monkeypatch.setattr(KD, "step", step)
    tracker = MemoryTracker()
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), **KD_OOD))
    with pytest.raises(RuntimeError, match="boom at step 4"):
        train({**cfg, "log_with": [tracker]})
    assert tracker.started and tracker.finished
    assert [x["step"] for x in tracker.logged] == [2, 3]  # losses at 2, evaluation at 3; nothing after the failure


def test_log_with_none_writes_no_tensorboard_folder(tiny_task, tiny_teacher, tmp_path):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), log_with="none",
                                  **KD_OOD))
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "model.json", "model.safetensors", "results.json", "samples"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_land_in_the_run_folder(tiny_task, tiny_teacher, tmp_path):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), log_with="tensorboard",
                                  **KD_OOD))
    train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard" / "r"))
    events.Reload()
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_s", "lr", "eval/student_top1"):
        got = events.Scalars(key)  # float32 on disk
        assert [e.step for e in got] == [x["step"] for x in lines if key in x], key
        assert [e.value for e in got] == pytest.approx([x[key] for x in lines if key in x], rel=1e-6), key
