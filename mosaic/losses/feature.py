"""Feature-based losses: compare intermediate feature maps of a student (or cloner) with a teacher's.

FitNets hints, attention transfer (AT, also ZSKT's attention term), neuron selectivity transfer
(NST, an MMD between channel maps) and MKD's value / direction losses for anomaly detection.
Every function computes in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.precision import in_fp32


# ----------------------------------------------------------------------------- FitNets

def check_same_shape(student: Tensor, teacher: Tensor, *, what: str) -> None:
    """Raise a ValueError naming both shapes when a student and a teacher tensor differ in shape."""
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} does not match teacher shape "
                         f"{tuple(teacher.shape)}; map the student layer with an adapter (1x1 conv / linear) "
                         f"or choose layers of the same size")


@in_fp32
def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error between the regressor's output on the student layer and the teacher's hint layer.

    Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015): L_HT = 1/2 ||u_h(x) - r(v_g(x))||^2.
    We average over all elements instead of summing (so the weight does not depend on the map size)
    and drop the 1/2; the method multiplies by `weight`, default 100 as in the single-stage FitNets of
    the CRD benchmark (Tian et al. 2020), since the paper's two-stage schedule has no single weight.
    """
    check_same_shape(regressed, hint, what="FitNets hint")
    return (regressed.float() - hint.float()).pow(2).mean()


# ----------------------------------------------------------------------------- attention transfer

@in_fp32
def attention_map(features: Tensor, *, p: float = 2.0) -> Tensor:
    """Q = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2: the L2-normalised spatial attention, shape (B, H*W)."""
    if features.dim() != 4:
        raise ValueError(f"attention maps need (B, C, H, W) feature maps, got shape {tuple(features.shape)}")
    a = features.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1)


@in_fp32
def at_pair_loss(student: Tensor, teacher: Tensor, *, p: float = 2.0) -> Tensor:
    """mean over batch and positions of (Q_s - Q_t)^2 for one layer pair (channel counts may differ)."""
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention transfer needs equal spatial size (H, W) and batch, got student shape "
                         f"{tuple(student.shape)} and teacher shape {tuple(teacher.shape)}: pair layers of "
                         f"the same resolution (at.student_layers / zskt.at_layers)")
    return (attention_map(student, p=p) - attention_map(teacher, p=p)).pow(2).mean()


@in_fp32
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


# ----------------------------------------------------------------------------- neuron selectivity transfer

NST_KERNELS = ("linear", "poly", "gaussian")


@in_fp32
def channel_vectors(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H*W) with every channel's spatial map L2-normalised (one sample per channel)."""
    if features.dim() != 4:
        raise ValueError(f"NST needs (B, C, H, W) feature maps, got shape {tuple(features.shape)}")
    return F.normalize(features.float().flatten(2), p=2, dim=2)


def _kernel(a: Tensor, b: Tensor, *, kernel: str, sigma2: Tensor | None) -> Tensor:
    """Gram matrix k(a_i, b_j) of two batches of vector sets, shape (B, Na, Nb)."""
    if kernel == "linear":
        return a @ b.transpose(1, 2)
    if kernel == "poly":
        return (a @ b.transpose(1, 2)).pow(2)  # degree d=2, offset c=0
    if kernel == "gaussian":
        d2 = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(1) - 2 * a @ b.transpose(1, 2))
        return torch.exp(-d2.clamp_min(0) / (2 * sigma2))
    raise ValueError(f"unknown NST kernel '{kernel}': choose one of {', '.join(NST_KERNELS)}")


@in_fp32
def mmd2(student: Tensor, teacher: Tensor, *, kernel: str = "poly", sigma2: float | None = None) -> Tensor:
    """Per-sample MMD^2 between student and teacher channel vectors, shape (B,).

    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i) over the
    L2-normalised channel maps. Kernels: linear x.y, polynomial (x.y + c)^d with d=2, c=0, and Gaussian
    exp(-||x-y||^2 / (2 sigma^2)) with sigma^2 the mean squared distance over all ordered pairs of the
    pooled student+teacher vectors (Huang & Wang; self-pairs included, held constant for the gradient)
    unless `sigma2` is given. Channel counts may differ; the spatial size may not.
    """
    if kernel not in NST_KERNELS:
        raise ValueError(f"unknown NST kernel '{kernel}': choose one of {', '.join(NST_KERNELS)}")
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"NST: student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} "
                         f"must share batch and spatial size (H, W); pair layers of the same resolution")
    s, t = channel_vectors(student), channel_vectors(teacher)
    s2 = None
    if kernel == "gaussian":
        if sigma2 is None:
            both = torch.cat([s, t], dim=1)
            s2 = torch.cdist(both, both).pow(2).mean(dim=(1, 2), keepdim=True).detach().clamp_min(1e-12)
        else:
            s2 = torch.tensor(float(sigma2), device=s.device)
    k_tt = _kernel(t, t, kernel=kernel, sigma2=s2).mean(dim=(1, 2))
    k_ss = _kernel(s, s, kernel=kernel, sigma2=s2).mean(dim=(1, 2))
    k_st = _kernel(s, t, kernel=kernel, sigma2=s2).mean(dim=(1, 2))
    return k_tt + k_ss - 2 * k_st


@in_fp32
def nst_loss(student: Tensor, teacher: Tensor, *, kernel: str = "poly", weight: float = 50.0,
             sigma2: float | None = None) -> Tensor:
    """weight/2 * batch mean of MMD^2 (Huang & Wang, "Like What You Like", 2017: lambda=50 with the poly kernel).

    The paper's loss is H(y, p_S) + lambda/2 * L_MMD^2; lambda=50 is its setting for the polynomial
    kernel, the kernel it recommends, so both are our defaults.
    """
    return 0.5 * weight * mmd2(student, teacher, kernel=kernel, sigma2=sigma2).mean()


# ----------------------------------------------------------------------------- MKD (anomaly detection)
# Salehi et al., "Multiresolution Knowledge Distillation for Anomaly Detection" (CVPR 2021). These take
# lists of feature maps, one per critical layer, shaped (N, ...), and return one loss per image, shaped
# (N,): training averages it over the batch, at test time it is the anomaly score.

def _pairs(source: Sequence[Tensor], cloner: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Check that the two feature lists line up and return them as flattened float32 (N, D) pairs."""
    if len(source) != len(cloner) or not source:
        raise ValueError(f"need one cloner feature per source feature, got {len(source)} and {len(cloner)}")
    pairs = []
    for i, (s, c) in enumerate(zip(source, cloner)):
        if s.shape != c.shape:
            raise ValueError(f"critical layer {i}: source features {tuple(s.shape)} vs cloner {tuple(c.shape)}")
        pairs.append((s.float().flatten(1), c.float().flatten(1)))
    return pairs


@in_fp32
def value_loss(source: Sequence[Tensor], cloner: Sequence[Tensor]) -> Tensor:
    """Per-image sum over layers of the mean squared difference of the activations (the paper's L_val)."""
    return torch.stack([(s - c).pow(2).mean(1) for s, c in _pairs(source, cloner)]).sum(0)


@in_fp32
def direction_loss(source: Sequence[Tensor], cloner: Sequence[Tensor], *, eps: float = 1e-8) -> Tensor:
    """Per-image sum over layers of 1 - cosine similarity of the flattened activations (the paper's L_dir)."""
    terms = [1 - F.cosine_similarity(s, c, dim=1, eps=eps) for s, c in _pairs(source, cloner)]
    return torch.stack(terms).sum(0)


@in_fp32
def mkd_loss(source: Sequence[Tensor], cloner: Sequence[Tensor], *, lambda_dir: float = 0.01) -> Tensor:
    """Per-image total loss L_val + lambda_dir * L_dir (lambda_dir=0.01 is the paper's default)."""
    return value_loss(source, cloner) + lambda_dir * direction_loss(source, cloner)
