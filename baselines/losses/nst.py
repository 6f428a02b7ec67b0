"""Neuron selectivity transfer: MMD^2 between the distributions of student and teacher channel maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("linear", "poly", "gaussian")


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
    raise ValueError(f"unknown NST kernel '{kernel}': choose one of {', '.join(KERNELS)}")


def mmd2(student: Tensor, teacher: Tensor, *, kernel: str = "poly", sigma2: float | None = None) -> Tensor:
    """Per-sample MMD^2 between student and teacher channel vectors, shape (B,).

    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i) over the
    L2-normalised channel maps. Kernels: linear x.y, polynomial (x.y + c)^d with d=2, c=0, and Gaussian
    exp(-||x-y||^2 / (2 sigma^2)) with sigma^2 the mean squared distance over all ordered pairs of the
    pooled student+teacher vectors (Huang & Wang; self-pairs included, held constant for the gradient)
    unless `sigma2` is given. Channel counts may differ; the spatial size may not.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown NST kernel '{kernel}': choose one of {', '.join(KERNELS)}")
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


def nst_loss(student: Tensor, teacher: Tensor, *, kernel: str = "poly", weight: float = 50.0,
             sigma2: float | None = None) -> Tensor:
    """weight/2 * batch mean of MMD^2 (Huang & Wang, "Like What You Like", 2017: lambda=50 with the poly kernel).

    The paper's loss is H(y, p_S) + lambda/2 * L_MMD^2; lambda=50 is its setting for the polynomial
    kernel, the kernel it recommends, so both are our defaults.
    """
    return 0.5 * weight * mmd2(student, teacher, kernel=kernel, sigma2=sigma2).mean()
