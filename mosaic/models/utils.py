"""Small model helpers: freezing a teacher, counting parameters, unwrapping DDP / torch.compile wrappers."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["count_params", "freeze", "is_frozen", "unwrap_model"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain model inside torch.compile (`_orig_mod`) and (Distributed)DataParallel (`module`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only those with requires_grad if `trainable_only`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _StayInEval:
    """Stored as `module.train` on frozen modules: ignores train()/train(False) and keeps eval mode (picklable)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return self.module


def freeze(model: ModuleT) -> ModuleT:
    """Freeze `model` in place for use as a teacher and return it.

    Puts every submodule in eval mode, turns off requires_grad on all parameters and makes later
    `.train()` calls no-ops, so BatchNorm running statistics and dropout never change. Gradients still
    flow through the model to its input (needed to train generators against a frozen teacher).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        m.train = _StayInEval(m)  # type: ignore[method-assign]
        m._mosaic_frozen = True
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when `freeze` was applied to `model` (or to the model it wraps)."""
    return bool(getattr(unwrap_model(model), "_mosaic_frozen", False))
