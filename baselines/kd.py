"""Hinton knowledge distillation on labelled in-domain images (or, label-free, on the OOD pool)."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.common import StreamMethod, check_fraction
from mosaic.losses import hinton_kd
from mosaic.methods import Context, register_method
from mosaic.methods.supervised import sgd


@register_method("kd")
class KD(StreamMethod):
    """Hinton KD: (1 - alpha) CE + alpha T^2 KL to the teacher's soft outputs (KD alone without labels)."""
    defaults = {
        "temperature": 4.0,  # softmax temperature T; the soft term is scaled by T^2 (Hinton et al. 2015)
        "alpha": 0.9,        # weight of the soft term; 1 - alpha goes to CE on labels (ignored without labels)
        "stream": "train",   # train: labelled in-domain images | ood: the unlabelled OOD pool (label-free KD)
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = hinton_kd(s_logits, t_logits, y, temperature=self.opts["temperature"], alpha=self.opts["alpha"])
        self.update(loss, [self.student_opt])
        return {"loss": loss.detach()}
