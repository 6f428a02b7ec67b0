"""One config system: built-in defaults < YAML file < `key=value` overrides (dotted keys).

A config is a plain nested dict. Every key must exist in the defaults (the engine's
below, plus the section of the chosen method, named after it), so a typo is an error
with close matches instead of a silently ignored option.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


# What fills the crop padding of the in-device augmentation (mosaic.augment.Augment implements these).
PADDING_MODES = ("constant", "reflect", "replicate")
# Function matching's mixed views (mosaic.augment.Mix implements these).
MIX_MODES = ("none", "mixup", "cutmix")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, bad value or unreadable file."""


# Engine defaults. Methods add their own section (see mosaic.methods.Method.defaults).
DEFAULTS: dict[str, Any] = {
    "method": "mosaic",         # registered method name (mosaic list-methods)
    "name": None,               # run folder name under out_dir; default "<method>-<student.arch>"
    "out_dir": "runs",          # parent folder of run folders
    "seed": 0,                  # seeds python, numpy, torch (and each rank differently for data/noise)
    "steps": 1000,              # training steps (one outer iteration of the method each)
    "epochs": None,             # if set, steps = ceil(epochs * len(train) / global batch); for supervised runs
    "batch_size": 256,          # images per process per step and data stream
    "resume": False,            # continue from the latest checkpoint in the run folder
    "overwrite": False,         # delete an existing run folder first
    "mixed_precision": "auto",  # auto | no | bf16 | fp16: autocast around each network forward (mosaic/precision.py);
                                #   auto = bf16 on a GPU with native bf16 and on a CPU with AMX / AVX-512 BF16, else
                                #   fp32 (no); fp16 needs a CUDA GPU (gradient scaler); evaluation always runs in fp32
    "cpu": False,               # force CPU even when a GPU is present
    "compile": False,           # torch.compile the players (MosaicKD also its teacher); minutes to start on CPU,
                                # and slower steps on top of bf16 + channels-last there (results/speed-cpu.md)
    "channels_last": "auto",    # channels-last memory format for players and teacher: auto (each network that is a
                                #   convnet: most of its weights in convolutions) | true | false
    "schedule": "cosine",       # learning-rate schedule over `steps`: cosine | onecycle | constant
    "warmup": 0.0,              # fraction of steps with linear warm-up (onecycle uses 0.15 when 0)
    "log_every": 50,            # steps between metric lines in metrics.jsonl
    "eval_every": 500,          # steps between evaluations on the test set (0: only at the end)
    "eval_batch_size": 512,
    "ckpt_every": 500,          # steps between checkpoints (0: only at the end)
    "keep_ckpts": 2,            # checkpoints kept in run/checkpoints
    "sample_every": 1000,       # steps between sample image grids (0: only at the end)
    "progress": True,           # tqdm progress bar (main process only)
    "log_with": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
                                # experiment trackers (Accelerate's): tensorboard (the default when installed,
                                #   else none) | wandb | mlflow | aim | comet_ml | clearml | dvclive | ... | all
                                #   | none, or a list of them; metrics.jsonl is always written
    "sync_bn": False,           # SyncBatchNorm in the trained players when several processes run (see README)
    "global_batch": False,      # true: batch_size is the global batch, split over the processes
    "mix": "none",              # function matching (Beyer et al. 2022): teacher and student see one strongly mixed
                                #   view of each student batch: none | mixup | cutmix (methods call ctx.mix)
    "mix_alpha": 1.0,           # Beta(alpha, alpha) of the mix: MixUp's weight of the partner, CutMix's kept area
    "guard": {                  # divergence guard (mosaic/guard.py)
        "on_nonfinite": "stop", # stop | restore (last checkpoint, lower LR) | skip (drop the update) | off
        "every": 10,            # steps between checks (each check is one host sync)
        "lr_factor": 0.5,       # restore: learning rates are multiplied by this after each restore
        "max_restores": 3,      # restore: stop after this many restores
        "max_skips": 20,        # skip: stop after this many skipped updates in a row
    },
    "data": {
        "root": None,           # data root; default $MOSAIC_DATA_ROOT, ./data or ../shared/data
        "train": "cifar10",     # in-domain training set (teacher training, in-domain KD)
        "test": "cifar10",      # in-domain test set for evaluation (null: no evaluation)
        "ood": "tiny-imagenet", # unlabelled out-of-domain pool (null for data-free methods)
        "image_size": 32,
        "channels": 3,
        "download": False,      # allow torchvision downloads (needs internet)
        "train_limit": None,    # keep this many training images (class-balanced; after train_classes)
        "train_classes": None,  # keep only these classes of data.train: a name or index, or a list of them
                                #   (null: all); MKD anomaly detection fits on the normal class this way
        "test_limit": None,     # keep this many test images (class-balanced)
        "ood_limit": None,      # keep this many OOD images (random subset; class-balanced under ood_classes)
        "ood_classes": None,    # keep only these class folders of a labelled OOD source (a name or index, or a list),
                                #   e.g. a pool far from the task's classes; it is still used unlabelled (null: all)
        "ood_select": None,     # keep the N OOD images with the highest teacher entropy (cached per teacher+pool)
        "on_corrupt": "warn",   # unreadable image: warn (skip it) | error
        "cache": True,          # cache decoded images as uint8 tensors
        "crop_padding": 4,      # random-crop padding of the in-device augmentation (0: none)
        "padding_mode": "constant",  # what fills that padding: constant (black, as torchvision's CIFAR recipe)
                                #   | reflect | replicate (no black borders for a discriminator to learn)
        "flip": True,           # random horizontal flip
    },
    "teacher": {
        "checkpoint": None,     # model.safetensors (+ .json) from train-teacher, or any state_dict file
        "arch": None,           # architecture; read from the checkpoint's JSON when null
        "num_classes": None,    # class count; from the JSON, else from the test set
        "kwargs": {},           # timm options for a teacher given as a bare state_dict (a JSON checkpoint
                                #   records its own), e.g. teacher.kwargs.patch_size=4
        "mean": None,           # per-channel input mean in [0, 1] (data.channels numbers), e.g. [0.485, 0.456, 0.406];
                                #   null: the teacher's model.json, else a timm model's pretrained_cfg (not for
                                #   the CIFAR nets here), else the in-domain data set's statistics. The student
                                #   is normalised the same way
        "std": None,            # per-channel input std, set together with teacher.mean
    },
    "student": {
        "arch": "resnet18_cifar",  # any timm model name; ViT/Swin/... are built for data.image_size
        "checkpoint": None,     # optional initial weights
        "kwargs": {},           # extra options of the timm constructor, recorded in model.json, e.g.
                                #   student.kwargs.patch_size=4 student.kwargs.drop_path_rate=0.1
        "lr": 0.1,              # SGD learning rate
        "momentum": 0.9,
        "weight_decay": 1e-4,   # (train-teacher uses 5e-4)
        "nesterov": False,
    },
}

# Sections whose keys are free (passed on to timm), so not checked against the defaults.
OPEN_SECTIONS = ("student.kwargs", "teacher.kwargs")
# create_model options the engine sets from the task itself, refused in those sections.
RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "image_size", "where")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # numbers such as 1e-3 or 5E4

# `key=value` shorthands on the command line.
ALIASES = {"teacher": "teacher.checkpoint", "ood": "data.ood", "student": "student.arch",
           "train": "data.train", "test": "data.test", "arch": "student.arch"}


def _close(key: str, options: Iterable[str]) -> str:
    """A ' did you mean ...?' suffix for an unknown key, or ''."""
    matches = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, null, lists); 1e-3 is a number too."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):  # YAML 1.1 wants a dot: 1.0e-3
        return float(value)
    return value


def merge(base: dict, update: Mapping, *, where: str = "", strict: bool = True) -> dict:
    """Recursively merge `update` into a copy of `base`; unknown keys raise ConfigError."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if strict and key not in out:
            raise ConfigError(f"unknown config key '{path}'{_close(key, out)}")
        if isinstance(out.get(key), dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{path}' is a section; set its fields, e.g. {path}.{next(iter(out[key]), 'x')}=...")
            out[key] = merge(out[key], value, where=path + ".", strict=strict and path not in OPEN_SECTIONS)
        else:
            out[key] = value
    return out


def overrides_to_dict(overrides: Iterable[str], *, aliases: Mapping[str, str] = ALIASES) -> dict:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': 1}, 'c': 'x'} (`aliases`, default the shorthands, expanded)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        key = aliases.get(key.strip(), key.strip())
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one")
        node[leaf] = parse_value(text)
    return out


def expand_aliases(data: Mapping, aliases: Mapping[str, str]) -> dict:
    """A YAML mapping with its top-level shorthands expanded (one whose value is a mapping is a section: kept)."""
    out: dict = {}
    for key, value in data.items():
        if key in aliases and not isinstance(value, Mapping):
            *parents, leaf = aliases[key].split(".")
            nested: Any = {leaf: value}
            for part in reversed(parents):
                nested = {part: nested}
            out = merge(out, nested, strict=False)
        else:
            out = merge(out, {key: value}, strict=False)
    return out


def split_args(items: Iterable[str]) -> tuple[str | None, list[str]]:
    """Separate an optional YAML path from key=value overrides (command-line arguments)."""
    yaml_path, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif yaml_path is None and item.endswith((".yaml", ".yml")):
            yaml_path = item
        else:
            raise ConfigError(f"unexpected argument '{item}': give a .yaml config file and key=value overrides")
    return yaml_path, overrides


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def user_config(*, yaml_path: str | Path | None = None, overrides: Iterable[str] = (), base: Mapping | None = None,
                aliases: Mapping[str, str] = ALIASES) -> dict:
    """What the user asked for, not yet checked: `base` < YAML file < key=value overrides, `aliases` expanded in both."""
    user = merge({}, base or {}, strict=False)
    if yaml_path is not None:
        user = merge(user, expand_aliases(load_yaml(yaml_path), aliases), strict=False)
    return merge(user, overrides_to_dict(overrides, aliases=aliases), strict=False)


def complete(user: Mapping, *, method_defaults=None) -> dict:
    """The full, checked config: the defaults (with the chosen method's section added) < `user`.

    `method_defaults(name) -> dict` gives a method's option defaults (the registry's);
    the method name is read from `user` before validation.
    """
    defaults = copy.deepcopy(DEFAULTS)
    method = user.get("method", defaults["method"])
    if method_defaults is not None:
        section = user.get(method)
        recipe = section.get("recipe") if isinstance(section, Mapping) else None
        defaults[method] = copy.deepcopy(method_defaults(method, recipe) if recipe is not None
                                         else method_defaults(method))
    cfg = merge(defaults, user)
    if cfg["mixed_precision"] is False:  # YAML 1.1 reads a bare `no` as false
        cfg["mixed_precision"] = "no"
    if cfg["guard"]["on_nonfinite"] is False:  # and a bare `off` as false
        cfg["guard"]["on_nonfinite"] = "off"
    validate(cfg)
    return cfg


def resolve(*, yaml_path: str | Path | None = None, overrides: Iterable[str] = (),
            base: Mapping | None = None, method_defaults=None, aliases: Mapping[str, str] = ALIASES) -> dict:
    """Build the full config: defaults < `base` < YAML < overrides, with the method's section added.

    `aliases` are the command's shorthands (default ALIASES), expanded in the YAML file's top level and
    in the overrides; `method_defaults` as in `complete`.
    """
    return complete(user_config(yaml_path=yaml_path, overrides=overrides, base=base, aliases=aliases),
                    method_defaults=method_defaults)


def validate(cfg: Mapping) -> None:
    """Reject values the engine cannot run with, naming the key and the fix."""
    def positive(key: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
        if value is None and allow_none:
            return
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise ConfigError(f"'{key}' must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

    positive("steps", cfg["steps"])
    positive("batch_size", cfg["batch_size"])
    positive("eval_batch_size", cfg["eval_batch_size"])
    positive("keep_ckpts", cfg["keep_ckpts"])
    for key in ("log_every", "eval_every", "ckpt_every", "sample_every"):
        positive(key, cfg[key], allow_zero=True)
    if cfg["epochs"] is not None and not (isinstance(cfg["epochs"], (int, float)) and cfg["epochs"] > 0):
        raise ConfigError(f"'epochs' must be a positive number or null, got {cfg['epochs']!r}")
    data = cfg["data"]
    positive("data.image_size", data["image_size"])
    if data["channels"] not in (1, 3):
        raise ConfigError(f"'data.channels' must be 1 or 3, got {data['channels']!r}")
    for key in ("train_limit", "test_limit", "ood_limit", "ood_select"):
        positive(f"data.{key}", data[key], allow_none=True)
    for key in ("train_classes", "ood_classes"):
        classes = data[key]
        items = classes if isinstance(classes, list) else [classes]
        if classes is not None and (not items or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                         for c in items)):
            raise ConfigError(f"'data.{key}' must be a class name or index, or a list of them, got {classes!r}")
    if data["padding_mode"] not in PADDING_MODES:
        raise ConfigError(f"'data.padding_mode' must be {', '.join(PADDING_MODES[:-1])} or {PADDING_MODES[-1]}, "
                          f"got {data['padding_mode']!r}")
    if data["padding_mode"] == "reflect" and data["crop_padding"] >= data["image_size"]:
        raise ConfigError(f"'data.padding_mode=reflect' needs data.crop_padding < data.image_size "
                          f"({data['crop_padding']} >= {data['image_size']}); lower the padding or use replicate")
    if data["on_corrupt"] not in ("warn", "error"):
        raise ConfigError(f"'data.on_corrupt' must be warn or error, got {data['on_corrupt']!r}")
    if cfg["mix"] not in MIX_MODES:
        raise ConfigError(f"'mix' must be one of {', '.join(MIX_MODES)}, got {cfg['mix']!r}")
    if isinstance(cfg["mix_alpha"], bool) or not isinstance(cfg["mix_alpha"], (int, float)) or cfg["mix_alpha"] <= 0:
        raise ConfigError(f"'mix_alpha' must be a positive number (Beta(alpha, alpha)), got {cfg['mix_alpha']!r}")
    if cfg["mixed_precision"] not in ("auto", "no", "fp16", "bf16"):
        raise ConfigError(f"'mixed_precision' must be auto, no, bf16 or fp16, got {cfg['mixed_precision']!r}")
    if cfg["channels_last"] not in ("auto", True, False):
        raise ConfigError(f"'channels_last' must be auto, true or false, got {cfg['channels_last']!r}")
    if cfg["schedule"] not in ("cosine", "onecycle", "constant"):
        raise ConfigError(f"'schedule' must be cosine, onecycle or constant, got {cfg['schedule']!r}")
    guard = cfg["guard"]
    if guard["on_nonfinite"] not in ("stop", "restore", "skip", "off"):
        raise ConfigError(f"'guard.on_nonfinite' must be stop, restore, skip or off, got {guard['on_nonfinite']!r}")
    positive("guard.every", guard["every"])
    positive("guard.max_restores", guard["max_restores"], allow_zero=True)
    positive("guard.max_skips", guard["max_skips"], allow_zero=True)
    if not 0.0 < float(guard["lr_factor"]) <= 1.0:
        raise ConfigError(f"'guard.lr_factor' must be in (0, 1], got {guard['lr_factor']!r}")
    for section in OPEN_SECTIONS:
        role = section.split(".")[0]
        options = cfg[role]["kwargs"]
        if not isinstance(options, Mapping):
            raise ConfigError(f"'{section}' must be a mapping of timm options, e.g. {section}.drop_path_rate=0.1; "
                              f"got {options!r}")
        for key in options:
            if key == "pretrained":
                raise ConfigError(f"'{section}.pretrained' is not supported (runs download nothing); "
                                  f"start from weights with {role}.checkpoint=<file>")
            if key in RESERVED_KWARGS:
                raise ConfigError(f"'{section}.{key}' is set by mosaic from the task; remove it")
    if not 0.0 <= float(cfg["warmup"]) < 1.0:
        raise ConfigError(f"'warmup' is a fraction of the steps in [0, 1), got {cfg['warmup']!r}")
    check_teacher_stats(cfg["teacher"], channels=data["channels"])


def check_teacher_stats(teacher: Mapping, *, channels: int) -> None:
    """teacher.mean / teacher.std: both null, or both data.channels numbers (std positive)."""
    mean, std = teacher["mean"], teacher["std"]
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise ConfigError(f"'teacher.{given}' is set but 'teacher.{missing}' is not: give both (or neither)")
    example = "[0.485, 0.456, 0.406]" if channels == 3 else "[0.5]"
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        numbers = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not numbers or len(value) != channels:
            raise ConfigError(f"'teacher.{key}' must be a list of {channels} numbers (one per channel, "
                              f"data.channels={channels}), got {value!r}; e.g. teacher.{key}={example}")
    if std is not None and not all(v > 0 for v in std):
        raise ConfigError(f"'teacher.std' must be positive, got {std!r}")


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config as one level of dotted keys with scalar values (lists and null as JSON), for experiment trackers."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            scalar = isinstance(value, (bool, int, float, str))
            out[f"{prefix}{key}"] = value if scalar else json.dumps(value, default=str)
    return out


def dump(cfg: Mapping, path: str | Path, *, header: Iterable[str] = ()) -> None:
    """Write the resolved config as YAML, after `header` lines as YAML comments (what the run resolved at start)."""
    comments = "".join(f"# {line}\n" for line in header)
    Path(path).write_text(comments + yaml.safe_dump(dict(cfg), sort_keys=False))
