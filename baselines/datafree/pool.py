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

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from baselines.datafree.common import check_positive, make_student_opt, require
from mosaic.augment import Augment, to_float
from mosaic.config import ConfigError
from mosaic.losses import kd_loss
from mosaic.methods import Context, Method, no_param_grad
from mosaic.models import unwrap_model
from mosaic.players import Generator
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


class PoolDistillation(Method):
    """Base of the pool-based methods (DeepInversion, CMI, Fast): a pool, the student's optimizer, KD on pool samples.

    Subclasses make images with `synthesize()` and `self.pool.add(...)`; `kd_step()` trains the
    student on an augmented pool batch (the run's `data.crop_padding` / `flip`), teacher at
    temperature `opts['temperature']`. The pool is the method's state_dict unless extended.
    """
    needs = {}                        # data-free: no data stream
    players = ("student",)

    def __init__(self, ctx: Context, *, pool_size: int) -> None:
        super().__init__(ctx)
        self.student_opt = make_student_opt(self.student.parameters(), self.opts, ctx, self.name)
        augment = Augment.from_config(ctx.cfg["data"], image_size=ctx.image_size).to(ctx.device)
        try:
            self.pool = ImagePool(pool_size, channels=ctx.channels, image_size=ctx.image_size, device=ctx.device,
                                  seed=ctx.cfg["seed"], augment=augment)
        except ValueError as err:
            raise ConfigError(f"{self.name}: {err} ({self.name}.pool_size)") from None

    @contextlib.contextmanager
    def student_for_synthesis(self) -> Iterator[nn.Module]:
        """The bare student in eval mode with no parameter gradients (adversarial terms), restored afterwards."""
        student = unwrap_model(self.student)
        was_training = student.training
        student.eval()
        try:
            with no_param_grad(student):
                yield student
        finally:
            student.train(was_training)

    def kd_updates(self) -> int:
        """How many KD steps (student updates) the whole run makes."""
        raise NotImplementedError

    def budget(self) -> dict[str, int]:
        """One student update of batch_size pool images (per process) per KD step."""
        return self.count_budget(self.kd_updates(), self.ctx.batch_size)

    def kd_step(self) -> dict[str, Tensor]:
        """One KD step of the student on an augmented batch from the pool (mixed under function matching)."""
        x = self.ctx.mix(self.ctx.normalize(self.pool.sample(self.ctx.batch_size)))
        with torch.no_grad():
            t_logits = self.teacher(x)
        loss_s = kd_loss(self.student(x), t_logits, temperature=self.opts["temperature"])
        self.update(loss_s, self.student_opt)
        return {"loss_s": loss_s.detach()}

    @torch.no_grad()
    def sample_images(self, n: int) -> Tensor | None:
        """The n latest pool images sorted by the teacher's class (None before the first batch)."""
        return self.sort_by_teacher(to_float(self.pool.latest(n))) if len(self.pool) else None

    def state_dict(self) -> dict:
        """The pool (uint8, CPU) and its sample position."""
        return self.pool.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.pool.load_state_dict(state, what=f"{self.name} pool")
        except ValueError as err:
            raise ConfigError(f"{err} ({self.name}.pool_size)") from None


class InterleavedSynthesis(PoolDistillation):
    """Base of CMI and Fast: a generator synthesises a batch into the pool every `synth_every` KD steps.

    Engine step s < `warmup` only synthesises (Fast's warm-up epochs, no KD); after it, step s
    first synthesises one batch when (s - warmup) % synth_every == 0, then takes one KD step on a
    pool batch (the reference: one synthesis, then kd_steps KD steps, per epoch). The generator
    (`mosaic.players.Generator`, sigmoid head as the reference's) is no engine player: the method
    updates it during synthesis and keeps it in its state_dict. Subclasses implement
    `synthesize(adversarial)`, which makes `synth_batch` images, adds them to the pool and returns
    its terms.
    """

    def __init__(self, ctx: Context) -> None:
        o = ctx.opts
        check_positive(self.name, o, "pool_size", "nz", "ngf", "g_steps", "synth_every")
        require(isinstance(o["warmup"], int) and o["warmup"] >= 0,
                f"{self.name}.warmup must be an integer >= 0, got {o['warmup']!r}")
        super().__init__(ctx, pool_size=o["pool_size"])
        self.synth_batch = o["synth_batch"] or ctx.batch_size
        check_positive(self.name, {"synth_batch": self.synth_batch}, "synth_batch")
        require(self.synth_batch <= o["pool_size"], f"{self.name}.synth_batch {self.synth_batch} exceeds "
                                                   f"{self.name}.pool_size {o['pool_size']}: raise pool_size")
        require(ctx.steps > o["warmup"], f"{self.name} spends its first {o['warmup']} steps synthesising "
                                         f"({self.name}.warmup) and KD needs at least one more: raise steps "
                                         f"above {o['warmup']} or lower {self.name}.warmup")
        self.generator = self.new_generator()
        self.syntheses = 0

    def new_generator(self) -> nn.Module:
        """A freshly initialised generator on the run's device; no player (the method optimises it itself), but
        its forwards autocast as the players' do."""
        try:
            return self.ctx.autocast(self.make_generator())
        except ValueError as err:
            raise ConfigError(f"{self.name}: {err} (data.image_size)") from None

    def make_generator(self) -> nn.Module:
        """The generator's architecture: `mosaic.players.Generator` (nz, ngf, sigmoid head) unless overridden."""
        o = self.opts
        return Generator(nz=o["nz"], ngf=o["ngf"], image_size=self.ctx.image_size, channels=self.ctx.channels)

    def kd_updates(self) -> int:
        """Every step after the warm-up is one KD step."""
        return self.ctx.steps - self.opts["warmup"]

    def synthesis_due(self, step: int) -> bool:
        """Whether engine step `step` starts with a synthesis."""
        warmup = self.opts["warmup"]
        return step < warmup or (step - warmup) % self.opts["synth_every"] == 0

    def synthesize(self, *, adversarial: bool) -> dict[str, Tensor]:
        """Make one batch, add it to the pool and return the synthesis terms (subclasses)."""
        raise NotImplementedError

    def adversarial_due(self) -> bool:
        """Whether the next synthesis has its adversarial term: from the first one after the warm-up."""
        return self.syntheses >= self.opts["warmup"]

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.synthesis_due(step):
            losses = self.synthesize(adversarial=self.adversarial_due())
            self.syntheses += 1
        if step >= self.opts["warmup"]:
            losses.update(self.kd_step())
        return losses

    def results(self) -> dict:
        return {f"{self.name}_pool_images": len(self.pool), f"{self.name}_images_made": self.pool.added,
                f"{self.name}_syntheses": self.syntheses}

    def state_dict(self) -> dict:
        """The pool, the generator and the number of syntheses so far."""
        return {**self.pool.state_dict(), "generator": self.generator.state_dict(), "syntheses": self.syntheses}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.syntheses = int(state["syntheses"])
