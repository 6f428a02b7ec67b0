"""Response-based losses: compare output distributions (logits) of a student with a teacher, labels or peers.

Hinton KD (and ZSKT's class-averaged reading of it), cross-entropy, the label-mixing KD of the
classic baselines, logit L1, deep mutual learning, multi-teacher ensembles, Jensen-Shannon
divergence and top-1 agreement. Every function computes in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.precision import in_fp32

KL_REDUCTIONS = ("batchmean", "mean")


def _kl_terms(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """Pointwise terms p_t * (log p_t - log p_s) of KL(p_t || p_s), shape (B, C)."""
    return log_p_t.exp() * (log_p_t - log_p_s)


def _reduce_kl(log_p_t: Tensor, log_p_s: Tensor, t: float, reduction: str) -> Tensor:
    """T^2 * batch mean of the per-sample KL ("batchmean") or the mean of the pointwise terms ("mean")."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"KL reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")
    terms = _kl_terms(log_p_t, log_p_s)
    if reduction == "mean":
        return terms.mean()
    return terms.sum(dim=1).mean() * (t * t)


@in_fp32
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
            reduction: str = "batchmean") -> Tensor:
    """Hinton's distillation loss T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch.

    reduction="batchmean" (default): T^2 * batch mean of the per-sample KL (Hinton et al. 2015: the
    T^2 factor keeps the soft-target gradients at the scale of the hard-label ones).
    reduction="mean": the pointwise KL terms averaged over batch *and* classes, without T^2 (ZSKT's
    reading, PyTorch kl_div's old default 'mean').
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return _reduce_kl(log_p_t, log_p_s, t, reduction)


@in_fp32
def soft_kl(student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 1.0,
            reduction: str = "batchmean") -> Tensor:
    """`kd_loss` given the teacher's log-probabilities (already at temperature T), e.g. of a teacher ensemble."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    return _reduce_kl(teacher_log_probs.float(), log_p_s, t, reduction)


@in_fp32
def cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy to integer labels."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@in_fp32
def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
              temperature: float = 4.0, alpha: float = 0.9) -> Tensor:
    """Hinton KD: (1 - alpha) * CE(s, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015). Without labels
    (`labels=None`: OOD or synthetic images) it is the label-free variant, `kd_loss` alone, whatever
    alpha is. Defaults T=4, alpha=0.9 are the usual CIFAR setting (the paper tries T in 2..20 and gives
    the soft term most of the weight; the CRD benchmark of Tian et al. 2020 uses exactly these).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the weight of the soft term and must lie in [0, 1], got {alpha}")
    soft = kd_loss(student_logits, teacher_logits, temperature=temperature)
    if labels is None:
        return soft
    return (1.0 - alpha) * cross_entropy(student_logits, labels) + alpha * soft


@in_fp32
def logit_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None, *,
               temperature: float, alpha: float) -> Tensor:
    """The logit part shared by the feature methods: CE when alpha=0, Hinton KD otherwise, KD alone without labels."""
    if labels is None:
        if teacher_logits is None:
            raise ValueError("without labels the logit loss needs teacher logits")
        return hinton_kd(student_logits, teacher_logits, None, temperature=temperature)
    if alpha == 0.0 or teacher_logits is None:
        return cross_entropy(student_logits, labels)
    return hinton_kd(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)


@in_fp32
def logit_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over the batch of ||t - s||_1 / C: the mean absolute logit difference (adversarial KD, DFAD)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit L1: student shape {tuple(student_logits.shape)} does not match teacher shape "
                         f"{tuple(teacher_logits.shape)}; both networks need the same classes")
    return (student_logits.float() - teacher_logits.float()).abs().mean()


@in_fp32
def mutual_loss(own_logits: Tensor, peer_logits: Sequence[Tensor], labels: Tensor | None = None, *,
                temperature: float = 1.0) -> Tensor:
    """CE(own, labels) + mean over peers of T^2 * KL(softmax(peer/T) || softmax(own/T)); peers are detached.

    Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning" (CVPR 2018): network k minimises
    L_CE + 1/(K-1) sum_{l != k} KL(p_l || p_k), the peers' predictions taken as fixed targets; T=1
    as in the paper (the T^2 factor is then 1). Without labels only the mutual term is left.
    """
    if not peer_logits:
        raise ValueError("deep mutual learning needs at least one peer (K >= 2 networks)")
    t = float(temperature)
    log_p = F.log_softmax(own_logits.float() / t, dim=1)
    kls = [_kl_terms(F.log_softmax(peer.detach().float() / t, dim=1), log_p).sum(dim=1).mean()
           for peer in peer_logits]
    loss = torch.stack(kls).mean() * (t * t)
    if labels is not None:
        loss = loss + cross_entropy(own_logits, labels)
    return loss


def teacher_weights(n: int, weights: Sequence[float] | None = None) -> list[float]:
    """Normalised non-negative weights of n teachers (equal when `weights` is None)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} teacher weights given for {n} teachers: give one weight per teacher")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


@in_fp32
def ensemble_log_probs(teacher_logits: Sequence[Tensor], *, temperature: float = 4.0,
                       weights: Sequence[float] | None = None) -> Tensor:
    """log sum_i w_i softmax(t_i / T), computed as a logsumexp (exact for one teacher, safe for zero weights)."""
    if not teacher_logits:
        raise ValueError("the teacher ensemble needs at least one teacher's logits")
    w = torch.tensor(teacher_weights(len(teacher_logits), weights), device=teacher_logits[0].device)
    log_p = torch.stack([F.log_softmax(t.float() / float(temperature), dim=1) for t in teacher_logits])
    return torch.logsumexp(log_p + w.log().view(-1, 1, 1), dim=0)


@in_fp32
def ensemble_probs(teacher_logits: Sequence[Tensor], *, temperature: float = 4.0,
                   weights: Sequence[float] | None = None) -> Tensor:
    """sum_i w_i softmax(t_i / T): the weighted average of the teachers' softened distributions."""
    return ensemble_log_probs(teacher_logits, temperature=temperature, weights=weights).exp()


@in_fp32
def multi_teacher_kd(student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor | None = None, *,
                     temperature: float = 4.0, alpha: float = 0.9,
                     weights: Sequence[float] | None = None) -> Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(sum_i w_i softmax(t_i/T) || softmax(s/T)); KD alone without labels.

    The averaged-soft-target form of You et al., "Learning from Multiple Teacher Networks" (KDD 2017),
    with Hinton's T^2 scaling; equal weights by default, T=4 and alpha=0.9 as for single-teacher KD.
    """
    log_p_t = ensemble_log_probs(teacher_logits, temperature=temperature, weights=weights)
    soft = soft_kl(student_logits, log_p_t, temperature=temperature)
    if labels is None:
        return soft
    return (1.0 - alpha) * cross_entropy(student_logits, labels) + alpha * soft


@in_fp32
def js_divergence(logits_a: Tensor, logits_b: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence (nats) between softmax(a/T) and softmax(b/T), mean over the batch."""
    log_p = F.log_softmax(logits_a.float() / temperature, dim=1)
    log_q = F.log_softmax(logits_b.float() / temperature, dim=1)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((0.5 * (p + q)).clamp_min(1e-12))
    js = 0.5 * (p * (log_p - log_m)).sum(dim=1) + 0.5 * (q * (log_q - log_m)).sum(dim=1)
    return js.mean()


@in_fp32
def top1_agreement(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """Fraction of samples on which two classifiers predict the same class."""
    return (a_logits.argmax(1) == b_logits.argmax(1)).float().mean()
