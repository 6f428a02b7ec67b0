"""Generator output heads (mosaic/players/generator.py) against their formulas, worked out by hand per channel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mosaic.players import Generator

B, C, SIZE = 6, 3, 8


def outputs_and_last_conv(head: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny generator's train-mode output and the output of its last conv (the head's input) for one batch."""
    torch.manual_seed(0)
    g = Generator(nz=5, ngf=4, image_size=SIZE, channels=C, head=head, **kw).train()
    seen = {}
    last_conv = [m for m in g.body if isinstance(m, nn.Conv2d)][-1]
    last_conv.register_forward_hook(lambda mod, inp, out: seen.update(conv=out.detach().clone()))
    out = g(torch.randn(B, 5))
    return out.detach(), seen["conv"]


def hand_bn(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel batch normalisation with the biased batch variance, no scale or shift, in float64."""
    x = x.double()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_sigmoid_head_is_the_default_and_makes_pixels_in_unit_range():
    assert Generator(nz=5, ngf=4, image_size=SIZE).head == "sigmoid"
    out, conv = outputs_and_last_conv("sigmoid")
    assert 0 < out.min() and out.max() < 1
    assert torch.allclose(out.double(), 1 / (1 + torch.exp(-conv.double())), atol=1e-6)


@pytest.mark.parametrize("head,squash", [("tanh_bn", torch.tanh), ("bn", lambda x: x)])
def test_bn_heads_normalise_each_channel_over_the_batch(head, squash):
    out, conv = outputs_and_last_conv(head)
    assert torch.allclose(out.double(), hand_bn(squash(conv)), atol=1e-5)
    mean = out.double().mean(dim=(0, 2, 3))
    var = out.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(C, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(var, torch.ones(C, dtype=torch.float64), atol=1e-3)  # var / (var + 1e-5)
    assert out.abs().max() > 1  # not squashed into [-1, 1] or [0, 1]


def test_head_layers_follow_the_original_codes():
    tanh_bn = Generator(nz=5, ngf=4, image_size=SIZE, head="tanh_bn").body
    assert isinstance(tanh_bn[-2], nn.Tanh) and isinstance(tanh_bn[-1], nn.BatchNorm2d)
    assert not tanh_bn[-1].affine                      # DAFL / DFAD: BatchNorm2d(C, affine=False)
    bn = Generator(nz=5, ngf=4, image_size=SIZE, head="bn").body
    assert isinstance(bn[-2], nn.Conv2d) and isinstance(bn[-1], nn.BatchNorm2d) and bn[-1].affine  # ZSKT
    with pytest.raises(ValueError, match="unknown generator head 'relu'"):
        Generator(head="relu")


def test_bn_eps_applies_to_the_two_hidden_conv_batchnorms_only():
    def eps_of(g):
        return [m.eps for m in g.body if isinstance(m, nn.BatchNorm2d)]
    assert eps_of(Generator(nz=5, ngf=4, image_size=SIZE)) == [1e-5, 1e-5, 1e-5]
    # DAFL-train.py: BatchNorm2d(128) after the projection, BatchNorm2d(128, 0.8) and (64, 0.8) after the convs
    assert eps_of(Generator(nz=5, ngf=4, image_size=SIZE, head="tanh_bn", bn_eps=0.8)) == [1e-5, 0.8, 0.8, 1e-5]
    out, conv = outputs_and_last_conv("tanh_bn", bn_eps=0.8)
    assert torch.allclose(out.double(), hand_bn(torch.tanh(conv)), atol=1e-5)  # the output BN keeps eps 1e-5
    with pytest.raises(ValueError, match="bn_eps"):
        Generator(bn_eps=0)
