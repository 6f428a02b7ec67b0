"""Response losses (mosaic/losses/response.py) against hand computations: KD, CE, logit L1, DML, multi-teacher, JS."""
from __future__ import annotations

import math

import pytest
import torch

from hand import S, T_, Y, approx, ce, kl, softmax, tensor
from mosaic.losses import (cross_entropy, ensemble_probs, hinton_kd, js_divergence, kd_loss, logit_l1,
                           multi_teacher_kd, mutual_loss, top1_agreement)


# ----------------------------------------------------------------------------- Hinton KD divergence (kd_loss)


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t).item() == pytest.approx(want, abs=1e-6)


def test_kd_loss_temperature_includes_t_squared():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    a = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)  # softmax of t / 2
    want = 4.0 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(want, abs=1e-6)


def test_kd_loss_zero_for_identical_and_mean_over_batch():
    x = torch.randn(5, 7)
    assert kd_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert kd_loss(s, t).item() == pytest.approx(0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), abs=1e-6)


def test_kd_loss_mean_reduction_averages_over_classes_too_without_t_squared():
    """ZSKT's reading: the pointwise KL terms averaged over batch and classes."""
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    kl_ = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t, reduction="mean").item() == approx(kl_ / 2)
    a = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax of t / 2
    want = (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))) / 2
    assert kd_loss(s, t, temperature=2.0, reduction="mean").item() == approx(want)
    with pytest.raises(ValueError, match="batchmean, mean"):
        kd_loss(s, t, reduction="sum")


# ----------------------------------------------------------------------------- Hinton KD with labels


def test_hinton_kd_matches_hand_computation():
    T, alpha = 2.0, 0.7
    soft = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T_)) / 2
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want = (1 - alpha) * hard + alpha * T * T * soft
    got = hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_hinton_kd_t_squared_factor_and_label_free_variant():
    for T in (1.0, 3.0, 5.0):
        kl_mean = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T_)) / 2
        got = hinton_kd(tensor(S), tensor(T_), None, temperature=T, alpha=0.3)  # alpha ignored without labels
        assert got.item() == pytest.approx(T * T * kl_mean, rel=1e-6)
    # T=3: the loss is 9 x the plain KL, not the KL itself
    kl3 = sum(kl(softmax(t, 3.0), softmax(s, 3.0)) for s, t in zip(S, T_)) / 2
    assert hinton_kd(tensor(S), tensor(T_), temperature=3.0).item() / kl3 == pytest.approx(9.0, rel=1e-6)


def test_hinton_kd_zero_for_identical_logits_and_alpha_limits():
    assert hinton_kd(tensor(S), tensor(S), temperature=4.0).item() == pytest.approx(0.0, abs=1e-7)
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    assert hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), alpha=0.0).item() == pytest.approx(hard, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), alpha=1.5)


# ----------------------------------------------------------------------------- cross-entropy and agreement


def test_cross_entropy_and_agreement():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    want = 0.5 * (-math.log(0.75) - math.log(0.5))
    assert cross_entropy(logits, labels).item() == pytest.approx(want, abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert top1_agreement(a, b).item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- logit L1 (adversarial KD, DFAD)


def test_logit_l1_is_mean_absolute_difference():
    want = sum(abs(a - b) for rs, rt in zip(S, T_) for a, b in zip(rs, rt)) / 6
    assert logit_l1(tensor(S), tensor(T_)).item() == pytest.approx(want)
    assert logit_l1(tensor(S), tensor(S)).item() == 0.0
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 4.0], [3.0, 1.0]])
    assert logit_l1(s, t).item() == approx((1 + 2 + 0 + 3) / 4)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        logit_l1(tensor(S), torch.zeros(2, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- multi-teacher


def test_multi_teacher_weighted_average_matches_hand_computation():
    T2 = [[0.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]
    T, alpha, w = 2.0, 0.6, [0.25, 0.75]
    soft = 0.0
    for i in range(2):
        p1, p2 = softmax(T_[i], T), softmax(T2[i], T)
        p = [w[0] * a + w[1] * b for a, b in zip(p1, p2)]
        soft += kl(p, softmax(S[i], T)) / 2
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want = (1 - alpha) * hard + alpha * T * T * soft
    got = multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], torch.tensor(Y), temperature=T, alpha=alpha,
                           weights=[1.0, 3.0])  # normalised to 0.25 / 0.75
    assert got.item() == pytest.approx(want, rel=1e-6)
    equal = ensemble_probs([tensor(T_), tensor(T2)], temperature=1.0)
    assert equal[0, 1].item() == pytest.approx(0.5 * softmax(T_[0])[1] + 0.5 * softmax(T2[0])[1], rel=1e-6)
    only_second = multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], temperature=T, weights=[0.0, 2.0])
    kl2 = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T2)) / 2
    assert only_second.item() == pytest.approx(T * T * kl2, rel=1e-6)  # a zero weight drops a teacher
    with pytest.raises(ValueError, match="2 teachers"):
        multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], weights=[1.0])


# ----------------------------------------------------------------------------- deep mutual learning


def test_mutual_loss_matches_hand_computation_and_detaches_peers():
    P2 = [[0.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    want = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want += 0.5 * (sum(kl(softmax(t), softmax(s)) for s, t in zip(S, T_)) / 2
                   + sum(kl(softmax(p), softmax(s)) for s, p in zip(S, P2)) / 2)
    own = tensor(S).requires_grad_(True)
    peer = tensor(T_).requires_grad_(True)
    got = mutual_loss(own, [peer, tensor(P2)], torch.tensor(Y))
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert peer.grad is None  # peers are fixed targets
    assert mutual_loss(tensor(S), [tensor(S)]).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- Jensen-Shannon divergence


def test_js_divergence():
    a, b = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    p, q, m = (0.75, 0.25), (0.5, 0.5), (0.625, 0.375)
    js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
    assert js_divergence(a, b).item() == approx(js)
    assert js_divergence(b, a).item() == approx(js)
