"""Supervised training with cross-entropy on labelled in-domain data: how teachers are made."""
from __future__ import annotations

import torch
from torch import Tensor

from mosaic.losses import cross_entropy
from mosaic.methods import Context, Method, register_method


def sgd(params, student_cfg: dict) -> torch.optim.Optimizer:
    """SGD from the config's student section (lr, momentum, weight_decay, nesterov); foreach kernels."""
    return torch.optim.SGD(params, lr=student_cfg["lr"], momentum=student_cfg["momentum"],
                           weight_decay=student_cfg["weight_decay"], nesterov=student_cfg["nesterov"],
                           foreach=True)


@register_method("supervised")
class Supervised(Method):
    """Train the network under `student.*` on `data.train` labels (used by `mosaic train-teacher`)."""
    defaults = {
        "label_smoothing": 0.0,  # cross-entropy label smoothing
    }
    needs = {"train": 1}
    players = ("student",)
    requires_teacher = False

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y = self.ctx.normalize(batch["train"]), batch["train_labels"]
        logits = self.student(x)
        loss = cross_entropy(logits, y, label_smoothing=self.opts["label_smoothing"])
        self.student_opt.zero_grad(set_to_none=True)
        self.backward(loss)
        self.student_opt.step()
        return {"loss": loss.detach(), "train_top1": (logits.detach().argmax(1) == y).float().mean()}
