"""FitNets: a learned 1x1-conv regressor maps a student layer onto a teacher hint layer (L2), plus the logit loss."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.common import StreamMethod, check_fraction
from baselines.features import Adapters, PairedTaps, layer_pairs, make_adapter, probe_shapes
from baselines.losses import hint_loss, logit_loss
from mosaic.methods import Context, register_method
from mosaic.methods.supervised import sgd


@register_method("fitnets")
class FitNets(StreamMethod):
    """FitNets hints (single stage): CE (or KD) + weight * MSE(regressor(student layer), teacher layer)."""
    defaults = {
        "student_layers": None,  # guided student layer(s): module paths or feature indices (null: the middle
                                 #   resolution both nets share, FitNets' middle-layer hint)
        "teacher_layers": None,  # hint layer(s) of the teacher, paired in order with student_layers
        "weight": 100.0,         # hint loss weight (CRD benchmark's single-stage FitNets; see losses/fitnets.py)
        "alpha": 0.0,            # share of Hinton KD in the logit loss (0: CE only); KD alone without labels
        "temperature": 4.0,      # KD temperature when alpha > 0 or without labels
        "stream": "train",       # train: labelled in-domain images | ood: the unlabelled OOD pool
    }
    players = ("student", "regressor")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        pairs = layer_pairs(self.name, self.opts, self.student, self.teacher, pick="middle")
        s_shapes = probe_shapes(self.student, [s for s, _ in pairs], ctx)
        t_shapes = probe_shapes(self.teacher, [t for _, t in pairs], ctx)
        self.regressor = Adapters([make_adapter(self.name, s, s_shapes[s], t, t_shapes[t]) for s, t in pairs]
                                  ).to(ctx.device)
        self.taps = PairedTaps(self.student, self.teacher, pairs)
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])
        self.regressor_opt = sgd(self.regressor.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        s_feats, t_feats = self.taps.features()
        hints = [hint_loss(r, t) for r, t in zip(self.regressor(s_feats), t_feats)]
        hint = torch.stack(hints).mean()
        logit = logit_loss(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        loss = logit + o["weight"] * hint
        self.update(loss, [self.student_opt, self.regressor_opt])
        self.taps.clear()
        return {"loss": loss.detach(), "loss_logit": logit.detach(), "loss_hint": hint.detach()}
