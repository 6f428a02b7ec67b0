"""DCGAN-style generator: noise -> image (MosaicKD, DAFL, DFAD, ZSKT, DFQ all use this shape).

The output head decides what the image is:
  sigmoid  conv, sigmoid                          -> pixels in [0, 1] (MosaicKD, CMI, Fast)
  tanh_bn  conv, tanh, BatchNorm2d(C, affine=False) -> already normalised classifier input (DAFL, DFAD)
  bn       conv, BatchNorm2d(C)                   -> already normalised classifier input (ZSKT)
"""
from __future__ import annotations

import copy

import torch
from einops import rearrange
from torch import Tensor, nn

HEADS = ("sigmoid", "tanh_bn", "bn")


def make_head(head: str, channels: int) -> list[nn.Module]:
    """The layers after the generator's last conv for `head` (one of HEADS)."""
    if head == "sigmoid":
        return [nn.Sigmoid()]
    if head == "tanh_bn":  # DAFL DAFL-train.py Generator and DFAD GeneratorA: Tanh, BatchNorm2d(C, affine=False)
        return [nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
    if head == "bn":       # ZSKT models/generator.py: a final BatchNorm2d(C, affine=True), no squashing
        return [nn.BatchNorm2d(channels)]
    raise ValueError(f"unknown generator head {head!r}: use one of {', '.join(HEADS)}")


class Generator(nn.Module):
    """Linear projection to a 4x-downsampled map, two upsample+conv+BN+LeakyReLU blocks, conv, head.

    `head` picks the output layers (module docstring); `bn_eps` is the eps of the two BatchNorm layers
    after the hidden convs (DAFL's code uses 0.8 there; torch's 1e-5 otherwise); `width`: the projected map
    has ngf * width channels (4: DCGAN / MosaicKD; 2: the Fast-Datafree / NAYER decoder, whose first conv keeps
    ngf * 2 channels).
    """

    def __init__(self, *, nz: int = 100, ngf: int = 64, image_size: int = 32, channels: int = 3,
                 head: str = "sigmoid", bn_eps: float = 1e-5, width: int = 4) -> None:
        super().__init__()
        if image_size % 4 != 0 or image_size < 8:
            raise ValueError(f"the generator makes images whose size is a multiple of 4 (>= 8); "
                             f"image_size={image_size} cannot be produced: use e.g. {max(8, image_size // 4 * 4)}")
        if not (isinstance(bn_eps, (int, float)) and not isinstance(bn_eps, bool) and bn_eps > 0):
            raise ValueError(f"the generator's bn_eps must be a positive number, got {bn_eps!r}")
        head_layers = make_head(head, channels)
        self.nz, self.image_size, self.channels, self.head = nz, image_size, channels, head
        self.init_size = image_size // 4
        if width not in (2, 4):
            raise ValueError(f"the generator's width must be 2 or 4 (times ngf), got {width!r}")
        self.project = nn.Linear(nz, ngf * width * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(ngf * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * width, ngf * 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1),
            *head_layers,
        )
        self.out_start = len(self.body) - len(head_layers) - 1  # the last conv: it and the head run in fp32

    def sample_noise(self, n: int, *, device: torch.device | str | None = None) -> Tensor:
        """n noise vectors z ~ N(0, I)."""
        return torch.randn(n, self.nz, device=device if device is not None else self.project.weight.device)

    @torch.no_grad()
    def fixed_samples(self, n: int) -> Tensor:
        """n outputs (images for the sigmoid head) from fixed noise (seed 0, comparable across steps), made by a copy.

        The copy keeps this generator's BatchNorm statistics and the training random stream untouched.
        """
        z = torch.randn(n, self.nz, generator=torch.Generator().manual_seed(0)).to(self.project.weight.device)
        return copy.deepcopy(self)(z).float()

    def forward(self, z: Tensor) -> Tensor:
        h = rearrange(self.project(z), "b (c h w) -> b c h w", h=self.init_size, w=self.init_size)
        if not self.body[2].weight.is_contiguous():  # the convs are channels-last: so are the maps (upsampling
            h = h.contiguous(memory_format=torch.channels_last)  # a contiguous map on CPU is ~10x slower)
        for layer in self.body[:self.out_start]:
            h = layer(h)
        # the last conv and the head in fp32 even under autocast: a bf16 sigmoid rounds to exactly 1.0 from a
        # pre-activation of about 6.5 on, and the images are what every other player sees
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            for layer in self.body[self.out_start:]:
                h = layer(h)
        return h
