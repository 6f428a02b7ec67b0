"""Player preparation: what the engine does to a method's networks and optimizers before the first step.

Public so that the speed bench and tests build players exactly as a run does.
"""
from __future__ import annotations

import torch
from torch import nn

from mosaic.engine.folder import RunError
from mosaic.engine.schedule import make_scheduler
from mosaic.engine.task import memory_format
from mosaic.guard import Guard
from mosaic.precision import autocast_forward


def prepare_players(method, cfg: dict, accelerator, *,
                    guard: Guard | None = None) -> tuple[list[torch.optim.lr_scheduler.LambdaLR], dict[str, nn.Module]]:
    """Prepare every player of `method` in place; returns the LR schedulers and the unwrapped players.

    Each player gets SyncBatchNorm (`sync_bn`, several processes), its memory format (`channels_last`),
    Accelerate's preparation (device, DDP), autocast around each forward (`mixed_precision`, resolved in
    `method.ctx.precision`; Accelerate's own fp16 wrapper is replaced by it) and `torch.compile` (`compile`); each optimizer
    `<player>_opt` gets an LR scheduler (the method's `lr_lambda` of the run's schedule over ctx.steps),
    Accelerate's preparation and the divergence guard's wrapper (not under fp16, whose gradient scaler
    already drops such steps).
    """
    device, precision = accelerator.device, method.ctx.precision
    schedulers = []
    for name in method.players:
        module = getattr(method, name)
        if cfg["sync_bn"] and accelerator.num_processes > 1:
            if device.type == "cpu":
                raise RunError("sync_bn=true needs GPUs (torch's SyncBatchNorm does not run on CPU): "
                               "set sync_bn=false for CPU processes")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # same parameter objects
        module = module.to(memory_format=memory_format(module, precision))
        module = accelerator.prepare(module)
        inner = accelerator.unwrap_model(module, keep_fp32_wrapper=False)  # drops Accelerate's fp16 wrapper, if any
        autocast_forward(inner, precision, device.type)
        if cfg["compile"]:
            module = torch.compile(module)
        setattr(method, name, module)
        opt = getattr(method, f"{name}_opt", None)
        if opt is not None:
            schedulers.append(make_scheduler(method, name, opt, cfg))
            opt = accelerator.prepare(opt)
            if guard is not None and precision.mixed_precision != "fp16":
                guard.wrap_optimizer(name, opt)
            setattr(method, f"{name}_opt", opt)
    if "student" in method.players:
        method.ctx.student = method.student
    return schedulers, {name: accelerator.unwrap_model(getattr(method, name)) for name in method.players}
