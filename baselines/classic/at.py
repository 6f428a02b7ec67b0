"""Attention transfer: match normalised spatial attention maps at several layer pairs, plus the logit loss."""
from __future__ import annotations

from baselines.classic.features import FeatureKD
from mosaic.losses import attention_transfer
from mosaic.methods import register_method



@register_method("at")
class AttentionTransfer(FeatureKD):
    """Attention transfer (Zagoruyko & Komodakis 2017): CE (or KD) + beta/2 sum_pairs mean (Q_s - Q_t)^2."""
    defaults = {
        "student_layers": None,  # student layers: module paths or feature indices (null: the last stage of every
                                 #   resolution both nets share, the paper's group outputs)
        "teacher_layers": None,  # teacher layers, paired in order with student_layers (same H x W required)
        "beta": 1000.0,          # attention loss weight beta (the paper's 1e3)
        "p": 2.0,                # attention map exponent: mean over channels of |A|^p (the paper's p=2)
        "alpha": 0.0,            # share of Hinton KD in the logit loss (0: CE only, AT alone); KD without labels
        "temperature": 4.0,      # KD temperature when alpha > 0 or without labels
        "stream": "train",       # train: labelled in-domain images | ood: the unlabelled OOD pool
    }

    pick = "all"

    def feature_terms(self, s_feats, t_feats):
        o = self.opts
        attention = attention_transfer(s_feats, t_feats, p=o["p"], beta=o["beta"])
        return attention, {"loss_at": attention}
