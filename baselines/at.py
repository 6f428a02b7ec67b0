"""Attention transfer: match normalised spatial attention maps at several layer pairs, plus the logit loss."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.common import StreamMethod, check_fraction
from baselines.features import PairedTaps, layer_pairs, probe_shapes, require_same_spatial
from baselines.losses import attention_transfer, logit_loss
from mosaic.methods import Context, register_method
from mosaic.methods.supervised import sgd


@register_method("at")
class AttentionTransfer(StreamMethod):
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

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        pairs = layer_pairs(self.name, self.opts, self.student, self.teacher, pick="all")
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
        attention = attention_transfer(s_feats, t_feats, p=o["p"], beta=o["beta"])
        logit = logit_loss(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        loss = logit + attention
        self.update(loss, [self.student_opt])
        self.taps.clear()
        return {"loss": loss.detach(), "loss_logit": logit.detach(), "loss_at": attention.detach()}
