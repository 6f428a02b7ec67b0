"""Teacher normalisation: teacher.mean/std > the teacher's model.json > a timm model's pretrained_cfg > the data set.

The engine prints which one the teacher gets and where it came from, results.json records it, and the student
(one Context.normalize) and its model.json use the same. Also: a missing teacher/student checkpoint is reported
before any data set is decoded.
"""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from mosaic.cli import _resolve, main
from mosaic.data import load_split
from mosaic.engine.task import teacher_normalization
from mosaic.models import create_model

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_ARGS = {"teacher.mean": "[0.485,0.456,0.406]", "teacher.std": "[0.229,0.224,0.225]"}
KD_OOD = {"method": "kd_ood", "student.arch": "cnn_tiny", "steps": 1,  # one update on one batch: the loss by hand
          "kd_ood.student_steps": 1, "kd_ood.update_batches": 1}


def bare_teacher(tiny_teacher, folder):
    """The tiny trained cnn_tiny teacher as a bare state_dict file (no model.json beside it)."""
    path = folder / "teacher.pt"
    torch.save(load_file(tiny_teacher), path)
    return path


def capture_first_step(monkeypatch) -> dict:
    """Record kd_ood's first batch, the student before its update, and the loss the method computed."""
    from mosaic.methods import get_method
    method = get_method("kd_ood")
    real, seen = method.step, {}

    def step(self, batch, i):
        if not seen:
            seen["x"] = batch["ood"].clone()
            seen["student"] = copy.deepcopy(self.accelerator.unwrap_model(self.student))
        out = real(self, batch, i)
        seen.setdefault("loss", out["loss_s"].item())
        return out

    monkeypatch.setattr(method, "step", step)
    return seen


def hand_kd(teacher, student, x, mean, std) -> float:
    """KL(softmax(teacher) || softmax(student)) on inputs normalised by hand with `mean`, `std` (T = 1)."""
    xn = torch.empty_like(x)
    for c in range(3):
        xn[:, c] = (x[:, c] - mean[c]) / std[c]
    with torch.no_grad():
        t, s = teacher(xn).double(), student(xn).double()
    p_t = t.exp() / t.exp().sum(1, keepdim=True)
    log_p_s = s - s.exp().sum(1, keepdim=True).log()
    return float((p_t * (p_t.log() - log_p_s)).sum(1).mean())


def test_bare_teacher_gets_the_given_statistics_in_its_kd_loss(tiny_task, tiny_teacher, tmp_path, monkeypatch,
                                                               capsys):
    weights = bare_teacher(tiny_teacher, tmp_path)
    seen = capture_first_step(monkeypatch)
    args = base_overrides(tiny_task, tmp_path, name="r", teacher=str(weights), **{"teacher.arch": "cnn_tiny"},
                          **IMAGENET_ARGS, **KD_OOD)
    assert main(["distill", *args]) == 0
    line = ("teacher normalisation: mean=(0.485, 0.456, 0.406) std=(0.229, 0.224, 0.225) "
            "from teacher.mean/std")
    out = capsys.readouterr()
    assert line in out.err.splitlines() and line not in out.out  # stdout stays the report

    teacher = create_model("cnn_tiny", num_classes=3).eval()
    teacher.load_state_dict(torch.load(weights))
    student = seen["student"].train()  # as the method runs it: batch statistics
    want = hand_kd(teacher, student, seen["x"], *IMAGENET)
    assert seen["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    logged = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["loss_s"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["normalisation"] == {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1]), "source": "teacher.mean/std"}
    # the data set's statistics (what this teacher gets without teacher.mean/std) give another loss
    test = load_split(_resolve(base_overrides(tiny_task, tmp_path)), "test")
    assert abs(hand_kd(teacher, student, seen["x"], test.mean, test.std) - want) > 1e-3
    # the student is normalised the same way, and its model.json says so
    meta = json.loads((tmp_path / "r" / "model.json").read_text())
    assert (meta["mean"], meta["std"]) == (list(IMAGENET[0]), list(IMAGENET[1]))


def test_timm_imagenet_teacher_gets_its_pretrained_cfg(tiny_task, tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "timm_teacher.pt"
    torch.save(create_model("test_efficientnet", num_classes=3).state_dict(), weights)
    args = base_overrides(tiny_task, tmp_path, name="r", teacher=str(weights),
                          **{"teacher.arch": "test_efficientnet"}, **KD_OOD)
    assert main(["distill", *args]) == 0
    line = ("teacher normalisation: mean=(0.485, 0.456, 0.406) std=(0.229, 0.224, 0.225) "
            "from the pretrained_cfg of timm's test_efficientnet")
    out = capsys.readouterr()
    assert line in out.err.splitlines() and line not in out.out  # stdout stays the report
    assert json.loads((tmp_path / "r" / "results.json").read_text())["normalisation"]["source"] == (
        "the pretrained_cfg of timm's test_efficientnet")


def fake_sets(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)) -> dict:
    return {"train": SimpleNamespace(mean=mean, std=std, name="task")}


def norm_cfg(*, mean=None, std=None, channels: int = 3) -> dict:
    return {"teacher": {"mean": mean, "std": std}, "data": {"channels": channels}}


def test_precedence_order():
    timm_teacher = create_model("test_efficientnet", num_classes=3)
    cifar_teacher = create_model("cnn_tiny", num_classes=3)  # its pretrained_cfg holds CIFAR-10 statistics
    json_meta = {"arch": "test_efficientnet", "mean": [0.7, 0.7, 0.7], "std": [0.3, 0.3, 0.3]}
    given = norm_cfg(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    sets = fake_sets()
    # 1. teacher.mean/std beats everything
    assert teacher_normalization(given, sets, timm_teacher, json_meta) == (
        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "teacher.mean/std")
    # 2. then what the teacher was trained with (model.json), even for a timm architecture
    assert teacher_normalization(norm_cfg(), sets, timm_teacher, json_meta) == (
        (0.7, 0.7, 0.7), (0.3, 0.3, 0.3), "the teacher's model.json")
    # 3. then a timm model's pretrained_cfg (bare state_dict)
    bare = {"arch": "test_efficientnet", "num_classes": 3, "in_chans": 3}
    assert teacher_normalization(norm_cfg(), sets, timm_teacher, bare) == (
        *IMAGENET, "the pretrained_cfg of timm's test_efficientnet")
    # 4. the data set: for the CIFAR nets here (trained with the data's statistics), without a teacher,
    #    and when the pretrained_cfg does not fit the channel count
    data = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "the statistics of data set 'task'")
    assert teacher_normalization(norm_cfg(), sets, cifar_teacher, {"arch": "cnn_tiny", "num_classes": 3}) == data
    assert teacher_normalization(norm_cfg(), sets, None, {}) == data
    gray = fake_sets(mean=(0.5,), std=(0.2,))
    assert teacher_normalization(norm_cfg(channels=1), gray, timm_teacher, bare) == (
        (0.5,), (0.2,), "the statistics of data set 'task'")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_missing_checkpoint_is_reported_before_any_data_is_decoded(role, tiny_task, tiny_teacher, tmp_path,
                                                                   monkeypatch, capsys):
    import mosaic.engine.task as task

    def decode(*args, **kwargs):
        raise AssertionError("a data set was decoded before the checkpoint was checked")

    monkeypatch.setattr(task, "load_split", decode)
    missing = tmp_path / "nowhere" / "model.safetensors"
    extra = {"teacher": str(missing)} if role == "teacher" else {"teacher": str(tiny_teacher),
                                                                 "student.checkpoint": str(missing)}
    args = base_overrides(tiny_task, tmp_path, name="r", **{**KD_OOD, **extra})
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {role}.checkpoint '{missing}' not found: give a model.safetensors (with its .json), "
                   f"a run folder or a state_dict file" + (" (train one with `mosaic train-teacher`)"
                                                            if role == "teacher" else "")]
    assert not (tmp_path / "r").exists()
