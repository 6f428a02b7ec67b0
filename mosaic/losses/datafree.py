"""Losses of the data-free baselines (DAFL, ZSKT, DFAD, DFQ, DeepInversion, CMI, Fast) that no other method shares.

Teacher-side priors on synthetic images (DAFL's one-hot and activation terms), DeepInversion's
competition term, CMI's and Fast's agreement-masked adversarial term, BatchNorm-statistics
matching (DFQ, DeepInversion, CMI, Fast), image priors (DeepInversion) and CMI's instance-level
contrastive loss. The KD divergences they train students with live in `mosaic.losses.response`,
the class-balance term in `mosaic.losses.generator`. Every function computes in float32 whatever
the input dtype, so the terms are stable under autocast.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.losses.response import js_divergence
from mosaic.precision import in_fp32


# ----------------------------------------------------------------------------- teacher-side priors (DAFL, DFQ)

@in_fp32
def onehot_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of the logits to their own argmax: low when every prediction is one-hot (DAFL L_oh)."""
    logits = logits.float()
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


@in_fp32
def activation_loss(features: Tensor) -> Tensor:
    """Minus the mean absolute feature value: low when the teacher's features fire strongly (DAFL L_a)."""
    return -features.float().abs().mean()


# ----------------------------------------------------------------------------- teacher-student competition (DeepInversion)

@in_fp32
def competition_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's R_compete = 1 - JS(p_T, p_S): low where teacher and student disagree."""
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature=temperature)


@in_fp32
def clamped_js_competition(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 3.0,
                           clamp: float = 0.01) -> Tensor:
    """Fast-Datafree's DeepInv adversary, -jsdiv(s, t, T): minus 0.5 KL(M || P) - 0.5 KL(M || Q), clamped.

    P = softmax(s/T), Q = softmax(t/T), M = (P + Q) / 2, each clamped to [clamp, 1 - clamp] after M is
    formed (so a clamped probability passes no gradient); the KLs put M first, as `F.kl_div(log P, M)`
    does, and average over the batch. Low where student and teacher disagree.
    """
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = 0.5 * (p + q)
    p, q, m = (v.clamp(clamp, 1 - clamp) for v in (p, q, m))
    log_m = m.log()
    divergence = 0.5 * (m * (log_m - p.log())).sum(dim=1) + 0.5 * (m * (log_m - q.log())).sum(dim=1)
    return -divergence.mean()


@in_fp32
def masked_adversarial_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """-mean_i [argmax s_i == argmax t_i] KL(p_t,i || p_s,i): CMI / Fast's decision-adversarial synthesis term.

    Images on which student and teacher already agree are pushed towards disagreement; the rest
    count zero (the batch mean still divides by the whole batch, as the reference code).
    """
    s, t = student_logits.float(), teacher_logits.float()
    log_p_s, log_p_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    agree = (s.argmax(dim=1) == t.argmax(dim=1)).float()
    return -(kl * agree).mean()


# ----------------------------------------------------------------------------- BatchNorm statistics (DFQ, DeepInversion)

@in_fp32
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a (B, C, H, W) batch over batch and space."""
    flat = x.float().transpose(0, 1).flatten(1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=False)


@in_fp32
def bn_stat_distance(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """||mean - running_mean||_2 + ||var - running_var||_2 for one BatchNorm layer (DeepInversion's R_feature)."""
    return (torch.linalg.vector_norm(mean.float() - running_mean.float())
            + torch.linalg.vector_norm(var.float() - running_var.float()))


@in_fp32
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


@in_fp32
def total_variation_l2(x: Tensor) -> Tensor:
    """Sum over the four neighbour directions of the L2 norm of the differences over the whole batch (DI code)."""
    return sum(torch.linalg.vector_norm(d.float()) for d in _neighbour_differences(x))


@in_fp32
def total_variation_l1(x: Tensor) -> Tensor:
    """Sum over the four neighbour directions of the mean absolute difference."""
    return sum(d.float().abs().mean() for d in _neighbour_differences(x))


@in_fp32
def image_l2(x: Tensor) -> Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion's R_l2 prior)."""
    return torch.linalg.vector_norm(x.float().flatten(1), dim=1).mean()


# ----------------------------------------------------------------------------- contrastive inversion (CMI)

@in_fp32
def instance_contrastive_loss(local: Tensor, global_: Tensor, *, temperature: float, batch: int) -> Tensor:
    """CMI's InfoNCE: row i of `local` must pick row i of `global_` (detached) among all rows, at `temperature`.

    Both are (N, D) L2-normalised projections whose first `batch` rows are the current images
    and the rest the memory bank's; logits = local @ global_^T / temperature, cross-entropy to
    the diagonal. With bank rows the loss is mean over the batch rows + mean over the bank rows
    (CMI's code), otherwise the plain mean.
    """
    logits = local.float() @ global_.detach().float().T / temperature
    per_row = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")
    if len(per_row) > batch:
        return per_row[:batch].mean() + per_row[batch:].mean()
    return per_row.mean()
