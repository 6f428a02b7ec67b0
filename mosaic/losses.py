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


def patch_gan_loss(logits: Tensor, *, real: bool) -> Tensor:
    """Binary cross-entropy with logits against an all-real or all-fake target, averaged over the map."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy to integer labels."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def top1_agreement(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """Fraction of samples on which two classifiers predict the same class."""
    return (a_logits.argmax(1) == b_logits.argmax(1)).float().mean()
