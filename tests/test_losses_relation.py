"""Relation losses (mosaic/losses/relation.py): RKD distance and angle terms against plain loops."""
from __future__ import annotations

import math

import pytest
import torch

from hand import dist, dot, huber, tensor
from mosaic.losses import rkd_angle, rkd_distance, rkd_loss


def hand_rkd(s: list, t: list) -> tuple[float, float, float]:
    """Distance and angle terms by plain loops (pairs i != j, triplets of distinct i, j, k, angle at j),
    and the largest |psi_D(s) - psi_D(t)|."""
    n = len(s)

    def psi_d(e):
        d = {(i, j): dist(e[i], e[j]) for i in range(n) for j in range(n) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def psi_a(e):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        u = [a - b for a, b in zip(e[i], e[j])]
                        v = [a - b for a, b in zip(e[k], e[j])]
                        out[i, j, k] = dot(u, v) / (math.sqrt(dot(u, u)) * math.sqrt(dot(v, v)))
        return out

    ds, dt = psi_d(s), psi_d(t)
    as_, at = psi_a(s), psi_a(t)
    d_loss = sum(huber(ds[k] - dt[k]) for k in ds) / len(ds)
    a_loss = sum(huber(as_[k] - at[k]) for k in as_) / len(as_) if as_ else 0.0
    return d_loss, a_loss, max(abs(ds[k] - dt[k]) for k in ds)


def test_rkd_on_a_345_triangle():
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    mu_t = (2 + math.sqrt(2)) / 3
    d_want = (huber(3 / 4 - 1 / mu_t) + huber(1 - 1 / mu_t) + huber(5 / 4 - math.sqrt(2) / mu_t)) / 3
    # angles at vertices 0, 1, 2: cos 0 vs 0, 0.6 vs 1/sqrt2, 0.8 vs 1/sqrt2 (each vertex in 2 of 6 triplets)
    a_want = (huber(0.0) + huber(0.6 - 1 / math.sqrt(2)) + huber(0.8 - 1 / math.sqrt(2))) / 3
    assert rkd_distance(tensor(s), tensor(t)).item() == pytest.approx(d_want, rel=1e-6)
    assert rkd_angle(tensor(s), tensor(t)).item() == pytest.approx(a_want, rel=1e-6)
    assert rkd_loss(tensor(s), tensor(t)).item() == pytest.approx(25 * d_want + 50 * a_want, rel=1e-6)


def test_rkd_matches_loops_including_huber_linear_part():
    s = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [30.0, 0.0, -1.0]]  # an outlier: |psi_s - psi_t| > 1
    t = [[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 2.0]]                       # teacher embedding of another width
    d_want, a_want, largest = hand_rkd(s, t)
    assert largest > 1  # the outlier exercises the linear branch of the Huber loss
    assert rkd_distance(tensor(s), tensor(t)).item() == pytest.approx(d_want, rel=1e-6)
    assert rkd_angle(tensor(s), tensor(t)).item() == pytest.approx(a_want, rel=1e-6)


def test_rkd_zero_for_identical_embeddings_and_scale_invariant():
    e = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, 0.0], [-0.7, 0.2, 1.1], [0.0, 0.0, -0.5]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    assert rkd_loss(e, e).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_loss(e, 5.0 * e).item() == pytest.approx(0.0, abs=1e-7)   # relations ignore the teacher's scale
    assert rkd_distance(7.3 * e, t).item() == pytest.approx(rkd_distance(e, t).item(), rel=1e-5)
    assert rkd_angle(0.2 * e + 3.0, t).item() == pytest.approx(rkd_angle(e, t).item(), rel=1e-5)
    assert rkd_distance(e, t).item() > 0
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 2\)"):
        rkd_distance(e, t[:3])
