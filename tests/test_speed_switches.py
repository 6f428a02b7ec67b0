"""MosaicKD's speed switches change how a step runs, never what it computes (CPU, fp32, one thread)."""
from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
from einops import repeat

from mosaic.methods import method_defaults
from mosaic.methods.mosaic_kd import MosaicKD
from mosaic.players.patches import random_patches
from test_mosaic_kd import B, SIZE, make_method  # the same tiny MosaicKD (seed 0) as the method's own tests

STEPS = 3
SWITCHES = {"fast_crop": True, "batch_teacher": True, "inference_mode": True, "fused_optim": True}
OFF = {k: False for k in SWITCHES}


def train(method: MosaicKD, *, steps: int = STEPS) -> list[dict[str, float]]:
    """Losses of `steps` outer iterations on fixed OOD batches, from one seed."""
    n = MosaicKD.stream_needs(method.opts)["ood"] * B
    batches = [torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(10 + i)) for i in range(steps)]
    torch.manual_seed(1)
    return [{k: v.item() for k, v in method.step({"ood": x}, i).items()} for i, x in enumerate(batches)]


def assert_same_run(a: MosaicKD, b: MosaicKD) -> None:
    """Equal losses at every step and equal players afterwards (allclose: fused kernels round differently)."""
    la, lb = train(a), train(b)
    for step, (x, y) in enumerate(zip(la, lb)):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), f"{key} differs at step {step}"
    for name in ("generator", "discriminator", "student"):
        for (k, p), q in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-5), f"{name}.{k} differs"


def test_all_switches_on_match_all_off():
    on, off = make_method(**SWITCHES), make_method(**OFF)
    assert all(on.opts[k] for k in SWITCHES) and not any(off.opts[k] for k in SWITCHES)
    assert_same_run(on, off)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_switch_alone_matches_all_off(switch):
    assert_same_run(make_method(**{**OFF, switch: True}), make_method(**OFF))


def test_switch_defaults():
    defaults = method_defaults("mosaic")
    assert all(defaults[k] is True for k in SWITCHES if k != "batch_teacher")
    assert "compile" not in defaults  # one switch for every method: the engine's top-level `compile`
    assert defaults["batch_teacher"] is None and make_method().batch_teacher is False  # auto: off on CPU


def test_fast_crop_is_kornias_crop_pixel_for_pixel():
    images = torch.randn(5, 3, 20, 20, requires_grad=True)
    torch.manual_seed(3)
    want = K.RandomCrop((7, 7))(repeat(images, "b c h w -> (n b) c h w", n=3))
    after_want = torch.rand(1)
    torch.manual_seed(3)
    got = random_patches(images, patch_size=7, copies=3)
    assert torch.equal(got, want) and torch.equal(torch.rand(1), after_want)  # same pixels, same random draws
    weights = torch.randn_like(got)
    g_want, = torch.autograd.grad((want * weights).sum(), images)
    g_got, = torch.autograd.grad((got * weights).sum(), images)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_batched_teacher_sees_the_per_step_inputs():
    seen = {}
    for batched in (True, False):
        m = make_method(**{**OFF, "batch_teacher": batched})
        inputs = []
        m.teacher.register_forward_pre_hook(lambda mod, inp: inputs.append(inp[0].detach().clone()))
        train(m, steps=1)
        seen[batched] = torch.cat(inputs[1:])  # the G step's forward, then the student steps'
    assert torch.equal(seen[True], seen[False])


def test_channels_last_and_bf16_autocast_run_on_cpu():
    """The engine's bf16 on CPU (each forward autocast on its own, channels-last): finite, and close to fp32."""
    from mosaic.precision import Precision, autocast_forward
    bf16 = Precision(mixed_precision="bf16", channels_last=True, requested="bf16", reason="test", device="cpu",
                     capability="test")
    m, ref = make_method(), make_method()
    for module in (m.generator, m.discriminator, m.student, m.teacher):
        autocast_forward(module.to(memory_format=torch.channels_last), bf16, "cpu")
    losses, want = train(m, steps=1), train(ref, steps=1)
    assert all(torch.isfinite(torch.tensor(v)) for step in losses for v in step.values())
    for key in want[0]:  # bf16 rounding (8 bits of mantissa), not another computation
        assert losses[0][key] == pytest.approx(want[0][key], rel=0.05, abs=0.02), key
