"""MosaicKD's OOD selection: keep the pool images on which the teacher is least sure, cached per teacher and pool."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from mosaic.data import ImageSet, cache_dir
from mosaic.pool_stats import most_uncertain


def select_ood(ood: ImageSet, ctx, *, keep: int, teacher_file: str | None, batch_size: int = 512) -> ImageSet:
    """Keep the `keep` OOD images with the highest teacher entropy (`ctx`: a mosaic.methods.Context).

    The chosen indices are cached per (teacher file, pool, size) under $MOSAIC_CACHE/ood_select.
    """
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
        logits = ctx.predict(ctx.teacher, ood.images.to(ctx.device), batch_size=batch_size)
        index = most_uncertain(logits, keep).cpu()  # what `mosaic inspect` reports
        if ctx.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(index, tmp)
            os.replace(tmp, path)
    return ImageSet(images=ood.images[index], labels=None, classes=None, name=f"{ood.name}, top-{keep} entropy",
                    mean=ood.mean, std=ood.std)
