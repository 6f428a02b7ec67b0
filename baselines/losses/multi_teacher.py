"""Multi-teacher distillation: the student matches a (weighted) average of several teachers' soft outputs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.losses.hinton import soft_kl


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


def ensemble_log_probs(teacher_logits: Sequence[Tensor], *, temperature: float = 4.0,
                       weights: Sequence[float] | None = None) -> Tensor:
    """log sum_i w_i softmax(t_i / T), computed as a logsumexp (exact for one teacher, safe for zero weights)."""
    if not teacher_logits:
        raise ValueError("the teacher ensemble needs at least one teacher's logits")
    w = torch.tensor(teacher_weights(len(teacher_logits), weights), device=teacher_logits[0].device)
    log_p = torch.stack([F.log_softmax(t.float() / float(temperature), dim=1) for t in teacher_logits])
    return torch.logsumexp(log_p + w.log().view(-1, 1, 1), dim=0)


def ensemble_probs(teacher_logits: Sequence[Tensor], *, temperature: float = 4.0,
                   weights: Sequence[float] | None = None) -> Tensor:
    """sum_i w_i softmax(t_i / T): the weighted average of the teachers' softened distributions."""
    return ensemble_log_probs(teacher_logits, temperature=temperature, weights=weights).exp()


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
    return (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels) + alpha * soft
