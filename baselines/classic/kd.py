"""Hinton knowledge distillation on labelled in-domain images or, label-free, on the OOD pool (`kd_ood`)."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.classic.common import StreamMethod, check_fraction
from mosaic.config import ConfigError
from mosaic.losses import hinton_kd
from mosaic.methods import Context, register_method


@register_method("kd")
class KD(StreamMethod):
    """Hinton KD: (1 - alpha) CE + alpha T^2 KL to the teacher's soft outputs (KD alone without labels)."""
    defaults = {
        "temperature": 4.0,  # softmax temperature T; the soft term is scaled by T^2 (Hinton et al. 2015)
        "alpha": 0.9,        # weight of the soft term; 1 - alpha goes to CE on labels (ignored without labels)
        "stream": "train",   # train: labelled in-domain images | ood: the unlabelled OOD pool (label-free KD)
        "batches": 1,        # student updates per step, each on its own batch of the stream
    }
    loss_key = "loss"

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """KD's options, `batches` checked."""
        b = opts.get("batches", 1)
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"{cls.name}.batches must be a positive integer, got {b!r}")
        return opts

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        self.student_opt = self.student_optimizer()

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_all, y_all = self.inputs(batch)
        n = self.ctx.batch_size
        for i, x in enumerate(x_all.split(n)):
            y = None if y_all is None else y_all[i * n:(i + 1) * n]
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = hinton_kd(self.student(x), t_logits, y, temperature=self.opts["temperature"],
                             alpha=self.opts["alpha"])
            self.update(loss, self.student_opt)
        return {self.loss_key: loss.detach()}


@register_method("kd_ood")
class KDOnOOD(KD):
    """The control every OOD method is judged against: `kd` on the OOD images alone at temperature 1.

    A configuration of `kd` (stream=ood, label-free so alpha plays no part) with its own option names.
    """
    defaults = {
        "temperature": 1.0,  # KD temperature T (loss scaled by T^2)
        "ood_batches": 1,    # OOD batches per step; set to MosaicKD's student_steps for an equal image budget
    }
    loss_key = "loss_s"

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """kd's options for this configuration."""
        if opts["ood_batches"] < 1:
            raise ConfigError("kd_ood.ood_batches must be >= 1")
        return {"temperature": opts["temperature"], "alpha": 1.0, "stream": "ood", "batches": opts["ood_batches"]}
