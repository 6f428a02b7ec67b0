"""The synthesised-image pool shared by DeepInversion, CMI and Fast: bounded uint8 storage, augmented resumable samples.

Fast-Datafree splits a synthesiser into `synthesize()` (make a batch, add it to the pool) and
`sample()` (draw a student batch from everything made so far); the methods keep that split and
this pool is the part they share. The pool is per process (each process synthesises its own
images), holds at most `size` images as uint8 and, once full, replaces the oldest first (FIFO,
the ring buffer of CMI's feature memory bank; the reference image pools grow without bound).
Samples are shuffled epochs over the stored images (`mosaic.stream.Stream`), restarted with a
fresh permutation after every `add` (the reference rebuilds its DataLoader after each synthesis),
and augmented on the device. `state_dict` holds the images and the sample position, so a resumed
run draws exactly the batches the interrupted one would have.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mosaic.stream import Stream


class ImagePool:
    """At most `size` images (C, side, side) as uint8 on `device`, FIFO replacement, augmented resumable samples."""

    def __init__(self, size: int, *, channels: int, image_size: int, device: torch.device | str = "cpu",
                 seed: int = 0, augment: nn.Module | None = None) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"the image pool size must be a positive integer, got {size!r}")
        self.size, self.seed, self.augment = size, seed, augment
        self.data = torch.empty((size, channels, image_size, image_size), dtype=torch.uint8, device=device)
        self.filled = 0      # slots holding an image
        self.next = 0        # slot the next image goes to (the oldest once full)
        self.added = 0       # images ever added
        self.rebuilds = 0    # sample streams started (each after an add gets its own shuffle seed)
        self.stale = True    # images were added since the current stream started
        self._stream: Stream | None = None
        self._stream_state: dict | None = None

    def __len__(self) -> int:
        return self.filled

    def add(self, images: Tensor) -> None:
        """Store float [0, 1] (or uint8) images, overwriting the oldest once the pool is full."""
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(f"the pool holds {tuple(self.data.shape[1:])} images, got {tuple(images.shape)}")
        if len(images) > self.size:
            raise ValueError(f"{len(images)} images do not fit a pool of {self.size}: raise the pool size")
        if images.dtype != torch.uint8:
            images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = images.to(self.data.device)
        first = min(len(images), self.size - self.next)
        self.data[self.next:self.next + first] = images[:first]
        self.data[:len(images) - first] = images[first:]
        self.next = (self.next + len(images)) % self.size
        self.filled = min(self.size, self.filled + len(images))
        self.added += len(images)
        self.stale, self._stream, self._stream_state = True, None, None

    def images(self) -> Tensor:
        """The stored uint8 images in slot order (a view)."""
        return self.data[:self.filled]

    def latest(self, n: int) -> Tensor:
        """The n most recently added images, oldest first, as uint8."""
        n = min(n, self.filled)
        idx = (torch.arange(self.next - n, self.next, device=self.data.device)) % self.size
        return self.data.index_select(0, idx)

    def _stream_now(self) -> Stream:
        """The current sample stream, started (with the next shuffle seed) when images came in since the last."""
        if self._stream is None:
            if self.filled == 0:
                raise RuntimeError("the image pool is empty: synthesize() before sample()")
            if self.stale:
                self.rebuilds, self.stale, self._stream_state = self.rebuilds + 1, False, None
            self._stream = Stream(self.images(), seed=self.seed + 7919 * (self.rebuilds - 1), augment=self.augment)
            if self._stream_state is not None:
                self._stream.load_state_dict(self._stream_state)
        return self._stream

    def sample(self, n: int) -> Tensor:
        """n augmented images in [0, 1] from shuffled epochs over the pool."""
        x, _ = self._stream_now().next(n)
        return x

    def state_dict(self) -> dict:
        """The images (uint8, CPU, slot order) under 'pool' and the ring and stream position under 'pool_state'."""
        stream = self._stream.state_dict() if self._stream is not None else self._stream_state
        return {"pool": self.images().cpu(),
                "pool_state": {"next": self.next, "added": self.added, "rebuilds": self.rebuilds,
                               "stale": self.stale, "stream": stream}}

    def load_state_dict(self, state: dict, *, what: str = "image pool") -> None:
        """Restore `state_dict`'s result; a checkpoint without 'pool_state' (DeepInversion's first format) also loads."""
        pool = state["pool"]
        if pool.shape[0] > self.size or tuple(pool.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(f"the checkpoint's {what} has shape {tuple(pool.shape)}, which does not fit this run's "
                             f"pool {tuple(self.data.shape)}: resume with the same pool size and data.image_size")
        self.data[:len(pool)] = pool.to(self.data.device)
        self.filled = len(pool)
        ring = state.get("pool_state") or {"next": len(pool) % self.size, "added": len(pool),
                                           "rebuilds": 1 if state.get("stream") else 0,
                                           "stale": not state.get("stream"), "stream": state.get("stream")}
        self.next, self.added = int(ring["next"]), int(ring["added"])
        self.rebuilds, self.stale = int(ring["rebuilds"]), bool(ring["stale"])
        self._stream, self._stream_state = None, ring["stream"]
