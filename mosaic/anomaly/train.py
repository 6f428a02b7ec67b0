"""Fitting the cloner on normal images (Accelerate loop, Adam) and scoring images with a fitted MKD pair."""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from mosaic.augment import Augment, to_float
from mosaic.stream import Stream

from .mkd import MKD

__all__ = ["fit", "score_images", "source_targets"]

# Source features are computed once up front (no augmentation) only when they fit in this many bytes.
TARGET_CACHE_BYTES = 2 * 1024**3


@torch.no_grad()
def source_targets(mkd: MKD, images: Tensor, *, batch_size: int = 256) -> List[Tensor]:
    """Source features at the critical layers for all uint8 `images`, in batches, on the images' device."""
    parts: List[List[Tensor]] = []
    for start in range(0, len(images), batch_size):
        parts.append(mkd.source_features(to_float(images[start:start + batch_size])))
    return [torch.cat(layer) for layer in zip(*parts)]


def _target_bytes(mkd: MKD, count: int) -> int:
    """Bytes the float32 source features of `count` images would take."""
    device = next(mkd.cloner.parameters()).device
    probe = torch.zeros(1, mkd.in_chans, mkd.image_size, mkd.image_size, device=device)
    with torch.no_grad():
        return 4 * count * sum(f[0].numel() for f in mkd.source_features(probe))


def fit(mkd: MKD, images: Tensor, *, epochs: float = 20, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 0.0, crop_padding: int = 0, flip: bool = False, seed: int = 0, cpu: bool = False,
        mixed_precision: str = "no", progress: bool = True) -> dict:
    """Train the cloner (and adapters) of `mkd` in place on normal uint8 `images` (N, C, H, W); returns stats.

    Options: epochs=20 (passes over the images; fractions allowed), batch_size=64, lr=1e-3 (Adam, the
    paper's), weight_decay=0, crop_padding=0 / flip=False (kornia crop + flip augmentation; without it the
    source features are computed once up front when they fit in 2 GiB), seed=0, cpu=False (force the CPU),
    mixed_precision="no" (no | fp16 | bf16), progress=True (tqdm bar on the main process).
    Returns {"steps", "wall_s", "loss_first", "loss_last", "device"}.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    if len(images) == 0:
        raise ValueError("fit needs at least one normal image")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(seed, device_specific=True)
    device = accelerator.device
    mkd.to(device).train()
    params = [p for p in mkd.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(mkd, optimizer)
    augment: Optional[nn.Module] = None
    if crop_padding or flip:
        augment = Augment(image_size=mkd.image_size, padding=crop_padding, flip=flip).to(device)
    images = images.to(device)
    world = accelerator.num_processes
    stream = Stream(images, seed=seed, rank=accelerator.process_index, world_size=world)
    targets = None
    if augment is None and _target_bytes(mkd, len(images)) <= TARGET_CACHE_BYTES:
        targets = source_targets(mkd, images)
    steps = max(1, math.ceil(epochs * len(images) / (batch_size * world)))
    bar = tqdm(total=steps, disable=not (progress and accelerator.is_main_process), desc="mkd fit", dynamic_ncols=True)
    first = last = float("nan")
    start = time.time()
    for step in range(steps):
        index = stream.indices(batch_size)
        x = to_float(images.index_select(0, index))
        if augment is not None:
            x = augment(x)
        batch_targets = None if targets is None else [t.index_select(0, index) for t in targets]
        with accelerator.autocast():
            loss = model(x, batch_targets).mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if step == 0 or step == steps - 1 or step % 20 == 0:
            last = float(accelerator.reduce(loss.detach(), reduction="mean"))
            first = last if step == 0 else first
            bar.set_postfix(loss=f"{last:.4g}")
        bar.update(1)
    bar.close()
    mkd.eval()
    return {"steps": steps, "wall_s": round(time.time() - start, 2), "loss_first": first, "loss_last": last,
            "device": str(device)}


@torch.no_grad()
def score_images(mkd: MKD, images: Tensor, *, batch_size: int = 256,
                 targets: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Anomaly score (the per-image MKD loss, eval mode) of uint8 `images`, on the CPU as float32 (N,).

    `targets` are the source features of `images` from `source_targets`, to share them between cloners.
    """
    mkd.eval()
    device = next(mkd.cloner.parameters()).device
    scores = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        batch_targets = None if targets is None else [t[start:start + batch_size].to(device) for t in targets]
        scores.append(mkd(x, batch_targets).float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)
