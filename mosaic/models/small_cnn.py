"""Small plain BN CNNs for CPU work: `cnn_tiny` (~24k params, for tests) and `cnn_small` (~0.59M, a demo teacher)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from timm.models import generate_default_cfgs

from ._base import CifarNet, build_cifar, check_input, cifar_cfg, conv_stage, register_cifar

__all__ = ["SmallCNN"]


class SmallCNN(CifarNet):
    """Plain CNN: a full-resolution `stem` of 3x3 ConvBnAct layers, then stages `layer1..` led by a 2x2 max-pool."""

    def __init__(
        self,
        stem_widths: Sequence[int],
        stage_widths: Sequence[Sequence[int]],
        *,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.stem = conv_stage(in_chans, stem_widths, pool=False)
        in_chs, reduction = stem_widths[-1], 1
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=in_chs, reduction=1, module="stem")]
        self.stage_names: List[str] = []
        for i, widths in enumerate(stage_widths):
            reduction *= 2
            name = f"layer{i + 1}"
            self.add_module(name, conv_stage(in_chs, widths, pool=True))
            self.stage_names.append(name)
            in_chs = widths[-1]
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))
        self.num_feature_levels = len(self.feature_info)
        self._init_head(in_chs, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, type(self).__name__)
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


TINY = dict(stem_widths=(16,), stage_widths=((32,), (64,)))
SMALL = dict(stem_widths=(32, 32), stage_widths=((64, 64), (128, 128), (256,)))

default_cfgs = generate_default_cfgs({
    "cnn_tiny": cifar_cfg(first_conv="stem.0.conv"),
    "cnn_small": cifar_cfg(first_conv="stem.0.conv"),
})


@register_cifar
def cnn_tiny(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Very small CNN for fast CPU tests: widths 16-32-64, 24k params, ~2.8M MACs at 32x32."""
    return build_cifar(SmallCNN, "cnn_tiny", pretrained, feature_levels=3, **TINY, **kwargs)


@register_cifar
def cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Small CNN for a CPU demo teacher: widths 32x2, 64x2, 128x2, 256; 0.59M params, ~43M MACs at 32x32."""
    return build_cifar(SmallCNN, "cnn_small", pretrained, feature_levels=4, **SMALL, **kwargs)
