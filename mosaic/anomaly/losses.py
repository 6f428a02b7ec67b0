"""MKD losses (Salehi et al., CVPR 2021): value and direction discrepancies between source and cloner features.

All functions take lists of feature maps, one per critical layer, shaped (N, ...), and return one loss
per image, shaped (N,), computed in float32. Training averages it over the batch; at test time it is
the anomaly score.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["value_loss", "direction_loss", "mkd_loss"]


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


def value_loss(source: Sequence[Tensor], cloner: Sequence[Tensor]) -> Tensor:
    """Per-image sum over layers of the mean squared difference of the activations (the paper's L_val)."""
    return torch.stack([(s - c).pow(2).mean(1) for s, c in _pairs(source, cloner)]).sum(0)


def direction_loss(source: Sequence[Tensor], cloner: Sequence[Tensor], *, eps: float = 1e-8) -> Tensor:
    """Per-image sum over layers of 1 - cosine similarity of the flattened activations (the paper's L_dir)."""
    terms = [1 - torch.nn.functional.cosine_similarity(s, c, dim=1, eps=eps) for s, c in _pairs(source, cloner)]
    return torch.stack(terms).sum(0)


def mkd_loss(source: Sequence[Tensor], cloner: Sequence[Tensor], *, lambda_dir: float = 0.01) -> Tensor:
    """Per-image total loss L_val + lambda_dir * L_dir (lambda_dir=0.01 is the paper's default)."""
    return value_loss(source, cloner) + lambda_dir * direction_loss(source, cloner)
