"""The Context the engine hands a method: config, networks, task shape, device, and the services a method may call."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mosaic.augment import to_float
from mosaic.precision import Precision, autocast_forward, full_precision


@dataclass
class Context:
    """What the engine hands a method: config, networks, task shape and device."""
    cfg: dict                       # the full resolved config
    opts: dict                      # this method's section of the config
    teacher: nn.Module | None       # frozen, on the device (None when training a teacher)
    student: nn.Module              # fresh (or initialised) student on the device, not yet prepared
    num_classes: int
    image_size: int
    channels: int
    mean: Tensor                    # in-domain normalisation, shape (C,), on the device
    std: Tensor
    device: torch.device
    accelerator: Any                # accelerate.Accelerator
    steps: int                      # total training steps of the run
    batch_size: int                 # per process
    mixer: Callable[[Tensor], Tensor] | None = None  # the run's `mix` (mosaic.augment.Mix); None: identity
    precision: Precision | None = None  # the run's resolved precision (None: fp32, contiguous)

    def mix(self, x: Tensor) -> Tensor:
        """The run's function-matching view of a student batch (config `mix`): feed it to teacher and student alike.

        Identity (and no random draws) when mix=none. Call it once per student update, on the whole batch the
        student trains on, before both forwards.
        """
        return x if self.mixer is None else self.mixer(x)

    def normalize(self, x: Tensor) -> Tensor:
        """Map [0, 1] images to the in-domain normalised space the classifiers expect."""
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor, *, batch_size: int | None = None) -> Tensor:
        """fp32 logits of `model` for uint8 images, in batches (default eval_batch_size), in eval mode (mode restored).

        Runs in full precision whatever the run's autocast (evaluation, OOD selection).
        """
        batch_size = batch_size or self.cfg["eval_batch_size"]
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = self.normalize(to_float(images[i:i + batch_size]))
            with full_precision():
                out.append(model(x).float())
        model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.num_classes, device=images.device)

    def test_set(self):
        """The run's labelled test set (data.test) as the engine loads it (an ImageSet), or None when unset."""
        from mosaic.data import load_split

        return load_split(self.cfg, "test") if self.cfg["data"]["test"] else None

    def load_classifier(self, checkpoint: str | os.PathLike, *, arch: str | None = None,
                        num_classes: int | None = None) -> tuple[nn.Module, dict]:
        """A classifier checkpoint (as `teacher=` reads it) for this task's channels and classes, in eval mode.

        On the run's device, in the memory format and with the per-forward autocast a teacher gets.
        """
        from mosaic.models import load_classifier

        model, meta = load_classifier(checkpoint, arch=arch, num_classes=num_classes, in_chans=self.channels,
                                      default_classes=self.num_classes, image_size=self.image_size)
        return self.autocast(model), meta

    def autocast(self, module: nn.Module) -> nn.Module:
        """`module` (a network that is no player: an extra teacher, a synthesis generator) on the device, in the
        run's memory format, each forward in its own autocast block as the players' are (in place; returns it)."""
        if self.precision is None:
            return module.to(self.device)
        layout = torch.channels_last if self.precision.wants_channels_last(module) else torch.contiguous_format
        return autocast_forward(module.to(self.device, memory_format=layout), self.precision, self.device.type)
