"""Tests for the model zoo: CIFAR nets in timm's registry, create_model, freeze, checkpoints and feature taps."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import write_images
from mosaic.data import load_image_set
from mosaic.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CheckpointError,
    FeatureTaps,
    ModelError,
    count_params,
    create_model,
    feature_taps,
    freeze,
    list_cifar_models,
    load_model,
    load_state,
    save_model,
)

# Published parameter counts at 10 classes (millions).
PUBLISHED_M = {
    "resnet18_cifar": 11.17,
    "resnet34_cifar": 21.28,
    "wrn16_1": 0.175,
    "wrn16_2": 0.69,
    "wrn40_1": 0.56,
    "wrn40_2": 2.24,
    "vgg11_bn_cifar": 9.23,
}


# ---- exact parameter counts derived from the architectures (bias-free convs, BN = 2 params per channel) ----

def _conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k


def _bn(c: int) -> int:
    return 2 * c


def _fc(cin: int, n: int) -> int:
    return cin * n + n


def _resnet(layers, nc=10, in_chans=3, widths=(64, 128, 256, 512)) -> int:
    total = _conv(in_chans, 64) + _bn(64)
    cin = 64
    for i, (depth, w) in enumerate(zip(layers, widths)):
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            total += _conv(cin, w) + _bn(w) + _conv(w, w) + _bn(w)
            if stride != 1 or cin != w:
                total += _conv(cin, w, 1) + _bn(w)
            cin = w
    return total + _fc(cin, nc)


def _wrn(depth, k, nc=10, in_chans=3) -> int:
    n = (depth - 4) // 6
    total = _conv(in_chans, 16)
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += _bn(cin) + _conv(cin, w) + _bn(w) + _conv(w, w)
            if cin != w:
                total += _conv(cin, w, 1)  # projection shortcut, no BN in the original WRN
            cin = w
    return total + _bn(cin) + _fc(cin, nc)


def _plain(widths, nc=10, in_chans=3) -> int:
    total, cin = 0, in_chans
    for w in widths:
        total += _conv(cin, w) + _bn(w)
        cin = w
    return total + _fc(cin, nc)


EXPECTED = {
    "resnet18_cifar": _resnet((2, 2, 2, 2)),
    "resnet34_cifar": _resnet((3, 4, 6, 3)),
    "wrn16_1": _wrn(16, 1),
    "wrn16_2": _wrn(16, 2),
    "wrn40_1": _wrn(40, 1),
    "wrn40_2": _wrn(40, 2),
    "vgg11_bn_cifar": _plain((64, 128, 256, 256, 512, 512, 512, 512)),
    "cnn_tiny": _plain((16, 32, 64)),
    "cnn_small": _plain((32, 32, 64, 64, 128, 128, 256)),
}
NAMES = sorted(EXPECTED)


@functools.lru_cache(maxsize=None)
def _shared(name: str) -> nn.Module:
    """A 10-class model in eval mode, built once; tests that mutate a model build their own."""
    return create_model(name, num_classes=10).eval()


def _x(b: int = 2, c: int = 3, s: int = 32, grad: bool = False) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0)).requires_grad_(grad)


def test_all_cifar_models_are_registered_in_timm():
    assert sorted(list_cifar_models()) == NAMES
    assert set(NAMES) <= set(timm.list_models())
    assert isinstance(timm.create_model("cnn_tiny", num_classes=3), nn.Module)


@pytest.mark.parametrize("name", NAMES)
def test_param_count_matches_architecture_and_paper(name):
    n = count_params(_shared(name))
    assert n == EXPECTED[name]
    if name in PUBLISHED_M:
        assert abs(n / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.02
    if name == "cnn_tiny":
        assert n < 30_000
    if name == "cnn_small":
        assert 300_000 <= n <= 600_000


@pytest.mark.parametrize("name", NAMES)
def test_timm_api_shapes_and_feature_info(name):
    model = _shared(name)
    x = _x()
    with torch.no_grad(), FeatureTaps(model, list(range(len(model.feature_info)))) as feats:
        logits = model(x)
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
    assert logits.shape == (2, 10)
    assert model.num_classes == 10 and model.in_chans == 3
    assert fmap.shape[:2] == (2, model.num_features)
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(fmap), logits, atol=1e-5)
    assert isinstance(model.get_classifier(), nn.Linear)
    # feature_info names real modules whose outputs have the stated channels and stride
    for i, info in enumerate(model.feature_info):
        assert set(info) >= {"module", "num_chs", "reduction"}
        assert feats[i].shape[1:] == (info["num_chs"], 32 // info["reduction"], 32 // info["reduction"])
    assert fmap.shape == feats[len(model.feature_info) - 1].shape
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert tuple(cfg["mean"]) == CIFAR10_MEAN and tuple(cfg["std"]) == CIFAR10_STD


def test_cifar_configs_carry_the_statistics_data_normalises_cifar10_with(tmp_path):
    """Teachers trained here see CIFAR-10 normalised with data.py's statistics; the nets' configs must say the same."""
    write_images(tmp_path / "cifar10-jpeg" / "test" / "cat", 2, size=32, rng=np.random.default_rng(0))
    cifar = load_image_set("cifar10", split="test", root=str(tmp_path), cache=False)
    assert cifar.name.startswith("cifar10 (offline")  # the named set, not a folder with computed statistics
    assert cifar.std == (0.2023, 0.1994, 0.2010)  # the reference code's std, not the per-pixel 0.247/0.243/0.261
    assert (CIFAR10_MEAN, CIFAR10_STD) == (cifar.mean, cifar.std)
    for name in NAMES:
        cfg = _shared(name).pretrained_cfg
        assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (cifar.mean, cifar.std), name


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_grayscale_and_small_inputs(name):
    model = timm.create_model(name, num_classes=7).eval()
    gray = create_model(name, num_classes=7, in_chans=1).eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 7)
        assert gray(_x(c=1, s=28)).shape == (2, 7)
        assert model(_x(s=8)).shape == (2, 7)
        assert model(torch.randn(2, 3, 13, 9)).shape == (2, 7)
        model.reset_classifier(5)
        assert model(_x(s=8)).shape == (2, 5) and model.num_classes == 5
    assert gray.pretrained_cfg["input_size"][0] == 1 and len(gray.pretrained_cfg["mean"]) == 1


def test_train_mode_forward_and_backward():
    model = create_model("wrn16_1", num_classes=10, drop_rate=0.3).train()
    loss = model(_x()).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_features_only_through_timm():
    feats = timm.create_model("resnet18_cifar", features_only=True, out_indices=(1, 4))(_x(b=1))
    assert [f.shape[1:] for f in feats] == [(64, 32, 32), (512, 4, 4)]


def test_wrong_input_channels_gives_one_line_error():
    with pytest.raises(ModelError, match="in_chans=1") as err:
        _shared("cnn_tiny")(_x(c=1))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="unsqueeze"):
        _shared("cnn_tiny")(torch.randn(3, 32, 32))


# ---- create_model errors ----

def test_unknown_model_suggests_close_match():
    with pytest.raises(ModelError, match="resnet18_cifar") as err:
        create_model("resnet81_cifar", num_classes=10)
    assert isinstance(err.value, ValueError) and "timm.list_models()" in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5])
def test_bad_num_classes(num_classes):
    with pytest.raises(ModelError, match="num_classes"):
        create_model("cnn_tiny", num_classes=num_classes)


def test_unknown_option_is_named():
    with pytest.raises(ModelError, match="widen"):
        create_model("cnn_tiny", num_classes=10, widen=3)


@pytest.mark.parametrize("name", ["resnet18_cifar", "wrn40_2"])
def test_pretrained_cifar_net_errors_clearly(name):
    with pytest.raises(ModelError, match="no pretrained weights.*train-teacher"):
        create_model(name, num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_pretrained_download_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="could not be downloaded.*pretrained=false"):
        create_model("resnet18", num_classes=10, pretrained=True)
    # a hub name is read from the Hub even without pretrained weights: one line as well
    with pytest.raises(ModelError, match=r"'hf-hub:timm/resnet18.a1_in1k' is read from the Hugging Face Hub, "
                                         r"which could not be reached \(OSError: .*Name or service not known\)"):
        create_model("hf-hub:timm/resnet18.a1_in1k", num_classes=10)


# ---- freeze ----

def test_freeze_keeps_eval_and_bn_stats_but_passes_gradients():
    model = create_model("wrn16_1", num_classes=10, drop_rate=0.5)
    model.train()
    model(_x(s=16))  # move BN stats away from their init values
    assert freeze(model) is model
    model.train()
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(s=16, grad=True)
    out = model(x)
    assert torch.equal(out, model(x))  # dropout off
    out.square().sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# ---- load_state ----

def _two(name: str = "cnn_tiny"):
    torch.manual_seed(1)
    a = create_model(name, num_classes=10).eval()
    torch.manual_seed(2)
    b = create_model(name, num_classes=10).eval()
    return a, b


def _same_output(a: nn.Module, b: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a(_x()), b(_x()))


def test_load_state_roundtrip_from_pt_file(tmp_path):
    a, b = _two()
    assert not _same_output(a, b)
    torch.save(a.state_dict(), tmp_path / "w.pth")
    report = load_state(b, tmp_path / "w.pth")
    assert report.ok and _same_output(a, b)


def test_load_state_strips_ddp_and_compile_prefixes():
    a, b = _two()
    load_state(b, {f"module._orig_mod.{k}": v for k, v in a.state_dict().items()})
    assert _same_output(a, b)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "student", "teacher"])
def test_load_state_finds_nested_weights(tmp_path, key):
    a, b = _two()
    torch.save({"epoch": 3, "args": {"lr": 0.1}, key: a.state_dict()}, tmp_path / "ckpt.pt")
    load_state(b, str(tmp_path / "ckpt.pt"))
    assert _same_output(a, b)


def test_load_state_safetensors(tmp_path):
    from safetensors.torch import save_file

    a, b = _two()
    save_file(a.state_dict(), str(tmp_path / "w.safetensors"))
    load_state(b, tmp_path / "w.safetensors")
    assert _same_output(a, b)


def test_load_state_other_architecture_names_shape_mismatch():
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_state(create_model("wrn16_2", num_classes=10), _shared("wrn16_1").state_dict())
    msg = str(err.value)
    assert "layer1.0.conv1.weight (checkpoint (16, 16, 3, 3) vs model (32, 16, 3, 3))" in msg
    assert "missing keys: layer1.0.shortcut.weight" in msg
    assert "another architecture or class count" in msg and "\n" not in msg


def test_load_state_class_count_mismatch_names_classifier():
    ckpt = create_model("cnn_tiny", num_classes=100).state_dict()
    model = create_model("cnn_tiny", num_classes=10)
    with pytest.raises(CheckpointError, match=r"fc\.weight \(checkpoint \(100, 64\) vs model \(10, 64\)\)") as err:
        load_state(model, ckpt)
    assert "num_classes=100" in str(err.value)
    report = load_state(model, ckpt, strict=False)
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.stem[0].conv.weight, ckpt["stem.0.conv.weight"])


def test_load_state_missing_and_unexpected_keys_are_listed():
    state = dict(_shared("cnn_tiny").state_dict())
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 missing keys: fc.bias; 1 unexpected keys: extra.weight"):
        load_state(create_model("cnn_tiny", num_classes=10), state)


def test_load_state_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_state(_shared("cnn_tiny"), path)


# ---- save_model / load_model ----

def test_save_and_load_model_roundtrip(tmp_path):
    model = create_model("cnn_tiny", num_classes=4, in_chans=1).eval()
    meta = dict(arch="cnn_tiny", num_classes=4, in_chans=1, image_size=28, mean=[0.5], std=[0.5],
                classes=["a", "b", "c", "d"], top1=0.25)
    path = tmp_path / "teacher.safetensors"
    save_model(model, path, meta=meta)
    stored = json.loads((tmp_path / "teacher.json").read_text())
    assert stored == meta
    loaded, got = load_model(path)
    assert got == meta and not loaded.training
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_save_model_fills_meta_and_load_model_takes_run_folder(tmp_path):
    model = _shared("cnn_tiny")
    save_model(model, tmp_path, meta={"top1": 0.5})
    loaded, meta = load_model(tmp_path)
    assert meta["arch"] == "cnn_tiny" and meta["num_classes"] == 10 and meta["image_size"] == 32
    assert meta["mean"] == list(CIFAR10_MEAN) and meta["top1"] == 0.5
    assert _same_output(model, loaded)


def test_load_model_without_json_asks_for_arch(tmp_path):
    save_model(_shared("cnn_tiny"), tmp_path / "m.safetensors", meta={})
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="arch"):
        load_model(tmp_path / "m.safetensors")
    model, _ = load_model(tmp_path / "m.safetensors", arch="cnn_tiny", num_classes=10)
    assert _same_output(model, _shared("cnn_tiny"))


# ---- feature taps ----

def test_feature_taps_shapes_and_gradient_flow():
    model = create_model("resnet18_cifar", num_classes=10)
    x = _x(s=16, grad=True)
    with feature_taps(model, ["layer2", -1, "layer3.0.conv1"]) as feats:
        model(x)
    assert feats["layer2"].shape == (2, 128, 8, 8)
    assert feats[-1].shape == (2, 512, 2, 2)
    assert feats["layer3.0.conv1"].shape == (2, 256, 4, 4)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed on exit
    feats["layer2"].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_feature_taps_unknown_layer_lists_close_match():
    with pytest.raises(ModelError, match="did you mean layer2"):
        FeatureTaps(_shared("wrn16_1"), ["layr2"])
    with pytest.raises(ModelError, match="out of range.*0=stem"):
        FeatureTaps(_shared("wrn16_1"), [9])


def test_load_state_reads_checkpoints_with_python_objects(tmp_path):
    import argparse

    a, b = _two()
    torch.save({"args": argparse.Namespace(lr=0.1), "net": a.state_dict()}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="weights_only=False"):
        load_state(b, tmp_path / "old.pt")
    assert _same_output(a, b)


def test_load_state_unreadable_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*not a valid torch.save file"):
        load_state(_shared("cnn_tiny"), tmp_path / "junk.pt")


def test_wrapped_models_load_and_tap_through_the_wrapper():
    a, _ = _two()
    wrapped = nn.DataParallel(create_model("cnn_tiny", num_classes=10).eval())  # CPU: just calls the module
    load_state(wrapped, a.state_dict())
    with feature_taps(wrapped, ["layer1", 0]) as feats:
        wrapped(_x())
    assert feats["layer1"].shape == (2, 32, 16, 16) and feats[0].shape == (2, 16, 32, 32)


def test_frozen_model_survives_pickling():
    import io

    buf = io.BytesIO()
    torch.save(freeze(create_model("cnn_tiny", num_classes=10)), buf)
    buf.seek(0)
    model = torch.load(buf, weights_only=False)
    assert model.train() is model and not any(m.training for m in model.modules())
