"""Mixed precision: bf16 steps are exact steps, losses in fp32, evaluation in fp32, auto resolves per machine.

The engine's autocast wraps each network forward on its own (mosaic/precision.py). One autocast block
around a whole step (the engine before issue 23) keeps the bf16 weight copies of its first forward, so
every later forward of the step runs with the weights from before the step's optimizer updates.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import base_overrides, train_killed_at
from mosaic import losses as L
from mosaic.cli import _resolve, main
from mosaic.config import ConfigError
from mosaic.engine import checkpoints, train
from mosaic.methods import get_method
from mosaic.models import create_model
from mosaic.players import Generator
from mosaic.precision import (Precision, autocast_forward, autocast_like, full_precision, in_fp32, is_convnet,
                              resolve_precision)

CPU = torch.device("cpu")
BF16 = Precision(mixed_precision="bf16", channels_last="auto", requested="bf16", reason="test", device="cpu",
                 capability="test")

# one step of each method takes several optimizer steps of `player`, forwards in between
MULTI_STEP = {
    "mosaic": ("student", {"mosaic.student_steps": 3, "mosaic.patch_size": 8, "mosaic.ngf": 8, "mosaic.ndf": 8}),
    "kd_ood": ("student", {"kd_ood.student_steps": 3}),
    "cmi": ("generator", {"cmi.nz": 8, "cmi.ngf": 8, "cmi.pool_size": 16, "cmi.g_steps": 3, "cmi.synth_every": 2,
                          "cmi.bank_size": 32, "cmi.n_neg": 8, "cmi.head_dim": 8}),
    "fast": ("generator", {"fast.nz": 8, "fast.ngf": 8, "fast.pool_size": 16, "fast.g_steps": 3,
                           "fast.synth_every": 2, "fast.warmup": 1}),
}


def record_forwards(monkeypatch, method: str, player: str, *, outer_autocast: bool = False) -> list[dict]:
    """During the first step of `method`, every forward of `player`: its weights, mode, input and output.

    `outer_autocast` runs that step inside one bf16 autocast block, as the engine did before issue 23.
    Fast adapts a copy of its generator: the copy's forwards are recorded (the hooks are copied with it).
    """
    cls, seen = get_method(method), []
    real = cls.step

    def pre(module, inputs):
        seen.append({"module": module, "weights": copy.deepcopy(module.state_dict()), "train": module.training,
                     "input": inputs[0].detach().clone()})

    def post(module, inputs, output):
        seen[-1]["output"] = output.detach().float()

    def step(self, batch, i):
        if i > 0:
            return real(self, batch, i)
        net = self.accelerator.unwrap_model(getattr(self, player))
        handles = [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
        try:
            if outer_autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return real(self, batch, i)
            return real(self, batch, i)
        finally:
            for h in handles:
                h.remove()

    monkeypatch.setattr(cls, "step", step)
    return seen


def replay(record: dict, weights: dict) -> torch.Tensor:
    """The recorded forward again, on a copy of the network holding `weights`, in a fresh bf16 autocast block."""
    net = copy.deepcopy(record["module"])
    net._forward_pre_hooks.clear()
    net._forward_hooks.clear()
    net.load_state_dict(weights)
    net.train(record["train"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a block of its own: no cached weights
        return net(record["input"]).float()


def run_bf16(method, tiny_task, tiny_teacher, tmp_path, **extra):
    player, opts = MULTI_STEP[method]
    args = base_overrides(tiny_task, tmp_path, name=method, method=method, teacher=str(tiny_teacher), steps=2,
                          **{"mixed_precision": "bf16", "student.arch": "cnn_tiny", **opts, **extra})
    assert main(["distill", *args]) == 0
    return player


def stale_forwards(seen: list[dict]) -> list[int]:
    """Indices of recorded forwards whose output came from older weights than the network held at the time."""
    stale = []
    for i, rec in enumerate(seen[1:], start=1):
        now = replay(rec, rec["weights"])
        if not torch.allclose(now, rec["output"], rtol=1e-3, atol=1e-4):
            stale.append(i)
    return stale


@pytest.mark.parametrize("method", sorted(MULTI_STEP))
def test_each_forward_under_bf16_sees_the_last_optimizer_step(method, tiny_task, tiny_teacher, tmp_path,
                                                              monkeypatch):
    seen = record_forwards(monkeypatch, method, MULTI_STEP[method][0])
    run_bf16(method, tiny_task, tiny_teacher, tmp_path)
    assert len(seen) >= 3
    changed = [i for i in range(1, len(seen)) if any(
        not torch.equal(seen[i]["weights"][k], seen[0]["weights"][k]) for k in seen[0]["weights"])]
    assert changed, "the player's weights change between forwards of one step"
    assert stale_forwards(seen) == []
    # the check has teeth: the same forwards replayed with the first weights give other outputs
    assert any(not torch.allclose(replay(seen[i], seen[0]["weights"]), seen[i]["output"], rtol=1e-3, atol=1e-4)
               for i in changed)


@pytest.mark.parametrize("method", ["mosaic", "kd_ood"])
def test_one_autocast_block_around_a_step_is_caught_as_stale(method, tiny_task, tiny_teacher, tmp_path, monkeypatch):
    """What the engine did before: the detector above finds the stale forwards it made."""
    seen = record_forwards(monkeypatch, method, MULTI_STEP[method][0], outer_autocast=True)
    run_bf16(method, tiny_task, tiny_teacher, tmp_path, mixed_precision="no")
    assert len(stale_forwards(seen)) >= 1


def test_autocast_forward_gives_fp32_outputs_and_no_stale_weights():
    torch.manual_seed(0)
    net = autocast_forward(nn.Linear(6, 3), BF16, "cpu")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    losses = []
    for _ in range(4):
        out = net(x)
        assert out.dtype == torch.float32
        loss = (out - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert net.weight.dtype == torch.float32
    assert all(b < a - 1e-3 for a, b in zip(losses, losses[1:])), losses  # one autocast block: 4 equal losses
    with torch.no_grad():  # the value is bf16's: inputs and weights rounded, fp32 accumulation
        want = (x.bfloat16().float() @ net.weight.bfloat16().float().T + net.bias.bfloat16().float())
    assert torch.allclose(net(x), want.bfloat16().float(), atol=1e-2)
    with full_precision():
        assert torch.allclose(net(x), x @ net.weight.T + net.bias, atol=1e-6)


def test_deepcopy_keeps_the_wrapper_bound_to_the_copy():
    net = autocast_forward(nn.Linear(4, 2), BF16, "cpu")
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.weight.add_(1.0)
    x = torch.randn(3, 4)
    assert twin(x).dtype == torch.float32
    assert not torch.allclose(twin(x), net(x))  # the copy runs its own weights
    with full_precision():
        assert torch.allclose(twin(x), x @ twin.weight.T + twin.bias, atol=1e-6)
    assert list(twin.state_dict()) == ["weight", "bias"]


def test_autocast_like_covers_calls_that_bypass_forward():
    net = autocast_forward(create_model("cnn_tiny", num_classes=3), BF16, "cpu")
    x = torch.randn(2, 3, 16, 16)
    with autocast_like(net):
        assert net.forward_features(x).dtype == torch.bfloat16
    with full_precision(), autocast_like(net):
        assert net.forward_features(x).dtype == torch.float32
    with autocast_like(nn.Linear(2, 2)):  # not wrapped: no autocast
        assert torch.is_autocast_enabled("cpu") is False


def test_channels_last_generator_keeps_its_maps_channels_last():
    torch.manual_seed(0)
    g = Generator(nz=8, ngf=8, image_size=16, channels=3)
    seen = []
    g.body[1].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    z = torch.randn(4, 8)
    want = g(z)
    g.to(memory_format=torch.channels_last)
    got = g(z)
    assert seen == [False, True] and torch.allclose(got, want, atol=1e-6)  # same images, other layout


def test_generator_head_is_fp32_under_autocast():
    torch.manual_seed(0)
    g = autocast_forward(Generator(nz=8, ngf=8, image_size=16, channels=3), BF16, "cpu").eval()
    last = g.body[g.out_start]
    assert isinstance(last, nn.Conv2d) and isinstance(g.body[-1], nn.Sigmoid)
    with torch.no_grad():  # pre-activations 7, 8, 9: a bf16 sigmoid rounds each to exactly 1.0
        last.weight.zero_()
        last.bias.copy_(torch.tensor([7.0, 8.0, 9.0]))
    assert torch.sigmoid(torch.tensor([7.0, 8.0, 9.0], dtype=torch.bfloat16)).eq(1.0).all()
    x = g(torch.randn(4, 8))
    want = torch.sigmoid(torch.tensor([7.0, 8.0, 9.0])).view(1, 3, 1, 1).expand_as(x)
    assert x.dtype == torch.float32 and torch.equal(x, want) and (x < 1.0).all()


# ----------------------------------------------------------------------------- losses in fp32

def logits(n: int = 8, c: int = 5, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


def fmap(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).abs() + 0.1


LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
LOSSES = {  # name: (function, positional tensors, keyword options)
    "patch_gan_loss": (L.patch_gan_loss, [logits(8, 1)], {"real": True}),
    "discriminator_loss": (L.discriminator_loss, [logits(8, 2), logits(8, 2, 1)], {}),
    "student_adversarial_loss": (L.student_adversarial_loss, [logits(8, 2)], {}),
    "onehot_loss": (L.onehot_loss, [logits()], {}),
    "activation_loss": (L.activation_loss, [fmap(8, 16)], {}),
    "competition_loss": (L.competition_loss, [logits(), logits(seed=1)], {}),
    "clamped_js_competition": (L.clamped_js_competition, [logits(), logits(seed=1)], {}),
    "masked_adversarial_kl": (L.masked_adversarial_kl, [logits(), logits(seed=1)], {}),
    "bn_stat_distance": (L.bn_stat_distance, [fmap(6), fmap(6, seed=1), fmap(6, seed=2), fmap(6, seed=3)], {}),
    "total_variation_l2": (L.total_variation_l2, [fmap(2, 3, 8, 8)], {}),
    "total_variation_l1": (L.total_variation_l1, [fmap(2, 3, 8, 8)], {}),
    "image_l2": (L.image_l2, [fmap(2, 3, 8, 8)], {}),
    "instance_contrastive_loss": (L.instance_contrastive_loss,
                                  [torch.nn.functional.normalize(fmap(12, 16), dim=1),
                                   torch.nn.functional.normalize(fmap(12, 16, seed=1), dim=1)],
                                  {"temperature": 0.1, "batch": 6}),
    "hint_loss": (L.hint_loss, [fmap(4, 8, 4, 4), fmap(4, 8, 4, 4, seed=1)], {}),
    "attention_transfer": (L.attention_transfer, [[fmap(4, 8, 4, 4)], [fmap(4, 6, 4, 4, seed=1)]], {}),
    "mmd2_poly": (L.mmd2, [fmap(4, 16, 6, 6), fmap(4, 24, 6, 6, seed=1)], {"kernel": "poly"}),
    "mmd2_gaussian": (L.mmd2, [fmap(4, 16, 6, 6), fmap(4, 24, 6, 6, seed=1)], {"kernel": "gaussian"}),
    "nst_loss": (L.nst_loss, [fmap(4, 16, 6, 6), fmap(4, 24, 6, 6, seed=1)], {}),
    "mkd_loss": (L.mkd_loss, [[fmap(4, 8, 4, 4)], [fmap(4, 8, 4, 4, seed=1)]], {}),
    "entropy": (L.entropy, [logits()], {}),
    "balance_loss": (L.balance_loss, [logits()], {}),
    "rkd_distance": (L.rkd_distance, [fmap(8, 16), fmap(8, 12, seed=1)], {}),
    "rkd_angle": (L.rkd_angle, [fmap(8, 16), fmap(8, 12, seed=1)], {}),
    "rkd_loss": (L.rkd_loss, [fmap(8, 16), fmap(8, 12, seed=1)], {}),
    "kd_loss": (L.kd_loss, [logits(), logits(seed=1)], {"temperature": 4.0}),
    "soft_kl": (L.soft_kl, [logits(), torch.log_softmax(logits(seed=1), 1)], {}),
    "cross_entropy": (L.cross_entropy, [logits(), LABELS], {}),
    "hinton_kd": (L.hinton_kd, [logits(), logits(seed=1), LABELS], {}),
    "logit_l1": (L.logit_l1, [logits(), logits(seed=1)], {}),
    "mutual_loss": (L.mutual_loss, [logits(), [logits(seed=1), logits(seed=2)], LABELS], {}),
    "multi_teacher_kd": (L.multi_teacher_kd, [logits(), [logits(seed=1), logits(seed=2)]], {}),
    "js_divergence": (L.js_divergence, [logits(), logits(seed=1)], {}),
}


def cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, list):
        return [cast(v, dtype) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_on_bf16_inputs_under_autocast_is_the_fp32_value_of_the_rounded_inputs(name):
    fn, args, kwargs = LOSSES[name]
    rounded = [cast(cast(a, torch.bfloat16), torch.float32) for a in args]
    want = fn(*rounded, **kwargs)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*[cast(a, torch.bfloat16) for a in args], **kwargs)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


@pytest.mark.parametrize("name", ["mmd2_poly", "mmd2_gaussian", "instance_contrastive_loss"])
def test_the_same_loss_without_in_fp32_would_compute_in_bf16(name):
    """The Gram-matrix losses: under autocast their matmuls run in bf16 unless the loss turns autocast off."""
    fn, args, kwargs = LOSSES[name]
    want = fn(*args, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = fn.__wrapped__(*args, **kwargs)
        got = fn(*args, **kwargs)
    assert torch.allclose(got.float(), want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(raw.float(), want, rtol=1e-5, atol=0)


def test_in_fp32_keeps_float64_and_integer_arguments():
    seen = {}

    @in_fp32
    def f(a, b, c):
        seen.update(a=a.dtype, b=b.dtype, c=c.dtype, on=torch.is_autocast_enabled("cpu"))
        return a.sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        f(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.long))
    assert seen == {"a": torch.float64, "b": torch.float32, "c": torch.long, "on": False}


# ----------------------------------------------------------------------------- resolution

def test_auto_is_bf16_where_the_cpu_runs_it_natively(monkeypatch):
    import mosaic.precision as P
    monkeypatch.setattr(P, "cpu_bf16", lambda: "amx_bf16")
    p = resolve_precision("auto", "auto", CPU)
    assert (p.mixed_precision, p.capability, p.dtype) == ("bf16", "amx_bf16", torch.bfloat16)
    assert "natively" in p.reason
    monkeypatch.setattr(P, "cpu_bf16", lambda: "none")
    p = resolve_precision("auto", "auto", CPU)
    assert (p.mixed_precision, p.capability, p.dtype) == ("no", "none", None)
    assert resolve_precision("bf16", False, CPU).mixed_precision == "bf16"  # explicit wins
    monkeypatch.setattr(P, "cpu_bf16", lambda: "avx512_bf16")
    assert resolve_precision("no", True, CPU).mixed_precision == "no"


def test_cpu_capability_comes_from_torch(monkeypatch):
    import mosaic.precision as P
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert P.cpu_bf16() == "avx512_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert P.cpu_bf16() == "none"


def test_fp16_on_cpu_is_one_clear_error(tiny_task, tiny_teacher, tmp_path, capsys):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "auto", CPU)
    args = base_overrides(tiny_task, tmp_path, name="r", method="kd_ood", teacher=str(tiny_teacher), steps=1,
                          mixed_precision="fp16", **{"student.arch": "cnn_tiny"})
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "mixed_precision=bf16" in err[0]
    assert not (tmp_path / "r").exists()


def test_channels_last_auto_is_per_network():
    assert is_convnet(create_model("cnn_tiny", num_classes=3))
    assert not is_convnet(nn.Sequential(nn.Flatten(), nn.Linear(48, 100), nn.Linear(100, 3)))
    vit_like = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Linear(16, 16), nn.Linear(16, 3))
    assert not BF16.wants_channels_last(vit_like)  # one patch conv, mostly linear layers
    generator = Generator(nz=256, ngf=8, image_size=32, channels=3)  # its projection outweighs its convs
    assert sum(p.numel() for p in generator.project.parameters()) > sum(
        p.numel() for m in generator.body if isinstance(m, nn.Conv2d) for p in m.parameters())
    assert BF16.wants_channels_last(generator)
    assert BF16.wants_channels_last(create_model("cnn_tiny", num_classes=3))
    off = Precision(**{**BF16.record(), "channels_last": False})
    assert not off.wants_channels_last(create_model("cnn_tiny", num_classes=3))


def test_run_records_the_resolved_precision(tiny_task, tiny_teacher, tmp_path, monkeypatch, capsys):
    import mosaic.precision as P
    monkeypatch.setattr(P, "cpu_bf16", lambda: "amx_bf16")  # as on a CPU with AMX, whatever runs the test
    args = base_overrides(tiny_task, tmp_path, name="r", method="kd_ood", teacher=str(tiny_teacher), steps=1,
                          mixed_precision="auto", channels_last="auto", **{"student.arch": "cnn_tiny"})
    assert main(["distill", *args]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("precision:")]
    assert lines == ["precision: bf16 autocast (mixed_precision=auto: CPU runs bf16 natively (amx_bf16)); "
                     "memory format: channels-last for convnets"]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    p = res["precision"]
    assert (p["mixed_precision"], p["requested"], p["capability"], p["channels_last"]) == (
        "bf16", "auto", "amx_bf16", "auto")
    assert p["channels_last_networks"] == {"teacher": True, "student": True} and p["device"]
    head = (tmp_path / "r" / "config.yaml").read_text().splitlines()[:3]
    assert head[0].startswith("# resolved at start on") and "mixed_precision=auto -> bf16" in head[1]
    assert "channels_last=auto -> teacher: True, student: True" in head[2]
    from mosaic.config import load_yaml
    assert load_yaml(tmp_path / "r" / "config.yaml")["mixed_precision"] == "auto"  # the request is kept


def test_predict_runs_in_fp32_under_a_bf16_run():
    """Evaluation, model.json top-1 and ood_select all rank by Context.predict: fp32 logits, not bf16 ones."""
    from accelerate import Accelerator

    from mosaic.methods.context import Context
    torch.manual_seed(0)
    net = create_model("cnn_tiny", num_classes=3).eval()
    reference = copy.deepcopy(net)
    ctx = Context(cfg={"eval_batch_size": 5}, opts={}, teacher=net, student=nn.Identity(), num_classes=3,
                  image_size=16, channels=3, mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25), device=CPU,
                  accelerator=Accelerator(cpu=True), steps=1, batch_size=1, precision=BF16)
    ctx.autocast(net)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        want = reference(x)
        bf16 = net(x)  # the wrapped network outside predict: bf16 compute
    got = ctx.predict(net, images)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bf16, want, rtol=1e-4, atol=1e-5)


def test_bf16_resume_is_bit_identical(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    common = dict(method="mosaic", teacher=str(tiny_teacher), steps=4, ckpt_every=2, mixed_precision="bf16",
                  **{"student.arch": "cnn_tiny", "mosaic.patch_size": 8, "mosaic.student_steps": 2,
                     "mosaic.ngf": 8, "mosaic.ndf": 8})
    full = train(_resolve(base_overrides(tiny_task, tmp_path, name="full", **common)))
    from mosaic.methods.mosaic_kd import MosaicKD
    train_killed_at(monkeypatch, MosaicKD, 3, _resolve(base_overrides(tiny_task, tmp_path, name="killed", **common)))
    assert [p.name for p in checkpoints(tmp_path / "killed")] == ["step_00000002"]
    resumed = train(_resolve(base_overrides(tiny_task, tmp_path, name="killed", resume=True, **common)))
    assert resumed["final_losses"] == full["final_losses"]
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("full", "killed"))
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert all(a[k].dtype == torch.float32 for k in a if a[k].is_floating_point())  # fp32 master weights saved


def test_logits_come_from_an_fp32_classifier():
    """Features in bf16, the linear head in fp32: logits are not rounded to bf16 (KD's soft targets read them)."""
    torch.manual_seed(0)
    net = create_model("cnn_tiny", num_classes=3).eval()
    autocast_forward(net, BF16, "cpu")
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        logits = net(x)
        with autocast_like(net):
            pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        want = pooled.float() @ net.fc.weight.T + net.fc.bias
    assert logits.dtype == torch.float32 and torch.allclose(logits, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(logits, logits.bfloat16().float())  # a bf16 head would give only bf16 values
    twin = copy.deepcopy(net)
    assert twin.fc.forward.__self__ is twin.fc  # the copy's head computes with the copy's weights
