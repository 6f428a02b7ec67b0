"""The one training loop every method runs on: `train(cfg)` reads top to bottom."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from mosaic import config as config_lib
from mosaic.engine.evaluation import run_evaluator
from mosaic.engine.folder import (check_run_dir, checkpoints, load_latest_checkpoint, prepare_run_dir, run_dir,
                                  save_checkpoint, save_grid)
from mosaic.engine.metrics import MetricLog, check_trackers, tracker_names
from mosaic.engine.players import prepare_players
from mosaic.engine.schedule import step_schedules
from mosaic.engine.task import Task, draw_batch, make_context, make_streams, setup_task
from mosaic.guard import DivergenceError, Guard, scale_learning_rates
from mosaic.methods import get_method
from mosaic.models import save_model
from mosaic.ood_select import select_ood
from mosaic.precision import Precision, cpu_name, resolve_precision, run_device


class Progress:
    """The step counter, the guard's restore count and the run's training seconds, checkpointed with the run."""

    def __init__(self) -> None:
        self.step = 0
        self.restores = 0      # times the guard went back to a checkpoint
        self.lr_scale = 1.0    # learning-rate multiplier those restores applied
        self.resumes = 0       # times the run was resumed from a checkpoint (resume=true)
        self.before = 0.0      # training seconds of the run's earlier processes, up to the checkpoint resumed
        self.started = time.time()
        self._saved_seconds, self._saved_resumes = 0.0, 0

    def elapsed(self) -> float:
        """Training seconds of the run so far, summed over every process that made it (a resume adds up)."""
        return self.before + time.time() - self.started

    def resumed(self) -> None:
        """This process continues the checkpoint just loaded: its seconds and resume count carry over."""
        self.before, self.started = self._saved_seconds, time.time()
        self.resumes = self._saved_resumes + 1

    def state_dict(self) -> dict:
        return {"step": self.step, "restores": self.restores, "lr_scale": self.lr_scale,
                "elapsed_s": self.elapsed(), "resumes": self.resumes}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.restores = int(state.get("restores", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        # a guard restore in the same process keeps its clock running; only resume() takes these over
        self._saved_seconds = float(state.get("elapsed_s", 0.0))
        self._saved_resumes = int(state.get("resumes", 0))


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the end of the step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self) -> "StopFlag":
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


def guard_check(guard: Guard, players: dict, progress: Progress, schedulers: list, log: MetricLog, accelerator,
                folder, cfg: dict, step: int) -> bool:
    """Act on non-finite values (stop, or restore the last checkpoint with lower LRs); True after a restore."""
    problem = guard.problems(players)
    flag = torch.tensor(float(problem is not None), device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:  # every rank takes the same decision
        return False
    problem = problem or "another process saw non-finite values"
    where = f"run '{folder}' diverged at or before step {step}: {problem}"
    g = cfg["guard"]
    if guard.mode != "restore" or progress.restores >= g["max_restores"]:
        tried = f" after {progress.restores} restore(s)" if guard.mode == "restore" else ""
        raise DivergenceError(f"{where}{tried}. Lower the learning rates (student.lr, <method>.lr_*), "
                              f"or set guard.on_nonfinite=restore to go back and continue with lower ones")
    restores = progress.restores + 1
    ckpt = load_latest_checkpoint(accelerator, folder)
    if ckpt is None:
        raise DivergenceError(f"{where}; no checkpoint to restore")
    target = g["lr_factor"] ** restores
    scale_learning_rates(schedulers, target / progress.lr_scale)  # the checkpoint has its own scale
    progress.restores, progress.lr_scale = restores, target
    guard.reset()
    log.truncate(progress.step)
    log.write(progress.step, {"guard/restored_from": progress.step, "guard/restores": restores,
                              "guard/lr_scale": target})
    if accelerator.is_main_process:
        print(f"warning: {where}; restored {ckpt.name} with learning rates x{target:g}")
    return True


def train(cfg: dict) -> dict[str, Any]:
    """Run one training job described by a resolved config; returns results.json's content."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    method_cls = get_method(cfg["method"])
    needs = method_cls.stream_needs(cfg.get(cfg["method"], {}))
    trackers = check_trackers(cfg["log_with"])
    project = ProjectConfiguration(project_dir=str(run_dir(cfg)), logging_dir=str(run_dir(cfg) / "tensorboard"))
    precision = resolve_precision(cfg["mixed_precision"], cfg["channels_last"], run_device(cpu=cfg["cpu"]))
    # autocast is ours (one block per forward, mosaic/precision.py); Accelerate keeps fp16's gradient scaler
    accelerator = Accelerator(cpu=cfg["cpu"], mixed_precision="fp16" if precision.mixed_precision == "fp16" else "no",
                              log_with=trackers or None,
                              project_config=project)  # the folder is made later; trackers start once it exists
    main, device = accelerator.is_main_process, accelerator.device
    set_seed(cfg["seed"], device_specific=True)  # ranks differ: noise and augmentation are per process
    check_run_dir(cfg)  # refuse early; the folder itself is made once every input has been checked

    task = setup_task(cfg, needs, accelerator, requires_teacher=method_cls.requires_teacher,
                      same_classes=method_cls.same_classes)
    cfg = {**cfg, "steps": task.steps, "log_with": tracker_names(cfg["log_with"])}
    steps, batch_size, sets = task.steps, task.batch_size, task.sets
    ctx = make_context(cfg, task, accelerator, precision)
    method = method_cls(ctx)
    evaluator = run_evaluator(method, sets.get("test"), ctx, batch_size=cfg["eval_batch_size"])
    folder = prepare_run_dir(cfg, accelerator)
    if main:
        config_lib.dump(cfg, folder / "config.yaml", header=precision_header(precision, ctx))
        # the run starts: how the teacher's (and so the student's) inputs are normalised, and why
        who = "teacher normalisation" if task.teacher is not None else "normalisation"
        print(f"{who}: mean={tuple(task.mean)} std={tuple(task.std)} from {task.norm_source}",
              file=sys.stderr)  # stdout stays the JSON report
        print(precision.summary(), file=sys.stderr)
    accelerator.init_trackers(folder.name, config=config_lib.flatten(cfg))
    with trackers_closed_on_error(accelerator):
        guard = Guard.from_config(cfg["guard"], device=device)
        schedulers, players = prepare_players(method, cfg, accelerator, guard=guard)
        d = cfg["data"]
        if "ood" in sets and d["ood_select"] and ctx.teacher is not None:
            sets["ood"] = select_ood(sets["ood"], ctx, keep=d["ood_select"], teacher_file=cfg["teacher"]["checkpoint"],
                                     batch_size=cfg["eval_batch_size"])
        streams = make_streams(cfg, sets, needs, accelerator)
        progress = Progress()
        for obj in (progress, *schedulers, *streams.values(), method):
            accelerator.register_for_checkpointing(obj)
        resume_step = resume(accelerator, folder, progress) if cfg["resume"] else None
        log = MetricLog(folder, enabled=main, resume_step=resume_step, accelerator=accelerator)
        if guard.mode == "restore" and not checkpoints(folder):
            save_checkpoint(accelerator, folder, progress.step, cfg["keep_ckpts"])  # something to go back to

        def due(every: int, step: int) -> bool:
            return every > 0 and step % every == 0 and step != steps

        sums: dict[str, Tensor] = {}
        count, last_eval = 0, {}
        bar = tqdm(total=steps, initial=progress.step, disable=not (main and cfg["progress"]), desc=cfg["method"],
                   dynamic_ncols=True)
        with StopFlag() as stop:
            while progress.step < steps:
                batch = draw_batch(streams, needs, batch_size)
                losses = method.step(batch, progress.step)  # each network forward autocasts on its own
                step_schedules(schedulers)
                progress.step += 1
                step = progress.step
                guard.observe(losses, step)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                count += 1
                bar.update(1)
                saving = due(cfg["ckpt_every"], step) or stop.requested
                if guard.enabled and (step % guard.every == 0 or saving or step == steps) and guard_check(
                        guard, players, progress, schedulers, log, accelerator, folder, cfg, step):
                    bar.n = progress.step
                    sums, count = {}, 0
                    continue
                if (cfg["log_every"] and step % cfg["log_every"] == 0) or step == steps:
                    values = {k: float(accelerator.reduce(v / count, reduction="mean").item()) for k, v in sums.items()}
                    if schedulers:
                        values["lr"] = schedulers[0].get_last_lr()[0]
                    values["elapsed_s"] = round(progress.elapsed(), 3)
                    log.write(step, values)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:4]})
                    sums, count = {}, 0
                if evaluator is not None and due(cfg["eval_every"], step):
                    last_eval = evaluator()
                    log.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
                if main and due(cfg["sample_every"], step):
                    save_grid(method.sample_images(64), folder / "samples" / f"step_{step:08d}.png")
                if saving:
                    save_checkpoint(accelerator, folder, step, cfg["keep_ckpts"])
                if stop.requested:
                    bar.close()
                    raise SystemExit(f"stopped by signal at step {step}; checkpoint saved, resume with resume=true")
        bar.close()
        results = finish(cfg, task, method, accelerator, folder, log, evaluator, wall=progress.elapsed())
        results["resumes"] = progress.resumes  # wall_s sums the training seconds of every process
        if guard.enabled:
            results["guard"] = {"restores": progress.restores, "lr_scale": progress.lr_scale,
                                "skipped_updates": len(guard.skipped), "first_skips": guard.skipped[:10]}
        if main:
            (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


@contextlib.contextmanager
def trackers_closed_on_error(accelerator) -> Iterator[None]:
    """End the run's trackers (flush and close their files) when the run dies after they started, then re-raise."""
    try:
        yield
    except BaseException:
        accelerator.end_training()
        raise


def resume(accelerator, folder, progress: Progress) -> int | None:
    """Load the run's last usable checkpoint; the step it resumes from, or None (start from step 0)."""
    if load_latest_checkpoint(accelerator, folder) is None:
        if accelerator.is_main_process:
            print(f"resume=true but {folder} has no usable checkpoint: starting from step 0")
        return None
    progress.resumed()
    if accelerator.is_main_process:
        print(f"resumed {folder} from step {progress.step}")
    return progress.step


def finish(cfg: dict, task: Task, method, accelerator, folder, log: MetricLog,
           evaluator: Callable[[], dict] | None, *, wall: float) -> dict[str, Any]:
    """End of run: final evaluation and checkpoint, the student's model files and sample grid; results.json's content."""
    steps, s, d = cfg["steps"], cfg["student"], cfg["data"]
    last_eval = {}
    if evaluator is not None:
        last_eval = evaluator()
        log.write(steps, {f"eval/{k}": v for k, v in last_eval.items()})
    if not checkpoints(folder) or checkpoints(folder)[-1].name != f"step_{steps:08d}":
        save_checkpoint(accelerator, folder, steps, cfg["keep_ckpts"])
    results = {
        "method": cfg["method"], "student": s["arch"], "teacher": task.teacher_meta.get("arch"),
        "steps": steps, "wall_s": round(wall, 2), "device": device_name(accelerator.device),
        "processes": accelerator.num_processes, "global_batch": task.batch_size * accelerator.num_processes,
        **method.budget(),
        "images": {key: len(images) for key, images in task.sets.items()},
        "normalisation": {"mean": list(task.mean), "std": list(task.std), "source": task.norm_source},
        **last_eval, "final_losses": log.last_losses(), **method.results(),
        "precision": {**method.ctx.precision.record(), "channels_last_networks": channels_last_networks(method)},
    }
    if accelerator.is_main_process:
        labelled = task.sets.get("train") or task.sets.get("test")
        meta = {"arch": s["arch"], "num_classes": task.num_classes, "in_chans": d["channels"],
                "image_size": d["image_size"], "mean": list(task.mean), "std": list(task.std),
                "classes": labelled.classes if labelled is not None else None,
                "top1": last_eval.get("student_top1")}
        save_model(accelerator.unwrap_model(method.eval_model()), folder / "model.safetensors", meta=meta)
        save_grid(method.sample_images(64), folder / "samples" / "final.png")
        method.save(folder)
    return results


def channels_last_networks(method) -> dict[str, bool]:
    """Which of the run's networks (teacher, players) are in channels-last memory format."""
    nets = {"teacher": method.ctx.teacher} if method.ctx.teacher is not None else {}
    nets.update({name: getattr(method, name) for name in method.players})
    unwrap = method.accelerator.unwrap_model
    return {name: method.ctx.precision.wants_channels_last(unwrap(net)) for name, net in nets.items()}


def precision_header(precision: Precision, ctx) -> list[str]:
    """config.yaml's first lines: what mixed_precision and channels_last resolved to on this machine, and why."""
    layout = {name: ctx.precision.wants_channels_last(net) for name, net in
              (("teacher", ctx.teacher), ("student", ctx.student)) if net is not None}
    return [f"resolved at start on {precision.device} ({precision.capability}):",
            f"  mixed_precision={precision.requested} -> {precision.mixed_precision} ({precision.reason})",
            f"  channels_last={precision.channels_last} -> " + ", ".join(f"{k}: {v}" for k, v in layout.items())]


def device_name(device: torch.device) -> str:
    """A readable device name for results tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {cpu_name()})"
