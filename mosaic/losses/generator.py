"""Label-space losses of a generator: the teacher's predictions on synthetic images should be confident and balanced.

MosaicKD's label-space alignment (entropy + class balance); the class-balance term is also DAFL's
information entropy (log base 10) and DFQ's balance prior (natural log). Both compute in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mosaic.precision import in_fp32


@in_fp32
def entropy(logits: Tensor) -> Tensor:
    """Mean per-sample entropy (nats) of softmax(logits): low when each prediction is confident."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


@in_fp32
def balance_loss(logits: Tensor, *, base: float | None = None) -> Tensor:
    """sum_c pbar_c log pbar_c of the batch-mean softmax pbar: minimal, -log C, when classes are balanced.

    base=None (default) keeps the natural log (DFQ); base=b divides by ln b, i.e. log base b:
    2 for MosaicKD, 10 for DAFL's information entropy L_ie (its official code uses log10, so its
    weight, 5 on CIFAR-10, refers to base 10).
    """
    p_bar = F.softmax(logits.float(), dim=1).mean(dim=0)
    total = (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()
    if base is None:
        return total
    if base <= 0 or base == 1:
        raise ValueError(f"balance_loss base must be positive and not 1 (e.g. 2, 10 or math.e), got {base}")
    return total / math.log(base)
