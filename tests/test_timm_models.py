"""Any timm network at the task's image size: img_size passing, timm options, the start-up forward check."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from mosaic.cli import TEACHER_BASE, _resolve, main
from mosaic.engine import train
from mosaic.models import CheckpointError, ModelError, check_forward, create_model, load_model, save_model

VIT = "vit_tiny_patch16_224"
SMALL_VIT = {"patch_size": 4, "depth": 2}  # 192 wide, two blocks: fast on CPU


# ---- create_model: the task's image size and timm options ----

def test_vit_is_built_for_the_image_size():
    model = create_model(VIT, num_classes=3, image_size=16, **SMALL_VIT)
    # (16 / 4)^2 = 16 patch tokens plus the class token, 192 wide
    assert model.pos_embed.shape == (1, 17, 192) and len(model.blocks) == 2
    assert model.create_kwargs == {"patch_size": 4, "depth": 2, "img_size": 16}
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)
    assert create_model(VIT, num_classes=3, depth=1).pos_embed.shape == (1, 197, 192)  # no size: timm's 224


@pytest.mark.parametrize("name", ["resnet18", "cnn_tiny"])
def test_networks_without_img_size_ignore_the_image_size(name):
    model = create_model(name, num_classes=3, image_size=16)
    assert model.create_kwargs == {}
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_unknown_option_names_the_config_key_and_close_matches():
    with pytest.raises(ModelError) as err:
        create_model(VIT, num_classes=3, image_size=16, where="student.kwargs", drop_path=0.1)
    msg = str(err.value)
    assert msg.startswith(f"student.kwargs.drop_path is not an option of {VIT} (did you mean drop_path_rate")
    assert "VisionTransformer takes img_size, patch_size" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="student.kwargs.img_size is not an option of resnet18"):
        create_model("resnet18", num_classes=3, where="student.kwargs", img_size=32)  # explicit: never dropped


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_pretrained_offline_is_one_line_with_an_image_size(monkeypatch, name):
    """Without network, pretrained=True still ends in one ModelError, whether or not img_size is taken."""
    import timm
    calls = []

    def offline(model_name, **kwargs):
        calls.append(sorted(kwargs))
        if "img_size" in kwargs and model_name == "resnet18":
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'img_size'")
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match=f"pretrained weights for '{name}' could not be downloaded") as err:
        create_model(name, num_classes=3, pretrained=True, image_size=32)
    assert "\n" not in str(err.value)
    assert len(calls) == (2 if name == "resnet18" else 1) and "img_size" in calls[0]


def test_vit_saves_and_loads_through_model_json(tmp_path):
    torch.manual_seed(0)
    model = create_model(VIT, num_classes=3, image_size=16, **SMALL_VIT).eval()
    save_model(model, tmp_path, meta={"image_size": 16})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["model_kwargs"] == {"patch_size": 4, "depth": 2, "img_size": 16} and meta["image_size"] == 16
    loaded, _ = load_model(tmp_path)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_old_model_json_without_img_size_rebuilds_the_old_network(tmp_path):
    """A model.json from before img_size was recorded holds only what the caller gave: timm's 224px ViT."""
    torch.manual_seed(0)
    model = create_model(VIT, num_classes=3, depth=1).eval()
    save_model(model, tmp_path, meta={"model_kwargs": {"depth": 1}})
    loaded, meta = load_model(tmp_path)
    assert meta["model_kwargs"] == {"depth": 1} and loaded.pos_embed.shape == (1, 197, 192)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


# ---- check_forward ----

def test_check_forward_leaves_modes_bn_stats_and_random_state_alone():
    model = create_model("resnet18_cifar", num_classes=10)
    model.train()
    model.layer2.eval()  # mixed modes must come back exactly as they were
    model(torch.randn(4, 3, 16, 16))  # move BN statistics off their initial values
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    check_forward(model, image_size=16, channels=3, num_classes=10)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # num_batches_tracked too
    assert torch.equal(torch.get_rng_state(), rng)


def test_check_forward_names_network_shape_and_fix():
    fixed = create_model(VIT, num_classes=3, depth=1, img_size=224)  # a ViT forced to 224px inputs
    with pytest.raises(ModelError) as err:
        check_forward(fixed, image_size=16, channels=3, num_classes=3)
    msg = str(err.value)
    assert msg.startswith(f"student {VIT} cannot take 3x16x16 images: Input height (16) doesn't match model (224)")
    assert msg.endswith("pass student.kwargs.img_size/patch_size") and "\n" not in msg
    # a network whose attention biases are sized for 224px: it builds at 32px but cannot run there
    other = create_model("efficientformer_l1", num_classes=3, image_size=32)
    with pytest.raises(ModelError, match="teacher efficientformer_l1 cannot take 3x32x32 images: "):
        check_forward(other, image_size=32, channels=3, num_classes=3, role="teacher")


def test_check_forward_wants_class_logits():
    model = create_model("cnn_tiny", num_classes=5)
    with pytest.raises(ModelError, match=r"gives outputs shaped \(2, 5\) for two 3x8x8 images, not \(2, 10\)"):
        check_forward(model, image_size=8, channels=3, num_classes=10)
    with pytest.raises(ModelError, match="cannot take 1x8x8 images: .*in_chans=1"):
        check_forward(model, image_size=8, channels=1, num_classes=5)


# ---- through the engine ----

def test_vit_teacher_then_kd_ood_at_the_task_size(tiny_task, tmp_path):
    """A ViT trained at 16x16 with timm options, then rebuilt from its model.json as a teacher: same predictions."""
    vit = {"student.arch": VIT, "student.kwargs.patch_size": 4, "student.kwargs.depth": 2, "epochs": "null",
           "student.lr": 0.01}
    first = train(_resolve(base_overrides(tiny_task, tmp_path, name="vit", steps=3, **vit), TEACHER_BASE))
    meta = json.loads((tmp_path / "vit" / "model.json").read_text())
    assert meta["model_kwargs"] == {"patch_size": 4, "depth": 2, "img_size": 16} and meta["image_size"] == 16
    second = train(_resolve(base_overrides(tiny_task, tmp_path, name="kd", steps=2, method="kd_ood",
                                           teacher=str(tmp_path / "vit"), **{"student.arch": "cnn_tiny"})))
    # the distillation run evaluates the rebuilt teacher on the same 36 test images the ViT run ended with
    assert second["teacher_top1"] == first["student_top1"]
    # the same weights as a bare state_dict: teacher.arch and teacher.kwargs rebuild the network
    torch.save(load_file(tmp_path / "vit" / "model.safetensors"), tmp_path / "vit.pt")
    bare = {"teacher.arch": VIT, "teacher.kwargs.patch_size": 4, "teacher.kwargs.depth": 2, "data.image_size": 16}
    third = train(_resolve(base_overrides(tiny_task, tmp_path, name="kd2", steps=1, method="kd_ood",
                                          teacher=str(tmp_path / "vit.pt"), **{"student.arch": "cnn_tiny"}, **bare)))
    assert third["teacher_top1"] == first["student_top1"]
    # teacher.kwargs that contradict the options model.json recorded are refused
    with pytest.raises(CheckpointError, match=r"teacher.kwargs asks for \{'depth': 3\}"):
        train(_resolve(base_overrides(tiny_task, tmp_path, name="kd3", steps=1, method="kd_ood",
                                      teacher=str(tmp_path / "vit"), **{"teacher.kwargs.depth": 3})))
    assert not (tmp_path / "kd3").exists()


def test_student_that_cannot_take_the_images_leaves_no_run_folder(tiny_task, tmp_path, capsys):
    args = base_overrides(tiny_task, tmp_path, name="r", steps=1, epochs="null",
                          **{"student.arch": VIT, "student.kwargs.img_size": 224, "student.kwargs.depth": 1})
    assert main(["train-teacher", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: student {VIT} cannot take 3x16x16 images"), err
    assert not (tmp_path / "r").exists()
