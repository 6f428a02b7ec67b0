"""Generator label-space losses (mosaic/losses/generator.py) by hand: entropy and class balance in any log base."""
from __future__ import annotations

import math

import pytest
import torch

from hand import approx
from mosaic.losses import balance_loss, entropy


def test_entropy():
    assert entropy(torch.zeros(3, 4)).item() == pytest.approx(math.log(4.0), abs=1e-6)
    want = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy(torch.tensor([[math.log(3.0), 0.0]])).item() == pytest.approx(want, abs=1e-6)


def test_balance_loss_minimal_when_balanced_in_every_base():
    balanced = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    collapsed = torch.tensor([[50.0, 0.0], [50.0, 0.0]])
    assert balance_loss(balanced).item() == pytest.approx(-math.log(2.0), abs=1e-5)
    assert balance_loss(collapsed).item() == pytest.approx(0.0, abs=1e-5)
    # pbar = (0.625, 0.375) for softmax rows (3/4, 1/4) and (1/2, 1/2)
    mixed = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    want = 0.625 * math.log(0.625) + 0.375 * math.log(0.375)
    assert balance_loss(mixed).item() == pytest.approx(want, abs=1e-6)
    # DAFL's information entropy: the same term in log base 10
    want10 = 5 / 8 * math.log10(5 / 8) + 3 / 8 * math.log10(3 / 8)
    assert balance_loss(mixed, base=10.0).item() == approx(want10)
    assert balance_loss(torch.zeros(4, 3), base=10.0).item() == approx(-math.log10(3))
    assert balance_loss(mixed, base=math.e).item() == approx(want10 * math.log(10))
    # MosaicKD's: log base 2, minimal (-1 bit) for two balanced classes
    assert balance_loss(mixed, base=2.0).item() == approx(0.625 * math.log2(0.625) + 0.375 * math.log2(0.375))
    assert balance_loss(balanced, base=2.0).item() == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ValueError, match="base must be positive and not 1"):
        balance_loss(mixed, base=1.0)
