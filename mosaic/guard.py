"""The divergence guard: notice non-finite losses, gradients and weights, and respond as configured.

GAN players diverge: a loss turns to NaN and the run keeps "training" on garbage. The
guard watches every step without a host sync (losses are folded into a device tensor
that remembers the first bad step of each loss) and looks at the host only every
`guard.every` steps and before each checkpoint, so a saved checkpoint is always clean.
Responses (`guard.on_nonfinite`):

- `stop` (default): raise DivergenceError naming the loss, the first bad step and the
  players whose weights or BatchNorm buffers went non-finite.
- `restore`: reload the last checkpoint, multiply every learning rate by
  `guard.lr_factor`, and go on (at most `guard.max_restores` times, then stop).
- `skip`: check each optimizer's gradients before it steps and drop a non-finite update
  (one host sync per optimizer step: the price of skipping exactly that step); stops
  when weights still went bad (e.g. BatchNorm buffers fed NaN) or after
  `guard.max_skips` skips in a row.
- `off`: no checks.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn


class DivergenceError(RuntimeError):
    """A run whose losses, gradients or weights became NaN/inf."""


def nonfinite_players(players: dict[str, nn.Module]) -> list[str]:
    """Names of the players with a non-finite parameter or floating-point buffer (one host sync)."""
    flags = []
    for module in players.values():
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors
                     else torch.ones((), dtype=torch.bool))
    if not flags:
        return []
    ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [name for name, good in zip(players, ok) if not good]


def grads_finite(optimizer: torch.optim.Optimizer) -> Tensor:
    """A device bool: every gradient the optimizer would apply is finite."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class Guard:
    """Watches a run for non-finite values; `observe` every step (no sync), `check` now and then (one sync)."""

    def __init__(self, *, mode: str, every: int, max_skips: int, device: torch.device) -> None:
        self.mode, self.every, self.max_skips = mode, every, max_skips
        self.device = device
        self.keys: list[str] = []
        self.first_bad: Tensor | None = None   # per loss: first step with a non-finite value, -1 if none
        self.skipped: list[tuple[str, int]] = []  # (player, step) of dropped updates
        self.skips_in_row = 0
        self.step = 0

    @classmethod
    def from_config(cls, guard_cfg: dict, *, device: torch.device) -> "Guard":
        """The guard a run's `guard.*` section describes."""
        return cls(mode=guard_cfg["on_nonfinite"], every=guard_cfg["every"], max_skips=guard_cfg["max_skips"],
                   device=device)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def observe(self, losses: dict[str, Tensor], step: int) -> None:
        """Fold the step's losses into the per-loss first-bad-step record, on the device."""
        self.step = step
        if not self.enabled or not losses:
            return
        if list(losses) != self.keys:
            self._flush_keys(list(losses))
        values = torch.stack([v.detach().float().reshape(-1)[0] if v.numel() else v.new_zeros(())
                              for v in losses.values()])
        bad = ~torch.isfinite(values)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def _flush_keys(self, keys: list[str]) -> None:
        """Start a new record when a method returns another set of losses (keeps earlier bad steps)."""
        old = dict(zip(self.keys, self.first_bad.tolist())) if self.first_bad is not None else {}
        self.keys = keys
        self.first_bad = torch.tensor([old.get(k, -1) for k in keys], dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Forget what was seen (after a restore)."""
        if self.first_bad is not None:
            self.first_bad.fill_(-1)
        self.skips_in_row = 0

    def problems(self, players: dict[str, nn.Module]) -> str | None:
        """A readable account of what went non-finite since the last reset, or None (one host sync)."""
        if not self.enabled:
            return None
        bad_players = nonfinite_players(players)
        bad_losses = []
        if self.first_bad is not None:
            bad_losses = [(k, s) for k, s in zip(self.keys, self.first_bad.tolist()) if s >= 0]
        if self.mode == "skip" and not bad_players and self.skips_in_row <= self.max_skips:
            return None  # the updates were dropped: bad losses alone are what skip mode is for
        if not bad_players and not bad_losses:
            return None
        parts = []
        if bad_players:
            parts.append(f"weights of {', '.join(bad_players)} are non-finite at step {self.step}")
        if bad_losses:
            first = min(s for _, s in bad_losses)
            parts.append("non-finite " + ", ".join(f"{k} (first at step {s})" for k, s in bad_losses))
            parts[-1] += f"; it began at step {first}"
        if self.mode == "skip" and self.skips_in_row > self.max_skips:
            parts.append(f"{self.skips_in_row} updates in a row were skipped")
        return "; ".join(parts)

    def wrap_optimizer(self, name: str, optimizer) -> None:
        """In skip mode, make `optimizer.step` drop updates whose gradients are non-finite."""
        if self.mode != "skip":
            return
        step_fn: Callable = optimizer.step

        @functools.wraps(step_fn)
        def guarded_step(*args, **kwargs):
            if bool(grads_finite(optimizer).item()):
                self.skips_in_row = 0
                return step_fn(*args, **kwargs)
            optimizer.zero_grad(set_to_none=True)
            self.skipped.append((name, self.step + 1))
            self.skips_in_row += 1
            return None

        optimizer.step = guarded_step


def scale_learning_rates(schedulers: list, factor: float) -> None:
    """Multiply the base and current learning rates of every scheduled optimizer by `factor`."""
    for sched in schedulers:
        sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        for group in sched.optimizer.param_groups:
            group["lr"] *= factor
