"""OOD distillation: the reference loop (mosaic_ref), D's real images and crops, function matching, budgets."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import base_overrides
from mosaic.augment import Mix, to_float
from mosaic.config import ConfigError, resolve
from mosaic.engine.task import make_streams
from mosaic.methods import Context, get_method, method_defaults
from mosaic.models import create_model, freeze
from mosaic.players.patches import grid_offsets, grid_patches, patch_offsets

B, C = 4, 3
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def make(name: str = "mosaic", *, size: int = 16, seed: int = 0, overrides: tuple = (), **opts):
    """A method on a hand-made CPU Context with tiny random cnn_tiny teacher and student, outside the engine."""
    from accelerate import Accelerator

    small = {"ngf": 8, "ndf": 8, "student_steps": 2} if name.startswith("mosaic") else {}
    torch.manual_seed(seed)
    cfg = resolve(overrides=[f"method={name}", f"data.image_size={size}", *overrides,
                             *[f"{name}.{k}={v}" for k, v in {**small, **opts}.items()]],
                  method_defaults=method_defaults)
    ctx = Context(cfg=cfg, opts=cfg[name], teacher=freeze(create_model("cnn_tiny", num_classes=C)),
                  student=create_model("cnn_tiny", num_classes=C), num_classes=C, image_size=size, channels=3,
                  mean=torch.tensor(MEAN), std=torch.tensor(STD), device=torch.device("cpu"),
                  accelerator=Accelerator(cpu=True), steps=10, batch_size=B)
    if cfg["mix"] != "none":  # as mosaic.engine.task.make_context builds it
        ctx.mixer = Mix(mode=cfg["mix"], alpha=cfg["mix_alpha"])
    return get_method(name)(ctx)


def batch_for(m, *, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    needs = type(m).stream_needs(m.ctx.opts)
    return {key: torch.rand(n * B, 3, size, size, generator=g) for key, n in needs.items()}


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ----------------------------------------------------------------------------- the reference loop

def test_mosaic_ref_losses_and_updates_match_the_reference_formulas():
    """One mosaic_ref step against kd_mosaic.py's loop written out by hand: same losses, same student weights."""
    m = make("mosaic_ref")
    o = m.opts
    assert o["patch_size"] is None and o["d_real"] == "plain" and o["d_normalize"] is True
    assert type(m).stream_needs(m.ctx.opts) == {"ood": 2, "ood_plain": 1}
    G, D, T, S = (copy.deepcopy(x) for x in (m.generator, m.discriminator, m.teacher, m.student))
    batch = batch_for(m)
    torch.manual_seed(5)
    out = m.step(batch, 0)

    norm = m.ctx.normalize
    bce = F.binary_cross_entropy_with_logits
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(S.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(5)
    images = norm(G(torch.randn(B, o["nz"])))
    real = norm(batch["ood_plain"])  # un-augmented, whole, normalised
    d_fake, d_real = D(images.detach()), D(real)
    loss_d = (bce(d_fake, torch.zeros_like(d_fake), reduction="sum")
              + bce(d_real, torch.ones_like(d_real), reduction="sum")) / (2 * len(d_fake)) * 1.0
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    t_out, s_out = T(images), S(images)
    pyx, log_pyx = F.softmax(t_out, 1), F.log_softmax(t_out, 1)
    py = pyx.mean(0)
    d_out = D(images)
    loss_local = bce(d_out, torch.ones_like(d_out), reduction="sum") / len(d_out)
    loss_align = -(pyx * log_pyx).sum(1).mean()
    loss_adv = -F.kl_div(F.log_softmax(s_out, 1), pyx, reduction="batchmean")
    loss_balance = (py * torch.log2(py)).sum()
    loss_g = 1.0 * loss_adv + loss_align * 1.0 + 1.0 * loss_local + loss_balance * 10.0
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    for k in range(2):
        with torch.no_grad():
            x = torch.cat([norm(G(torch.randn(B, o["nz"]))), norm(batch["ood"][k * B:(k + 1) * B])])
            t = T(x)
        loss_s = F.kl_div(F.log_softmax(S(x), 1), F.softmax(t, 1), reduction="batchmean")
        opt_s.zero_grad()
        loss_s.backward()
        opt_s.step()

    for key, want in (("loss_d", loss_d), ("g_local", loss_local), ("g_align", loss_align),
                      ("g_balance", loss_balance), ("g_adv", loss_adv), ("loss_g", loss_g), ("loss_s", loss_s)):
        assert out[key].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6), key
    assert torch.allclose(flat(m.student), flat(S), atol=1e-5)
    assert torch.allclose(flat(m.generator), flat(G), atol=1e-5)


def test_mosaic_ref_keeps_the_reference_set_up_whatever_is_asked():
    assert "patch_size" not in method_defaults("mosaic_ref") and "d_real" not in method_defaults("mosaic_ref")
    with pytest.raises(ConfigError, match="unknown config key 'mosaic_ref.patch_size'"):
        resolve(overrides=["method=mosaic_ref", "mosaic_ref.patch_size=8"], method_defaults=method_defaults)
    m = make("mosaic_ref", lambda_local=0.5)
    assert m.opts["lambda_local"] == 0.5 and m.crops_per_image == 1


# ----------------------------------------------------------------------------- D's real images

def test_plain_stream_gives_the_pools_images_without_padding_or_shift():
    cfg = resolve(overrides=["data.crop_padding=4", "seed=3"], method_defaults=method_defaults)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    sets = {"ood": SimpleNamespace(images=pool, labels=None)}
    acc = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    streams = make_streams(cfg, sets, {"ood": 3, "ood_plain": 1}, acc)
    plain, aug = streams["ood_plain"], streams["ood"]
    assert plain.augment is None and aug.augment is not None
    for _ in range(12):  # three epochs of the plain stream
        idx_before = (plain.epoch, plain.cursor)
        x, _ = plain.next(10)
        twin = copy.deepcopy(plain)
        twin.epoch, twin.cursor, twin._order = *idx_before, None
        assert torch.equal(x, to_float(pool[twin.indices(10)]))  # exactly the pool's pixels: no pad, no shift
    # a shuffle of its own: the first batches of the two streams are different images
    fresh = make_streams(cfg, sets, {"ood": 1, "ood_plain": 1}, acc)
    assert not torch.equal(fresh["ood"].indices(10), fresh["ood_plain"].indices(10))


@pytest.mark.parametrize("name, opts", [("mosaic", {"d_real": "plain", "patch_size": "null"}), ("mosaic_ref", {})])
def test_discriminator_real_images_are_the_plain_batch(name, opts):
    m = make(name, **opts)
    seen = []
    m.discriminator.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    batch = batch_for(m)
    m.step(batch, 0)
    want = m.ctx.normalize(batch["ood_plain"]) if m.opts["d_normalize"] else batch["ood_plain"]
    assert torch.equal(seen[0], want)


def test_d_real_augmented_keeps_todays_streams():
    assert get_method("mosaic").stream_needs({**method_defaults("mosaic")}) == {"ood": 6}
    assert get_method("mosaic").stream_needs({**method_defaults("mosaic"), "d_real": "plain"}) == {"ood": 5,
                                                                                                 "ood_plain": 1}


# ----------------------------------------------------------------------------- crops

def test_grid_offsets_reach_both_borders():
    assert grid_offsets(32, 16) == [0, 16]
    assert grid_offsets(32, 12) == [0, 10, 20]   # 3 crops of 12 overlap by 2 and cover 32
    assert grid_offsets(32, 32) == [0]
    assert grid_offsets(16, 8) == [0, 8]
    for size, p in ((32, 12), (32, 20), (28, 8), (16, 5)):
        covered = set()
        for y in grid_offsets(size, p):
            covered |= set(range(y, y + p))
        assert covered == set(range(size))


def test_cover_crops_give_every_pixel_a_local_gradient():
    """Candidate default: patch_size=16, patch_layout=cover, crop_reduction=sum on 32x32 images."""
    m = make(size=32, patch_size=16, patch_layout="cover", crop_reduction="sum")
    assert m.crops_per_image == 4
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    m.local_loss(m.discriminator(m.d_view(x)), real=True).backward()
    assert (x.grad.abs().sum(1) > 0).all()
    # each crop is the slice of the grid, crop-major
    crops = grid_patches(x.detach(), patch_size=16)
    assert torch.equal(crops[2 * 3 + 1], x.detach()[1, :, 16:, 16:])
    # today's default (two random 16x16 crops) leaves pixels without gradient in a step
    d = make(size=32)
    x.grad = None
    torch.manual_seed(0)
    d.local_loss(d.discriminator(d.d_view(x)), real=True).backward()
    assert (x.grad.abs().sum(1) == 0).any()


def test_default_random_crops_can_reach_every_pixel():
    """The default (two random 16x16 crops of 32x32): every pixel can get a local gradient, corners rarely.

    A pixel (i, j) lies in the crop at offset (min(i, 16), min(j, 16)); each of the 17 x 17 offsets must be
    drawable, the four extreme ones included, at 1/289 each (a corner pixel: under 1% of crops).
    """
    torch.manual_seed(0)
    n = 289 * 200
    y, x = patch_offsets(n, height=32, width=32, patch_size=16)
    counts = torch.bincount(y * 17 + x, minlength=17 * 17)
    assert len(counts) == 289 and (counts > 0).all()  # every offset, so every pixel, is reachable
    share = counts.float() / n
    assert share[[0, 16, 16 * 17, 16 * 17 + 16]].max() < 0.01  # corner crops: about 1/289 each
    assert share.mean().item() == pytest.approx(1 / 289) and share.std().item() < 0.5 / 289  # uniform
    # and through the method: two crops per image and step, each pixel in a crop at least once in a while
    d = make(size=32)
    img = torch.rand(2, 3, 32, 32, requires_grad=True)
    reached = torch.zeros(2, 32, 32, dtype=torch.bool)
    for _ in range(40):
        img.grad = None
        d.local_loss(d.discriminator(d.d_view(img)), real=True).backward()
        reached |= img.grad.abs().sum(1) > 0
    assert reached[:, 8:24, 8:24].all() and reached.float().mean() > 0.9  # the centre always, most of the rest


def test_crop_reduction_sum_is_the_mean_times_the_crops():
    mean = make(size=32, patch_size=16, patch_layout="cover")
    total = make(size=32, patch_size=16, patch_layout="cover", crop_reduction="sum")
    total.discriminator.load_state_dict(mean.discriminator.state_dict())
    x = torch.rand(3, 3, 32, 32)
    a = mean.local_loss(mean.discriminator(mean.d_view(x)), real=False)
    b = total.local_loss(total.discriminator(total.d_view(x)), real=False)
    assert b.item() == pytest.approx(4 * a.item(), rel=1e-6)
    # with local_reduction=sum the cover grid's 4 maps of 4x4 logits weigh as the 8x8 map of the whole image:
    # the loss per image is the sum of 64 BCE terms, as the reference's
    logits = total.discriminator(total.d_view(x))
    want = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum") / 3
    assert logits.shape == (12, 1, 4, 4) and b.item() == pytest.approx(want.item(), rel=1e-5)


def test_d_whole_adds_the_whole_image_loss_to_the_crop_loss():
    """d_whole: D's loss is the crops' loss (the default's) plus the whole image's (mosaic_ref's map, summed / B)."""
    m = make(size=32, d_whole=True)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    torch.manual_seed(5)
    got = m.d_loss(m.discriminator, x, real=False)
    # by hand: the same two random crops (same draws), mean over crops of each crop map's summed BCE, / B ...
    torch.manual_seed(5)
    y, xo = patch_offsets(2 * 3, height=32, width=32, patch_size=16)
    crops = torch.stack([x[i % 3, :, y[i]:y[i] + 16, xo[i]:xo[i] + 16] for i in range(6)])
    crop_logits = m.discriminator(crops)
    crop_part = F.binary_cross_entropy_with_logits(crop_logits, torch.zeros_like(crop_logits), reduction="sum") / 6
    # ... plus the whole image's 8x8 map, summed / B
    whole_logits = m.discriminator(x)
    assert whole_logits.shape == (3, 1, 8, 8)
    whole_part = F.binary_cross_entropy_with_logits(whole_logits, torch.zeros_like(whole_logits),
                                                    reduction="sum") / 3
    assert got.item() == pytest.approx((crop_part + whole_part).item(), rel=1e-5)
    # every pixel gets a local gradient each step (the two random crops alone leave some without)
    got.backward()
    assert (x.grad.abs().sum(1) > 0).all()
    # off (the default), the loss is the crops' alone: the same draws give crop_part
    plain = make(size=32)
    plain.discriminator.load_state_dict(m.discriminator.state_dict())
    torch.manual_seed(5)
    assert plain.d_loss(plain.discriminator, x, real=False).item() == pytest.approx(crop_part.item(), rel=1e-5)
    assert method_defaults("mosaic")["d_whole"] is False


def test_d_whole_step_trains_the_generator_through_both_views():
    """One d_whole step: the generator's local term reaches G through the crops and the whole image."""
    m = make(size=32, d_whole=True)
    seen = []
    m.discriminator.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    before = flat(m.generator)
    out = m.step(batch_for(m, size=32), 0)
    assert torch.isfinite(out["g_local"]) and not torch.equal(before, flat(m.generator))
    # D step: real crops, real whole, fake crops, fake whole; G step: crops, whole
    assert seen == [(16, 16), (32, 32), (16, 16), (32, 32), (16, 16), (32, 32)]
    with pytest.raises(ConfigError, match="already shows D whole images only"):
        make(size=32, d_whole=True, patch_size="null")


def test_bad_crop_options_are_clear_errors():
    with pytest.raises(ConfigError, match="mosaic.patch_layout must be random or cover"):
        make(patch_layout="grid")
    with pytest.raises(ConfigError, match="mosaic.d_real must be augmented or plain"):
        make(d_real="clean")
    with pytest.raises(ConfigError, match="or be null for whole images"):
        make(patch_size=40)


# ----------------------------------------------------------------------------- function matching

def spy(module, seen: list) -> None:
    module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_kd_ood_teacher_and_student_see_the_same_mixed_view(mix):
    m = make("kd_ood", overrides=(f"mix={mix}",), student_steps=2, update_batches=2)
    t_in, s_in = [], []
    spy(m.teacher, t_in)
    spy(m.student, s_in)
    batch = batch_for(m)
    m.step(batch, 0)
    assert len(t_in) == len(s_in) == 2
    for k, (t, s) in enumerate(zip(t_in, s_in)):
        assert torch.equal(t, s) and len(t) == 2 * B
        assert not torch.equal(t, m.ctx.normalize(batch["ood"][2 * B * k:2 * B * (k + 1)]))  # it is mixed


@pytest.mark.parametrize("batch_teacher", [False, True])
def test_mosaic_student_steps_share_one_mixed_view(batch_teacher):
    m = make(overrides=("mix=cutmix",), batch_teacher=batch_teacher)
    t_in, s_in = [], []
    spy(m.teacher, t_in)
    spy(m.student, s_in)
    m.step(batch_for(m), 0)
    teacher_views = torch.cat(t_in[-1:]) if batch_teacher else torch.cat(t_in[-2:])
    assert torch.equal(teacher_views, torch.cat(s_in[-2:]))  # the last two student forwards are its two updates
    # batch_teacher stays a speed switch under mix: the same draws, the same weights
    fresh = [make(overrides=("mix=cutmix",), batch_teacher=bt) for bt in (False, True)]
    for f in fresh:
        torch.manual_seed(4)
        f.step(batch_for(f), 0)
    assert torch.allclose(flat(fresh[0].student), flat(fresh[1].student), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mixup_weights_follow_beta_and_blend_pairs(alpha):
    torch.manual_seed(0)
    mix = Mix(mode="mixup", alpha=alpha)
    n = 20000
    x = torch.rand(n, 1, 2, 2)
    out = mix(x)
    lam, pairs = mix.last["lambdas"], mix.last["pairs"]
    mean, var = 0.5, 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert lam.mean().item() == pytest.approx(mean, abs=4 * (var / n) ** 0.5)
    assert lam.var().item() == pytest.approx(var, rel=0.05)
    assert torch.allclose(out, (1 - lam.view(-1, 1, 1, 1)) * x + lam.view(-1, 1, 1, 1) * x[pairs], atol=1e-6)
    assert sorted(pairs.tolist()) == list(range(n))


def test_cutmix_boxes_follow_beta():
    """Pasted area per image = floor(sqrt(1 - lam) * side)^2 / side^2 with lam ~ Beta(a, a), as CutMix draws it."""
    torch.manual_seed(0)
    a, side, n = 0.5, 32, 4000
    mix = Mix(mode="cutmix", alpha=a)
    x = (torch.arange(n).float() / n).view(n, 1, 1, 1).expand(n, 1, side, side).contiguous()  # one value per image
    out = mix(x)
    other = mix.last["pairs"] != torch.arange(n)
    pasted = (out != x).float().mean((1, 2, 3))[other]
    lam = np.random.default_rng(0).beta(a, a, 400_000)
    want = np.floor(np.sqrt(1 - lam) * side) ** 2 / side ** 2
    assert pasted.mean().item() == pytest.approx(want.mean(), abs=4 * (want.var() / len(pasted)) ** 0.5)
    assert pasted.var().item() == pytest.approx(want.var(), rel=0.1)


def test_mix_off_is_the_identity_and_bad_values_are_errors():
    m = make()
    x = torch.rand(B, 3, 16, 16)
    assert m.ctx.mixer is None and m.ctx.mix(x) is x
    with pytest.raises(ConfigError, match="'mix' must be one of none, mixup, cutmix"):
        resolve(overrides=["mix=blend"], method_defaults=method_defaults)
    with pytest.raises(ConfigError, match="'mix_alpha' must be a positive number"):
        resolve(overrides=["mix=mixup", "mix_alpha=0"], method_defaults=method_defaults)
    with pytest.raises(ConfigError, match="labels no longer fit"):
        make("kd", overrides=("mix=mixup",))


# ----------------------------------------------------------------------------- budgets

def test_budgets_are_the_hand_counts():
    # kd_ood defaults: 10 steps x 5 updates, each on 2 x 4 OOD images
    assert make("kd_ood").budget() == {"student_updates": 50, "student_images": 400}
    assert make("kd_ood", student_steps=1, update_batches=1).budget() == {"student_updates": 10, "student_images": 40}
    # MosaicKD (student_steps 2 here): 10 x 2 updates of 4 generated + 4 OOD; synthetic_batch=6: 6 + 4
    assert make().budget() == {"student_updates": 20, "student_images": 160}
    assert make(synthetic_batch=6).budget() == {"student_updates": 20, "student_images": 200}
    assert make("mosaic_ref").budget() == {"student_updates": 20, "student_images": 160}
    # with defaults, MosaicKD and kd_ood give the student the same updates and images
    assert make("mosaic", student_steps=5).budget() == make("kd_ood").budget()
    assert make("supervised").budget() == {"student_updates": 10, "student_images": 40}
    # data-free generator methods: student_steps updates per step (DAFL 1), each on batch_size generated images
    assert make("dafl").budget() == {"student_updates": 10, "student_images": 40}
    assert make("dfad").budget() == {"student_updates": 50, "student_images": 200}


def test_kd_ood_defaults_draw_what_the_old_hand_matched_rows_drew():
    """New defaults at batch B = the suites' old kd_ood rows (batch 2B, 5 updates of one batch): same weights."""
    new = make("kd_ood")
    old = make("kd_ood", student_steps=5, update_batches=1)
    old.ctx.batch_size = 2 * B
    x = torch.rand(10 * B, 3, 16, 16)
    new.step({"ood": x}, 0)
    old.step({"ood": x}, 0)
    assert torch.equal(flat(new.student), flat(old.student))


def test_results_json_records_the_budget(tiny_task, tiny_teacher, tmp_path):
    from mosaic.engine import train

    runs = {"kd_ood": {}, "mosaic": {"mosaic.student_steps": 2, "mosaic.patch_size": 8, "mosaic.ngf": 8,
                                     "mosaic.ndf": 8},
            "mosaic_ref": {"mosaic_ref.student_steps": 1, "mosaic_ref.ngf": 8, "mosaic_ref.ndf": 8}}
    want = {"kd_ood": (3 * 5, 3 * 5 * 16), "mosaic": (3 * 2, 3 * 2 * 16), "mosaic_ref": (3, 3 * 16)}
    for name, extra in runs.items():
        cfg = resolve(overrides=base_overrides(tiny_task, tmp_path, name=name, method=name, teacher=tiny_teacher,
                                               steps=3, **{"student.arch": "cnn_tiny", **extra}),
                      method_defaults=method_defaults)
        train(cfg)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert (results["student_updates"], results["student_images"]) == want[name], name
