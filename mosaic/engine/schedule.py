"""Learning-rate schedules over a run's steps: cosine, one-cycle or constant, with linear warm-up."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch


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


def run_schedule(cfg: dict) -> Callable[[int, int], float]:
    """The config's schedule (`schedule`, `warmup`) as a (step, total) -> multiplier function."""
    kind, warmup = cfg["schedule"], float(cfg["warmup"])
    return lambda step, total: lr_factor(step, total, kind=kind, warmup=warmup)


def make_scheduler(method, player: str, optimizer: torch.optim.Optimizer, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR scheduler of one player's optimizer: the method's `lr_lambda` of the run's schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, method.lr_lambda(player, run_schedule(cfg)))


def step_schedules(schedulers: list[torch.optim.lr_scheduler.LRScheduler]) -> None:
    """Advance every schedule by one run step.

    The schedules follow run steps, not optimizer steps: a method whose optimizer skips a step (DeepInversion
    while it synthesises its pool) is scheduled all the same, so torch's warning about it is silenced here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for sched in schedulers:
            sched.step()
