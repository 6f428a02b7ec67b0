"""Config: defaults < YAML < overrides, unknown keys rejected with close matches."""
import pytest

from mosaic.config import ConfigError, overrides_to_dict, resolve
from mosaic.methods import method_defaults


def full(**kw):
    return resolve(method_defaults=method_defaults, **kw)


def test_overrides_are_typed_and_dotted():
    d = overrides_to_dict(["steps=10", "data.image_size=28", "mosaic.betas=[0.5, 0.9]", "name=abc", "data.root=null"])
    assert d == {"steps": 10, "data": {"image_size": 28, "root": None}, "mosaic": {"betas": [0.5, 0.9]}, "name": "abc"}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nbatch_size: 32\nmosaic:\n  lambda_adv: 2.0\n")
    cfg = full(yaml_path=f, overrides=["batch_size=16"])
    assert cfg["steps"] == 7 and cfg["batch_size"] == 16
    assert cfg["mosaic"]["lambda_adv"] == 2.0
    assert cfg["mosaic"]["lambda_balance"] == 10.0  # default kept


def test_aliases():
    cfg = full(overrides=["teacher=t.safetensors", "ood=/x", "student=wrn16_1"])
    assert cfg["teacher"]["checkpoint"] == "t.safetensors"
    assert cfg["data"]["ood"] == "/x"
    assert cfg["student"]["arch"] == "wrn16_1"


def test_unknown_key_has_close_match():
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        full(overrides=["batch_sise=3"])
    with pytest.raises(ConfigError, match="data.imge_size.*image_size"):
        full(overrides=["data.imge_size=3"])
    with pytest.raises(ConfigError, match="lambda_adv"):
        full(overrides=["mosaic.lambda_adw=3"])


def test_unknown_method_has_close_match():
    with pytest.raises(ConfigError, match="did you mean mosaic"):
        full(overrides=["method=mosaik"])


def test_method_section_belongs_to_method():
    cfg = full(overrides=["method=kd_ood", "kd_ood.temperature=4"])
    assert cfg["kd_ood"]["temperature"] == 4 and "mosaic" not in cfg
    with pytest.raises(ConfigError, match="unknown config key 'mosaic'"):
        full(overrides=["method=kd_ood", "mosaic.lambda_adv=1"])


@pytest.mark.parametrize("override, match", [
    ("batch_size=0", "batch_size"), ("steps=-5", "steps"), ("steps=1.5", "steps"),
    ("data.channels=2", "channels"), ("mixed_precision=fp8", "mixed_precision"),
    ("schedule=linear", "schedule"), ("data.on_corrupt=skip", "on_corrupt"),
    ("teacher.kwargs.in_chans=1", "'teacher.kwargs.in_chans' is set by mosaic"),
    ("student.kwargs.pretrained=true", "'student.kwargs.pretrained' is not supported.*student.checkpoint"),
    ("student.kwargs=4", "'student.kwargs' is a section"),
])
def test_bad_values_are_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        full(overrides=[override])


def test_bare_no_means_no_precision():
    assert full(overrides=["mixed_precision=no"])["mixed_precision"] == "no"


def test_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        full(yaml_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        full(yaml_path=bad)
    with pytest.raises(ConfigError, match="key=value"):
        full(overrides=["steps"])
    with pytest.raises(ConfigError, match="section"):
        full(overrides=["data=3"])


def test_config_is_on_the_ground_floor():
    """`import mosaic.config` (and resolving a config) loads no torch, timm, kornia or accelerate."""
    import subprocess
    import sys

    code = ("import sys, mosaic.config as c; c.validate(c.merge(c.DEFAULTS, {}));"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'kornia', 'accelerate')];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_model_kwargs_are_free_keys_merged_from_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  arch: vit_tiny_patch16_224\n  kwargs:\n    patch_size: 4\n    depth: 6\n")
    cfg = full(yaml_path=f, overrides=["student.kwargs.depth=2", "student.kwargs.drop_path_rate=0.1"])
    assert cfg["student"]["kwargs"] == {"patch_size": 4, "depth": 2, "drop_path_rate": 0.1}
    assert cfg["teacher"]["kwargs"] == {}
