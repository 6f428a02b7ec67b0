"""Numeric precision of a run: what `mixed_precision` and `channels_last` resolve to, and autocast per forward.

Autocast wraps network forwards only. torch's autocast keeps one low-precision copy of each fp32
weight until the outermost autocast block exits, so a block spanning an optimizer step would feed
every later forward the weights from before that step. Here each forward enters and leaves its own
block (the copies are dropped on exit), its floating outputs come back as fp32, and everything between
forwards (losses, optimizer steps) runs in fp32. `full_precision()` switches the wrappers off
(evaluation and teacher rankings run in fp32).
"""
from __future__ import annotations

import contextlib
import functools
import platform
import threading
from types import MethodType
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mosaic.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_state = threading.local()


@dataclass(frozen=True)
class Precision:
    """A run's resolved precision: the autocast dtype name, the memory-format rule and why they were chosen."""
    mixed_precision: str          # no | bf16 | fp16 (resolved)
    channels_last: bool | str     # True | False | "auto" (each network: channels-last when it is a convnet)
    requested: str                # what the config asked: auto | no | bf16 | fp16
    reason: str                   # one line: why this precision
    device: str                   # CPU model name or GPU name
    capability: str               # what decided: e.g. "amx_bf16", "avx512_bf16", "none", "cuda bf16"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return DTYPES.get(self.mixed_precision)

    def wants_channels_last(self, module: nn.Module) -> bool:
        """Whether `module` is kept in channels-last memory format."""
        return is_convnet(module) if self.channels_last == "auto" else bool(self.channels_last)

    def record(self) -> dict[str, Any]:
        """The resolution as results.json records it."""
        return asdict(self)

    def summary(self) -> str:
        """One line for stderr."""
        layout = "channels-last for convnets" if self.channels_last == "auto" else (
            "channels-last" if self.channels_last else "contiguous")
        return (f"precision: {'fp32' if self.mixed_precision == 'no' else self.mixed_precision + ' autocast'} "
                f"(mixed_precision={self.requested}: {self.reason}); memory format: {layout}")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """The CPU's native bf16 instructions as torch reports them: "amx_bf16", "avx512_bf16" or "none"."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "none"


def run_device(*, cpu: bool) -> torch.device:
    """The device a run will train on (what Accelerate picks for one process): a CUDA GPU unless `cpu`, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def resolve_precision(mixed_precision: str, channels_last: bool | str, device: torch.device) -> Precision:
    """Resolve `mixed_precision` (auto | no | bf16 | fp16) and `channels_last` (auto | true | false) for `device`.

    auto = bf16 on a CUDA device that supports it natively and on a CPU with AMX or AVX-512 BF16 (as torch
    reports them), fp32 elsewhere. fp16 needs a CUDA device (its gradient scaler); on a CPU it is an error.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        capability = "cuda bf16" if native else "cuda without bf16"
    else:
        name = cpu_name() if device.type == "cpu" else device.type
        capability = cpu_bf16() if device.type == "cpu" else "unknown"
        native = capability != "none" and device.type == "cpu"
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"mixed_precision=fp16 needs a CUDA GPU (its gradient scaler); on {device.type} use "
                          f"mixed_precision=bf16, or auto (bf16 where the {device.type} runs it natively, else fp32)")
    if mixed_precision == "auto":
        chosen = "bf16" if native else "no"
        what = "GPU" if device.type == "cuda" else "CPU"
        reason = (f"{what} runs bf16 natively ({capability})" if native
                  else f"{what} has no native bf16 ({capability}): fp32")
    else:
        chosen = mixed_precision
        reason = "set explicitly" + ("" if chosen != "bf16" or native else
                                     f"; this {device.type} has no native bf16 ({capability}), expect it slow")
    return Precision(mixed_precision=chosen, channels_last=channels_last, requested=mixed_precision,
                     reason=reason, device=name, capability=capability)


def is_convnet(module: nn.Module) -> bool:
    """True when `module` has at least as many convolutions as linear layers (channels-last pays off there).

    Counted in layers, not weights: a generator whose one linear projection outweighs its convs still
    spends its time in convolutions and upsampling, which channels-last makes several times faster on CPU.
    """
    conv = sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    linear = sum(isinstance(m, nn.Linear) for m in module.modules())
    return conv > 0 and conv >= linear


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Within this block, networks wrapped by `autocast_forward` run in fp32 (evaluation, teacher rankings)."""
    old = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = old


def to_fp32(out: Any) -> Any:
    """Floating tensors in `out` (a tensor, or tuples / lists / dicts of them) as fp32."""
    if isinstance(out, Tensor):
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(to_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: to_fp32(v) for k, v in out.items()}
    return out


def autocast_forward(module: nn.Module, precision: Precision, device_type: str) -> nn.Module:
    """Make each call of `module` run in its own autocast block with fp32 outputs (in place; returns it).

    No-op in fp32 or when already wrapped. Parameters, state_dict and hooks are untouched; a deep copy
    of the module (a frozen snapshot, a sample copy) keeps the wrapper, bound to the copy.
    """
    if precision.dtype is None or "_mosaic_autocast" in module.__dict__:
        return module
    module._mosaic_inner_forward = module.forward  # bound method: copy.deepcopy rebinds it to the copy
    module._mosaic_autocast = (precision.mixed_precision, device_type)
    module.forward = MethodType(_autocast_call, module)
    classifier = module.get_classifier() if callable(getattr(module, "get_classifier", None)) else None
    if isinstance(classifier, nn.Linear):  # timm's head API: logits from an fp32 matmul, not rounded to bf16
        classifier.forward = MethodType(_fp32_linear, classifier)
    return module


def _fp32_linear(self: nn.Linear, x: Tensor) -> Tensor:
    """A classifier's forward in fp32 whatever the autocast around it (the logits every loss reads)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), self.weight, self.bias)


@contextlib.contextmanager
def autocast_like(module: nn.Module) -> Iterator[None]:
    """The autocast block `module`'s own forward runs in (for calls that bypass forward: forward_features...).

    A no-op for a module `autocast_forward` did not wrap, and under `full_precision()`. Cast what comes
    out to fp32 (`to_fp32`) before a loss.
    """
    setting = module.__dict__.get("_mosaic_autocast")
    if setting is None or getattr(_state, "off", False):
        yield
        return
    name, device_type = setting
    with torch.autocast(device_type, dtype=DTYPES[name]):
        yield


def _autocast_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The wrapped forward: the module's own forward in an autocast block of its own, outputs back in fp32."""
    name, device_type = self._mosaic_autocast
    if getattr(_state, "off", False):
        with torch.autocast(device_type, enabled=False):
            return self._mosaic_inner_forward(*args, **kwargs)
    with torch.autocast(device_type, dtype=DTYPES[name]):
        out = self._mosaic_inner_forward(*args, **kwargs)
    return to_fp32(out)


def in_fp32(fn: Callable) -> Callable:
    """Decorator for a loss: autocast off inside it and its floating tensor arguments (also in lists) cast to fp32."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = to_fp32(args), to_fp32(kwargs)
        devices = {t.device.type for t in _tensors(args, kwargs)} or {"cpu"}
        with contextlib.ExitStack() as stack:
            for device_type in devices:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, Tensor))
