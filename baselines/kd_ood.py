"""The control every OOD method is judged against: plain KD on the out-of-domain images alone."""
from __future__ import annotations

import torch
from torch import Tensor

from mosaic.config import ConfigError
from mosaic.losses import kd_loss
from mosaic.methods import Context, Method, register_method
from mosaic.methods.supervised import sgd


@register_method("kd_ood")
class KDOnOOD(Method):
    """The student learns the teacher's soft outputs on augmented OOD images (Hinton KD, no labels)."""
    defaults = {
        "temperature": 1.0,  # KD temperature T (loss scaled by T^2)
        "ood_batches": 1,    # OOD batches per step; set to MosaicKD's student_steps for an equal image budget
    }
    needs = {"ood": 1}

    @classmethod
    def stream_needs(cls, opts: dict) -> dict[str, int]:
        return {"ood": opts["ood_batches"]}

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if self.opts["ood_batches"] < 1:
            raise ConfigError("kd_ood.ood_batches must be >= 1")
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        for x in batch["ood"].split(self.ctx.batch_size):
            x = self.ctx.normalize(x)
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = kd_loss(self.student(x), t_logits, temperature=self.opts["temperature"])
            self.student_opt.zero_grad(set_to_none=True)
            self.backward(loss)
            self.student_opt.step()
        return {"loss_s": loss.detach()}
