"""Feature losses (mosaic/losses/feature.py) against hand computations: FitNets, AT, NST and MKD's value / direction."""
from __future__ import annotations

import math

import pytest
import torch

from hand import approx, dist, dot, tensor
from mosaic.losses import (at_pair_loss, attention_map, attention_transfer, check_same_shape, direction_loss,
                           hint_loss, mkd_loss, mmd2, nst_loss, value_loss)


# ----------------------------------------------------------------------------- FitNets


def test_hint_loss_matches_hand_computation_and_rejects_other_shapes():
    a = [[[[1.0, 2.0]], [[0.0, -1.0]]]]          # (1, 2, 1, 2)
    b = [[[[0.5, 2.0]], [[1.0, 1.0]]]]
    want = ((1 - 0.5) ** 2 + 0 + (0 - 1) ** 2 + (-1 - 1) ** 2) / 4
    assert hint_loss(tensor(a), tensor(b)).item() == pytest.approx(want)
    assert hint_loss(tensor(a), tensor(a)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 2\).*\(1, 3, 1, 2\)"):
        hint_loss(tensor(a), torch.zeros(1, 3, 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        check_same_shape(torch.zeros(2, 3), torch.zeros(2, 4), what="x")


# ----------------------------------------------------------------------------- attention transfer

FA = [[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, -1.0]]]]    # (1, 2, 2, 2)
FB = [[[[0.0, 1.0], [2.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]], [[2.0, 0.0], [1.0, 0.0]]]]  # (1, 3, 2, 2)
FC = [[[[1.0, 2.0]], [[3.0, 0.0]]]]  # (1, 2, 1, 2)
# FC's channel-mean of squares: ((1 + 9) / 2, (4 + 0) / 2) = (5, 2); normalised by sqrt(29)
QC = [5 / math.sqrt(29), 2 / math.sqrt(29)]


def hand_attention(f: list) -> list[float]:
    """Mean over channels of squared activations at each position (row-major), L2-normalised."""
    chans = f[0]
    a = [sum(c[i][j] ** 2 for c in chans) / len(chans) for i in range(2) for j in range(2)]
    norm = math.sqrt(sum(v * v for v in a))
    return [v / norm for v in a]


def test_attention_map_is_normalised_mean_of_squares():
    qa = hand_attention(FA)  # positions: (1+9)/2, (4+0)/2, (0+1)/2, (1+1)/2 = 5, 2, 0.5, 1
    assert qa[0] == pytest.approx(5 / math.sqrt(25 + 4 + 0.25 + 1))
    got = attention_map(tensor(FA))
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx(qa)
    assert got.norm(dim=1).item() == pytest.approx(1.0)
    assert attention_map(3.7 * tensor(FA))[0].tolist() == pytest.approx(qa)  # scale of the activations drops out
    assert attention_map(torch.tensor(FC)).flatten().tolist() == [approx(QC[0]), approx(QC[1])]


def test_attention_transfer_matches_hand_computation_over_pairs():
    qa, qb = hand_attention(FA), hand_attention(FB)
    pair = sum((x - y) ** 2 for x, y in zip(qa, qb)) / 4  # mean over batch (1) and positions (4)
    assert at_pair_loss(tensor(FA), tensor(FB)).item() == pytest.approx(pair)
    two = attention_transfer([tensor(FA), tensor(FB)], [tensor(FB), tensor(FB)], beta=1000.0)
    assert two.item() == pytest.approx(1000.0 / 2 * (pair + 0.0))
    assert attention_transfer([tensor(FA)], [tensor(FA)]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2\).*\(1, 2, 4, 4\)"):
        at_pair_loss(tensor(FA), torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    # FC against a uniform map (ZSKT's attention term): attention (1, 1) / sqrt(2)
    f, g = torch.tensor(FC), torch.ones(1, 3, 1, 2)
    b = 1 / math.sqrt(2)
    assert at_pair_loss(f, g).item() == approx(((QC[0] - b) ** 2 + (QC[1] - b) ** 2) / 2)
    with pytest.raises(ValueError, match="equal spatial size"):
        at_pair_loss(f, torch.ones(1, 3, 2, 2))


# ----------------------------------------------------------------------------- NST

NS = [[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 1.0]]]]                          # (1, 2, 1, 3): 2 channels of 3 positions
NT = [[[[1.0, 1.0, 0.0]], [[2.0, 0.0, 0.0]], [[0.0, 3.0, 4.0]]]]        # (1, 3, 1, 3)


def unit_channels(f: list) -> list[list[float]]:
    out = []
    for c in f[0]:
        v = c[0]
        n = math.sqrt(sum(x * x for x in v))
        out.append([x / n for x in v])
    return out


def hand_mmd(s: list, t: list, k) -> float:
    S_, T2 = unit_channels(s), unit_channels(t)
    tt = sum(k(a, b) for a in T2 for b in T2) / len(T2) ** 2
    ss = sum(k(a, b) for a in S_ for b in S_) / len(S_) ** 2
    st = sum(k(a, b) for a in S_ for b in T2) / (len(S_) * len(T2))
    return tt + ss - 2 * st


def test_nst_kernels_match_hand_computation():
    linear = hand_mmd(NS, NT, dot)
    poly = hand_mmd(NS, NT, lambda a, b: dot(a, b) ** 2)
    gauss = hand_mmd(NS, NT, lambda a, b: math.exp(-dist(a, b) ** 2 / (2 * 0.5)))
    assert mmd2(tensor(NS), tensor(NT), kernel="linear").item() == pytest.approx(linear, rel=1e-6)
    assert mmd2(tensor(NS), tensor(NT), kernel="poly").item() == pytest.approx(poly, rel=1e-6)
    assert mmd2(tensor(NS), tensor(NT), kernel="gaussian", sigma2=0.5).item() == pytest.approx(gauss, rel=1e-6)
    # default sigma^2: mean squared distance over all pairs of the pooled channel vectors
    pool = unit_channels(NS) + unit_channels(NT)
    s2 = sum(dist(a, b) ** 2 for a in pool for b in pool) / len(pool) ** 2
    gauss_auto = hand_mmd(NS, NT, lambda a, b: math.exp(-dist(a, b) ** 2 / (2 * s2)))
    assert mmd2(tensor(NS), tensor(NT), kernel="gaussian").item() == pytest.approx(gauss_auto, rel=1e-6)
    # the linear-kernel MMD is the squared distance between the mean channel vectors
    ms = [sum(c) / 2 for c in zip(*unit_channels(NS))]
    mt = [sum(c) / 3 for c in zip(*unit_channels(NT))]
    assert linear == pytest.approx(dist(ms, mt) ** 2)
    assert len({round(linear, 6), round(poly, 6), round(gauss, 6)}) == 3  # the kernels really differ


def test_nst_loss_weight_batch_mean_and_identity():
    two = torch.cat([tensor(NS), tensor(NS) * 2.0])  # scaling a sample does not change its normalised channels
    poly = hand_mmd(NS, NT, lambda a, b: dot(a, b) ** 2)
    got = nst_loss(two, torch.cat([tensor(NT), tensor(NT)]), kernel="poly", weight=50.0)
    assert got.item() == pytest.approx(50.0 / 2 * poly, rel=1e-6)
    for kernel in ("linear", "poly", "gaussian"):
        assert mmd2(tensor(NT), tensor(NT), kernel=kernel).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown NST kernel 'rbf'"):
        mmd2(tensor(NS), tensor(NT), kernel="rbf")
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 3\).*\(1, 3, 1, 4\)"):
        mmd2(tensor(NS), torch.zeros(1, 3, 1, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- MKD value and direction (anomaly detection)


def _toy_features():
    """Two images, two layers: a (2, 2) map and a (2, 1, 1, 2) map."""
    source = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[[[3.0, 4.0]]], [[[1.0, 0.0]]]])]
    cloner = [torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[[[3.0, 4.0]]], [[[0.0, 1.0]]]])]
    return source, cloner


def test_value_loss_matches_hand_computation():
    source, cloner = _toy_features()
    # image 0: layer 1 ((0)^2 + (-1)^2) / 2 = 0.5, layer 2 identical = 0; image 1: (0 + 1) / 2 + (1 + 1) / 2 = 1.5
    assert torch.allclose(value_loss(source, cloner), torch.tensor([0.5, 1.5]))


def test_direction_loss_matches_hand_computation():
    source, cloner = _toy_features()
    # image 0: cos([1,0],[1,1]) = 1/sqrt2, cos([3,4],[3,4]) = 1; image 1: cos([0,2],[0,1]) = 1, cos([1,0],[0,1]) = 0
    expected = torch.tensor([1 - 1 / math.sqrt(2), 1.0])
    assert torch.allclose(direction_loss(source, cloner), expected)
    total = mkd_loss(source, cloner, lambda_dir=0.5)
    assert torch.allclose(total, torch.tensor([0.5, 1.5]) + 0.5 * expected)
    assert torch.allclose(mkd_loss(source, cloner), torch.tensor([0.5, 1.5]) + 0.01 * expected)  # paper default


def test_mkd_losses_reject_mismatched_features():
    source, cloner = _toy_features()
    with pytest.raises(ValueError, match="critical layer 1"):
        value_loss(source, [cloner[0], cloner[1][:, :, :, :1]])
    with pytest.raises(ValueError, match="one cloner feature per source feature"):
        direction_loss(source, cloner[:1])
