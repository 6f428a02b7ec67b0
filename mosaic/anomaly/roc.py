"""ROC-AUC in torch (no scikit-learn): the Mann-Whitney statistic with average ranks for ties."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_ranks", "roc_auc"]


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor in ascending order, tied values sharing the mean of their ranks (float64)."""
    unique, inverse, counts = torch.unique(values.flatten(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)  # rank of the last member of each tie group
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    return mean_rank[inverse]


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive, here: anomalous).

    Equals the trapezoidal area, so a tie between a positive and a negative counts one half.
    Raises ValueError when the shapes differ or when one of the two classes is absent.
    """
    scores, labels = torch.as_tensor(scores).flatten(), torch.as_tensor(labels).flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_auc needs one label per score, got {scores.numel()} scores and {labels.numel()} labels")
    positive = labels.to(torch.bool)
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    rank_sum = average_ranks(scores.to(torch.float64))[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
