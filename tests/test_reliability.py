"""Reliability: SIGKILL and SIGTERM mid-run, damaged checkpoints, and the divergence guard.

What a checkpoint holds (Accelerate's save_state plus our registered objects): every
player's weights and BatchNorm buffers, every optimizer's state, every LR scheduler, the
python / numpy / torch (and CUDA) RNG states of each process (so the generator's noise
stream continues where it was), each data stream's position (epoch and cursor: the OOD
sampler), the step counter with the guard's restore count and LR scale, and method state
(e.g. DeepInversion's image pool).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, base_overrides
from mosaic.cli import _resolve
from mosaic.engine import checkpoints, train
from mosaic.guard import DivergenceError

MOSAIC = {"method": "mosaic", "student.arch": "cnn_tiny", "mosaic.patch_size": 8, "mosaic.student_steps": 1,
          "mosaic.ngf": 8, "mosaic.ndf": 8}


def overrides(task, out, teacher, **extra):
    return base_overrides(task, out, teacher=str(teacher), log_every=5, **{**MOSAIC, **extra})


def launch(args: list[str], *, command: tuple[str, ...] = ("distill",)) -> subprocess.Popen:
    """`python -m mosaic <command> <args>` in a child process (one thread), output in proc.stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mosaic", *command, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(folder: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the run has a complete checkpoint at `step` or later (older ones get pruned)."""
    t0 = time.time()
    while not any(int(p.name.split("_")[1]) >= step for p in checkpoints(folder)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its step-{step} checkpoint:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no step-{step} checkpoint in {timeout}s")
        time.sleep(0.01)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cli_stderr(err: str) -> str:
    """A CLI run's stderr without the engine's start-up lines (the teacher's normalisation and the precision)."""
    return "\n".join(ln for ln in err.strip().splitlines()
                     if not ln.startswith(("teacher normalisation: ", "precision: ")))


def final_losses(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["final_losses"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_result(tiny_task, tiny_teacher, tmp_path, sig):
    steps = 60
    args = overrides(tiny_task, tmp_path, tiny_teacher, steps=steps, ckpt_every=5)
    killed = launch([*args, "name=killed"])
    rng = random.Random()  # a random point: after a random checkpoint, plus a random fraction of a step or two
    after, delay = rng.choice(range(5, 41, 5)), rng.uniform(0.0, 0.1)
    wait_for_checkpoint(tmp_path / "killed", after, killed)
    time.sleep(delay)
    killed.send_signal(sig)
    out = killed.communicate(timeout=120)[0]
    assert killed.returncode != 0, f"the run finished before the signal ({after}, {delay:.2f}s):\n{out}"
    done = checkpoints(tmp_path / "killed")
    assert done, "a checkpoint survived"
    last = int(done[-1].name.split("_")[1])
    assert last < steps, "the kill came before the end"
    if sig == signal.SIGTERM:  # graceful: a checkpoint at the very step it stopped, and a clean message
        assert "stopped by signal" in out and "resume with resume=true" in out
        assert "Traceback" not in out
    resumed = launch([*args, "name=killed", "resume=true"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"resumed {tmp_path / 'killed'} from step {last}" in out
    train(_resolve([*args, "name=full"]))  # the uninterrupted run, in this process (also one thread)
    assert final_losses(tmp_path / "full") == final_losses(tmp_path / "killed")
    assert same_weights(tmp_path / "full", tmp_path / "killed")
    lines = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss_s" in x]
    assert lines == list(range(5, steps + 1, 5))  # nothing duplicated or missing across the kill


def test_damaged_checkpoints_are_skipped(tiny_task, tiny_teacher, tmp_path):
    common = overrides(tiny_task, tmp_path, tiny_teacher, steps=9, ckpt_every=3, keep_ckpts=3)
    full = train(_resolve([*common, "name=full"]))
    train(_resolve([*common, "name=run", "steps=9"]))
    folder = tmp_path / "run"
    ckpts = checkpoints(folder)
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006", "step_00000009"]
    # a kill during the write of step 9 would leave only a .tmp folder: it is never picked up
    os.replace(ckpts[-1], folder / "checkpoints" / ".tmp_step_00000009")
    # and a checkpoint damaged on disk after it was written (truncated weights file) is reported and skipped
    weights = next(ckpts[1].glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    (folder / "results.json").unlink()
    with pytest.warns(UserWarning, match="step_00000006.*could not be loaded"):
        resumed = train(_resolve([*common, "name=run", "resume=true"]))
    assert resumed["final_losses"] == full["final_losses"]
    assert same_weights(tmp_path / "full", folder)


def test_pruning_keeps_the_last_n_checkpoints(tiny_task, tiny_teacher, tmp_path):
    train(_resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=8, ckpt_every=2, keep_ckpts=2, name="r")))
    assert [p.name for p in checkpoints(tmp_path / "r")] == ["step_00000006", "step_00000008"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


# ----------------------------------------------------------------------------- divergence guard

def poison_generator(monkeypatch, *, at: set[int]):
    """Make the generator's output NaN during the MosaicKD steps whose index is in `at` (0-based)."""
    from mosaic.methods.mosaic_kd import MosaicKD
    real = MosaicKD.step
    seen = []

    def step(self, batch, i):
        if i in at and i not in seen:
            seen.append(i)
            gen = self.accelerator.unwrap_model(self.generator)
            with torch.no_grad():
                gen.parameters().__next__().fill_(float("nan"))
        return real(self, batch, i)

    monkeypatch.setattr(MosaicKD, "step", step)
    return seen


def test_guard_stop_names_player_and_step(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    poison_generator(monkeypatch, at={6})
    cfg = _resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=20, ckpt_every=5, name="r",
                             **{"guard.every": 4}))
    with pytest.raises(DivergenceError) as err:
        train(cfg)
    msg = str(err.value)
    assert "generator" in msg and "first at step 7" in msg and "guard.on_nonfinite=restore" in msg
    # the checkpoint at step 5 is clean and no poisoned checkpoint was written after it
    assert [p.name for p in checkpoints(tmp_path / "r")] == ["step_00000005"]


def test_guard_stop_from_the_cli_is_one_line(tiny_task, tiny_teacher, tmp_path, monkeypatch, capsys):
    from mosaic.cli import main
    poison_generator(monkeypatch, at={2})
    code = main(["distill", *overrides(tiny_task, tmp_path, tiny_teacher, steps=8, name="r")])
    err = cli_stderr(capsys.readouterr().err)
    assert code == 2 and err.startswith("error: run") and "diverged" in err and len(err.splitlines()) == 1


def test_guard_restore_goes_back_with_lower_lr(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    seen = poison_generator(monkeypatch, at={7})  # poisoned once: after the restore step 8 runs clean
    cfg = _resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=12, ckpt_every=5, name="r",
                             **{"guard.on_nonfinite": "restore", "guard.every": 2, "guard.lr_factor": 0.5,
                                "schedule": "constant"}))
    res = train(cfg)
    assert seen == [7]
    assert res["guard"]["restores"] == 1 and res["guard"]["lr_scale"] == 0.5
    assert all(v == v for v in res["final_losses"].values())  # finite: no NaN left
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_s" in x] == [5, 10, 12]  # the poisoned window was dropped
    restore = [x for x in lines if "guard/restores" in x]
    assert restore == [{"step": 5, "guard/restored_from": 5, "guard/restores": 1, "guard/lr_scale": 0.5}]
    assert [x["lr"] for x in lines if "loss_s" in x] == [1e-3, 5e-4, 5e-4]  # lr of G (constant schedule), halved
    assert json.loads((tmp_path / "r" / "results.json").read_text())["guard"]["restores"] == 1


def test_guard_restore_gives_up_after_max_restores(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    from mosaic.methods.mosaic_kd import MosaicKD
    real = MosaicKD.step

    def always_nan(self, batch, i):
        out = real(self, batch, i)
        return {**out, "loss_g": out["loss_g"] * float("nan")}

    monkeypatch.setattr(MosaicKD, "step", always_nan)
    cfg = _resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=12, name="r",
                             **{"guard.on_nonfinite": "restore", "guard.every": 3, "guard.max_restores": 2}))
    with pytest.raises(DivergenceError, match="loss_g.*after 2 restore"):
        train(cfg)


def test_guard_skip_drops_exactly_the_bad_update(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    """A NaN gradient in the student at one step: that update is skipped, the run ends finite."""
    from mosaic.methods.mosaic_kd import MosaicKD
    real = MosaicKD.step
    snapshots = {}

    def step(self, batch, i):
        if i != 3:
            return real(self, batch, i)
        student = self.accelerator.unwrap_model(self.student)
        snapshots["before"] = {k: v.clone() for k, v in student.state_dict().items()}
        # only the student's own backward reaches its parameters (the G step runs with their grads off)
        hooks = [p.register_hook(lambda g: torch.full_like(g, float("nan"))) for p in student.parameters()]
        out = real(self, batch, i)
        for h in hooks:
            h.remove()
        snapshots["after"] = {k: v.clone() for k, v in student.state_dict().items()}
        return out

    monkeypatch.setattr(MosaicKD, "step", step)
    cfg = _resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=6, name="r",
                             **{"guard.on_nonfinite": "skip", "guard.every": 2, "student.weight_decay": 0.0}))
    res = train(cfg)
    assert ["student", 4] in [list(s) for s in res["guard"]["first_skips"]]
    before, after = snapshots["before"], snapshots["after"]
    weights = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(before[k], after[k]) for k in weights), "the NaN update was applied"
    assert all(v == v for v in res["final_losses"].values())


def test_guard_off_lets_nan_through(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    poison_generator(monkeypatch, at={1})
    res = train(_resolve(overrides(tiny_task, tmp_path, tiny_teacher, steps=3, name="r",
                                   **{"guard.on_nonfinite": "off"})))
    assert any(v != v for v in res["final_losses"].values())  # the control: without the guard, NaN survives


# ----------------------------------------------------------------------------- a full disk

def fill_disk_at_second_checkpoint(monkeypatch, kind: str) -> None:
    """Make the second checkpoint write fail after a partial file, as a full disk does.

    oserror: the write raises OSError(ENOSPC); torch: torch.save (the optimizer's file, after the weights were
    written) raises the RuntimeError torch's writer gives on a full disk.
    """
    import errno

    from accelerate import Accelerator
    real_save_state, real_torch_save, calls = Accelerator.save_state, torch.save, []

    def torch_save(obj, f, *args, **kwargs):
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_torch_save(obj, f, *args, **kwargs)

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2 and kind == "oserror":
            os.makedirs(output_dir, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(torch, "save", torch_save)


@pytest.mark.parametrize("kind", ["oserror", "torch"])
def test_full_disk_at_a_checkpoint_is_one_line_and_resumable(kind, tiny_task, tiny_teacher, tmp_path, monkeypatch,
                                                             capsys):
    from mosaic.cli import main
    common = overrides(tiny_task, tmp_path, tiny_teacher, steps=9, ckpt_every=3)
    with monkeypatch.context() as patch:
        fill_disk_at_second_checkpoint(patch, kind)
        assert main(["distill", *common, "name=run"]) == 2
    err = cli_stderr(capsys.readouterr().err).splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    folder = tmp_path / "run"
    for words in (f"could not write checkpoint step_00000006 in '{folder / 'checkpoints'}'",
                  "GiB free there", "resume=true continues from checkpoint step_00000003"):
        assert words in err[0], (words, err[0])
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_00000003"]  # no .tmp_ left
    assert [p.name for p in checkpoints(folder)] == ["step_00000003"]
    # once there is room: resume=true continues from step 3 and ends where an uninterrupted run ends
    resumed = train(_resolve([*common, "name=run", "resume=true"]))
    full = train(_resolve([*common, "name=full"]))
    assert resumed["final_losses"] == full["final_losses"]
    assert same_weights(tmp_path / "full", folder)


def test_failed_first_checkpoint_says_resume_starts_again(tmp_path):
    from mosaic.engine.folder import write_failure
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = write_failure(tmp_path / "run", "step_00000003", OSError(28, "No space left on device"))
    assert "could not write checkpoint step_00000003" in line and "No space left on device" in line
    assert "GiB free there" in line and "resume=true starts again from step 0" in line
