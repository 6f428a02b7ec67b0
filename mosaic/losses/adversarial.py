"""Adversarial losses: a discriminator tells real from fake, the other player tries to fool it.

MosaicKD's patch-GAN loss on images, and adversarial logit KD: Xu, Hsu & Huang, "Training Shallow
and Thin Networks for Acceleration via Knowledge Distillation with Conditional Adversarial Networks"
(ICLR 2018 workshop). There the discriminator D sees (softened) logits; its first two outputs score
real (teacher) / fake (student). In the class-conditioned form it has C + 2 outputs and the last C
classify the logits' class as well (auxiliary-classifier style), which keeps the student's logits
class-consistent; an L1 term on the logits themselves (`logit_l1`) steadies training.
The losses here are unweighted. The weights and the discriminator used by `adv_kd` (L1 and
adversarial weight 1 each, a 3-layer MLP of width 256, Adam 2e-4, betas 0.5/0.999) are our
choices, not values reproduced from the paper: equal weights are the neutral starting point and
the optimiser is the usual GAN setting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.precision import in_fp32


# ----------------------------------------------------------------------------- patch GAN (MosaicKD)

@in_fp32
def patch_gan_loss(logits: Tensor, *, real: bool, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits of a (B, 1, H, W) patch map against an all-real or all-fake target.

    reduction "mean" averages over every logit; "sum" sums each sample's map and averages over
    samples (so the term grows with the number of patches, as in the MosaicKD reference code).
    """
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if reduction == "mean":
        return bce.mean()
    if reduction == "sum":
        return bce.flatten(1).sum(1).mean()
    raise ValueError(f"reduction must be mean or sum, got {reduction!r}")


# ----------------------------------------------------------------------------- adversarial logit KD

REAL, FAKE = 0, 1  # indices of the real/fake scores among D's first two outputs


def _check_outputs(d_out: Tensor, labels: Tensor | None) -> None:
    """D's output is (B, 2) or (B, C + 2); class-conditioned outputs need labels."""
    if d_out.dim() != 2 or d_out.shape[1] < 2:
        raise ValueError(f"discriminator outputs must be (B, 2) or (B, C + 2), got shape {tuple(d_out.shape)}")
    if d_out.shape[1] > 2 and labels is None:
        raise ValueError("a class-conditioned discriminator (C + 2 outputs) needs labels (or teacher argmax)")


def _source_ce(d_out: Tensor, source: int) -> Tensor:
    """Cross-entropy of D's two real/fake scores against one source (REAL or FAKE) for the whole batch."""
    target = torch.full((d_out.shape[0],), source, dtype=torch.long, device=d_out.device)
    return F.cross_entropy(d_out[:, :2].float(), target)


def _class_ce(d_out: Tensor, labels: Tensor | None) -> Tensor:
    """Cross-entropy of D's C class scores against the labels (0 for an unconditioned D)."""
    if d_out.shape[1] == 2:
        return d_out.float().sum() * 0.0
    return F.cross_entropy(d_out[:, 2:].float(), labels)


@in_fp32
def discriminator_loss(d_teacher: Tensor, d_student: Tensor, labels: Tensor | None = None) -> Tensor:
    """D's loss: CE(real) on teacher logits + CE(fake) on student logits (+ class CE on both when conditioned)."""
    _check_outputs(d_teacher, labels)
    _check_outputs(d_student, labels)
    source = _source_ce(d_teacher, REAL) + _source_ce(d_student, FAKE)
    return source + _class_ce(d_teacher, labels) + _class_ce(d_student, labels)


@in_fp32
def student_adversarial_loss(d_student: Tensor, labels: Tensor | None = None) -> Tensor:
    """The student's adversarial loss: D should call its logits real (+ class CE when conditioned)."""
    _check_outputs(d_student, labels)
    return _source_ce(d_student, REAL) + _class_ce(d_student, labels)
