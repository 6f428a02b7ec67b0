"""Shared losses against hand computations."""
import math

import pytest
import torch

from mosaic.losses import balance_loss, cross_entropy, entropy, kd_loss, patch_gan_loss, top1_agreement


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


def test_entropy():
    assert entropy(torch.zeros(3, 4)).item() == pytest.approx(math.log(4.0), abs=1e-6)
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy(torch.tensor([[math.log(3.0), 0.0]])).item() == pytest.approx(want, abs=1e-6)


def test_balance_loss_minimal_when_balanced():
    balanced = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    collapsed = torch.tensor([[50.0, 0.0], [50.0, 0.0]])
    assert balance_loss(balanced).item() == pytest.approx(-math.log(2.0), abs=1e-5)
    assert balance_loss(collapsed).item() == pytest.approx(0.0, abs=1e-5)
    # pbar = (0.625, 0.375) for softmax rows (3/4, 1/4) and (1/2, 1/2)
    mixed = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    want = 0.625 * math.log(0.625) + 0.375 * math.log(0.375)
    assert balance_loss(mixed).item() == pytest.approx(want, abs=1e-6)


def test_patch_gan_loss():
    x = torch.tensor([[[[0.0, 2.0]]]])
    real = (math.log(2.0) + math.log(1 + math.exp(-2.0))) / 2
    fake = (math.log(2.0) + math.log(1 + math.exp(2.0))) / 2
    assert patch_gan_loss(x, real=True).item() == pytest.approx(real, abs=1e-6)
    assert patch_gan_loss(x, real=False).item() == pytest.approx(fake, abs=1e-6)
    # "sum": each sample's map summed, then the mean over samples
    two = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 0.0]]]])
    want = ((math.log(2.0) + math.log(1 + math.exp(-2.0))) + 2 * math.log(2.0)) / 2
    assert patch_gan_loss(two, real=True, reduction="sum").item() == pytest.approx(want, abs=1e-6)


def test_cross_entropy_and_agreement():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    want = 0.5 * (-math.log(0.75) - math.log(0.5))
    assert cross_entropy(logits, labels).item() == pytest.approx(want, abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert top1_agreement(a, b).item() == pytest.approx(2 / 3)
