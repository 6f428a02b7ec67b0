"""Task set-up: the data sets a run needs, the frozen teacher, and the checks that they fit together."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mosaic.augment import Augment, Mix
from mosaic.data import ImageSet, load_split
from mosaic.engine.folder import RunError
from mosaic.methods import Context
from mosaic.models import check_forward, create_model, freeze, list_cifar_models, load_classifier, load_state
from mosaic.precision import Precision, autocast_forward
from mosaic.stream import Stream


PLAIN = "_plain"  # a stream key "<set>_plain" draws the images of <set> un-augmented (e.g. "ood_plain")
PLAIN_SEED = 7919  # added to the run's seed: a plain stream shuffles apart from its augmented twin


def stream_source(key: str) -> str:
    """The data set a stream key draws from: "ood_plain" -> "ood", "train" -> "train"."""
    return key[:-len(PLAIN)] if key.endswith(PLAIN) else key


@dataclass
class Task:
    """What the data and the teacher fix before any player exists: sets, teacher, classes, normalisation, budget."""
    sets: dict[str, ImageSet]
    teacher: nn.Module | None
    teacher_meta: dict
    num_classes: int
    mean: tuple                     # the normalisation the teacher (and the student) gets
    std: tuple
    norm_source: str                # where mean/std come from, e.g. "teacher.mean/std"
    batch_size: int                 # per process and stream
    steps: int


def check_checkpoints(cfg: dict) -> None:
    """Teacher and student checkpoints that do not exist, reported before any data set is decoded."""
    for role in ("teacher", "student"):
        path = cfg[role]["checkpoint"]
        if path and not Path(path).exists():
            hint = " (train one with `mosaic train-teacher`)" if role == "teacher" else ""
            raise RunError(f"{role}.checkpoint '{path}' not found: give a model.safetensors (with its .json), "
                           f"a run folder or a state_dict file{hint}")


def load_data(cfg: dict, needs: dict[str, int], accelerator) -> dict[str, ImageSet]:
    """The data sets the method (its streams) and the evaluation (data.test) need."""
    d = cfg["data"]
    needs = {stream_source(key): n for key, n in needs.items()}
    if "train" in needs and not d["train"]:
        raise RunError(f"method '{cfg['method']}' trains on labelled in-domain data: set data.train")
    if "ood" in needs and not d["ood"]:
        raise RunError(f"method '{cfg['method']}' needs out-of-domain images: set ood=<folder or data set>")
    keys = [k for k in ("train", "ood") if k in needs] + (["test"] if d["test"] else [])
    with accelerator.main_process_first():  # the main process fills the decode cache first
        return {key: load_split(cfg, key) for key in keys}


def load_teacher(cfg: dict, sets: dict[str, ImageSet], *, required: bool) -> tuple[nn.Module | None, dict]:
    """The frozen teacher (or None when the method trains without one) and its metadata."""
    t = cfg["teacher"]
    if not t["checkpoint"]:
        if required:
            raise RunError(f"method '{cfg['method']}' distils a teacher: pass teacher=<checkpoint> "
                           f"(train one with `mosaic train-teacher`)")
        return None, {}
    labelled = sets.get("train") or sets.get("test")
    model, meta = load_classifier(t["checkpoint"], arch=t["arch"], num_classes=t["num_classes"],
                                  in_chans=cfg["data"]["channels"],
                                  default_classes=labelled.num_classes if labelled is not None else None,
                                  image_size=cfg["data"]["image_size"], kwargs=t.get("kwargs"))
    return freeze(model), meta


def check_task(cfg: dict, sets: dict[str, ImageSet], teacher_meta: dict, *, same_classes: bool = True) -> int:
    """Class count of the task; mismatches between teacher and data are errors.

    same_classes=False (Method.same_classes) skips the class checks: the teacher is used for its features only.
    """
    d = cfg["data"]
    num_classes = teacher_meta.get("num_classes")
    for key in ("train", "test"):
        s = sets.get(key)
        if s is None or (teacher_meta and not same_classes):
            continue
        labels_max = int(s.labels.max()) + 1 if s.labels is not None and len(s.labels) else 0
        if num_classes is None:
            num_classes = s.num_classes or labels_max
        if labels_max > num_classes:
            raise RunError(f"the {key} set '{s.name}' has labels up to {labels_max - 1}, but the teacher has "
                           f"{num_classes} classes: use the teacher's in-domain data set")
        if teacher_meta and s.num_classes and s.num_classes != num_classes:
            raise RunError(f"the teacher has {num_classes} classes but the {key} set '{s.name}' has "
                           f"{s.num_classes}: give the data set the teacher was trained on")
    if num_classes is None:
        raise RunError("cannot tell the number of classes: give a teacher checkpoint or a labelled data.test")
    for key in ("in_chans", "image_size"):
        want = d["channels"] if key == "in_chans" else d["image_size"]
        if key in teacher_meta and teacher_meta[key] != want:
            name = "data.channels" if key == "in_chans" else "data.image_size"
            raise RunError(f"the teacher was trained with {key}={teacher_meta[key]} but {name}={want}: "
                           f"set {name}={teacher_meta[key]}")
    return num_classes


def teacher_normalization(cfg: dict, sets: dict[str, ImageSet], teacher: nn.Module | None,
                          teacher_meta: dict) -> tuple[tuple, tuple, str]:
    """The (mean, std) the teacher's inputs get and where they come from, first found of: teacher.mean/std,
    the teacher's model.json, a timm model's pretrained_cfg (not the CIFAR nets here: their teachers are trained
    with the data set's statistics), the in-domain data set's statistics."""
    t, channels = cfg["teacher"], cfg["data"]["channels"]
    if t["mean"] is not None:
        return tuple(map(float, t["mean"])), tuple(map(float, t["std"])), "teacher.mean/std"
    if "mean" in teacher_meta:
        return tuple(teacher_meta["mean"]), tuple(teacher_meta["std"]), "the teacher's model.json"
    arch = str(teacher_meta.get("arch", ""))
    pretrained = getattr(teacher, "pretrained_cfg", None) or {}
    if (teacher is not None and arch.split(".")[0] not in list_cifar_models()
            and len(pretrained.get("mean", ())) == channels and len(pretrained.get("std", ())) == channels):
        return (tuple(map(float, pretrained["mean"])), tuple(map(float, pretrained["std"])),
                f"the pretrained_cfg of timm's {arch}")
    ref = sets.get("train") or sets.get("test") or sets.get("ood")
    return ref.mean, ref.std, f"the statistics of data set '{ref.name}'"


def per_process_batch(cfg: dict, processes: int) -> int:
    """Images per process and stream per step: batch_size, or batch_size / processes when global_batch."""
    if not cfg["global_batch"]:
        return cfg["batch_size"]
    if cfg["batch_size"] % processes:
        raise RunError(f"global_batch=true splits batch_size={cfg['batch_size']} over {processes} processes, "
                       f"which does not divide it: use a multiple of {processes}")
    return cfg["batch_size"] // processes


def setup_task(cfg: dict, needs: dict[str, int], accelerator, *, requires_teacher: bool,
               same_classes: bool = True) -> Task:
    """Load and check everything the run's data and teacher fix; `steps` follows `epochs` when that is set."""
    check_checkpoints(cfg)
    sets = load_data(cfg, needs, accelerator)
    teacher, teacher_meta = load_teacher(cfg, sets, required=requires_teacher)
    num_classes = check_task(cfg, sets, teacher_meta, same_classes=same_classes)
    mean, std, norm_source = teacher_normalization(cfg, sets, teacher, teacher_meta)
    batch_size = per_process_batch(cfg, accelerator.num_processes)
    steps = cfg["steps"]
    if cfg["epochs"] is not None and "train" in sets:
        train_batches = sum(n for key, n in needs.items() if stream_source(key) == "train")
        per_step = batch_size * train_batches * accelerator.num_processes
        steps = max(1, math.ceil(cfg["epochs"] * len(sets["train"]) / per_step))
    return Task(sets=sets, teacher=teacher, teacher_meta=teacher_meta, num_classes=num_classes, mean=mean,
                std=std, norm_source=norm_source, batch_size=batch_size, steps=steps)


def build_student(cfg: dict, num_classes: int, device: torch.device, precision: Precision) -> nn.Module:
    """A fresh student (`student.arch` + `student.kwargs`, from `student.checkpoint` when set), checked, on the device."""
    s, d = cfg["student"], cfg["data"]
    student = create_model(s["arch"], num_classes=num_classes, in_chans=d["channels"], image_size=d["image_size"],
                           where="student.kwargs", **s.get("kwargs", {}))
    if s["checkpoint"]:
        load_state(student, s["checkpoint"])
    check_forward(student, role="student", image_size=d["image_size"], channels=d["channels"], num_classes=num_classes)
    return student.to(device, memory_format=memory_format(student, precision))


def memory_format(module: nn.Module, precision: Precision) -> torch.memory_format:
    """channels_last where the run's precision puts `module` in it (channels_last=true, or auto and a convnet)."""
    return torch.channels_last if precision.wants_channels_last(module) else torch.contiguous_format


def prepare_frozen(module: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """A frozen network (teacher) on the device, in its memory format, each forward autocast as the run says."""
    module = module.to(device, memory_format=memory_format(module, precision))
    return autocast_forward(module, precision, device.type)


def make_streams(cfg: dict, sets: dict[str, ImageSet], needs: dict[str, int], accelerator) -> dict[str, Stream]:
    """One resumable, per-process stream on the device for each stream key the method draws from.

    A key names a data set ("train", "ood"), its images augmented (data.crop_padding, padding_mode, flip);
    "<set>_plain" draws the same set un-augmented, in its own shuffle (seed + PLAIN_SEED), as a second
    loader with test-time transforms would.
    """
    device, d = accelerator.device, cfg["data"]
    augment = Augment.from_config(d, image_size=d["image_size"]).to(device)
    images = {key: s.images.to(device) for key, s in sets.items() if key in {stream_source(k) for k in needs}}
    labels = {key: s.labels.to(device) if key == "train" and s.labels is not None else None for key, s in sets.items()}
    streams = {}
    for key in needs:
        src, plain = stream_source(key), key.endswith(PLAIN)
        streams[key] = Stream(images[src], labels[src], seed=cfg["seed"] + (PLAIN_SEED if plain else 0),
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              augment=None if plain else augment)
    return streams


def make_context(cfg: dict, task: Task, accelerator, precision: Precision) -> Context:
    """The Context a method is built from: the teacher and a fresh student on the device, the task's shape."""
    device = accelerator.device
    teacher = prepare_frozen(task.teacher, precision, device) if task.teacher is not None else None
    student = build_student(cfg, task.num_classes, device, precision)
    if teacher is not None:  # both networks must take the task's images: one clear error before the folder exists
        d = cfg["data"]
        check_forward(teacher, role="teacher", image_size=d["image_size"], channels=d["channels"],
                      num_classes=task.num_classes)
    return Context(cfg=cfg, opts=cfg.get(cfg["method"], {}), teacher=teacher, student=student,
                   num_classes=task.num_classes,
                   image_size=cfg["data"]["image_size"], channels=cfg["data"]["channels"],
                   mean=torch.tensor(task.mean, device=device), std=torch.tensor(task.std, device=device),
                   device=device, accelerator=accelerator, steps=task.steps, batch_size=task.batch_size,
                   mixer=Mix(mode=cfg["mix"], alpha=cfg["mix_alpha"]) if cfg["mix"] != "none" else None,
                   precision=precision)


def draw_batch(streams: dict[str, Stream], needs: dict[str, int], batch_size: int) -> dict[str, torch.Tensor]:
    """One step's images from each stream (`needs[key]` batches), with `<key>_labels` for labelled streams."""
    batch: dict[str, torch.Tensor] = {}
    for key, n in needs.items():
        x, y = streams[key].next(n * batch_size)
        batch[key] = x
        if y is not None:
            batch[f"{key}_labels"] = y
    return batch
