"""Hinton knowledge distillation: soft targets at temperature T, optionally mixed with hard labels."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, teacher_log_probs: Tensor, *, temperature: float = 4.0) -> Tensor:
    """T^2 * KL(p_t || softmax(s/T)) given the teacher's log-probabilities (already at temperature T), batch mean."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = teacher_log_probs.float()
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
              temperature: float = 4.0, alpha: float = 0.9) -> Tensor:
    """Hinton KD: (1 - alpha) * CE(s, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015). The T^2 factor keeps
    the soft-target gradients at the scale of the hard-label ones when T changes. Without labels
    (`labels=None`: OOD or synthetic images) it is the label-free variant, T^2 * KL alone, whatever
    alpha is. Defaults T=4, alpha=0.9 are the usual CIFAR setting (the paper tries T in 2..20 and gives
    the soft term most of the weight; the CRD benchmark of Tian et al. 2020 uses exactly these).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the weight of the soft term and must lie in [0, 1], got {alpha}")
    log_p_t = F.log_softmax(teacher_logits.float() / float(temperature), dim=1)
    soft = soft_kl(student_logits, log_p_t, temperature=temperature)
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - alpha) * hard + alpha * soft


def logit_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None, *,
               temperature: float, alpha: float) -> Tensor:
    """The logit part shared by the feature methods: CE when alpha=0, Hinton KD otherwise, KD alone without labels."""
    if labels is None:
        if teacher_logits is None:
            raise ValueError("without labels the logit loss needs teacher logits")
        return hinton_kd(student_logits, teacher_logits, None, temperature=temperature)
    if alpha == 0.0 or teacher_logits is None:
        return F.cross_entropy(student_logits.float(), labels)
    return hinton_kd(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
