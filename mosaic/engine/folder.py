"""The run folder: its name, the resume/overwrite check, atomic checkpoints, sample grids."""
from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor


class RunError(RuntimeError):
    """A run that cannot start or continue: existing folder, mismatched teacher and data, ..."""


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


def save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> None:
    """Save the full training state to checkpoints/step_N atomically and prune old checkpoints."""
    root = folder / "checkpoints"
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch's writer raises RuntimeError on a full disk
        failure = err
    failed = torch.tensor(float(failure is not None), device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item():  # every rank stops when one could not write
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise RunError(write_failure(folder, final.name, failure))
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


def write_failure(folder: Path, name: str, err: BaseException | None) -> str:
    """One line for a checkpoint that could not be written: the cause, the free space, what resume will use."""
    why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}" if err else "on another process"
    root = folder / "checkpoints"
    try:
        free = f"{shutil.disk_usage(root).free / 2 ** 30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    done = checkpoints(folder)
    keep = (f"resume=true continues from checkpoint {done[-1].name}" if done else
            "no checkpoint was written before, so resume=true starts again from step 0")
    return (f"could not write checkpoint {name} in '{root}' ({why}; {free}); the half-written copy was removed "
            f"and nothing else is lost: make room, then {keep}")


def load_latest_checkpoint(accelerator, folder: Path) -> Path | None:
    """Load the newest checkpoint that loads; a damaged one is reported and the one before it used."""
    for ckpt in reversed(checkpoints(folder)):
        try:
            accelerator.load_state(str(ckpt))
            return ckpt
        except Exception as err:  # a damaged checkpoint: fall back to the previous one
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"checkpoint '{ckpt}' could not be loaded ({type(err).__name__}: {first[:200]}); "
                          f"trying the one before it", stacklevel=2)
    return None


def save_grid(images: Tensor | None, path: Path) -> None:
    """Write images in [0, 1] as a PNG grid."""
    if images is None or len(images) == 0:
        return
    from torchvision.utils import save_image
    save_image(images.float().clamp(0, 1).cpu(), str(path), nrow=int(math.ceil(math.sqrt(len(images)))))
