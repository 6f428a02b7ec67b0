"""Relational KD: match the distance and angle structure of student and teacher embeddings, plus the logit loss."""
from __future__ import annotations

import torch

from baselines.classic.features import FeatureKD, pooled
from mosaic.losses import rkd_angle, rkd_distance
from mosaic.methods import register_method



@register_method("rkd")
class RKD(FeatureKD):
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

    same_spatial = False  # embeddings are pooled: only their batch structure is compared

    def feature_terms(self, s_feats, t_feats):
        o = self.opts
        dist = torch.stack([rkd_distance(pooled(s), pooled(t)) for s, t in zip(s_feats, t_feats)]).sum()
        angle = torch.stack([rkd_angle(pooled(s), pooled(t)) for s, t in zip(s_feats, t_feats)]).sum()
        return o["distance_weight"] * dist + o["angle_weight"] * angle, {"loss_rkd_d": dist, "loss_rkd_a": angle}
