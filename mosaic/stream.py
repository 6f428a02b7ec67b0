"""Endless batches drawn from a uint8 image tensor that lives on the training device."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mosaic.augment import to_float


class Stream:
    """Shuffled epochs over device-resident images, sharded by rank and augmented on the device.

    Every rank shuffles with the same seed and takes its own slice of the permutation,
    so ranks never see the same image in an epoch. The position (epoch, cursor) is the
    whole state: a resumed run draws exactly the batches the killed run would have.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: nn.Module | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"Stream wants uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) < world_size:
            raise ValueError(f"{len(images)} images cannot be split over {world_size} processes")
        self.images, self.labels = images, labels
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.augment = augment
        self.epoch, self.cursor = 0, 0
        self._order: Tensor | None = None

    @property
    def shard_size(self) -> int:
        """Images this rank sees per epoch (the remainder after an even split is dropped)."""
        return len(self.images) // self.world_size

    def _shard(self) -> Tensor:
        """This rank's slice of the current epoch's permutation (on the images' device)."""
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.images), generator=gen)
            self._order = perm[self.rank::self.world_size][: self.shard_size].to(self.images.device)
        return self._order

    def indices(self, n: int) -> Tensor:
        """The next n indices, moving to a freshly shuffled epoch when one runs out."""
        parts, need = [], n
        while need > 0:
            shard = self._shard()
            take = min(need, self.shard_size - self.cursor)
            parts.append(shard[self.cursor:self.cursor + take])
            self.cursor += take
            need -= take
            if self.cursor == self.shard_size:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def next(self, n: int) -> tuple[Tensor, Tensor | None]:
        """n augmented images as float in [0, 1] and their labels (None when unlabelled)."""
        idx = self.indices(n)
        x = to_float(self.images.index_select(0, idx))
        if self.augment is not None:
            x = self.augment(x)
        y = self.labels.index_select(0, idx) if self.labels is not None else None
        return x, y

    def state_dict(self) -> dict:
        """Position in the stream (the permutation is re-derived from seed and epoch)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Jump to a saved position."""
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._order = None
