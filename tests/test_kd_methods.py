"""The classic KD baselines as methods: real engine runs on the tiny task, and their players' behaviour."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import base_overrides
from mosaic.config import ConfigError, resolve
from mosaic.losses import kd_loss
from mosaic.methods import Context, get_method, method_defaults
from mosaic.models import create_model, freeze, save_model

B, SIZE, C = 8, 16, 3
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def save_random_classifier(path: Path, seed: int) -> Path:
    """A randomly initialised cnn_tiny for the 3-class task, saved like a trained teacher."""
    torch.manual_seed(seed)
    save_model(create_model("cnn_tiny", num_classes=C), path,
               meta={"arch": "cnn_tiny", "num_classes": C, "in_chans": 3, "image_size": SIZE, "mean": MEAN,
                     "std": STD})
    return path


@pytest.fixture(scope="session")
def kd_teachers(tmp_path_factory) -> tuple[Path, Path]:
    """Two different random cnn_tiny teachers (training one is not needed to check the mechanics)."""
    folder = tmp_path_factory.mktemp("kd_teachers")
    return save_random_classifier(folder / "t1.safetensors", 1), save_random_classifier(folder / "t2.safetensors", 2)


def make(name: str, *, steps: int = 6, test: str | None = None, teacher=None, seed: int = 0, **opts):
    """A method on a hand-made CPU Context with tiny random cnn_tiny teacher and student, outside the engine."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    overrides = [f"method={name}", "student.arch=cnn_tiny", f"data.image_size={SIZE}", "data.cache=false",
                 f"data.test={test}" if test else "data.test=null", "eval_batch_size=16",
                 *[f"{name}.{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in opts.items()]]
    cfg = resolve(overrides=overrides, method_defaults=method_defaults)
    teacher = teacher if teacher is not None else freeze(create_model("cnn_tiny", num_classes=C))
    ctx = Context(cfg=cfg, opts=cfg[name], teacher=teacher, student=create_model("cnn_tiny", num_classes=C),
                  num_classes=C, image_size=SIZE, channels=3, mean=torch.tensor(MEAN), std=torch.tensor(STD),
                  device=torch.device("cpu"), accelerator=Accelerator(cpu=True), steps=steps, batch_size=B)
    return get_method(name)(ctx)


def labelled_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"train": torch.rand(B, 3, SIZE, SIZE, generator=g), "train_labels": torch.randint(0, C, (B,), generator=g)}


def params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# ----------------------------------------------------------------------------- through the real engine

ENGINE_CASES = {
    "kd": {},
    "kd-ood": {"method": "kd", "kd.stream": "ood"},
    "fitnets": {},
    "at": {},
    "nst": {},
    "rkd": {},
    "adv_kd": {},
    "dml": {"dml.peers": 3},
    "born_again": {"born_again.generations": 3},
    "multi_teacher": {},
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_method_runs_through_the_engine(case, tiny_task, kd_teachers, tmp_path):
    from mosaic.cli import _resolve
    from mosaic.engine import train

    extra = {"method": case, **ENGINE_CASES[case]}
    if case == "multi_teacher":
        extra["multi_teacher.teachers"] = json.dumps([str(kd_teachers[1])])
        extra["multi_teacher.weights"] = "[1,2]"
    cfg = _resolve(base_overrides(tiny_task, tmp_path, name=case, teacher=str(kd_teachers[0]), steps=3,
                                  **{"student.arch": "cnn_tiny"}, **extra))
    results = train(cfg)
    assert results["steps"] == 3 and 0.0 <= results["student_top1"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / case / "metrics.jsonl").read_text().splitlines()]
    losses = [v for rec in lines for k, v in rec.items() if k.startswith("loss")]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), lines
    assert (tmp_path / case / "model.safetensors").is_file()
    if case == "dml":
        assert {"peer1_top1", "peer2_top1", "ensemble_top1"} <= results.keys()
    if case == "born_again":
        assert {"gen1_top1", "gen2_top1", "gen3_top1", "ensemble_top1"} <= results.keys()
        assert results["gen3_top1"] == results["student_top1"]  # the evaluated model is the last generation


def test_ood_stream_is_label_free():
    assert get_method("kd").stream_needs({"stream": "ood"}) == {"ood": 1}
    assert get_method("fitnets").stream_needs({"stream": "train"}) == {"train": 1}
    assert get_method("dml").stream_needs({}) == {"train": 1}
    with pytest.raises(ConfigError, match="kd.stream must be one of train, ood"):
        get_method("kd").stream_needs({"stream": "test"})
    m = make("kd", stream="ood")
    x = torch.rand(B, 3, SIZE, SIZE)
    images, labels = m.inputs({"ood": x})
    assert labels is None and torch.allclose(images, m.ctx.normalize(x))
    m.step({"ood": x}, 0)


def test_kd_ood_is_kd_on_the_ood_stream_at_temperature_one():
    """kd_ood = kd with stream=ood, T=1 (alpha plays no part without labels), `student_steps` updates per step."""
    assert get_method("kd_ood").stream_needs({"temperature": 1.0, "student_steps": 3, "update_batches": 1}) == {"ood": 3}
    assert get_method("kd_ood").stream_needs({"temperature": 1.0, "student_steps": 3, "update_batches": 2}) == {"ood": 6}
    assert get_method("kd").stream_needs({"stream": "ood", "batches": 3}) == {"ood": 3}
    a = make("kd_ood", student_steps=2, update_batches=1)
    b = make("kd", stream="ood", temperature=1.0, alpha=0.3, batches=2)
    assert torch.equal(params(a.student), params(b.student))
    x = torch.rand(2 * B, 3, SIZE, SIZE)
    out_a, out_b = a.step({"ood": x}, 0), b.step({"ood": x}, 0)
    assert torch.equal(out_a["loss_s"], out_b["loss"])
    assert torch.equal(params(a.student), params(b.student))
    # two updates: the second batch's loss is the KD loss of the once-updated student
    c = make("kd", stream="ood", temperature=1.0, batches=1)
    c.step({"ood": x[:B]}, 0)
    want = kd_loss(c.student(c.ctx.normalize(x[B:])), c.teacher(c.ctx.normalize(x[B:])), temperature=1.0)
    assert out_a["loss_s"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="kd_ood.student_steps must be a positive integer"):
        make("kd_ood", student_steps=0)
    with pytest.raises(ConfigError, match="kd_ood.update_batches must be a positive integer"):
        make("kd_ood", update_batches=0)
    with pytest.raises(ConfigError, match="kd.batches must be a positive integer"):
        make("kd", batches=0)


# ----------------------------------------------------------------------------- feature taps and adapters


def test_layer_pairs_follow_resolutions():
    from baselines.classic.features import auto_pairs
    tiny, small = create_model("cnn_tiny", num_classes=C), create_model("cnn_small", num_classes=C)
    assert auto_pairs(tiny, tiny, pick="all") == [(0, 0), (1, 1), (2, 2)]
    assert auto_pairs(tiny, small, pick="all") == [(0, 0), (1, 1), (2, 2)]  # small's stride-8 stage has no partner
    assert auto_pairs(tiny, tiny, pick="middle") == [(1, 1)]
    assert auto_pairs(tiny, small, pick="last") == [(2, 2)]
    wrn, resnet = create_model("wrn16_1", num_classes=C), create_model("resnet18_cifar", num_classes=C)
    assert auto_pairs(wrn, resnet, pick="all") == [(1, 1), (2, 2), (4, 3)]  # wrn's last stride-4 entry is 'act'
    m = make("at", student_layers=["layer1", 2], teacher_layers=[1, "layer2"])
    assert m.taps.pairs == [("layer1", 1), (2, "layer2")]


def test_fitnets_regressor_is_a_player_and_gets_gradients():
    m = make("fitnets")
    assert m.players == ("student", "regressor") and m.regressor_opt is not None
    conv = m.regressor.adapters[0]
    assert tuple(conv.weight.shape) == (32, 32, 1, 1)  # cnn_tiny layer1 -> cnn_tiny layer1
    before_r, before_s = params(m.regressor), params(m.student)
    batch = labelled_batch()
    # the hint term by hand: the regressor's map of the student's layer1 against the teacher's layer1
    with torch.no_grad():
        x = m.ctx.normalize(batch["train"])
        s_feat = m.student.layer1(m.student.stem(x))
        t_feat = m.teacher.layer1(m.teacher.stem(x))
        want = ((conv(s_feat) - t_feat) ** 2).mean()
    out = m.step(batch, 0)
    assert out["loss_hint"].item() == pytest.approx(want.item(), rel=1e-5)
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert not torch.equal(before_r, params(m.regressor)) and not torch.equal(before_s, params(m.student))
    assert not m.taps.student.features  # captured features are dropped after the step


def test_adapter_maps_channels_between_different_nets():
    from baselines.classic.features import probe_shapes
    m = make("fitnets", teacher=freeze(create_model("cnn_small", num_classes=C)))
    assert tuple(m.regressor.adapters[0].weight.shape) == (64, 32, 1, 1)  # student 32 ch -> teacher 64 ch
    assert probe_shapes(m.teacher, [1], m.ctx) == {1: (64, 8, 8)}
    m.step(labelled_batch(), 0)
    assert m.regressor.adapters[0].weight.grad.abs().sum() > 0


def test_adapters_map_channels_and_reject_spatial_mismatch():
    from baselines.classic.features import make_adapter
    conv = make_adapter("fitnets", "layer1", (32, 8, 8), "layer1", (64, 8, 8))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv(torch.zeros(2, 32, 8, 8)).shape == (2, 64, 8, 8)
    lin = make_adapter("fitnets", "fc", (10,), "fc", (20,))
    assert isinstance(lin, nn.Linear) and lin.out_features == 20
    with pytest.raises(ConfigError, match=r"'layer1'.*\(32, 8, 8\).*'layer2'.*\(64, 4, 4\)"):
        make_adapter("fitnets", "layer1", (32, 8, 8), "layer2", (64, 4, 4))
    with pytest.raises(ConfigError, match=r"\(32, 8, 8\).*\(64,\)"):
        make_adapter("fitnets", "layer1", (32, 8, 8), "fc", (64,))


def test_layer_shape_mismatch_names_both_shapes():
    with pytest.raises(ConfigError, match=r"student layer 1 gives shape \(32, 8, 8\) but teacher layer 2 gives "
                                          r"shape \(64, 4, 4\)"):
        make("fitnets", student_layers=[1], teacher_layers=[2])
    with pytest.raises(ConfigError, match=r"\(16, 16, 16\).*\(32, 8, 8\)"):
        make("at", student_layers=[0], teacher_layers=[1])
    with pytest.raises(ConfigError, match=r"'layer2'.*\(64, 4, 4\).*'stem'.*\(16, 16, 16\)"):
        make("nst", student_layers="layer2", teacher_layers="stem")
    with pytest.raises(ConfigError, match="set both nst.student_layers and nst.teacher_layers"):
        make("nst", student_layers=[1])
    with pytest.raises(ConfigError, match="kernel"):
        make("nst", kernel="rbf")


def test_feature_methods_match_their_losses_on_one_step():
    from mosaic.losses import attention_transfer, nst_loss, rkd_angle, rkd_distance
    batch = labelled_batch(3)
    for name in ("at", "nst", "rkd"):
        m = make(name)
        with torch.no_grad():
            x = m.ctx.normalize(batch["train"])
            s_maps = [m.student.stem(x)]
            t_maps = [m.teacher.stem(x)]
            for layer in ("layer1", "layer2"):
                s_maps.append(getattr(m.student, layer)(s_maps[-1]))
                t_maps.append(getattr(m.teacher, layer)(t_maps[-1]))
        out = m.step(batch, 0)
        if name == "at":
            assert out["loss_at"].item() == pytest.approx(attention_transfer(s_maps, t_maps).item(), rel=1e-5)
        elif name == "nst":
            assert out["loss_nst"].item() == pytest.approx(nst_loss(s_maps[-1], t_maps[-1]).item(), rel=1e-5)
        else:
            s_emb, t_emb = s_maps[-1].mean((2, 3)), t_maps[-1].mean((2, 3))
            assert out["loss_rkd_d"].item() == pytest.approx(rkd_distance(s_emb, t_emb).item(), rel=1e-5)
            assert out["loss_rkd_a"].item() == pytest.approx(rkd_angle(s_emb, t_emb).item(), rel=1e-5)


# ----------------------------------------------------------------------------- adversarial logit KD


def test_adv_kd_discriminator_is_conditioned_and_trained():
    m = make("adv_kd")
    assert m.players == ("student", "discriminator")
    assert m.discriminator.net[-1].out_features == C + 2
    assert make("adv_kd", conditional=False).discriminator.net[-1].out_features == 2
    before_d, before_s = params(m.discriminator), params(m.student)
    seen = []
    real_step = m.discriminator_opt.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() for p in m.discriminator.parameters()])
        return real_step(*args, **kwargs)

    m.discriminator_opt.step = recording_step
    out = m.step(labelled_batch(), 0)
    assert all(math.isfinite(v.item()) for v in out.values())
    assert not torch.equal(before_d, params(m.discriminator)) and not torch.equal(before_s, params(m.student))
    assert len(seen) == 1 and all(g.abs().sum() > 0 for g in seen[0])
    # the student's update leaves D's gradients as D's own loss made them (D is frozen during it)
    assert all(torch.equal(a, p.grad) for a, p in zip(seen[0], m.discriminator.parameters()))
    label_free = make("adv_kd", stream="ood")
    label_free.step({"ood": torch.rand(B, 3, SIZE, SIZE)}, 0)  # classes come from the teacher's argmax


# ----------------------------------------------------------------------------- deep mutual learning


def test_dml_peers_differ_and_all_update():
    m = make("dml", peers=3)
    assert m.players == ("student", "peer1", "peer2")
    nets = m.networks()
    before = {k: params(v) for k, v in nets.items()}
    assert not torch.equal(before["student"], before["peer1"]) and not torch.equal(before["peer1"], before["peer2"])
    batch = labelled_batch()
    with torch.no_grad():  # the student's loss by hand: CE + mean KL(peer || student)
        x = m.ctx.normalize(batch["train"])
        logits = {k: v(x) for k, v in nets.items()}
        log_s = F.log_softmax(logits["student"], 1)
        kls = [(F.softmax(logits[p], 1) * (F.log_softmax(logits[p], 1) - log_s)).sum(1).mean()
               for p in ("peer1", "peer2")]
        want = F.cross_entropy(logits["student"], batch["train_labels"]) + (kls[0] + kls[1]) / 2
    out = m.step(batch, 0)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert {"loss_peer1", "loss_peer2"} <= out.keys()
    for name, net in nets.items():
        assert not torch.equal(before[name], params(net)), f"{name} did not update"
    assert m.eval_model() is m.student
    with pytest.raises(ConfigError, match="dml.peers"):
        make("dml", peers=1)


# ----------------------------------------------------------------------------- born-again networks


def test_born_again_generations(tiny_task):
    from mosaic.engine.schedule import make_scheduler

    m = make("born_again", steps=6, generations=3, test=str(tiny_task["task"]))
    assert m.boundaries() == [2, 4]
    lr = m.ctx.cfg["student"]["lr"]
    sched = make_scheduler(m, "student", m.student_opt, m.ctx.cfg)  # as the engine schedules the student
    teachers_seen = []
    for step in range(6):
        if step == 2:
            last_gen1 = params(m.student)
        m.step(labelled_batch(step), step)
        if step in (1, 3, 5):  # second step of a generation: the cosine over its own two steps is at half
            assert m.student_opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5)
        teachers_seen.append(m.current_teacher())
        if step in (2, 4):
            assert m.student_opt.param_groups[0]["lr"] == pytest.approx(lr)  # schedule restarted
        if step == 2:
            assert torch.equal(params(m.frozen[0]), last_gen1)  # generation 1 frozen as it was
        sched.step()
    assert len(m.frozen) == 2
    assert teachers_seen[:2] == [m.teacher] * 2
    assert teachers_seen[2] is m.frozen[0] and teachers_seen[4] is m.frozen[1]
    assert all(not p.requires_grad for net in m.frozen for p in net.parameters())
    assert not torch.equal(params(m.frozen[0]), params(m.frozen[1]))

    # at a boundary the student is re-initialised (seeded per generation) and its optimizer state dropped
    assert m.student_opt.state
    m.start_generation()
    assert not m.student_opt.state
    fresh, now = m._fresh_student_state(3), m.student.state_dict()
    assert all(torch.equal(fresh[k], now[k]) for k in fresh)
    assert not torch.equal(params(m.student), params(m.frozen[-1]))

    # results: each generation's and the softmax-averaged ensemble's top-1, by hand
    from mosaic.data import load_image_set
    test = load_image_set(str(tiny_task["task"]), split="test", image_size=SIZE, cache=False)
    x = m.ctx.normalize(test.images.float() / 255)
    nets = [*m.frozen, m.student]
    m.student.eval()
    with torch.no_grad():
        probs = [F.softmax(net(x), 1) for net in nets]
    m.student.train()
    accs = [(p.argmax(1) == test.labels).float().mean().item() for p in probs]
    ens = (sum(probs).argmax(1) == test.labels).float().mean().item()
    res = m.results()
    assert [res[f"gen{i}_top1"] for i in (1, 2, 3, 4)] == pytest.approx(accs)
    assert res["ensemble_top1"] == pytest.approx(ens)

    # the frozen generations survive a checkpoint round trip
    other = make("born_again", steps=6, generations=3)
    other.load_state_dict(m.state_dict())
    assert [torch.equal(params(a), params(b)) for a, b in zip(m.frozen, other.frozen)] == [True] * 3
    with pytest.raises(ConfigError, match="born_again.generations"):
        make("born_again", steps=2, generations=3)


def test_born_again_resume_matches_uninterrupted_run(tiny_task, kd_teachers, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from baselines.classic.born_again import BornAgain
    from mosaic.cli import _resolve
    from mosaic.engine import train

    def cfg(name, **extra):
        return _resolve(base_overrides(tiny_task, tmp_path, name=name, method="born_again", steps=6, ckpt_every=3,
                                       teacher=str(kd_teachers[0]), **{"student.arch": "cnn_tiny",
                                                                       "born_again.generations": 3}, **extra))

    full = train(cfg("full"))
    real_step = BornAgain.step

    def dying_step(self, batch, step):
        if step == 4:  # killed after the checkpoint at 3, before generation 3 starts at step 4
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, batch, step)

    monkeypatch.setattr(BornAgain, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("killed"))
    monkeypatch.setattr(BornAgain, "step", real_step)
    resumed = train(cfg("killed", resume=True))
    assert resumed["final_losses"] == full["final_losses"]
    assert {k: v for k, v in resumed.items() if k.endswith("_top1")} == \
        {k: v for k, v in full.items() if k.endswith("_top1")}
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- multi-teacher


def test_multi_teacher_averages_teachers_by_hand(kd_teachers):
    from mosaic.models import load_model
    run_teacher = freeze(load_model(kd_teachers[0])[0])
    m = make("multi_teacher", teacher=run_teacher, teachers=[str(kd_teachers[1])], weights=[1, 3],
             temperature=2.0, alpha=0.5)
    assert len(m.teachers) == 2 and m.weights == [0.25, 0.75]
    batch = labelled_batch()
    with torch.no_grad():
        x, y = m.ctx.normalize(batch["train"]), batch["train_labels"]
        t1, t2 = m.teachers[0](x), m.teachers[1](x)
        assert not torch.allclose(t1, t2)
        s = m.student(x)
        p = 0.25 * F.softmax(t1 / 2, 1) + 0.75 * F.softmax(t2 / 2, 1)
        kl = (p * (p.log() - F.log_softmax(s / 2, 1))).sum(1).mean()
        want = 0.5 * F.cross_entropy(s, y) + 0.5 * 4 * kl
    out = m.step(batch, 0)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="multi_teacher.weights"):
        make("multi_teacher", teachers=[str(kd_teachers[1])], weights=[1, 2, 3])
