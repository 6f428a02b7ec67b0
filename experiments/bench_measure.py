"""The speed bench's measurements: wall time (interleaved runs), peak memory and FLOPs of one iteration."""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA) so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(run: Callable[[], None], device: torch.device) -> int:
    """Peak tensor bytes during one iteration.

    CUDA: torch.cuda.max_memory_allocated (weights and optimizer state included). CPU: the
    profiler's allocator events; the peak of the running sum of allocations minus frees,
    i.e. tensor memory above what was already held when the iteration began.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def count_flops(run: Callable[[], None]) -> float | None:
    """FLOPs of one iteration as torch.utils.flop_counter counts them (convolutions, matmuls), or None."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            run()
        return float(counter.get_total_flops())
    except Exception as err:  # e.g. a compiled graph the counter cannot see through
        print(f"  (flop count failed: {type(err).__name__}: {err})", file=sys.stderr)
        return None


def time_interleaved(runs: dict[str, Callable[[], None]], device: torch.device, *, reps: int, warmup: int,
                     first: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each run, alternating the runs (order rotated every repetition).

    The untimed warm-up calls' seconds go to `first` when given (start-up costs such as compilation).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            runs[name]()
            sync(device)
            if first is not None:
                first.setdefault(name, []).append(time.perf_counter() - t0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, *, n: int = 2048, reps: int = 5) -> float:
    """TFLOP/s of the best of `reps` timed n x n @ n x n torch.mm in `dtype` (after one untimed): a measured GEMM ceiling."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12
