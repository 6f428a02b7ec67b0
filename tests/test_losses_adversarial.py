"""Adversarial losses (mosaic/losses/adversarial.py): MosaicKD's patch GAN and adversarial logit KD by hand."""
from __future__ import annotations

import math

import pytest
import torch

from hand import ce, tensor
from mosaic.losses import discriminator_loss, patch_gan_loss, student_adversarial_loss


# ----------------------------------------------------------------------------- patch GAN (MosaicKD)


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


# ----------------------------------------------------------------------------- adversarial logit KD


def test_adversarial_losses_match_hand_computation():
    dt = [[2.0, -1.0], [0.5, 0.5]]            # D's (real, fake) scores on teacher logits
    ds = [[0.0, 1.0], [1.5, -0.5]]            # ... on student logits
    real, fake = 0, 1
    d_want = sum(ce(r, real) for r in dt) / 2 + sum(ce(r, fake) for r in ds) / 2
    assert discriminator_loss(tensor(dt), tensor(ds)).item() == pytest.approx(d_want, rel=1e-6)
    s_want = sum(ce(r, real) for r in ds) / 2
    assert student_adversarial_loss(tensor(ds)).item() == pytest.approx(s_want, rel=1e-6)

    # class-conditioned D: C + 2 = 5 outputs (real, fake, 3 classes)
    dtc = [[2.0, -1.0, 0.0, 1.0, 0.5], [0.5, 0.5, 2.0, 0.0, 0.0]]
    dsc = [[0.0, 1.0, 1.0, 1.0, -1.0], [1.5, -0.5, 0.0, 0.0, 3.0]]
    labels = [1, 2]
    cls_t = sum(ce(r[2:], y) for r, y in zip(dtc, labels)) / 2
    cls_s = sum(ce(r[2:], y) for r, y in zip(dsc, labels)) / 2
    src = sum(ce(r[:2], real) for r in dtc) / 2 + sum(ce(r[:2], fake) for r in dsc) / 2
    got = discriminator_loss(tensor(dtc), tensor(dsc), torch.tensor(labels))
    assert got.item() == pytest.approx(src + cls_t + cls_s, rel=1e-6)
    got_s = student_adversarial_loss(tensor(dsc), torch.tensor(labels))
    assert got_s.item() == pytest.approx(sum(ce(r[:2], real) for r in dsc) / 2 + cls_s, rel=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        student_adversarial_loss(tensor(dsc))
