"""Losses of the data-free baselines (DAFL, ZSKT, DFAD, DFQ, DeepInversion): pure functions of tensors.

Shared terms that MosaicKD also uses (Hinton KD, teacher entropy, natural-log class
balance) live in `mosaic.losses`; this module holds the rest. Every function computes in
float32 whatever the input dtype, so the terms are stable under autocast.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- teacher-side priors (DAFL, DFQ)

def onehot_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of the logits to their own argmax: low when every prediction is one-hot (DAFL L_oh)."""
    logits = logits.float()
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def activation_loss(features: Tensor) -> Tensor:
    """Minus the mean absolute feature value: low when the teacher's features fire strongly (DAFL L_a)."""
    return -features.float().abs().mean()


def information_entropy_loss(logits: Tensor, *, base: float = 10.0) -> Tensor:
    """sum_c pbar_c log_base pbar_c of the batch-mean softmax: minimal, -log_base C, for balanced classes (DAFL L_ie).

    DAFL's official code uses log10, so its weight (5 on CIFAR-10) refers to base 10.
    """
    p_bar = F.softmax(logits.float(), dim=1).mean(dim=0)
    return (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum() / math.log(base)


# ----------------------------------------------------------------------------- teacher-student discrepancies

def elementwise_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over batch *and* classes (ZSKT: PyTorch kl_div's old 'mean')."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).mean()


def logit_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean absolute difference between student and teacher logits over batch and classes (DFAD)."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def attention_map(features: Tensor) -> Tensor:
    """Spatial attention of a (B, C, H, W) map: channel-mean of squares, flattened, L2-normalised per sample."""
    a = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


def attention_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared difference of the two attention maps (Zagoruyko & Komodakis, as used by ZSKT)."""
    if student_features.shape[-2:] != teacher_features.shape[-2:]:
        raise ValueError(f"attention transfer needs maps of equal spatial size, got student "
                         f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}: "
                         f"pair layers with the same reduction (zskt.at_layers)")
    return (attention_map(student_features) - attention_map(teacher_features)).pow(2).mean()


def js_divergence(logits_a: Tensor, logits_b: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence (nats) between softmax(a/T) and softmax(b/T), mean over the batch."""
    log_p = F.log_softmax(logits_a.float() / temperature, dim=1)
    log_q = F.log_softmax(logits_b.float() / temperature, dim=1)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((0.5 * (p + q)).clamp_min(1e-12))
    js = 0.5 * (p * (log_p - log_m)).sum(dim=1) + 0.5 * (q * (log_q - log_m)).sum(dim=1)
    return js.mean()


def competition_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's R_compete = 1 - JS(p_T, p_S): low where teacher and student disagree."""
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature=temperature)


# ----------------------------------------------------------------------------- BatchNorm statistics (DFQ, DeepInversion)

def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a (B, C, H, W) batch over batch and space."""
    flat = x.float().transpose(0, 1).flatten(1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=False)


def bn_stat_distance(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """||mean - running_mean||_2 + ||var - running_var||_2 for one BatchNorm layer (DeepInversion's R_feature)."""
    return (torch.linalg.vector_norm(mean.float() - running_mean.float())
            + torch.linalg.vector_norm(var.float() - running_var.float()))


def bn_stat_loss(distances: Sequence[Tensor], *, first_multiplier: float = 1.0) -> Tensor:
    """Sum of per-layer BN-statistics distances, the first layer's scaled by `first_multiplier`."""
    if len(distances) == 0:
        raise ValueError("no BatchNorm statistics were collected: the teacher has no BatchNorm2d layer "
                         "or did not run inside the hooks")
    total = distances[0] * first_multiplier
    for d in distances[1:]:
        total = total + d
    return total


# ----------------------------------------------------------------------------- image priors (DeepInversion)

def _neighbour_differences(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Differences to the right, below and along both diagonals of every pixel of a (B, C, H, W) batch."""
    return (x[:, :, :, :-1] - x[:, :, :, 1:],
            x[:, :, :-1, :] - x[:, :, 1:, :],
            x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
            x[:, :, :-1, :-1] - x[:, :, 1:, 1:])


def total_variation_l2(x: Tensor) -> Tensor:
    """Sum over the four neighbour directions of the L2 norm of the differences over the whole batch (DI code)."""
    return sum(torch.linalg.vector_norm(d.float()) for d in _neighbour_differences(x))


def total_variation_l1(x: Tensor) -> Tensor:
    """Sum over the four neighbour directions of the mean absolute difference."""
    return sum(d.float().abs().mean() for d in _neighbour_differences(x))


def image_l2(x: Tensor) -> Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion's R_l2 prior)."""
    return torch.linalg.vector_norm(x.float().flatten(1), dim=1).mean()
