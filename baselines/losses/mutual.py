"""Deep mutual learning: every peer learns the labels and the other peers' predictions."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    kls = []
    for peer in peer_logits:
        log_q = F.log_softmax(peer.detach().float() / t, dim=1)
        kls.append((log_q.exp() * (log_q - log_p)).sum(dim=1).mean())
    loss = torch.stack(kls).mean() * (t * t)
    if labels is not None:
        loss = loss + F.cross_entropy(own_logits.float(), labels)
    return loss
