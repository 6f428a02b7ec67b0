"""Data-free losses (mosaic/losses/datafree.py) by hand: DAFL's priors, competition, BN statistics, image priors."""
from __future__ import annotations

import math

import torch

from hand import approx, dot, kl, softmax, tensor
from mosaic.losses import (activation_loss, batch_stats, bn_stat_distance, bn_stat_loss, clamped_js_competition,
                           competition_loss, image_l2, onehot_loss, total_variation_l1, total_variation_l2)


# ----------------------------------------------------------------------------- teacher-side priors (DAFL, DFQ)


def test_onehot_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    row1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    row2 = -math.log(math.exp(3) / (1 + math.exp(3) + math.exp(1)))
    assert onehot_loss(logits).item() == approx((row1 + row2) / 2)


def test_activation_loss():
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, -4.0]])).item() == approx(-2.5)


# ----------------------------------------------------------------------------- competition (DeepInversion)


def test_competition_loss_is_one_minus_js():
    a, b = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    p, q, m = (0.75, 0.25), (0.5, 0.5), (0.625, 0.375)
    js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
    assert competition_loss(b, a, temperature=1.0).item() == approx(1 - js)
    assert competition_loss(a, a).item() == approx(1.0)


def test_clamped_js_competition_is_minus_fast_datafrees_jsdiv():
    # no probability clamped: minus (KL(M || P) + KL(M || Q)) / 2, M first (F.kl_div(log P, M))
    s, t = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    p, q, m = [0.75, 0.25], [0.5, 0.5], [0.625, 0.375]
    assert clamped_js_competition(s, t, temperature=1.0).item() == approx(-(kl(m, p) + kl(m, q)) / 2)
    # the student's 0.99995 / 0.00005 clamps to 0.99 / 0.01 after M is formed from the raw probabilities
    s2 = torch.tensor([[10.0, 0.0]])
    p_raw = softmax([10.0, 0.0])
    m2 = [(a + b) / 2 for a, b in zip(p_raw, q)]
    p2 = [min(max(v, 0.01), 0.99) for v in p_raw]
    expected = -(kl(m2, p2) + kl(m2, q)) / 2
    assert clamped_js_competition(s2, t, temperature=1.0).item() == approx(expected)
    # batch mean over the two rows, temperature divides the logits
    both = clamped_js_competition(torch.cat([s * 3, s2 * 3]), torch.cat([t, t]), temperature=3.0).item()
    assert both == approx((-(kl(m, p) + kl(m, q)) / 2 + expected) / 2)
    # a clamped student probability passes no gradient through log P, only through M
    s2.requires_grad_(True)
    clamped_js_competition(s2, t, temperature=1.0).backward()
    dm = [0.5 * (math.log(mi / pi) + 1) + 0.5 * (math.log(mi / qi) + 1) for mi, pi, qi in zip(m2, p2, q)]
    dp = [0.5 * v for v in dm]  # dM / dP = 1/2; then through the softmax
    grad0 = p_raw[0] * (dp[0] - sum(pi * gi for pi, gi in zip(p_raw, dp)))
    assert s2.grad[0, 0].item() == approx(-grad0)


# ----------------------------------------------------------------------------- BatchNorm statistics (DFQ, DeepInversion)


def test_batch_stats_and_bn_distance():
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # (2, 1, 1, 2): mean 4, biased var (9+1+1+9)/4 = 5
    mean, var = batch_stats(x)
    assert mean.tolist() == [approx(4.0)] and var.tolist() == [approx(5.0)]
    assert bn_stat_distance(mean, var, torch.zeros(1), torch.ones(1)).item() == approx(4 + 4)
    # two channels: L2 norms over the channel vector, ||(3, 4)|| + ||(0, 0)||
    d = bn_stat_distance(torch.tensor([3.0, 4.0]), torch.ones(2), torch.zeros(2), torch.ones(2))
    assert d.item() == approx(5.0)
    assert bn_stat_loss([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)], first_multiplier=10).item() == approx(15)


# ----------------------------------------------------------------------------- image priors (DeepInversion)


def test_image_priors():
    x = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])  # (1, 1, 2, 2)
    # right: (-1, -4); down: (-3, -6); diagonals: 4 - 2 = 2 and 1 - 8 = -7
    assert total_variation_l2(x).item() == approx(math.sqrt(17) + math.sqrt(45) + 2 + 7)
    assert total_variation_l1(x).item() == approx(2.5 + 4.5 + 2 + 7)
    y = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])
    assert image_l2(y).item() == approx((5 + 0) / 2)
    assert total_variation_l2(torch.full((2, 3, 4, 4), 0.7)).item() == 0


# ----------------------------------------------------------------------------- CMI / Fast


def test_instance_contrastive_loss_by_hand():
    from mosaic.losses import instance_contrastive_loss

    local = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    glob = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    T = 0.5

    def row_loss(i):
        logits = [dot(local[i], g) / T for g in glob]
        return -math.log(math.exp(logits[i]) / sum(math.exp(v) for v in logits))

    rows = [row_loss(i) for i in range(3)]
    loc, glo = tensor(local).requires_grad_(True), tensor(glob).requires_grad_(True)
    # two current images + one bank row: mean over the batch rows + mean over the bank rows
    got = instance_contrastive_loss(loc, glo, temperature=T, batch=2)
    assert got.item() == approx((rows[0] + rows[1]) / 2 + rows[2])
    # no bank rows: the plain mean
    assert instance_contrastive_loss(loc, glo, temperature=T, batch=3).item() == approx(sum(rows) / 3)
    got.backward()
    assert loc.grad.abs().sum() > 0 and glo.grad is None  # the global views are the detached keys


def test_masked_adversarial_kl_by_hand():
    from mosaic.losses import masked_adversarial_kl

    s = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.2]]
    t = [[1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]  # rows 0 and 2 agree on the argmax, row 1 does not
    kls = [kl(softmax(ti), softmax(si)) for si, ti in zip(s, t)]
    assert masked_adversarial_kl(tensor(s), tensor(t)).item() == approx(-(kls[0] + kls[2]) / 3)
    assert masked_adversarial_kl(tensor(t), tensor(t)).item() == approx(0.0)
