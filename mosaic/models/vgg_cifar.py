"""CIFAR VGG with BatchNorm: five conv stages, 2x2 max-pools between them, global average pool, one linear layer."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from timm.models import generate_default_cfgs

from ._base import CifarNet, build_cifar, check_input, cifar_cfg, conv_stage, register_cifar

__all__ = ["VGGCifar", "VGG_CFGS"]

# conv widths of the five stages (Simonyan & Zisserman configs A/B/D/E)
VGG_CFGS: Dict[str, Sequence[Sequence[int]]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGGCifar(CifarNet):
    """VGG-BN for small images: stages layer1..layer5, a max-pool opening layers 2-5 (32x32 -> 2x2), avg-pool, linear.

    The fifth max-pool of ImageNet VGG and its 4096-wide MLP are replaced by global average pooling and a
    single linear layer (num_features -> num_classes), the usual CIFAR variant.
    """

    num_feature_levels = 5

    def __init__(self, cfg: Sequence[Sequence[int]], *, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGGCifar needs conv widths for 5 stages; got {len(cfg)}")
        self.in_chans = in_chans
        self.feature_info: List[Dict[str, Any]] = []
        in_chs, reduction = in_chans, 1
        for i, widths in enumerate(cfg):
            if i > 0:
                reduction *= 2
            self.add_module(f"layer{i + 1}", conv_stage(in_chs, widths, pool=i > 0))
            in_chs = widths[-1]
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{i + 1}"))
        self._init_head(in_chs, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, type(self).__name__)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.layer5(x)


default_cfgs = generate_default_cfgs({"vgg11_bn_cifar": cifar_cfg(first_conv="layer1.0.conv")})


@register_cifar
def vgg11_bn_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """VGG-11 with BatchNorm for 32x32 images: 9.23M params at 10 classes."""
    return build_cifar(VGGCifar, "vgg11_bn_cifar", pretrained, cfg=VGG_CFGS["vgg11"], **kwargs)
