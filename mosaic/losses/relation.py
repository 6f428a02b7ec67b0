"""Relation-based losses: transfer the pairwise distances and triplet angles of the teacher's embeddings (RKD).

Every function computes in float32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.precision import in_fp32


def _flat(embeddings: Tensor) -> Tensor:
    """(B, ...) -> (B, D) float embeddings."""
    if embeddings.dim() < 2 or embeddings.shape[0] < 2:
        raise ValueError(f"RKD needs a batch of at least 2 embeddings, got shape {tuple(embeddings.shape)}")
    return embeddings.float().flatten(1)


def _check_batch(student: Tensor, teacher: Tensor) -> None:
    """Student and teacher embeddings must describe the same samples (dimensions may differ)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"RKD: student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} "
                         f"hold different batch sizes; embed the same images with both networks")


@in_fp32
def normalized_distances(embeddings: Tensor) -> Tensor:
    """psi_D = ||e_i - e_j|| / mu with mu the mean distance over pairs i != j; shape (B, B), zero diagonal."""
    e = _flat(embeddings)
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    d = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    d = d * off
    mu = d[off].mean().clamp_min(1e-12)
    return d / mu


@in_fp32
def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean Huber (smooth L1, delta 1) loss between the students' and teacher's psi_D over pairs i != j."""
    _check_batch(student, teacher)
    with torch.no_grad():
        t = normalized_distances(teacher)
    s = normalized_distances(student)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(s[off], t[off], beta=1.0)


@in_fp32
def triplet_cosines(embeddings: Tensor) -> Tensor:
    """psi_A[i, j, k] = cos of the angle at e_j between e_i and e_k: <(e_i-e_j)/|.|, (e_k-e_j)/|.|>, shape (B, B, B)."""
    e = _flat(embeddings)
    u = F.normalize(e.unsqueeze(1) - e.unsqueeze(0), p=2, dim=2)  # u[j, i] = unit(e_i - e_j)
    return torch.einsum("jid,jkd->ijk", u, u)


@in_fp32
def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean Huber loss between student and teacher psi_A over triplets of distinct i, j, k (0 for B < 3)."""
    _check_batch(student, teacher)
    n = student.shape[0]
    if n < 3:
        return student.float().sum() * 0.0
    with torch.no_grad():
        t = triplet_cosines(teacher)
    s = triplet_cosines(student)
    idx = torch.arange(n, device=s.device)
    distinct = ((idx.view(-1, 1, 1) != idx.view(1, -1, 1)) & (idx.view(1, -1, 1) != idx.view(1, 1, -1))
                & (idx.view(-1, 1, 1) != idx.view(1, 1, -1)))
    return F.smooth_l1_loss(s[distinct], t[distinct], beta=1.0)


@in_fp32
def rkd_loss(student: Tensor, teacher: Tensor, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """distance_weight * RKD-D + angle_weight * RKD-A on (B, D_s) and (B, D_t) embeddings.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019): distances normalised by their
    mean, angles as cosines, both compared with the Huber loss; weights 25 (distance) and 50 (angle)
    are the paper's. Only relations are compared, so the embedding widths may differ.
    """
    return distance_weight * rkd_distance(student, teacher) + angle_weight * rkd_angle(student, teacher)
