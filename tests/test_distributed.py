"""Two processes over gloo (accelerate's debug_launcher): one method, not two independent runs.

`accelerate launch --cpu --num_processes 2` silently starts one process, and `--multi_gpu`
without CPU mode starts two world-size-1 runs, so these tests prove world size 2 from
inside the run: every rank reports its weights and its data at every step.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from mosaic.cli import _resolve
from mosaic.engine import checkpoints

MOSAIC = {"method": "mosaic", "student.arch": "cnn_tiny", "mosaic.patch_size": 8, "mosaic.student_steps": 2,
          "mosaic.ngf": 8, "mosaic.ndf": 8, "log_every": 1}


def digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _record_steps(record: Path) -> None:
    """Patch MosaicKD.step (before the fork) so each rank logs its weights, data and wrappers per step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mosaic.methods.mosaic_kd import MosaicKD
    real = MosaicKD.step

    def step(self, batch, i):
        rng = digest([torch.random.get_rng_state()])
        out = real(self, batch, i)
        acc = self.accelerator
        players = {n: acc.unwrap_model(getattr(self, n)) for n in self.players}
        rec = {"step": i + 1, "world": acc.num_processes, "rank": acc.process_index,
               "ood": digest([batch["ood"]]), "rng": rng,
               "weights": {n: digest(m.parameters()) for n, m in players.items()},
               "buffers": {n: digest(m.buffers()) for n, m in players.items()},
               "wrapped": {n: isinstance(getattr(self, n), DDP) for n in self.players},
               "teacher_wrapped": isinstance(self.teacher, DDP),
               "batch": int(batch["ood"].shape[0])}
        with open(record / f"rank{acc.process_index}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

    MosaicKD.step = step


def _child(cfg: dict) -> None:
    """What each process runs: a fresh Accelerate state (the parent's is inherited through fork), then train."""
    from accelerate.state import AcceleratorState, PartialState

    from mosaic.engine import train
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    torch.set_num_threads(1)
    train(cfg)


def launch2(cfg: dict) -> None:
    from accelerate import debug_launcher
    debug_launcher(_child, args=(cfg,), num_processes=2)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    from mosaic.methods.mosaic_kd import MosaicKD
    monkeypatch.setattr(MosaicKD, "step", MosaicKD.step)  # undone after the test
    record = tmp_path / "record"
    record.mkdir()
    _record_steps(record)
    return record


def read(record: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (record / f"rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_are_one_run(tiny_task, tiny_teacher, tmp_path, recorded):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="ddp", teacher=str(tiny_teacher), steps=4,
                                  ckpt_every=2, **MOSAIC))
    launch2(cfg)
    r0, r1 = read(recorded, 0), read(recorded, 1)
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == [1, 2, 3, 4]
    assert all(r["world"] == 2 for r in r0 + r1)  # not two world-size-1 runs
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"], f"ranks disagree after step {a['step']}"
        assert a["ood"] != b["ood"], "each rank must see its own OOD shard"
        assert a["rng"] != b["rng"], "each rank must draw its own noise"
    assert all(r["wrapped"] == {"generator": True, "discriminator": True, "student": True} for r in r0)
    assert not any(r["teacher_wrapped"] for r in r0 + r1)  # frozen teacher: no DDP, no all-reduce
    assert r0[0]["weights"] != r0[-1]["weights"]  # and training did move the weights
    folder = tmp_path / "ddp"
    res = json.loads((folder / "results.json").read_text())
    assert res["processes"] == 2 and res["global_batch"] == 16
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_s" in x] == [1, 2, 3, 4]  # written once, by the main process


def test_two_process_resume_equals_uninterrupted(tiny_task, tiny_teacher, tmp_path):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="full", teacher=str(tiny_teacher), steps=4,
                                  ckpt_every=2, keep_ckpts=3, **MOSAIC))
    launch2(cfg)
    full, cut = tmp_path / "full", tmp_path / "cut"
    shutil.copytree(full, cut)
    for ckpt in checkpoints(cut)[1:]:  # as if killed just after the step-2 checkpoint
        shutil.rmtree(ckpt)
    for name in ("results.json", "model.safetensors", "model.json"):
        (cut / name).unlink()
    launch2({**cfg, "name": "cut", "resume": True})
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (full, cut))
    assert ra["final_losses"] == rb["final_losses"] and ra["student_top1"] == rb["student_top1"]


def test_global_batch_is_split_over_processes(tiny_task, tiny_teacher, tmp_path, recorded):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="g", teacher=str(tiny_teacher), steps=1,
                                  global_batch=True, batch_size=16, **MOSAIC))
    launch2(cfg)
    # MosaicKD draws student_steps + 1 OOD batches per step: (2 + 1) x 8 images on each of the 2 ranks
    assert [r["batch"] for r in read(recorded, 0) + read(recorded, 1)] == [24, 24]
    assert json.loads((tmp_path / "g" / "results.json").read_text())["global_batch"] == 16


def test_sync_bn_on_cpu_processes_is_a_clear_error(tiny_task, tiny_teacher, tmp_path):
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name="s", teacher=str(tiny_teacher), steps=1,
                                  sync_bn=True, **MOSAIC))
    with pytest.raises(Exception, match="sync_bn=true needs GPUs"):
        launch2(cfg)


def test_sync_bn_conversion_keeps_the_optimizer_parameters():
    """SyncBatchNorm replaces the BN modules but keeps their parameter objects, so optimizers stay valid."""
    from mosaic.models import create_model
    net = create_model("cnn_tiny", num_classes=3)
    before = [id(p) for p in net.parameters()]
    buffers = [id(b) for b in net.buffers()]
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert [id(p) for p in synced.parameters()] == before and [id(b) for b in synced.buffers()] == buffers
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())


def test_global_batch_must_divide():
    from mosaic.engine import RunError, per_process_batch
    assert per_process_batch({"global_batch": True, "batch_size": 64}, 4) == 16
    assert per_process_batch({"global_batch": False, "batch_size": 64}, 4) == 64
    with pytest.raises(RunError, match="multiple of 4"):
        per_process_batch({"global_batch": True, "batch_size": 66}, 4)


if os.environ.get("MOSAIC_SKIP_DISTRIBUTED"):  # escape hatch for sandboxes without loopback sockets
    pytestmark = pytest.mark.skip(reason="MOSAIC_SKIP_DISTRIBUTED is set")
