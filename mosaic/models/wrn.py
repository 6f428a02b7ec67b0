"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation blocks, depth 6n+4, widths 16, 16k, 32k, 64k."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn
from timm.models import generate_default_cfgs

from ._base import CifarNet, build_cifar, check_input, cifar_cfg, register_cifar
from .errors import ModelError

__all__ = ["PreActBlock", "WideResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice (dropout between) plus a shortcut; a 1x1 conv on the activated input when shapes change."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # as in the paper's code, a projection shortcut sees the pre-activated input, an identity one the raw input
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + shortcut


class WideResNet(CifarNet):
    """WRN-depth-k: 3x3 stem to 16 channels, three groups of n=(depth-4)/6 blocks, final BN-ReLU, avg-pool, linear."""

    num_feature_levels = 5

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        """`drop_rate` is the dropout probability between the two convs of every block (paper: 0.3; default 0)."""
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...); got {depth}")
        if not 0.0 <= drop_rate < 1.0:
            raise ModelError(f"drop_rate must be in [0, 1); got {drop_rate}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=widths[0], reduction=1, module="stem")]
        in_chs, reduction = widths[0], 1
        for i, width in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                PreActBlock(in_chs if j == 0 else width, width, stride=stride if j == 0 else 1, drop_rate=drop_rate)
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            # group outputs are pre-activation (no BN-ReLU yet), the usual tap point for feature distillation
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
            in_chs = width
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU()
        self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module="act"))
        self._init_head(in_chs, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, type(self).__name__)
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.act(self.norm(x))


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(first_conv="stem") for name in ("wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2")
})


@register_cifar
def wrn16_1(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-1: 0.175M params at 10 classes."""
    return build_cifar(WideResNet, "wrn16_1", pretrained, depth=16, widen_factor=1, **kwargs)


@register_cifar
def wrn16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2: 0.69M params at 10 classes."""
    return build_cifar(WideResNet, "wrn16_2", pretrained, depth=16, widen_factor=2, **kwargs)


@register_cifar
def wrn40_1(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-1: 0.56M params at 10 classes."""
    return build_cifar(WideResNet, "wrn40_1", pretrained, depth=40, widen_factor=1, **kwargs)


@register_cifar
def wrn40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2: 2.24M params at 10 classes."""
    return build_cifar(WideResNet, "wrn40_2", pretrained, depth=40, widen_factor=2, **kwargs)
