"""MosaicKD: the tests that catch its known failure modes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mosaic.config import ConfigError, resolve
from mosaic.methods import Context, method_defaults
from mosaic.methods.mosaic_kd import MosaicKD
from mosaic.models import create_model, freeze

B, SIZE = 4, 16


def make_method(seed: int = 0, student: torch.nn.Module | None = None, **opts) -> MosaicKD:
    """A MosaicKD instance on CPU with tiny random teacher/student (or `student`), outside the engine."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    cfg = resolve(overrides=[f"mosaic.{k}={v}" for k, v in {"patch_size": 8, "ngf": 8, "ndf": 8,
                                                              "student_steps": 2, **opts}.items()],
                  method_defaults=method_defaults)
    teacher = freeze(create_model("cnn_tiny", num_classes=3))
    student = student if student is not None else create_model("cnn_tiny", num_classes=3)
    ctx = Context(cfg=cfg, opts=cfg["mosaic"], teacher=teacher, student=student, num_classes=3, image_size=SIZE,
                  channels=3, mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.25, 0.3]),
                  device=torch.device("cpu"), accelerator=Accelerator(cpu=True), steps=10, batch_size=B)
    return MosaicKD(ctx)


def ood_batch(m: MosaicKD, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = MosaicKD.stream_needs(m.opts)["ood"]
    return {"ood": torch.rand(n * B, 3, SIZE, SIZE, generator=g)}


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def adv_grad(m: MosaicKD, z: torch.Tensor, *, detach_teacher=False, detach_student=False) -> torch.Tensor:
    """Gradient of the adversarial term alone w.r.t. the generator's parameters."""
    m.generator.zero_grad(set_to_none=True)
    x = m.ctx.normalize(m.generator(z))
    t, s = m.teacher(x), m.student(x)
    t = t.detach() if detach_teacher else t
    s = s.detach() if detach_student else s
    loss = -(F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    loss.backward()
    return grads(m.generator)


def test_adversarial_term_reaches_generator_through_student_and_teacher():
    m = make_method()
    z = torch.randn(B, m.opts["nz"])
    full = adv_grad(m, z)
    via_student = adv_grad(m, z, detach_teacher=True)
    via_teacher = adv_grad(m, z, detach_student=True)
    assert full.abs().sum() > 0 and via_student.abs().sum() > 0 and via_teacher.abs().sum() > 0
    assert torch.allclose(full, via_student + via_teacher, atol=1e-6)
    # the method's own g_adv gives the same gradient as the hand-written term
    m.generator.zero_grad(set_to_none=True)
    m.generator_losses(m.generator(z))["g_adv"].backward()
    assert torch.allclose(grads(m.generator), full, atol=1e-6)


def test_adversarial_gradient_depends_on_student():
    m = make_method()
    z = torch.randn(B, m.opts["nz"])
    before = adv_grad(m, z)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(before, adv_grad(m, z))
    # a "student" that is the teacher (the public re-implementation's bug) gives no adversarial signal at all
    m.student = copy.deepcopy(m.teacher)
    m.generator.zero_grad(set_to_none=True)
    g_adv = m.generator_losses(m.generator(z))["g_adv"]
    assert g_adv.item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_bit_identical_after_training():
    m = make_method()
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    for step in range(3):
        m.step(ood_batch(m, seed=step), step)
    after = m.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    student_changed = any(not torch.equal(a, b) for a, b in zip(
        make_method().student.state_dict().values(), m.student.state_dict().values()))
    assert student_changed


def test_discriminator_sees_crops_of_the_right_size_and_source():
    m = make_method(patch_size=8, patches=3)
    seen, fakes = [], []
    m.discriminator.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    m.generator.register_forward_hook(lambda mod, inp, out: fakes.append(out.detach().clone()))
    batch = ood_batch(m)
    m.step(batch, 0)
    real, fake_d, fake_g = seen[:3]
    for crops in (real, fake_d, fake_g):
        assert crops.shape == (3 * B, 3, 8, 8)

    def is_window_of(crop, images):
        windows = images.unfold(2, 8, 1).unfold(3, 8, 1)  # (N, C, h, w, 8, 8)
        diff = (windows - crop[None, :, None, None]).abs().amax(dim=(1, 4, 5))
        return bool((diff < 1e-6).any())

    ood0 = batch["ood"][:B]
    assert all(is_window_of(c, ood0) for c in real)
    assert all(is_window_of(c, fakes[0]) for c in fake_d)
    assert all(is_window_of(c, fakes[0]) for c in fake_g)
    assert not any(is_window_of(c, fakes[0]) for c in real)


def test_generator_terms_match_hand_computation():
    m = make_method()
    fake = m.generator(torch.randn(B, m.opts["nz"]))
    torch.manual_seed(5)
    terms = m.generator_losses(fake)
    x = m.ctx.normalize(fake)
    p_t = torch.softmax(m.teacher(x), 1).double()
    p_s = torch.softmax(m.student(x), 1).double()
    ent = -(p_t * p_t.log()).sum(1).mean()
    pbar = p_t.mean(0)
    bal = (pbar * torch.log2(pbar)).sum()
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.manual_seed(5)
    d = torch.sigmoid(m.discriminator(m.crops(fake)).double())
    local = -(d.log()).flatten(1).sum(1).mean()  # default: sum over each crop's map, mean over crops
    assert terms["g_align"].item() == pytest.approx(ent.item(), abs=1e-5)
    assert terms["g_balance"].item() == pytest.approx(bal.item(), abs=1e-5)
    assert terms["g_adv"].item() == pytest.approx(-kl.item(), abs=1e-5)
    assert terms["g_local"].item() == pytest.approx(local.item(), abs=1e-5)
    assert -math.log2(3) - 1e-6 <= terms["g_balance"].item() <= 0


def _g_loss(m, z):
    torch.manual_seed(123)  # same crops each time
    g = m.generator_losses(m.generator(z))
    o = m.opts
    return (o["lambda_local"] * g["g_local"] + o["lambda_align"] * g["g_align"]
            + o["lambda_balance"] * g["g_balance"] + o["lambda_adv"] * g["g_adv"])


def test_one_generator_step_lowers_its_loss():
    m = make_method(lr_g=1e-4)
    z = torch.randn(16, m.opts["nz"])
    before = _g_loss(m, z)
    m.generator_opt.zero_grad()
    before.backward()
    m.generator_opt.step()
    with torch.no_grad():
        after = _g_loss(m, z)
    assert after.item() < before.item()


def test_one_discriminator_step_lowers_its_loss():
    m = make_method(lr_g=1e-4)
    real = torch.rand(16, 3, SIZE, SIZE)
    fake = m.generator(torch.randn(16, m.opts["nz"])).detach()

    def d_loss():
        torch.manual_seed(7)
        return 0.5 * (m.local_loss(m.discriminator(m.crops(real)), real=True)
                      + m.local_loss(m.discriminator(m.crops(fake)), real=False))

    before = d_loss()
    m.discriminator_opt.zero_grad()
    before.backward()
    m.discriminator_opt.step()
    with torch.no_grad():
        assert d_loss().item() < before.item()


def test_student_sees_ood_normalised_with_in_domain_statistics():
    m = make_method(student_steps=1)
    inputs = []
    m.student.register_forward_pre_hook(lambda mod, inp: inputs.append(inp[0].detach().clone()))
    batch = ood_batch(m)
    m.step(batch, 0)
    student_x = inputs[-1]  # the distillation step: generated then OOD
    assert student_x.shape[0] == 2 * B
    want = (batch["ood"][B:2 * B] - m.ctx.mean.view(1, 3, 1, 1)) / m.ctx.std.view(1, 3, 1, 1)
    assert torch.allclose(student_x[B:], want, atol=1e-6)


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        make_method(patch_size=32)
    with pytest.raises(ConfigError, match="student_steps"):
        make_method(student_steps=0)
    with pytest.raises(ConfigError, match="student_bn"):
        make_method(student_bn="clean")


def first_bn(model: torch.nn.Module) -> torch.nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_frozen_bn_stats_normalises_by_batch_and_keeps_running_stats():
    from mosaic.methods import frozen_bn_stats

    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    with frozen_bn_stats(bn):
        y = bn(x)
    # batch statistics by hand (biased variance), running ones untouched
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(y, (x - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0 and bn.track_running_stats
    bn(x)  # tracking is back after the context
    assert torch.allclose(bn.running_mean, 0.1 * x.mean((0, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("mode", ["mixed", "ood"])
def test_student_bn_running_stats_come_from_the_chosen_images(mode):
    """Replay the momentum update over the batches the first BN layer tracked; under `ood` only OOD halves count."""
    m = make_method(student_steps=2, student_bn=mode)
    bn = first_bn(m.student)
    seen = []  # (input of the first BN layer, did it update the running stats?)
    bn.register_forward_pre_hook(lambda mod, inp: seen.append((inp[0].detach().clone(),
                                                               mod.training and mod.track_running_stats)))
    student_inputs = []
    m.student.register_forward_pre_hook(lambda mod, inp: student_inputs.append(inp[0].detach().clone()))
    batch = ood_batch(m)
    m.step(batch, 0)
    tracked = [x for x, t in seen if t]
    if mode == "mixed":  # the G step's generated batch, then each mixed batch of generated + OOD images
        assert [len(x) for x in tracked] == [B, 2 * B, 2 * B]
    else:  # only the OOD halves, each seen once, after its student step
        assert [len(x) for x in tracked] == [B, B]
        # student forwards: the G step's generated batch, then (mixed batch, its OOD half) per student step
        assert [len(x) for x in student_inputs] == [B, 2 * B, B, 2 * B, B]
        for k, x in enumerate(student_inputs[2::2]):
            want = (batch["ood"][(k + 1) * B:(k + 2) * B] - m.ctx.mean.view(1, 3, 1, 1)) / m.ctx.std.view(1, 3, 1, 1)
            assert torch.allclose(x, want, atol=1e-6)
    mean = torch.zeros(bn.num_features)
    for x in tracked:
        mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert int(bn.num_batches_tracked) == len(tracked)


def test_student_bn_ood_does_not_change_the_training_losses():
    """The extra forward only refreshes running statistics: with equal seeds the losses of one step are equal."""
    losses = {}
    for mode in ("mixed", "ood"):
        m = make_method(seed=3, student_steps=2, student_bn=mode)
        losses[mode] = {k: float(v) for k, v in m.step(ood_batch(m), 0).items()}
    assert losses["mixed"] == pytest.approx(losses["ood"], abs=1e-6)


def test_student_bn_ood_keeps_the_weights_of_mixed_with_a_dropout_student():
    """The extra BN forward draws dropout masks from a forked stream: two steps end with the same weights."""
    weights = {}
    for mode in ("mixed", "ood"):
        torch.manual_seed(5)
        student = torch.nn.Sequential(torch.nn.Dropout(0.3), create_model("cnn_tiny", num_classes=3))
        m = make_method(seed=3, student=student, student_steps=2, student_bn=mode)
        for step in range(2):
            m.step(ood_batch(m, seed=step + 1), step)
        weights[mode] = torch.cat([p.detach().flatten() for p in m.student.parameters()])
    assert torch.equal(weights["mixed"], weights["ood"])
