"""FitNets: a learned 1x1-conv regressor maps a student layer onto a teacher hint layer (L2), plus the logit loss."""
from __future__ import annotations

import torch

from baselines.classic.features import Adapters, FeatureKD, make_adapter
from mosaic.losses import hint_loss
from mosaic.methods import Context, register_method



@register_method("fitnets")
class FitNets(FeatureKD):
    """FitNets hints (single stage): CE (or KD) + weight * MSE(regressor(student layer), teacher layer)."""
    defaults = {
        "student_layers": None,  # guided student layer(s): module paths or feature indices (null: the middle
                                 #   resolution both nets share, FitNets' middle-layer hint)
        "teacher_layers": None,  # hint layer(s) of the teacher, paired in order with student_layers
        "weight": 100.0,         # hint loss weight (CRD benchmark's single-stage FitNets; see mosaic/losses/feature.py)
        "alpha": 0.0,            # share of Hinton KD in the logit loss (0: CE only); KD alone without labels
        "temperature": 4.0,      # KD temperature when alpha > 0 or without labels
        "stream": "train",       # train: labelled in-domain images | ood: the unlabelled OOD pool
    }
    players = ("student", "regressor")

    pick = "middle"
    same_spatial = False  # the regressor adapts channels; make_adapter rejects other mismatches

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        s_shapes, t_shapes = self.pair_shapes()
        self.regressor = Adapters([make_adapter(self.name, s, s_shapes[s], t, t_shapes[t]) for s, t in self.pairs]
                                  ).to(ctx.device)
        self.regressor_opt = self.student_optimizer(self.regressor.parameters())

    def optimizers(self):
        return [self.student_opt, self.regressor_opt]

    def feature_terms(self, s_feats, t_feats):
        hint = torch.stack([hint_loss(r, t) for r, t in zip(self.regressor(s_feats), t_feats)]).mean()
        return self.opts["weight"] * hint, {"loss_hint": hint}
