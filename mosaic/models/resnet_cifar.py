"""CIFAR ResNets (He et al. 2016, BasicBlock, widths 64-128-256-512) with a 3x3 stem and no max-pool."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import nn
from timm.models import generate_default_cfgs

from ._base import CifarNet, ConvBnAct, build_cifar, check_input, cifar_cfg, register_cifar

__all__ = ["BasicBlock", "ResNetCifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN projection when stride or width changes)."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class ResNetCifar(CifarNet):
    """ResNet for small images: 3x3 stride-1 stem, four BasicBlock stages (strides 1, 2, 2, 2), avg-pool, linear."""

    num_feature_levels = 5

    def __init__(
        self,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"ResNetCifar needs 4 stages; got layers={tuple(layers)} widths={tuple(widths)}")
        self.in_chans = in_chans
        self.stem = ConvBnAct(in_chans, widths[0])
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=widths[0], reduction=1, module="stem")]
        in_chs, reduction = widths[0], 1
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                BasicBlock(in_chs if j == 0 else width, width, stride=stride if j == 0 else 1) for j in range(depth)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
            in_chs = width
        self._init_head(in_chs, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, type(self).__name__)
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar": cifar_cfg(first_conv="stem.conv"),
    "resnet34_cifar": cifar_cfg(first_conv="stem.conv"),
})


@register_cifar
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 for 32x32 images (2-2-2-2 BasicBlocks), 11.17M params at 10 classes."""
    return build_cifar(ResNetCifar, "resnet18_cifar", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_cifar
def resnet34_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-34 for 32x32 images (3-4-6-3 BasicBlocks), 21.28M params at 10 classes."""
    return build_cifar(ResNetCifar, "resnet34_cifar", pretrained, layers=(3, 4, 6, 3), **kwargs)
