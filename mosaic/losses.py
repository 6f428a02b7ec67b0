"""Losses shared by every method: pure functions of tensors, no state, no modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Hinton's distillation loss T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)


def entropy(logits: Tensor) -> Tensor:
    """Mean per-sample entropy (nats) of softmax(logits): low when each prediction is confident."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def balance_loss(logits: Tensor) -> Tensor:
    """sum_c pbar_c log pbar_c for the batch-mean softmax pbar: minimal (-log C) when classes are balanced."""
    p_bar = F.softmax(logits.float(), dim=1).mean(dim=0)
    return (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()


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


def cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy to integer labels."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def top1_agreement(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """Fraction of samples on which two classifiers predict the same class."""
    return (a_logits.argmax(1) == b_logits.argmax(1)).float().mean()
