"""Attention transfer: match the normalised spatial attention maps of student and teacher layers."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_map(features: Tensor, *, p: float = 2.0) -> Tensor:
    """Q = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2: the L2-normalised spatial attention, shape (B, H*W)."""
    if features.dim() != 4:
        raise ValueError(f"attention maps need (B, C, H, W) feature maps, got shape {tuple(features.shape)}")
    a = features.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1)


def at_pair_loss(student: Tensor, teacher: Tensor, *, p: float = 2.0) -> Tensor:
    """mean over batch and positions of (Q_s - Q_t)^2 for one layer pair (channel counts may differ)."""
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention transfer: student shape {tuple(student.shape)} and teacher shape "
                         f"{tuple(teacher.shape)} must share batch and spatial size (H, W); "
                         f"pair layers of the same resolution")
    return (attention_map(student, p=p) - attention_map(teacher, p=p)).pow(2).mean()


def attention_transfer(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *,
                       p: float = 2.0, beta: float = 1000.0) -> Tensor:
    """beta/2 * sum over layer pairs of mean (Q_s - Q_t)^2.

    Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017): activation-based attention
    with p=2 and beta=1000 (their CIFAR setting; the mean over batch and positions stands in for their
    division of beta by the attention-map size and batch size). Defaults follow the paper.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"attention transfer needs equally many (>= 1) student and teacher maps, "
                         f"got {len(student_feats)} and {len(teacher_feats)}")
    total = torch.zeros((), device=student_feats[0].device)
    for s, t in zip(student_feats, teacher_feats):
        total = total + at_pair_loss(s, t, p=p)
    return 0.5 * beta * total
