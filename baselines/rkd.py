"""Relational KD: match the distance and angle structure of student and teacher embeddings, plus the logit loss."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.common import StreamMethod, check_fraction
from baselines.features import PairedTaps, layer_pairs, pooled
from baselines.losses import logit_loss, rkd_angle, rkd_distance
from mosaic.methods import Context, register_method
from mosaic.methods.supervised import sgd


@register_method("rkd")
class RKD(StreamMethod):
    """RKD (Park et al. 2019): CE (or KD) + 25 * distance-wise + 50 * angle-wise Huber losses on embeddings."""
    defaults = {
        "student_layers": None,    # embedding layer(s): module paths or feature indices, global-average-pooled when
                                   #   maps (null: the deepest stage both nets share = the pre-logit embedding)
        "teacher_layers": None,    # teacher embedding layer(s), paired in order (widths may differ)
        "distance_weight": 25.0,   # weight of the distance-wise term (the paper's 25)
        "angle_weight": 50.0,      # weight of the angle-wise term (the paper's 50)
        "alpha": 0.0,              # share of Hinton KD in the logit loss (0: CE only, as the paper); KD without labels
        "temperature": 4.0,        # KD temperature when alpha > 0 or without labels
        "stream": "train",         # train: labelled in-domain images | ood: the unlabelled OOD pool
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        pairs = layer_pairs(self.name, self.opts, self.student, self.teacher, pick="last")
        self.taps = PairedTaps(self.student, self.teacher, pairs)
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        s_feats, t_feats = self.taps.features()
        dist = torch.stack([rkd_distance(pooled(s), pooled(t)) for s, t in zip(s_feats, t_feats)]).sum()
        angle = torch.stack([rkd_angle(pooled(s), pooled(t)) for s, t in zip(s_feats, t_feats)]).sum()
        logit = logit_loss(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        loss = logit + o["distance_weight"] * dist + o["angle_weight"] * angle
        self.update(loss, [self.student_opt])
        self.taps.clear()
        return {"loss": loss.detach(), "loss_logit": logit.detach(), "loss_rkd_d": dist.detach(),
                "loss_rkd_a": angle.detach()}
