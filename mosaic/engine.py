"""The one training loop every method runs on.

The engine owns devices, precision, seeding, steps, LR schedules, evaluation,
checkpoints, logging, progress and the run folder; a method (mosaic.methods) owns
only its players and its `step`. Data flows one way:
config -> data + models -> method -> engine -> run folder.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mosaic import config as config_lib
from mosaic.augment import Augment, to_float
from mosaic.data import ImageSet, load_image_set
from mosaic.guard import DivergenceError, Guard, scale_learning_rates
from mosaic.methods import Context, get_method
from mosaic.models import CheckpointError, check_forward, create_model, freeze, load_model, load_state, save_model
from mosaic.stream import Stream


class RunError(RuntimeError):
    """A run that cannot start or continue: existing folder, mismatched teacher and data, ..."""


# ----------------------------------------------------------------------------- models

def load_classifier(checkpoint: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
                    in_chans: int = 3, default_classes: int | None = None, image_size: int | None = None,
                    kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Load a classifier from our safetensors+JSON pair, a run folder, or any state_dict file given its arch.

    `default_classes` (the data's class count) is used for a bare state_dict when num_classes is not given;
    `image_size` and the timm options `kwargs` (teacher.kwargs) build a bare state_dict's network, and must
    agree with what the JSON recorded otherwise.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' not found")
    twin = path / "model.json" if path.is_dir() else path.with_suffix(".json")
    if twin.is_file():
        model, meta = load_model(path)
        if arch is not None and arch != meta["arch"]:
            raise CheckpointError(f"checkpoint '{path}' holds a {meta['arch']}, but arch={arch} was asked for")
        if num_classes is not None and num_classes != meta["num_classes"]:
            raise CheckpointError(f"checkpoint '{path}' has {meta['num_classes']} classes, but num_classes={num_classes}")
        recorded = meta.get("model_kwargs") or {}
        differ = {k: v for k, v in (kwargs or {}).items() if recorded.get(k) != v}
        if differ:
            raise CheckpointError(f"checkpoint '{path}' was built with options {recorded}, but teacher.kwargs "
                                  f"asks for {differ}: drop teacher.kwargs (model.json records the options)")
        return model, meta
    num_classes = num_classes or default_classes
    if arch is None or num_classes is None:
        raise CheckpointError(f"checkpoint '{path}' has no model.json beside it: give its architecture and "
                              f"class count (teacher.arch=..., teacher.num_classes=...)")
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                         where="teacher.kwargs", **(kwargs or {}))
    load_state(model, path)
    return model.eval(), {"arch": arch, "num_classes": num_classes, "in_chans": in_chans}


# ----------------------------------------------------------------------------- schedules

def lr_factor(step: int, total: int, *, kind: str, warmup: float) -> float:
    """Multiplier of the base learning rate at `step` of `total` (cosine, one-cycle or constant)."""
    if kind == "onecycle" and warmup == 0.0:
        warmup = 0.15
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if kind == "onecycle":  # linear anneal to zero after the warm-up peak
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Progress:
    """The step counter and the divergence guard's restore count, checkpointed with the run."""

    def __init__(self) -> None:
        self.step = 0
        self.restores = 0      # times the guard went back to a checkpoint
        self.lr_scale = 1.0    # learning-rate multiplier those restores applied

    def state_dict(self) -> dict:
        return {"step": self.step, "restores": self.restores, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.restores = int(state.get("restores", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))


# ----------------------------------------------------------------------------- run folder

def run_dir(cfg: dict) -> Path:
    """The run folder `<out_dir>/<name>`."""
    name = cfg["name"] or f"{cfg['method']}-{cfg['student']['arch']}"
    return Path(cfg["out_dir"]) / name


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    ckpt = folder / "checkpoints"
    if not ckpt.is_dir():
        return []
    done = [p for p in ckpt.glob("step_*") if p.is_dir() and (p / "DONE").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def check_run_dir(cfg: dict) -> Path:
    """The run folder, refused when it holds a run and neither resume nor overwrite is set; creates nothing."""
    folder = run_dir(cfg)
    if folder.exists() and any(folder.iterdir()) and not cfg["resume"] and not cfg["overwrite"]:
        raise RunError(f"run folder '{folder}' already exists: pass resume=true to continue it, "
                       f"overwrite=true to start again, or name=<new name>")
    return folder


def prepare_run_dir(cfg: dict, accelerator) -> Path:
    """Create the run folder (after every input was checked), clearing it first when overwrite is set."""
    folder = run_dir(cfg)
    accelerator.wait_for_everyone()  # every rank has passed check_run_dir before the main one creates it
    if accelerator.is_main_process:
        check_run_dir(cfg)
        exists = folder.exists() and any(folder.iterdir())
        if exists and cfg["overwrite"] and not cfg["resume"]:
            shutil.rmtree(folder)
        for sub in ("checkpoints", "samples"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return folder


class MetricLog:
    """Appends metric records to metrics.jsonl (and TensorBoard when installed), main process only."""

    def __init__(self, folder: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:  # drop lines written after the checkpoint
            self.truncate(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def truncate(self, step: int) -> None:
        """Drop the lines written after `step` (the run went back to a checkpoint at that step)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, images: Tensor, ctx: Context, *, batch_size: int) -> Tensor:
    """Logits of `model` for uint8 images, in batches, in eval mode (train mode restored after)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = ctx.normalize(to_float(images[i:i + batch_size]))
        with ctx.accelerator.autocast():
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, ctx.num_classes, device=images.device)


class Evaluator:
    """Top-1 of the student, of the teacher (computed once) and their agreement on the test set."""

    def __init__(self, test: ImageSet, ctx: Context, *, batch_size: int) -> None:
        acc = ctx.accelerator
        self.ctx, self.batch_size = ctx, batch_size
        if test.labels is None:
            raise RunError(f"the test set '{test.name}' has no labels: data.test must be a labelled data set")
        self.images = test.images[acc.process_index::acc.num_processes].to(ctx.device)
        self.labels = test.labels[acc.process_index::acc.num_processes].to(ctx.device)
        self.total = len(test)
        self.teacher_pred = None
        self.teacher_top1 = None
        if ctx.teacher is not None:
            self.teacher_pred = predict(ctx.teacher, self.images, ctx, batch_size=batch_size).argmax(1)
            self.teacher_top1 = self._fraction((self.teacher_pred == self.labels).sum())

    def _fraction(self, count: Tensor) -> float:
        return float(self.ctx.accelerator.reduce(count.float(), reduction="sum").item()) / self.total

    def __call__(self, model: nn.Module) -> dict[str, float]:
        pred = predict(model, self.images, self.ctx, batch_size=self.batch_size).argmax(1)
        out = {"student_top1": self._fraction((pred == self.labels).sum())}
        if self.teacher_pred is not None:
            out["teacher_top1"] = self.teacher_top1
            out["agreement"] = self._fraction((pred == self.teacher_pred).sum())
        return out


# ----------------------------------------------------------------------------- the loop

def load_split(cfg: dict, key: str, *, image_size: int | None = None, channels: int | None = None) -> ImageSet:
    """Decode (or read from cache) `data.<key>` ("train", "test" or "ood") as the config describes it."""
    d = cfg["data"]
    split = "test" if key == "test" else "train"
    return load_image_set(d[key], split=split, image_size=image_size or d["image_size"],
                          channels=channels or d["channels"], root=d["root"], download=d["download"],
                          limit=d[f"{key}_limit"], labelled=key != "ood", on_corrupt=d["on_corrupt"],
                          cache=d["cache"], seed=cfg["seed"])


def _load_data(cfg: dict, needs: dict[str, int], accelerator) -> dict[str, ImageSet]:
    """The data sets the method (its streams) and the evaluation (data.test) need."""
    d = cfg["data"]
    if "train" in needs and not d["train"]:
        raise RunError(f"method '{cfg['method']}' trains on labelled in-domain data: set data.train")
    if "ood" in needs and not d["ood"]:
        raise RunError(f"method '{cfg['method']}' needs out-of-domain images: set ood=<folder or data set>")
    keys = [k for k in ("train", "ood") if k in needs] + (["test"] if d["test"] else [])
    with accelerator.main_process_first():  # the main process fills the decode cache first
        return {key: load_split(cfg, key) for key in keys}


def _teacher(cfg: dict, sets: dict[str, ImageSet], requires: bool) -> tuple[nn.Module | None, dict]:
    """The frozen teacher (or None when the method trains without one) and its metadata."""
    t = cfg["teacher"]
    if not t["checkpoint"]:
        if requires:
            raise RunError(f"method '{cfg['method']}' distils a teacher: pass teacher=<checkpoint> "
                           f"(train one with `mosaic train-teacher`)")
        return None, {}
    labelled = sets.get("train") or sets.get("test")
    model, meta = load_classifier(t["checkpoint"], arch=t["arch"], num_classes=t["num_classes"],
                                  in_chans=cfg["data"]["channels"],
                                  default_classes=labelled.num_classes if labelled is not None else None,
                                  image_size=cfg["data"]["image_size"], kwargs=t.get("kwargs"))
    return freeze(model), meta


def _check_task(cfg: dict, sets: dict[str, ImageSet], teacher_meta: dict) -> tuple[int, tuple, tuple]:
    """Class count and normalisation of the task; mismatches between teacher and data are errors."""
    d = cfg["data"]
    num_classes = teacher_meta.get("num_classes")
    for key in ("train", "test"):
        s = sets.get(key)
        if s is None:
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
    if "mean" in teacher_meta:
        mean, std = tuple(teacher_meta["mean"]), tuple(teacher_meta["std"])
    else:
        ref = sets.get("train") or sets.get("test") or sets.get("ood")
        mean, std = ref.mean, ref.std
    return num_classes, mean, std


def select_ood(ood: ImageSet, ctx: Context, *, keep: int, teacher_file: str | None,
               batch_size: int = 512) -> ImageSet:
    """Keep the `keep` OOD images on which the teacher is least sure (highest entropy), as MosaicKD does.

    The chosen indices are cached per (teacher file, pool, size) under $MOSAIC_CACHE/ood_select.
    """
    import hashlib

    from mosaic.data import cache_dir

    if keep >= len(ood):
        return ood
    key = hashlib.sha256()
    if teacher_file:
        st = Path(teacher_file).stat()
        key.update(f"{Path(teacher_file).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    key.update(f"{ood.name}:{len(ood)}:{tuple(ood.images.shape)}:{keep}".encode())
    key.update(ood.images[:: max(1, len(ood) // 64)].numpy().tobytes())
    path = cache_dir() / "ood_select" / f"{key.hexdigest()[:24]}.pt"
    if path.is_file():
        index = torch.load(path)
    else:
        logits = predict(ctx.teacher, ood.images.to(ctx.device), ctx, batch_size=batch_size)
        log_p = torch.log_softmax(logits, dim=1)
        ent = -(log_p.exp() * log_p).sum(1)
        index = torch.argsort(ent, descending=True)[:keep].sort().values.cpu()
        if ctx.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(index, tmp)
            os.replace(tmp, path)
    return ImageSet(images=ood.images[index], labels=None, classes=None, name=f"{ood.name}, top-{keep} entropy",
                    mean=ood.mean, std=ood.std)


def per_process_batch(cfg: dict, processes: int) -> int:
    """Images per process and stream per step: batch_size, or batch_size / processes when global_batch."""
    if not cfg["global_batch"]:
        return cfg["batch_size"]
    if cfg["batch_size"] % processes:
        raise RunError(f"global_batch=true splits batch_size={cfg['batch_size']} over {processes} processes, "
                       f"which does not divide it: use a multiple of {processes}")
    return cfg["batch_size"] // processes


def _atomic_save_state(accelerator, folder: Path, step: int, keep: int) -> None:
    """Save the full training state to checkpoints/step_N atomically and prune old checkpoints."""
    root = folder / "checkpoints"
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "DONE").write_text(str(step))
        if final.exists():
            (final / "DONE").unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(folder)[:-keep]:
            (old / "DONE").unlink()  # first, so a kill mid-delete never leaves a "complete" half
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_latest_checkpoint(accelerator, folder: Path) -> Path | None:
    """Load the newest checkpoint that loads; a damaged one is reported and the one before it used."""
    import warnings

    for ckpt in reversed(checkpoints(folder)):
        try:
            accelerator.load_state(str(ckpt))
            return ckpt
        except Exception as err:  # a damaged checkpoint: fall back to the previous one
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"checkpoint '{ckpt}' could not be loaded ({type(err).__name__}: {first[:200]}); "
                          f"trying the one before it", stacklevel=2)
    return None


def _save_grid(images: Tensor | None, path: Path) -> None:
    """Write images in [0, 1] as a PNG grid."""
    if images is None or len(images) == 0:
        return
    from torchvision.utils import save_image
    save_image(images.float().clamp(0, 1).cpu(), str(path), nrow=int(math.ceil(math.sqrt(len(images)))))


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the end of the step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: dict) -> dict[str, Any]:
    """Run one training job described by a resolved config; returns results.json's content."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    method_cls = get_method(cfg["method"])
    needs = method_cls.stream_needs(cfg.get(cfg["method"], {}))
    accelerator = Accelerator(cpu=cfg["cpu"], mixed_precision=cfg["mixed_precision"])
    main = accelerator.is_main_process
    set_seed(cfg["seed"], device_specific=True)  # ranks differ: noise and augmentation are per process
    check_run_dir(cfg)  # refuse early; the folder itself is made once every input has been checked
    device = accelerator.device

    sets = _load_data(cfg, needs, accelerator)
    teacher, teacher_meta = _teacher(cfg, sets, getattr(method_cls, "requires_teacher", True))
    num_classes, mean, std = _check_task(cfg, sets, teacher_meta)
    batch_size = per_process_batch(cfg, accelerator.num_processes)
    steps = cfg["steps"]
    if cfg["epochs"] is not None and "train" in sets:
        per_step = batch_size * needs["train"] * accelerator.num_processes
        steps = max(1, math.ceil(cfg["epochs"] * len(sets["train"]) / per_step))
    cfg = {**cfg, "steps": steps}

    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format)
    s, d = cfg["student"], cfg["data"]
    student = create_model(s["arch"], num_classes=num_classes, in_chans=d["channels"], image_size=d["image_size"],
                           where="student.kwargs", **s.get("kwargs", {}))
    if s["checkpoint"]:
        load_state(student, s["checkpoint"])
    # Both networks must take the task's images: one clear error now, not a traceback after the folder exists.
    task_shape = dict(image_size=d["image_size"], channels=d["channels"], num_classes=num_classes)
    check_forward(student, role="student", **task_shape)
    if teacher is not None:
        check_forward(teacher, role="teacher", **task_shape)
    student = student.to(device, memory_format=memory_format)
    ctx = Context(cfg=cfg, opts=cfg.get(cfg["method"], {}), teacher=teacher, student=student,
                  num_classes=num_classes, image_size=cfg["data"]["image_size"], channels=cfg["data"]["channels"],
                  mean=torch.tensor(mean, device=device), std=torch.tensor(std, device=device), device=device,
                  accelerator=accelerator, steps=steps, batch_size=batch_size)
    method = method_cls(ctx)
    folder = prepare_run_dir(cfg, accelerator)
    if main:
        config_lib.dump(cfg, folder / "config.yaml")

    # Players: prepared by Accelerate (device placement, DDP, precision), each optimizer given the schedule.
    guard_cfg = cfg["guard"]
    guard = Guard(mode=guard_cfg["on_nonfinite"], every=guard_cfg["every"], max_skips=guard_cfg["max_skips"],
                  device=device)
    schedulers = []
    for name in method.players:
        module = getattr(method, name)
        if cfg["sync_bn"] and accelerator.num_processes > 1:
            if device.type == "cpu":
                raise RunError("sync_bn=true needs GPUs (torch's SyncBatchNorm does not run on CPU): "
                               "set sync_bn=false for CPU processes")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # same parameter objects
        if cfg["channels_last"]:
            module = module.to(memory_format=torch.channels_last)
        module = accelerator.prepare(module)
        if cfg["compile"]:
            module = torch.compile(module)
        setattr(method, name, module)
        opt = getattr(method, f"{name}_opt", None)
        if opt is not None:
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: lr_factor(i, steps, kind=cfg["schedule"], warmup=float(cfg["warmup"]))))
            opt = accelerator.prepare(opt)
            if cfg["mixed_precision"] != "fp16":  # under fp16 the gradient scaler already drops such steps
                guard.wrap_optimizer(name, opt)
            setattr(method, f"{name}_opt", opt)
    ctx.student = method.student if "student" in method.players else ctx.student
    players = {name: accelerator.unwrap_model(getattr(method, name)) for name in method.players}

    d = cfg["data"]
    if "ood" in sets and d["ood_select"] and teacher is not None:
        sets["ood"] = select_ood(sets["ood"], ctx, keep=d["ood_select"], teacher_file=cfg["teacher"]["checkpoint"],
                                 batch_size=cfg["eval_batch_size"])
    augment = Augment.from_config(d, image_size=d["image_size"]).to(device)
    streams = {key: Stream(sets[key].images.to(device), sets[key].labels.to(device) if key == "train" else None,
                           seed=cfg["seed"], rank=accelerator.process_index, world_size=accelerator.num_processes,
                           augment=augment)
               for key in needs}
    progress = Progress()
    for obj in (progress, *schedulers, *streams.values(), method):
        accelerator.register_for_checkpointing(obj)

    resume_step = None
    if cfg["resume"]:
        found = load_latest_checkpoint(accelerator, folder)
        if found is not None:
            resume_step = progress.step
            if main:
                print(f"resumed {folder} from step {resume_step}")
        elif main:
            print(f"resume=true but {folder} has no usable checkpoint: starting from step 0")
    log = MetricLog(folder, enabled=main, resume_step=resume_step)
    evaluator = Evaluator(sets["test"], ctx, batch_size=cfg["eval_batch_size"]) if "test" in sets else None
    if guard.mode == "restore" and not checkpoints(folder):
        _atomic_save_state(accelerator, folder, progress.step, cfg["keep_ckpts"])  # something to go back to

    def due(every: int, step: int) -> bool:
        return every > 0 and step % every == 0 and step != steps

    def check_guard(step: int) -> bool:
        """Act on non-finite values; True when the run went back to a checkpoint."""
        problem = guard.problems(players)
        flag = torch.tensor(float(problem is not None), device=device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:  # every rank takes the same decision
            return False
        problem = problem or "another process saw non-finite values"
        where = f"run '{folder}' diverged at or before step {step}: {problem}"
        if guard.mode != "restore" or progress.restores >= guard_cfg["max_restores"]:
            tried = f" after {progress.restores} restore(s)" if guard.mode == "restore" else ""
            raise DivergenceError(f"{where}{tried}. Lower the learning rates (student.lr, <method>.lr_*), "
                                  f"or set guard.on_nonfinite=restore to go back and continue with lower ones")
        restores = progress.restores + 1
        ckpt = load_latest_checkpoint(accelerator, folder)
        if ckpt is None:
            raise DivergenceError(f"{where}; no checkpoint to restore")
        target = guard_cfg["lr_factor"] ** restores
        scale_learning_rates(schedulers, target / progress.lr_scale)  # the checkpoint has its own scale
        progress.restores, progress.lr_scale = restores, target
        guard.reset()
        log.truncate(progress.step)
        log.write(progress.step, {"guard/restored_from": progress.step, "guard/restores": restores,
                                  "guard/lr_scale": target})
        if main:
            print(f"warning: {where}; restored {ckpt.name} with learning rates x{target:g}")
        bar.n = progress.step
        return True

    sums: dict[str, Tensor] = {}
    count, last_eval, t_start = 0, {}, time.time()
    bar = tqdm(total=steps, initial=progress.step, disable=not (main and cfg["progress"]), desc=cfg["method"],
               dynamic_ncols=True)
    with _StopFlag() as stop:
        while progress.step < steps:
            batch: dict[str, Tensor] = {}
            for key, n in needs.items():
                x, y = streams[key].next(n * batch_size)
                batch[key] = x
                if y is not None:
                    batch[f"{key}_labels"] = y
            with accelerator.autocast():
                losses = method.step(batch, progress.step)
            for sched in schedulers:
                sched.step()
            progress.step += 1
            step = progress.step
            guard.observe(losses, step)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            count += 1
            bar.update(1)
            saving = due(cfg["ckpt_every"], step) or stop.requested
            if guard.enabled and (step % guard.every == 0 or saving or step == steps) and check_guard(step):
                sums, count = {}, 0
                continue
            if (cfg["log_every"] and step % cfg["log_every"] == 0) or step == steps:
                values = {k: float(accelerator.reduce(v / count, reduction="mean").item()) for k, v in sums.items()}
                if schedulers:
                    values["lr"] = schedulers[0].get_last_lr()[0]
                values["elapsed_s"] = round(time.time() - t_start, 3)
                log.write(step, values)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:4]})
                sums, count = {}, 0
            if evaluator is not None and due(cfg["eval_every"], step):
                last_eval = evaluator(method.eval_model())
                log.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
            if main and due(cfg["sample_every"], step):
                _save_grid(method.sample_images(64), folder / "samples" / f"step_{step:08d}.png")
            if saving:
                _atomic_save_state(accelerator, folder, step, cfg["keep_ckpts"])
            if stop.requested:
                bar.close()
                log.close()
                raise SystemExit(f"stopped by signal at step {step}; checkpoint saved, resume with resume=true")
    bar.close()

    # End of run: final evaluation, checkpoint, model, samples and results.
    wall = time.time() - t_start
    if evaluator is not None:
        last_eval = evaluator(method.eval_model())
        log.write(steps, {f"eval/{k}": v for k, v in last_eval.items()})
    if not checkpoints(folder) or checkpoints(folder)[-1].name != f"step_{steps:08d}":
        _atomic_save_state(accelerator, folder, steps, cfg["keep_ckpts"])
    last_losses = {}
    if main and (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            last_losses.update({k: v for k, v in rec.items() if not k.startswith("eval/") and k not in ("step", "elapsed_s")})
    results = {
        "method": cfg["method"], "student": s["arch"], "teacher": teacher_meta.get("arch"),
        "steps": steps, "wall_s": round(wall, 2), "device": _device_name(device),
        "processes": accelerator.num_processes, "global_batch": batch_size * accelerator.num_processes,
        **last_eval, "final_losses": last_losses, **method.results(),
    }
    if guard.enabled:
        results["guard"] = {"restores": progress.restores, "lr_scale": progress.lr_scale,
                            "skipped_updates": len(guard.skipped), "first_skips": guard.skipped[:10]}
    if main:
        model = accelerator.unwrap_model(method.eval_model())
        meta = {"arch": s["arch"], "num_classes": num_classes, "in_chans": d["channels"],
                "image_size": d["image_size"], "mean": list(mean), "std": list(std),
                "classes": (sets.get("train") or sets.get("test")).classes if ("train" in sets or "test" in sets) else None,
                "top1": last_eval.get("student_top1")}
        save_model(model, folder / "model.safetensors", meta=meta)
        _save_grid(method.sample_images(64), folder / "samples" / "final.png")
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _device_name(device: torch.device) -> str:
    """A readable device name for results tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def evaluate(model_path: str, cfg: dict) -> dict[str, Any]:
    """Top-1 of a saved model on cfg's test set, and agreement with cfg's teacher when given."""
    from accelerate import Accelerator

    if not cfg["data"]["test"]:
        raise RunError("nothing to evaluate on: set data.test=<labelled data set>")
    accelerator = Accelerator(cpu=cfg["cpu"], mixed_precision=cfg["mixed_precision"])
    model, meta = load_classifier(model_path)
    d = cfg["data"]
    test = load_split(cfg, "test", image_size=meta.get("image_size"), channels=meta.get("in_chans"))
    teacher, teacher_meta = (None, {})
    if cfg["teacher"]["checkpoint"]:
        teacher, teacher_meta = _teacher(cfg, {"test": test}, True)
    _check_task(cfg | {"data": {**d, "image_size": meta.get("image_size", d["image_size"]),
                                "channels": meta.get("in_chans", d["channels"])}}, {"test": test}, meta)
    device = accelerator.device
    mean, std = meta.get("mean", test.mean), meta.get("std", test.std)
    ctx = Context(cfg=cfg, opts={}, teacher=teacher.to(device) if teacher is not None else None, student=model,
                  num_classes=meta["num_classes"], image_size=test.images.shape[-1], channels=test.images.shape[1],
                  mean=torch.tensor(mean, device=device), std=torch.tensor(std, device=device), device=device,
                  accelerator=accelerator, steps=0, batch_size=cfg["eval_batch_size"])
    scores = Evaluator(test, ctx, batch_size=cfg["eval_batch_size"])(model.to(device))
    return {"model": str(model_path), "arch": meta.get("arch"), "test": test.name, "images": len(test), **scores}
