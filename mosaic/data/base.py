"""What every part of the data package shares: the ImageSet, DataError, where data and caches live, seeded subsets."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """A data set could not be found, read or understood; the message says what to do."""


@dataclass(eq=False)
class ImageSet:
    """A whole data set as one uint8 tensor (N, C, H, W) plus optional labels and its channel stats."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.images) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"ImageSet {self.name!r}: images must be a uint8 tensor (N, C, H, W)")
        if self.labels is not None and (self.labels.ndim != 1 or len(self.labels) != len(self.images)):
            raise DataError(f"ImageSet {self.name!r}: labels must be a 1-D tensor with one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        classes = "unlabelled" if self.labels is None else f"{self.num_classes} classes"
        return f"ImageSet({self.name!r}, images={tuple(self.images.shape)} uint8, {classes})"

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None when the set has no class names."""
        return len(self.classes) if self.classes is not None else None


# ----------------------------------------------------------------------------- locations


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: explicit root > $MOSAIC_DATA_ROOT > ./data if it exists > ../shared/data if it exists > ./data.

    The two relative candidates are tried from the working directory, then from the repository root.
    """
    if root:
        return Path(root).expanduser().absolute()
    env = os.environ.get("MOSAIC_DATA_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    repo = Path(__file__).resolve().parents[1]
    for candidate in (Path("data"), Path("../shared/data"), repo / "data", repo.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("data").absolute()


def cache_dir() -> Path:
    """Folder of decoded-tensor cache files: $MOSAIC_CACHE, default ~/.cache/mosaic-kd."""
    return Path(os.environ.get("MOSAIC_CACHE") or "~/.cache/mosaic-kd").expanduser()


def select_indices(n: int, labels: list[int] | None, *, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of `limit` items (class-balanced when labels are given), in original order."""
    if limit is None or limit >= n:
        return list(range(n))
    rng = random.Random(seed)
    if labels is None:
        return sorted(rng.sample(range(n), limit))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pools = [by_class[c] for c in sorted(by_class)]
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)  # which classes get the remainder when limit is not a multiple of the class count
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for pool in pools:
            if depth < len(pool) and len(picked) < limit:
                picked.append(pool[depth])
        depth += 1
    return sorted(picked)
