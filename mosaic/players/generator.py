"""DCGAN-style generator: noise -> image in [0, 1] (MosaicKD, DAFL, DFAD, ZSKT all use this shape)."""
from __future__ import annotations

import copy

import torch
from einops import rearrange
from torch import Tensor, nn


class Generator(nn.Module):
    """Linear projection to a 4x-downsampled map, two upsample+conv+BN+LeakyReLU blocks, conv, sigmoid."""

    def __init__(self, *, nz: int = 100, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if image_size % 4 != 0 or image_size < 8:
            raise ValueError(f"the generator makes images whose size is a multiple of 4 (>= 8); "
                             f"image_size={image_size} cannot be produced: use e.g. {max(8, image_size // 4 * 4)}")
        self.nz, self.image_size, self.channels = nz, image_size, channels
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, ngf * 4 * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(ngf * 4),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 4, ngf * 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def sample_noise(self, n: int, *, device: torch.device | str | None = None) -> Tensor:
        """n noise vectors z ~ N(0, I)."""
        return torch.randn(n, self.nz, device=device if device is not None else self.project.weight.device)

    @torch.no_grad()
    def fixed_samples(self, n: int) -> Tensor:
        """n images from fixed noise (seed 0, comparable across steps), made by a copy of this generator.

        The copy keeps this generator's BatchNorm statistics and the training random stream untouched.
        """
        z = torch.randn(n, self.nz, generator=torch.Generator().manual_seed(0)).to(self.project.weight.device)
        return copy.deepcopy(self)(z).float()

    def forward(self, z: Tensor) -> Tensor:
        h = rearrange(self.project(z), "b (c h w) -> b c h w", h=self.init_size, w=self.init_size)
        return self.body(h)
