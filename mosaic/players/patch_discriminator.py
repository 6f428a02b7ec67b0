"""PatchGAN discriminator: a logit per local patch, telling real OOD patches from generated ones."""
from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """conv k4 s2 + LeakyReLU(0.2), conv k4 s2 + BN + LeakyReLU(0.2), conv k1 -> logit map.

    Each output logit sees a 10x10 receptive field of the input; the input itself is a
    random crop (the MosaicKD "patch"), so the map has (crop/4)^2 logits.
    """

    def __init__(self, *, channels: int = 3, ndf: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
