"""Adversarial logit KD: a discriminator on logits (optionally class-conditioned) against the student, plus L1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.classic.common import StreamMethod
from mosaic.config import ConfigError
from mosaic.losses import discriminator_loss, logit_l1, student_adversarial_loss
from mosaic.methods import Context, no_param_grad, register_method

D_INPUTS = ("logits", "probs")


class LogitDiscriminator(nn.Module):
    """A 3-layer MLP on C logits with 2 (real/fake) or C + 2 (real/fake + class) outputs."""

    def __init__(self, num_classes: int, *, hidden: int = 256, conditional: bool = True) -> None:
        super().__init__()
        out = num_classes + 2 if conditional else 2
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, out))

    def forward(self, logits: Tensor) -> Tensor:
        return self.net(logits)


@register_method("adv_kd")
class AdversarialKD(StreamMethod):
    """Xu et al. 2018: the student fools a (class-conditioned) logit discriminator and matches logits in L1."""
    defaults = {
        "conditional": True,    # C + 2 discriminator outputs (real/fake + class of labels or teacher argmax)
        "d_input": "logits",    # what D sees: logits / T ("logits") or softmax(logits / T) ("probs")
        "temperature": 1.0,     # softening T of D's input
        "adv_weight": 1.0,      # weight of the student's adversarial term
        "l1_weight": 1.0,       # weight of the L1 logit term (mean absolute logit difference)
        "ce_weight": 0.0,       # weight of CE on labels for the student (0: teacher-only signal, as the paper)
        "hidden": 256,          # discriminator MLP width
        "lr_d": 2e-4,           # Adam learning rate of the discriminator
        "betas": [0.5, 0.999],  # Adam betas of the discriminator
        "stream": "train",      # train: labelled in-domain images | ood: unlabelled OOD pool (teacher argmax classes)
    }
    players = ("student", "discriminator")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        if o["d_input"] not in D_INPUTS:
            raise ConfigError(f"adv_kd.d_input must be one of {', '.join(D_INPUTS)}, got {o['d_input']!r}")
        if o["temperature"] <= 0:
            raise ConfigError(f"adv_kd.temperature must be > 0, got {o['temperature']!r}")
        self.discriminator = LogitDiscriminator(ctx.num_classes, hidden=o["hidden"],
                                                conditional=o["conditional"]).to(ctx.device)
        self.discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), lr=o["lr_d"],
                                                  betas=tuple(o["betas"]), foreach=True)
        self.student_opt = self.student_optimizer()

    def soften(self, logits: Tensor) -> Tensor:
        """The discriminator's view of a batch of logits."""
        z = logits.float() / self.opts["temperature"]
        return F.softmax(z, dim=1) if self.opts["d_input"] == "probs" else z

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        classes = (y if y is not None else t_logits.argmax(1)) if o["conditional"] else None
        s_logits = self.student(x)

        # 1. Discriminator: teacher logits are real, student logits fake (+ their class when conditioned).
        d_out = self.discriminator(self.soften(torch.cat([t_logits, s_logits.detach()])))  # one call: DDP-safe
        d_teacher, d_student = d_out.split(len(t_logits))
        loss_d = discriminator_loss(d_teacher, d_student, classes)
        self.update(loss_d, self.discriminator_opt)

        # 2. Student: fool D, match the teacher's logits in L1 (and the labels when ce_weight > 0).
        with no_param_grad(self.discriminator):
            adv = student_adversarial_loss(self.discriminator(self.soften(s_logits)), classes)
        l1 = logit_l1(s_logits, t_logits)
        loss_s = o["adv_weight"] * adv + o["l1_weight"] * l1
        if o["ce_weight"] and y is not None:
            loss_s = loss_s + o["ce_weight"] * F.cross_entropy(s_logits.float(), y)
        self.update(loss_s, self.student_opt)
        return {"loss_d": loss_d.detach(), "loss_s": loss_s.detach(), "loss_adv": adv.detach(),
                "loss_l1": l1.detach()}
