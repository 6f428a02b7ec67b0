"""Supervised training with cross-entropy on labelled in-domain data: how teachers are made."""
from __future__ import annotations

from torch import Tensor

from mosaic.losses import cross_entropy
from mosaic.methods import Context, Method, register_method


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
        self.student_opt = self.student_optimizer()

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y = self.ctx.normalize(batch["train"]), batch["train_labels"]
        logits = self.student(x)
        loss = cross_entropy(logits, y, label_smoothing=self.opts["label_smoothing"])
        self.update(loss, self.student_opt)
        return {"loss": loss.detach(), "train_top1": (logits.detach().argmax(1) == y).float().mean()}
