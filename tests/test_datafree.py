"""Data-free baselines (DAFL, ZSKT, DFAD, DFQ, DeepInversion, CMI, Fast, NAYER): BN hooks, adversarial gradients, engine runs.

Their losses by hand: test_losses_*.py; the shared image pool, CMI and Fast: test_pool_methods.py.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from baselines.datafree.common import BNStatHooks
from baselines.datafree.deepinversion import DeepInversion, inversion_settings
from baselines.datafree.zskt import pair_layers
from conftest import base_overrides, train_killed_at
from hand import approx
from mosaic.config import ConfigError, resolve
from mosaic.losses import batch_stats, total_variation_l2
from mosaic.methods import Context, get_method, method_defaults
from mosaic.models import create_model, freeze

B, SIZE, CLASSES = 4, 16, 3
SMALL = {"nz": 16, "ngf": 8}


def make(name: str, seed: int = 0, **opts):
    """A method on CPU with a tiny random cnn_tiny teacher and student, outside the engine."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    cfg = resolve(overrides=[f"method={name}", *(f"{name}.{k}={json.dumps(v)}" for k, v in opts.items())],
                  method_defaults=method_defaults)
    teacher = freeze(create_model("cnn_tiny", num_classes=CLASSES))
    student = create_model("cnn_tiny", num_classes=CLASSES)
    ctx = Context(cfg=cfg, opts=cfg[name], teacher=teacher, student=student, num_classes=CLASSES, image_size=SIZE,
                  channels=3, mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.25, 0.3]),
                  device=torch.device("cpu"), accelerator=Accelerator(cpu=True), steps=10, batch_size=B)
    return get_method(name)(ctx)


def grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


# ----------------------------------------------------------------------------- BatchNorm statistics

def toy_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5))
    return net.eval()


def set_running_stats_to(net: nn.Module, x: torch.Tensor) -> None:
    """Make every BN layer's running stats the exact (biased) statistics of its input for the batch x."""
    def pre(module, inputs):
        mean, var = batch_stats(inputs[0])
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
    handles = [m.register_forward_pre_hook(pre) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()


def test_bn_statistics_loss_zero_for_matching_images_positive_otherwise():
    net, x = toy_net(), torch.randn(8, 3, 6, 6)
    set_running_stats_to(net, x)
    with BNStatHooks(net) as bn:
        net(x)
    assert len(bn.distances) == 2
    assert bn.loss(first_multiplier=10).item() == pytest.approx(0.0, abs=1e-5)
    with BNStatHooks(net) as bn:
        net(x * 1.5 + 0.3)
    d0, d1 = bn.distances[0].item(), bn.distances[1].item()
    assert d0 > 0.1 and d1 > 0.1
    assert bn.loss(first_multiplier=10).item() == approx(10 * d0 + d1)
    # single BN layer whose running stats are set by hand from the input's statistics
    one = nn.BatchNorm2d(3).eval()
    one.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    one.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    with BNStatHooks(one) as bn:
        one(x)
    assert bn.loss().item() == pytest.approx(0.0, abs=1e-5)
    with BNStatHooks(one) as bn:
        one(x + 0.5)
    assert bn.loss().item() == pytest.approx(0.5 * math.sqrt(3), rel=1e-4)  # mean off by 0.5 in 3 channels


def test_bn_hooks_are_removed_and_need_batchnorm():
    net = toy_net()
    hooks = BNStatHooks(net)
    with hooks:
        net(torch.randn(2, 3, 4, 4))
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    with pytest.raises(ConfigError, match="BatchNorm"):
        BNStatHooks(nn.Sequential(nn.Conv2d(3, 3, 1)))


# ----------------------------------------------------------------------------- adversarial gradients

def adv_grad(m, z: torch.Tensor) -> torch.Tensor:
    """Gradient of the adversarial term alone w.r.t. the generator's parameters."""
    m.generator.zero_grad(set_to_none=True)
    m.generator_losses(m.generator(z))["g_adv"].backward()
    return grads(m.generator)


def classifier_input(m, fake: torch.Tensor) -> torch.Tensor:
    """What teacher and student see: a sigmoid head's pixels normalised, other heads' outputs as they are."""
    return m.ctx.normalize(fake) if m.opts["head"] == "sigmoid" else fake


def hand_adv(name: str, m, fake: torch.Tensor) -> float:
    x = classifier_input(m, fake)
    t, s = m.teacher(x).double(), m.student(x).double()
    if name == "dfad":
        return -(s - t).abs().mean().item()
    p_t, log_p_s = torch.softmax(t, 1), torch.log_softmax(s, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean().item()
    return -kl / CLASSES if name == "zskt" else -kl


@pytest.mark.parametrize("name", ["zskt", "dfad", "dfq"])
def test_adversarial_gradient_reaches_generator_through_the_student(name):
    m = make(name, **SMALL)
    z = torch.randn(B, m.opts["nz"])
    with torch.no_grad():
        fake = m.generator(z)
        assert m.generator_losses(fake)["g_adv"].item() == pytest.approx(hand_adv(name, m, fake), abs=1e-5)
    before = adv_grad(m, z)
    assert before.abs().sum() > 0
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = adv_grad(m, z)
    assert after.abs().sum() > 0 and not torch.allclose(before, after)
    # a "student" that is the teacher (the public toolkit's bug) gives no adversarial signal at all
    m.student = copy.deepcopy(m.teacher)
    assert adv_grad(m, z).abs().max().item() == 0.0


def test_dafl_generator_loss_is_teacher_only():
    m = make("dafl", **SMALL)
    z = torch.randn(B, m.opts["nz"])

    def g_grad():
        m.generator.zero_grad(set_to_none=True)
        g = m.generator_losses(m.generator(z))
        (g["g_oh"] + 0.1 * g["g_act"] + 5 * g["g_ie"]).backward()
        return grads(m.generator)

    before = g_grad()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert before.abs().sum() > 0 and torch.equal(before, g_grad())


def test_dafl_terms_use_teacher_penultimate_features():
    m = make("dafl", **SMALL)
    fake = m.generator(torch.randn(B, m.opts["nz"]))
    g = m.generator_losses(fake)
    t = m.teacher
    feat = t.forward_features(classifier_input(m, fake)).mean(dim=(2, 3))  # cnn_tiny: average-pooled last map
    assert g["g_act"].item() == approx(-feat.abs().mean().item())
    assert torch.allclose(g["t_logits"], t(classifier_input(m, fake)))


def test_dfq_generator_terms_match_hand_computation():
    m = make("dfq", **SMALL)
    fake = m.generator(torch.randn(B, m.opts["nz"]))
    g = m.generator_losses(fake)
    x = m.ctx.normalize(fake)
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0])))
             for mod in m.teacher.modules() if isinstance(mod, nn.BatchNorm2d)]
    p = torch.softmax(m.teacher(x).double(), 1)
    for h in hooks:
        h.remove()
    bn = 0.0
    for mod, inp in seen:
        mu = inp.double().mean(dim=(0, 2, 3))
        var = ((inp.double() - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        bn += (mu - mod.running_mean.double()).norm().item() + (var - mod.running_var.double()).norm().item()
    pbar = p.mean(0)
    assert g["g_bn"].item() == pytest.approx(bn, rel=1e-4)
    assert g["g_balance"].item() == approx((pbar * pbar.log()).sum().item())
    assert g["g_oh"].item() == approx(-p.max(1).values.log().mean().item())


# ----------------------------------------------------------------------------- ZSKT layers

def test_zskt_pairs_stages_by_reduction():
    tiny, small = create_model("cnn_tiny", num_classes=3), create_model("cnn_small", num_classes=3)
    assert pair_layers(small, tiny) == [("layer1", "layer1"), ("layer2", "layer2")]
    wrn = pair_layers(create_model("wrn40_2", num_classes=10), create_model("wrn16_1", num_classes=10))
    assert wrn == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    with pytest.raises(Exception, match="unknown layer"):
        make("zskt", at_layers=[["layer1", "nolayer"]], **SMALL)


# ----------------------------------------------------------------------------- DeepInversion

def test_deepinversion_priors_are_on_by_default_and_smooth_images():
    d = method_defaults("deepinversion")
    assert d["tv_l2"] > 0 and d["l2"] > 0 and d["lambda_bn"] > 0
    # the first BN layer's extra weight is resolved by image size: x10 above 32 px (ImageNet code), see below
    assert d["first_bn_multiplier"] is None and inversion_settings(224)["first_bn_multiplier"] > 1
    m = make("deepinversion", pool_size=8, di_iters=1)
    v = torch.randn(B, 3, SIZE, SIZE, requires_grad=True)
    targets = torch.arange(B) % CLASSES
    terms = m.synthesis_losses(v, targets)
    o = m.opts
    prior = o["tv_l2"] * terms["tv_l2"] + o["l2"] * terms["l2"]
    assert prior.item() > 0
    rest = o["lambda_ce"] * terms["ce"] + o["lambda_bn"] * terms["bn"]
    assert (m.weighted(terms) - rest).item() == pytest.approx(prior.item(), rel=1e-2)
    tv_before = total_variation_l2(v).item()
    opt = torch.optim.Adam([v], lr=o["lr"])
    prior.backward()
    opt.step()
    assert total_variation_l2(v).item() < tv_before


def test_deepinversion_synthesis_lowers_its_loss_and_fills_the_pool():
    import warnings

    filters = list(warnings.filters)
    m = make("deepinversion", pool_size=6, synth_batch=4, di_iters=8, lr=0.1)
    assert warnings.filters == filters  # no process-wide filter installed by the method
    torch.manual_seed(1)
    v = torch.randn(4, 3, SIZE, SIZE)
    targets = torch.arange(4) % CLASSES
    start = m.weighted(m.synthesis_losses(v, targets)).item()
    torch.manual_seed(1)
    images, terms = m.synthesize(4)
    assert images.shape == (4, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    assert terms["loss"].item() < start and math.isfinite(terms["loss"].item())
    m.step({}, 0)
    m.step({}, 1)
    assert m.filled == 6  # 4 + the 2 left
    assert set(m.step({}, 2)) == {"loss_s"}


def test_deepinversion_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="raise steps above"):
        make("deepinversion", pool_size=100)  # 25 synthesis steps of 4 > 10 steps
    with pytest.raises(ConfigError, match="jitter"):
        make("deepinversion", pool_size=8, jitter=16)
    with pytest.raises(ConfigError, match="student_steps"):
        make("dfad", student_steps=0, **SMALL)


def test_deepinversion_benchmark_recipe_is_fast_datafrees_deepinv():
    d = method_defaults("deepinversion", "benchmark")
    assert d["recipe"] == "benchmark" and d["synth_every"] == 400 and d["di_iters"] == 1000 and d["lr"] == 0.1
    assert d["betas"] == [0.5, 0.99] and d["lambda_bn"] == 10.0 and d["competition"] == 1.0
    assert d["tv_l2"] == d["l2"] == 0.0 and d["student_bn"] == -0.001 and d["competition_form"] == "clamped"
    assert d["targets"] == "random" and d["temperature"] == 20.0
    assert inversion_settings(32, recipe="benchmark") == {"jitter": 4, "flip": True, "first_bn_multiplier": 1.0}
    assert method_defaults("deepinversion")["synth_every"] is None  # the paper recipe: the pool first


def test_deepinversion_benchmark_objective_subtracts_the_students_bn_term():
    m = make("deepinversion", recipe="benchmark", pool_size=8)
    assert (m.jitter, m.flip) == (2, True)  # 1/8 of the 16 px side
    student_stats = copy.deepcopy(m.student.state_dict())
    v = torch.randn(B, 3, SIZE, SIZE, requires_grad=True)
    terms = m.synthesis_losses(v, torch.arange(B) % CLASSES)
    assert terms["bn_student"].item() > 0 and terms["comp"].item() < 0
    expected = terms["ce"] + 10.0 * (terms["bn"] - 0.001 * terms["bn_student"]) + terms["comp"]
    assert m.weighted(terms).item() == approx(expected.item())
    with BNStatHooks(m.student) as hooks:  # the student's distances through a fresh hook, in eval mode
        m.student.eval()
        m.student(v)
        assert hooks.loss().item() == approx(terms["bn_student"].item())
    m.student.train()
    m.weighted(terms).backward()
    assert v.grad.abs().sum() > 0 and all(p.grad is None for p in m.student.parameters())
    m.synthesize(B)
    assert all(torch.equal(t, m.student.state_dict()[k]) for k, t in student_stats.items())  # BN stats untouched
    assert all(len(x._forward_hooks) == 0 for x in m.student.modules())


def test_deepinversion_interleaved_synthesis_every_n_kd_steps_into_a_fifo_pool():
    m = make("deepinversion", recipe="benchmark", pool_size=8, synth_every=3, di_iters=1)
    assert m.kd_updates() == 10  # every engine step is a KD step
    first = m.step({}, 0)
    assert "loss_s" in first and "di_loss" in first and m.filled == B
    assert set(m.step({}, 1)) == {"loss_s"} and set(m.step({}, 2)) == {"loss_s"}
    assert "di_loss" in m.step({}, 3) and m.filled == 2 * B
    m.step({}, 6)
    assert m.filled == 8 and m.pool.added == 3 * B  # FIFO: the oldest batch replaced
    assert m.results()["di_syntheses"] == 3 and m.results()["di_synthesis_steps"] == 0
    with pytest.raises(ConfigError, match="synth_batch 4 exceeds"):
        make("deepinversion", recipe="benchmark", pool_size=2)
    with pytest.raises(ConfigError, match="competition_form"):
        make("deepinversion", pool_size=8, competition_form="js")
    with pytest.raises(ConfigError, match="targets"):
        make("deepinversion", pool_size=8, targets="sorted")


def test_deepinversion_random_targets_are_uniform_draws():
    m = make("deepinversion", pool_size=8, targets="random", di_iters=1)
    seen = []
    real = m.synthesis_losses
    m.synthesis_losses = lambda x, targets: seen.append(targets.clone()) or real(x, targets)
    torch.manual_seed(5)
    m.synthesize(B)
    torch.manual_seed(5)
    assert torch.equal(seen[0], torch.randint(0, CLASSES, (B,)))


# ----------------------------------------------------------------------------- through the engine

ENGINE_OPTS = {
    "dafl": dict(SMALL),
    "zskt": {**SMALL, "student_steps": 2},
    "dfad": {**SMALL, "student_steps": 2},
    "dfq": {**SMALL, "student_steps": 2},
    "deepinversion": {"pool_size": 16, "di_iters": 2},  # 2 synthesis steps of 8, then KD
    "cmi": {**SMALL, "pool_size": 16, "g_steps": 2, "synth_every": 2, "bank_size": 32, "n_neg": 8, "head_dim": 8},
    "fast": {**SMALL, "pool_size": 16, "g_steps": 2, "synth_every": 2, "warmup": 1},
    "nayer": {**SMALL, "pool_size": 64, "g_steps": 2, "synth_every": 2, "warmup": 1, "warmup_loops": 2, "loops": 1},
}


def engine_cfg(task, teacher: Path, out: Path, name: str, method: str, **extra):
    from mosaic.cli import _resolve
    opts = {f"{method}.{k}": json.dumps(v) for k, v in ENGINE_OPTS[method].items()}
    items = {"name": name, "method": method, "teacher": str(teacher), "steps": 3, "student.arch": "cnn_tiny",
             **opts, **extra}
    return _resolve(base_overrides(task, out, **items))


@pytest.mark.parametrize("method", list(ENGINE_OPTS))
def test_method_runs_through_the_engine(method, tiny_task, tiny_teacher, tmp_path):
    from mosaic.engine import train
    res = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, method, method))
    assert res["steps"] == 3 and res["final_losses"]
    assert all(math.isfinite(v) for v in res["final_losses"].values()), res["final_losses"]
    assert 0.0 <= res["student_top1"] <= 1.0
    if method == "deepinversion":
        assert res["di_pool_images"] == 16 and res["di_synthesis_steps"] == 2 and "loss_s" in res["final_losses"]
    lines = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "elapsed_s" in x] == [1, 2, 3]  # one loss line per step


def _pool_in(checkpoint: Path) -> torch.Tensor:
    for f in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, weights_only=False)
        if isinstance(state, dict) and "pool" in state:
            return state["pool"]
    raise AssertionError(f"no DeepInversion pool in {checkpoint}")


def test_deepinversion_resume_keeps_the_pool(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mosaic.engine import checkpoints, train
    common = dict(steps=4, ckpt_every=1, keep_ckpts=4)
    full = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "full", "deepinversion", **common))

    real_synth = DeepInversion.synthesize
    # simulated kill during the second synthesis step
    train_killed_at(monkeypatch, DeepInversion, 1, engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed",
                                                              "deepinversion", **common))
    assert _pool_in(checkpoints(tmp_path / "killed")[-1]).shape[0] == 8  # one batch made before the kill

    calls = []

    def counting_synth(self, n):
        calls.append(n)
        return real_synth(self, n)

    monkeypatch.setattr(DeepInversion, "synthesize", counting_synth)
    resumed = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed", "deepinversion", resume=True, **common))
    assert calls == [8]  # only the missing batch is synthesised; the first comes from the checkpoint
    assert torch.equal(_pool_in(checkpoints(tmp_path / "killed")[-1]), _pool_in(checkpoints(tmp_path / "full")[-1]))
    assert resumed["final_losses"] == full["final_losses"]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- generator heads per method

def test_generator_heads_follow_each_papers_code():
    heads = {name: method_defaults(name)["head"] for name in ("dafl", "dfad", "zskt", "dfq")}
    assert heads == {"dafl": "tanh_bn", "dfad": "tanh_bn", "zskt": "bn", "dfq": "sigmoid"}
    m = make("dafl", **SMALL)
    assert [x.eps for x in m.generator.body if isinstance(x, nn.BatchNorm2d)] == [1e-5, 0.8, 0.8, 1e-5]
    with pytest.raises(ConfigError, match="dafl.head must be one of sigmoid, tanh_bn, bn"):
        make("dafl", head="tanh", **SMALL)
    with pytest.raises(ConfigError, match="dafl.bn_eps"):
        make("dafl", bn_eps=-1, **SMALL)


@pytest.mark.parametrize("head", ["sigmoid", "tanh_bn", "bn"])
def test_to_classifier_and_to_images_round_trip(head):
    m = make("dfad", head=head, **SMALL)
    mean, std = m.ctx.mean.view(1, -1, 1, 1), m.ctx.std.view(1, -1, 1, 1)
    images = torch.rand(B, 3, SIZE, SIZE)
    if head == "sigmoid":  # the generator makes pixels; the classifiers get them normalised
        assert torch.equal(m.to_images(images), images)
        assert torch.allclose(m.to_classifier(images), (images - mean) / std)
    else:                  # the generator makes the classifiers' input; grids get it de-normalised
        x = (images - mean) / std
        assert torch.equal(m.to_classifier(x), x)
        assert torch.allclose(m.to_images(x), images, atol=1e-6)
        wild = torch.full((1, 3, 2, 2), 50.0)
        assert torch.equal(m.to_images(wild), torch.ones_like(wild)) and m.to_images(-wild).max() == 0
    grid = m.sample_images(5)
    assert grid.shape == (5, 3, SIZE, SIZE) and 0 <= grid.min() and grid.max() <= 1


@pytest.mark.parametrize("name", ["zskt", "dfad", "dfq"])
def test_a_full_step_moves_the_generator_but_never_the_teacher(name):
    m = make(name, student_steps=1, **SMALL)
    teacher = copy.deepcopy(m.teacher.state_dict())
    generator = [p.detach().clone() for p in m.generator.parameters()]
    losses = m.step({}, 0)
    assert losses["loss_g"].item() != 0
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(a, b) for a, b in zip(generator, m.generator.parameters()))


def test_dfq_generator_step_runs_the_student_in_eval_mode():
    m = make("dfq", **SMALL)
    modes = []
    m.student.register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
    buffers = {k: v.clone() for k, v in m.student.named_buffers()}
    weights = {k: v.detach().clone() for k, v in m.student.named_parameters()}
    m.generator_step()
    assert modes == [False] and m.student.training        # eval for the generator step, train mode restored
    assert all(torch.equal(v, dict(m.student.named_buffers())[k]) for k, v in buffers.items())  # BN stats kept
    assert all(torch.equal(v, dict(m.student.named_parameters())[k]) for k, v in weights.items())
    m.step({}, 1)
    assert modes[-1] is True                              # KD steps train the student in train mode
    assert any(not torch.equal(v, dict(m.student.named_buffers())[k]) for k, v in buffers.items())


def test_dafl_generator_lr_is_the_readme_value_at_every_batch():
    lr = lambda m: m.generator_opt.param_groups[0]["lr"]  # noqa: E731
    assert lr(make("dafl", **SMALL)) == 0.02  # README: --lr_G 0.02 (batch 1024); here batch 4
    assert lr(make("dafl", lr_g=0.003, **SMALL)) == 0.003


@pytest.mark.parametrize("name", ["dafl", "dfad", "dfq", "zskt"])
def test_generator_methods_feed_one_mixed_view_to_teacher_and_student(name):
    """Under function matching every mixed batch of a step is what both the teacher and the student see."""
    m = make(name, **SMALL)
    mixed = []
    m.ctx.mixer = lambda x: mixed.append(x.flip(0)) or mixed[-1]  # a stand-in mixer that changes the batch
    seen = {"t": [], "s": []}

    def record(key):
        def hook(module, inputs):
            seen[key].append(inputs[0].detach().clone())
        return hook
    hooks = [m.teacher.register_forward_pre_hook(record("t")), m.student.register_forward_pre_hook(record("s"))]
    m.step({}, 0)
    for h in hooks:
        h.remove()
    assert len(mixed) == m.opts.get("student_steps", 1) if name != "zskt" else len(mixed) == 1
    for x in mixed:
        assert any(torch.equal(x.detach(), t) for t in seen["t"]) and any(torch.equal(x.detach(), s) for s in seen["s"])
