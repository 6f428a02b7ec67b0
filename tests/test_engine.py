"""The engine: run-folder contract, refusal to clobber, resume equality, schedules, errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, train_killed_at
from mosaic.cli import TEACHER_BASE, _resolve, main
from mosaic.engine import RunError, checkpoints, lr_factor, train


def cfg_for(task, out, base=None, **extra):
    return _resolve(base_overrides(task, out, **extra), base)


def test_teacher_run_folder_contract(tiny_teacher):
    folder = tiny_teacher.parent
    for name in ("config.yaml", "metrics.jsonl", "results.json", "model.safetensors", "model.json"):
        assert (folder / name).is_file(), name
    assert checkpoints(folder), "a final checkpoint is written"
    results = json.loads((folder / "results.json").read_text())
    assert results["method"] == "supervised" and results["steps"] == 40
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 41))
    assert any("eval/student_top1" in x for x in lines)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["arch"] == "cnn_tiny" and meta["num_classes"] == 3 and meta["image_size"] == 16


def test_existing_run_folder_is_refused_then_overwritten(tiny_task, tmp_path):
    cfg = cfg_for(tiny_task, tmp_path, TEACHER_BASE, name="r", steps=2, epochs="null", **{"student.arch": "cnn_tiny"})
    train(cfg)
    before = (tmp_path / "r" / "results.json").read_text()
    with pytest.raises(RunError, match="already exists.*resume=true.*overwrite=true"):
        train(cfg)
    assert (tmp_path / "r" / "results.json").read_text() == before  # nothing written over
    train({**cfg, "overwrite": True})


def test_resume_matches_uninterrupted_run(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    common = dict(method="mosaic", teacher=str(tiny_teacher), steps=6, ckpt_every=3,
                  **{"student.arch": "cnn_tiny", "mosaic.patch_size": 8, "mosaic.student_steps": 2,
                     "mosaic.ngf": 8, "mosaic.ndf": 8})
    full = train(cfg_for(tiny_task, tmp_path, name="full", **common))

    from mosaic.methods.mosaic_kd import MosaicKD
    train_killed_at(monkeypatch, MosaicKD, 4, cfg_for(tiny_task, tmp_path, name="killed", **common))
    assert [p.name for p in checkpoints(tmp_path / "killed")] == ["step_00000003"]
    resumed = train(cfg_for(tiny_task, tmp_path, name="killed", resume=True, **common))

    assert resumed["final_losses"] == full["final_losses"]
    assert resumed["student_top1"] == full["student_top1"]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
               if "loss_s" in x]
    assert metrics == [1, 2, 3, 4, 5, 6]  # no duplicated or missing lines after the resume
    assert full["resumes"] == 0 and resumed["resumes"] == 1


def test_wall_time_adds_up_over_a_resume_and_runs_on_through_a_guard_restore(monkeypatch):
    """results.json's wall_s: the seconds up to the checkpoint (30) plus the resumed process's own (10)."""
    from mosaic.engine.loop import Progress
    clock = [100.0]
    monkeypatch.setattr("time.time", lambda: clock[0])
    first = Progress()
    clock[0] = 130.0
    state = first.state_dict()
    assert state["elapsed_s"] == 30.0 and state["resumes"] == 0
    clock[0] = 500.0  # a new process, minutes later
    second = Progress()
    second.load_state_dict(state)
    second.resumed()
    clock[0] = 510.0
    assert second.elapsed() == 40.0 and second.resumes == 1
    assert second.state_dict()["resumes"] == 1
    third = Progress()  # the guard going back to a checkpoint in the same process: the clock keeps running
    clock[0] = 560.0
    third.load_state_dict(state)
    assert third.elapsed() == 50.0 and third.resumes == 0


def test_lr_schedules():
    assert lr_factor(0, 100, kind="cosine", warmup=0.0) == pytest.approx(1.0)
    assert lr_factor(50, 100, kind="cosine", warmup=0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, kind="cosine", warmup=0.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(0, 100, kind="onecycle", warmup=0.0) == pytest.approx(1 / 15)
    assert lr_factor(14, 100, kind="onecycle", warmup=0.0) == pytest.approx(1.0)
    assert lr_factor(15 + 85 // 2, 100, kind="onecycle", warmup=0.0) == pytest.approx(1 - 42 / 85)
    assert lr_factor(70, 100, kind="constant", warmup=0.0) == 1.0


def test_distill_without_teacher_is_a_clear_error(tiny_task, tmp_path, capsys):
    code = main(["distill", *base_overrides(tiny_task, tmp_path, steps=1)])
    assert code == 2
    assert "pass teacher=<checkpoint>" in capsys.readouterr().err


def test_teacher_class_count_mismatch(tiny_task, tiny_teacher, tmp_path, capsys):
    from conftest import make_task
    other = make_task(tmp_path / "four", classes=4, train=2, test=2, ood=2)
    code = main(["distill", *base_overrides(tiny_task, tmp_path, steps=1, teacher=str(tiny_teacher),
                                             **{"data.test": str(other["task"])})])
    assert code == 2
    err = capsys.readouterr().err
    assert "3 classes" in err and "labels up to 3" in err


def test_teacher_for_other_architecture(tiny_task, tiny_teacher, tmp_path, capsys):
    code = main(["distill", *base_overrides(tiny_task, tmp_path, steps=1, teacher=str(tiny_teacher),
                                             **{"teacher.arch": "wrn16_1"})])
    assert code == 2
    assert "cnn_tiny" in capsys.readouterr().err


def test_evaluate_command(tiny_task, tiny_teacher, tmp_path, capsys):
    code = main(["evaluate", str(tiny_teacher), f"data.test={tiny_task['task']}", "data.image_size=16", "cpu=true"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    results = json.loads((tiny_teacher.parent / "results.json").read_text())
    assert out["student_top1"] == pytest.approx(results["student_top1"])
    assert out["images"] == 36


def test_grayscale_28px_teacher_then_mosaic(tmp_path):
    """Image size and channels are task parameters: a 1-channel 28x28 task runs end to end."""
    from conftest import make_task
    task = make_task(tmp_path / "gray", classes=3, train=8, test=4, ood=16, size=28, channels=1)
    gray = {"data.image_size": 28, "data.channels": 1, "student.arch": "cnn_tiny", "epochs": "null"}
    train(cfg_for(task, tmp_path, TEACHER_BASE, name="t", steps=2, **gray))
    meta = json.loads((tmp_path / "t" / "model.json").read_text())
    assert meta["in_chans"] == 1 and meta["image_size"] == 28 and len(meta["mean"]) == 1
    res = train(cfg_for(task, tmp_path, name="m", steps=1, teacher=str(tmp_path / "t"), **gray,
                        **{"mosaic.patch_size": 12, "mosaic.ngf": 8, "mosaic.ndf": 8, "mosaic.student_steps": 1}))
    assert 0.0 <= res["student_top1"] <= 1.0
    from PIL import Image
    assert Image.open(tmp_path / "m" / "samples" / "final.png").size[0] > 28


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_padding_mode_reaches_the_training_batches(tiny_task, tmp_path, monkeypatch, mode):
    """data.padding_mode fills the crop padding of the engine's batches: black rows only under constant."""
    import mosaic.engine.task as engine_task

    seen = []

    class Recording(engine_task.Augment):
        def forward(self, images):
            out = super().forward(images)
            seen.append(out.detach().clone())
            return out

    monkeypatch.setattr(engine_task, "Augment", Recording)
    train(cfg_for(tiny_task, tmp_path, TEACHER_BASE, name="pad", steps=4, epochs="null",
                  **{"student.arch": "cnn_tiny", "data.crop_padding": 4, "data.padding_mode": mode}))
    x = torch.cat(seen)
    black_rows = (x.amax(dim=(1, 3)) == 0).sum()  # image rows that are zero in every channel and column
    assert len(x) == 4 * 8
    assert (black_rows > 0) if mode == "constant" else (black_rows == 0)


def test_padding_mode_is_checked(tiny_task, tmp_path):
    from mosaic.config import ConfigError
    with pytest.raises(ConfigError, match="data.padding_mode.*constant, reflect or replicate"):
        cfg_for(tiny_task, tmp_path, **{"data.padding_mode": "wrap"})
    with pytest.raises(ConfigError, match="crop_padding < data.image_size"):
        cfg_for(tiny_task, tmp_path, **{"data.padding_mode": "reflect", "data.crop_padding": 16})


def test_the_add_a_method_example_works_as_written(tiny_task, tiny_teacher, tmp_path):
    """mosaic.methods' docstring example registers, takes its option from the config and trains through the engine."""
    import textwrap

    import mosaic.methods as methods
    from mosaic.losses import kd_loss

    doc = methods.__doc__
    block = doc[doc.index("import torch"):doc.index("A step must not")]
    code = textwrap.dedent("    " + block)
    assert 20 <= len([ln for ln in code.splitlines() if ln.strip()]) <= 25
    namespace: dict = {}
    exec(compile(code, "mosaic.methods docstring", "exec"), namespace)
    assert "my_kd" in methods.list_methods()

    teacher_before = load_file(str(tiny_teacher))
    cfg = cfg_for(tiny_task, tmp_path, name="my", steps=3, method="my_kd", teacher=str(tiny_teacher),
                  **{"student.arch": "cnn_tiny", "my_kd.temperature": 2})
    assert cfg["my_kd"] == {"temperature": 2}
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "my" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert all(torch.equal(v, load_file(str(tiny_teacher))[k]) for k, v in teacher_before.items())

    # its step computes exactly kd_loss at the configured temperature on the normalised batch
    method = namespace["MyKD"]
    ctx_student = torch.nn.Linear(3 * 16 * 16, 3)
    ctx_teacher = torch.nn.Linear(3 * 16 * 16, 3).requires_grad_(False)

    class Ctx:  # the smallest stand-in: what the example touches
        opts, teacher, student, accelerator = {"temperature": 2.0}, ctx_teacher, ctx_student, None
        cfg = {"student": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}}

        @staticmethod
        def normalize(x):
            return (x - 0.5).flatten(1)

    m = method.__new__(method)
    methods.Method.__init__(m, Ctx)
    m.student_opt = m.student_optimizer()
    m.backward = lambda loss: loss.backward()
    x = torch.rand(4, 3, 16, 16)
    want = kd_loss(ctx_student((x - 0.5).flatten(1)), ctx_teacher((x - 0.5).flatten(1)), temperature=2.0)
    assert m.step({"ood": x}, 0)["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_schedules_follow_run_steps_without_a_process_wide_warnings_filter():
    """step_schedules steps a schedule whose optimizer skipped the step silently, and leaves warnings.filters as it was."""
    import warnings

    from mosaic.engine.schedule import step_schedules

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_schedules([sched])  # no optimizer step before it: torch would warn
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert warnings.filters == filters
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
