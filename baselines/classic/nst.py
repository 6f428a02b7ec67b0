"""Neuron selectivity transfer: MMD^2 between student and teacher channel-map distributions, plus the logit loss."""
from __future__ import annotations

import torch

from baselines.classic.features import FeatureKD
from mosaic.config import ConfigError
from mosaic.losses import NST_KERNELS, nst_loss
from mosaic.methods import Context, register_method



@register_method("nst")
class NST(FeatureKD):
    """NST (Huang & Wang 2017): CE (or KD) + weight/2 * MMD^2 of L2-normalised channel maps, per layer pair."""
    defaults = {
        "student_layers": None,  # student layers: module paths or feature indices (null: the deepest stage both
                                 #   nets share at one resolution, the paper's last conv features)
        "teacher_layers": None,  # teacher layers, paired in order with student_layers (same H x W required)
        "kernel": "poly",        # MMD kernel: linear | poly (d=2, c=0) | gaussian (sigma^2 = mean squared distance)
        "weight": 50.0,          # lambda: loss = logit + lambda/2 * MMD^2 (the paper's 50 for the poly kernel)
        "alpha": 0.0,            # share of Hinton KD in the logit loss (0: CE only, as the paper); KD without labels
        "temperature": 4.0,      # KD temperature when alpha > 0 or without labels
        "stream": "train",       # train: labelled in-domain images | ood: the unlabelled OOD pool
    }

    def __init__(self, ctx: Context) -> None:
        if ctx.opts["kernel"] not in NST_KERNELS:
            raise ConfigError(f"nst.kernel must be one of {', '.join(NST_KERNELS)}, got {ctx.opts['kernel']!r}")
        super().__init__(ctx)

    def feature_terms(self, s_feats, t_feats):
        o = self.opts
        mmd = torch.stack([nst_loss(s, t, kernel=o["kernel"], weight=o["weight"])
                           for s, t in zip(s_feats, t_feats)]).sum()
        return mmd, {"loss_nst": mmd}
