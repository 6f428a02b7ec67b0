"""Neuron selectivity transfer: MMD^2 between student and teacher channel-map distributions, plus the logit loss."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.common import StreamMethod, check_fraction
from baselines.features import PairedTaps, layer_pairs, probe_shapes, require_same_spatial
from baselines.losses import KERNELS, logit_loss, nst_loss
from mosaic.config import ConfigError
from mosaic.methods import Context, register_method
from mosaic.methods.supervised import sgd


@register_method("nst")
class NST(StreamMethod):
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
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        if self.opts["kernel"] not in KERNELS:
            raise ConfigError(f"nst.kernel must be one of {', '.join(KERNELS)}, got {self.opts['kernel']!r}")
        pairs = layer_pairs(self.name, self.opts, self.student, self.teacher, pick="last")
        s_shapes = probe_shapes(self.student, [s for s, _ in pairs], ctx)
        t_shapes = probe_shapes(self.teacher, [t for _, t in pairs], ctx)
        for s, t in pairs:
            require_same_spatial(self.name, s, s_shapes[s], t, t_shapes[t])
        self.taps = PairedTaps(self.student, self.teacher, pairs)
        self.student_opt = sgd(self.student.parameters(), ctx.cfg["student"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        s_feats, t_feats = self.taps.features()
        mmd = torch.stack([nst_loss(s, t, kernel=o["kernel"], weight=o["weight"])
                           for s, t in zip(s_feats, t_feats)]).sum()
        logit = logit_loss(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        loss = logit + mmd
        self.update(loss, [self.student_opt])
        self.taps.clear()
        return {"loss": loss.detach(), "loss_logit": logit.detach(), "loss_nst": mmd.detach()}
