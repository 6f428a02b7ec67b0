"""The shared synthesised-image pool, DeepInversion's size-dependent settings, CMI and Fast (meta update, resume)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from baselines.datafree.cmi import CMI
from baselines.datafree.deepinversion import inversion_settings
from baselines.datafree.fast import Fast
from baselines.datafree.pool import ImagePool
from conftest import train_killed_at
from mosaic.augment import Augment
from mosaic.config import ConfigError
from test_datafree import B, CLASSES, SIZE, SMALL, engine_cfg, grads, make

CMI_SMALL = {**SMALL, "g_steps": 2, "pool_size": 16, "bank_size": 12, "n_neg": 6, "head_dim": 8}
FAST_SMALL = {**SMALL, "g_steps": 3, "pool_size": 16, "warmup": 1}


def numbered(first: int, n: int) -> torch.Tensor:
    """n uint8 images (3, 4, 4) whose every pixel is the image's number."""
    return torch.arange(first, first + n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()


# ----------------------------------------------------------------------------- the pool

def test_pool_is_bounded_and_replaces_the_oldest_first():
    pool = ImagePool(5, channels=3, image_size=4)
    pool.add(numbered(0, 3))
    assert len(pool) == 3 and pool.latest(2)[:, 0, 0, 0].tolist() == [1, 2]
    pool.add(numbered(3, 4))  # 7 images into 5 slots: 0 and 1 are gone
    assert len(pool) == 5 and pool.added == 7
    assert sorted(pool.images()[:, 0, 0, 0].tolist()) == [2, 3, 4, 5, 6]
    assert pool.latest(5)[:, 0, 0, 0].tolist() == [2, 3, 4, 5, 6]
    pool.add(numbered(7, 5))
    assert sorted(pool.images()[:, 0, 0, 0].tolist()) == [7, 8, 9, 10, 11]
    # the ring by hand: 0-2 in slots 0-2; 3, 4 in slots 3, 4 and 5, 6 in 0, 1; 7-9 in 2-4 and 10, 11 in 0, 1
    assert pool.data[:, 0, 0, 0].tolist() == [10, 11, 7, 8, 9] and pool.next == 2
    with pytest.raises(ValueError, match="do not fit"):
        pool.add(numbered(0, 6))
    floats = ImagePool(2, channels=3, image_size=4)
    floats.add(torch.full((1, 3, 4, 4), 0.5))
    assert floats.images()[0, 0, 0, 0].item() == 128  # round(0.5 * 255)


def test_pool_samples_every_image_once_per_epoch_and_restarts_after_add():
    pool = ImagePool(8, channels=3, image_size=4, seed=3)
    pool.add(numbered(0, 6))
    epoch = torch.cat([pool.sample(3), pool.sample(3)])
    assert sorted((epoch[:, 0, 0, 0] * 255).round().int().tolist()) == list(range(6))
    pool.add(numbered(6, 2))  # a new shuffle over all 8 starts now
    epoch = torch.cat([pool.sample(4), pool.sample(4)])
    assert sorted((epoch[:, 0, 0, 0] * 255).round().int().tolist()) == list(range(8))


@pytest.mark.parametrize("stale", [False, True])
def test_pool_state_dict_round_trip_gives_the_same_images_and_samples(stale):
    def fresh():
        return ImagePool(6, channels=3, image_size=8, seed=1, augment=Augment(image_size=8, padding=2))

    torch.manual_seed(0)
    a = fresh()
    for i in range(3):
        a.add(torch.rand(4, 3, 8, 8))  # 12 images through 6 slots
        a.sample(5)
    if stale:
        a.add(torch.rand(2, 3, 8, 8))  # saved between an add and the next sample
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(7)
    expected = [a.sample(4) for _ in range(3)]
    b = fresh()
    b.load_state_dict(state)
    assert torch.equal(b.images(), a.images()) and b.next == a.next and b.added == a.added
    torch.manual_seed(7)
    assert all(torch.equal(b.sample(4), x) for x in expected)
    with pytest.raises(ValueError, match="same pool size"):
        ImagePool(3, channels=3, image_size=8).load_state_dict(state)


# ----------------------------------------------------------------------------- DeepInversion's settings by size

def test_deepinversion_cifar_settings_at_32_px_and_imagenet_ones_above():
    assert inversion_settings(32) == {"jitter": 2, "flip": False, "first_bn_multiplier": 1.0}  # official CIFAR code
    assert inversion_settings(16)["jitter"] == 1
    assert inversion_settings(224) == {"jitter": 30, "flip": True, "first_bn_multiplier": 10.0}  # ImageNet code
    assert inversion_settings(64) == {"jitter": 9, "flip": True, "first_bn_multiplier": 10.0}
    m = make("deepinversion", pool_size=8, di_iters=1)  # 16 px
    assert (m.jitter, m.flip, m.first_bn_multiplier) == (1, False, 1.0)
    v = torch.randn(B, 3, SIZE, SIZE)
    with m.bn_hooks:
        m.teacher(v)
    plain = sum(m.bn_hooks.distances.values()).item()
    assert m.synthesis_losses(v, torch.arange(B) % CLASSES)["bn"].item() == pytest.approx(plain, rel=1e-5)
    m.jitter = 0
    assert all(torch.equal(m.jitter_flip(v), v) for _ in range(8))  # never flipped
    user = make("deepinversion", pool_size=8, jitter=3, flip=True, first_bn_multiplier=10.0)
    assert (user.jitter, user.flip, user.first_bn_multiplier) == (3, True, 10.0)
    with pytest.raises(ConfigError, match="flip"):
        make("deepinversion", pool_size=8, flip="yes")


# ----------------------------------------------------------------------------- adversarial terms

def agreeing_student(m) -> None:
    """Make the student a slightly perturbed teacher: mostly the same argmax, non-zero KL."""
    m.student.load_state_dict(m.teacher.state_dict())
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for p in m.student.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("name,opts", [("cmi", CMI_SMALL), ("fast", FAST_SMALL)])
def test_adversarial_term_reaches_the_generator_and_leaves_the_teacher(name, opts):
    m = make(name, **opts)
    agreeing_student(m)
    torch.manual_seed(2)
    z = torch.randn(B, m.opts["nz"])
    terms = m.synthesis_terms(m.generator(z), torch.arange(B) % CLASSES, adversarial=True)
    assert terms["adv"].item() < 0
    m.generator.zero_grad(set_to_none=True)
    terms["adv"].backward()
    assert grads(m.generator).abs().sum() > 0
    assert all(p.grad is None for p in m.student.parameters())  # the student is no synthesis player
    off = m.synthesis_terms(m.generator(z), torch.arange(B) % CLASSES, adversarial=False)
    assert off["adv"].item() == 0.0
    teacher, student = copy.deepcopy(m.teacher.state_dict()), copy.deepcopy(m.student.state_dict())
    m.synthesize(adversarial=True)
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher.items())
    assert all(torch.equal(v, m.student.state_dict()[k]) for k, v in student.items())  # BN stats too
    assert len(m.pool) == B


def test_deepinversion_competition_reaches_the_pixels_and_leaves_the_teacher():
    m = make("deepinversion", pool_size=8, di_iters=2, competition=1.0)
    v = torch.randn(B, 3, SIZE, SIZE, requires_grad=True)
    comp = m.synthesis_losses(v, torch.arange(B) % CLASSES)["comp"]
    assert comp.item() > 0
    comp.backward()
    assert v.grad.abs().sum() > 0
    teacher = copy.deepcopy(m.teacher.state_dict())
    m.synthesize(B)
    assert all(torch.equal(t, m.teacher.state_dict()[k]) for k, t in teacher.items())


# ----------------------------------------------------------------------------- CMI

def test_cmi_synthesis_fills_pool_and_bank_and_uses_the_bank_as_negatives():
    m = make("cmi", **CMI_SMALL)
    dim = sum(layer.num_features for layer in m.bn_hooks.layers)
    m.synthesize()
    assert len(m.pool) == B and m.bank.filled == B and m.bank.data.shape == (12, 2 * dim)
    m.synthesize()
    m.synthesize()
    assert len(m.pool) == 3 * B and m.bank.filled == 12  # bank full: FIFO
    local, glob = torch.randn(B, dim), torch.randn(B, dim)
    torch.manual_seed(0)
    with_bank = m.contrastive(local, glob)
    m.bank.filled = 0
    torch.manual_seed(0)
    assert not torch.allclose(with_bank, m.contrastive(local, glob))  # negatives from the bank count


# ----------------------------------------------------------------------------- Fast's meta update

def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_fast_reptile_moves_the_initial_weights_by_the_reptile_rule():
    m = make("fast", meta="reptile", lr_meta=0.3, **FAST_SMALL)
    old = params(m.generator)
    fast, _, _ = m.adapt(adversarial=False)
    adapted = params(fast)
    assert any(not torch.equal(a, o) for a, o in zip(adapted, old))
    m.meta_update(fast)
    new = params(m.generator)
    for n, o, a in zip(new, old, adapted):
        assert torch.allclose(n, o + 0.3 * (a - o), atol=1e-7)
    assert any(not torch.equal(n, o) for n, o in zip(new, old))


def test_fast_fomaml_takes_one_adam_step_on_the_summed_inner_gradients():
    m = make("fast", **FAST_SMALL)  # meta=fomaml, the reference scripts' --is_maml 1
    old = params(m.generator)
    fast, _, _ = m.adapt(adversarial=False)
    summed = [p.grad.clone() for p in m.generator.parameters()]
    assert sum(g.abs().sum() for g in summed) > 0
    m.meta_update(fast)
    lr = m.opts["lr_g"] * m.opts["g_steps"]
    for n, o, g in zip(params(m.generator), old, summed):
        # Adam's first step: bias-corrected m = g, v = g^2, so the step is lr * g / (|g| + eps)
        assert torch.allclose(n, o - lr * g / (g.abs() + 1e-8), atol=1e-6)


def test_fast_bn_average_blends_past_statistics():
    m = make("fast", bn_momentum=0.9, **FAST_SMALL)
    m.synthesize(adversarial=False)
    first = {i: (mean.clone(), var.clone()) for i, (mean, var) in m.bn_hooks.last.items()}
    assert all(torch.equal(m.bn_hooks.ema[i][0], first[i][0]) for i in first)  # the first synthesis sets it
    m.synthesize(adversarial=False)
    for i, (mean, _) in m.bn_hooks.last.items():
        assert torch.allclose(m.bn_hooks.ema[i][0], 0.9 * first[i][0] + 0.1 * mean)


def test_pool_method_options_are_clear_errors():
    with pytest.raises(ConfigError, match="fast.meta"):
        make("fast", meta="maml", warmup=1, **SMALL)
    with pytest.raises(ConfigError, match="raise steps"):
        make("fast", warmup=10, **SMALL)  # make() runs 10 steps
    with pytest.raises(ConfigError, match="cmi.n_neg"):
        make("cmi", n_neg=0, **SMALL)
    with pytest.raises(ConfigError, match="pool_size"):
        make("cmi", pool_size=2, **SMALL)  # a batch of 4 does not fit


# ----------------------------------------------------------------------------- through the engine: resume

def _method_state(checkpoint) -> dict:
    for f in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, weights_only=False)
        if isinstance(state, dict) and "pool" in state:
            return state
    raise AssertionError(f"no pool in {checkpoint}")


@pytest.mark.parametrize("method_cls", [CMI, Fast])
def test_pool_method_resumes_to_identical_weights(method_cls, tiny_task, tiny_teacher, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mosaic.engine import checkpoints, train
    method = method_cls.name
    common = dict(steps=5, ckpt_every=1, keep_ckpts=5)
    full = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "full", method, **common))
    train_killed_at(monkeypatch, method_cls, 3, engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed", method,
                                                           **common))
    resumed = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed", method, resume=True, **common))
    assert resumed["final_losses"] == full["final_losses"]
    a, b = _method_state(checkpoints(tmp_path / "full")[-1]), _method_state(checkpoints(tmp_path / "killed")[-1])
    assert torch.equal(a["pool"], b["pool"]) and a["syntheses"] == b["syntheses"] == resumed[f"{method}_syntheses"]
    assert all(torch.equal(v, b["generator"][k]) for k, v in a["generator"].items())
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "results.json").exists() and (tmp_path / "full" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name, first", [("fast", 3), ("cmi", 4), ("nayer", 4)])
def test_adversarial_term_starts_where_each_reference_starts_it(name, first, monkeypatch):
    """warmup 4: Fast-Datafree's FastMetaSynthesizer (ep += 1, then adv if ep >= warmup) is adversarial from its
    4th synthesis on (index 3); NAYER's synthesizer (ep += 1, then adv if ep > warmup) from its 5th; CMI's from its
    first after the warm-up steps, as the toolkit's loop starts KD."""
    m = make(name, warmup=4, **SMALL)
    seen = []
    monkeypatch.setattr(m, "synthesize", lambda *, adversarial: seen.append(adversarial) or {})
    monkeypatch.setattr(m, "kd_step", lambda: {})
    for step in range(7):
        m.step({}, step)
    assert seen.index(True) == first and all(seen[first:]) and not any(seen[:first])


def test_pool_methods_count_their_student_budget():
    """student updates = KD steps (steps 10 here), each on batch_size pool images."""
    di = make("deepinversion", pool_size=6, synth_batch=4, di_iters=1)  # 2 synthesis steps, then 8 KD steps
    assert di.budget() == {"student_updates": 8, "student_images": 8 * B}
    for name in ("cmi", "fast"):
        m = make(name, warmup=3, **SMALL)
        assert m.budget() == {"student_updates": 7, "student_images": 7 * B}, name


def test_pool_kd_step_feeds_one_mixed_view_to_teacher_and_student():
    """Under mix=mixup the teacher and the student see the identical mixed batch (function matching)."""
    m = make("deepinversion", pool_size=4, synth_batch=4, di_iters=1)
    m.pool.add(torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8))
    calls = []
    m.ctx.mix = lambda x: calls.append(x) or x.flip(0)  # a stand-in mixer that changes the batch
    seen = {}

    def record(key):
        def hook(module, inputs):
            seen.setdefault(key, inputs[0].clone())
        return hook
    t_hook = m.teacher.register_forward_pre_hook(record("t"))
    s_hook = m.student.register_forward_pre_hook(record("s"))
    m.kd_step()
    t_hook.remove()
    s_hook.remove()
    assert len(calls) == 1 and torch.equal(seen["t"], seen["s"]) and torch.equal(seen["s"], calls[0].flip(0))
