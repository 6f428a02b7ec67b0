"""On-device image helpers: uint8 -> float, per-channel normalisation, crop + flip augmentation and mixing (kornia)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic.config import MIX_MODES, PADDING_MODES
from mosaic.players.patches import random_patches

__all__ = ["to_float", "normalize", "Augment", "Mix", "MIX_MODES", "PADDING_MODES"]


def to_float(images: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn uint8 images into floats in [0, 1] (dtype=float32 by default); float input is only cast."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255)
    if not images.is_floating_point():
        raise ValueError(f"to_float expects uint8 or float images, got {images.dtype}; convert them first")
    return images.to(dtype)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Return (x - mean) / std per channel for (C, H, W) or (N, C, H, W) floats, on x's device and dtype."""
    if x.ndim not in (3, 4) or not x.is_floating_point():
        raise ValueError(f"normalize expects float images (C, H, W) or (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        got = f"{len(mean)} means / {len(std)} stds"
        raise ValueError(f"normalize got {got} for {channels} channels; give one per channel")
    shape = (channels, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


class Augment(nn.Module):
    """Random crop with padding + horizontal flip on the device, via kornia; uint8 or float [0,1] in, float [0,1] out.

    Options (keyword-only):
      image_size: output side length (square crops).
      padding=4: pixels padded on every side before the random crop; 0 disables the crop.
      flip=True: flip each image horizontally with probability 0.5.
      padding_mode="constant": zero (black) padding, as torchvision's RandomCrop(32, padding=4) used for
        CIFAR; "reflect" or "replicate" are the alternatives.
      fast=True: the same crops and flips from the same random draws by one gather instead of kornia's
        per-image loop (pixel-identical; false runs the kornia modules themselves).
    Random draws come from torch's global generator, so `torch.manual_seed` makes it reproducible.
    """

    def __init__(self, *, image_size: int, padding: int = 4, flip: bool = True, padding_mode: str = "constant",
                 fast: bool = True) -> None:
        super().__init__()
        import kornia.augmentation as K

        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"Augment image_size must be a positive integer, got {image_size!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Augment padding must be a non-negative integer, got {padding!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"Augment padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        self.image_size, self.padding, self.flip, self.padding_mode = image_size, padding, flip, padding_mode
        self.fast = fast
        steps: list[nn.Module] = []
        if padding > 0:
            steps.append(K.RandomCrop((image_size, image_size), padding=padding, padding_mode=padding_mode, p=1.0))
        if flip:
            steps.append(K.RandomHorizontalFlip(p=0.5))
        self.steps = nn.Sequential(*steps)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], *, image_size: int) -> "Augment":
        """The augmentation a resolved config's `data` section asks for (crop_padding, padding_mode, flip)."""
        return cls(image_size=image_size, padding=data["crop_padding"], flip=data["flip"],
                   padding_mode=data["padding_mode"])

    def forward(self, images: Tensor) -> Tensor:
        """Augment a batch (N, C, H, W) of uint8 or [0, 1] float images; returns float [0, 1]."""
        if images.ndim != 4:
            raise ValueError(f"Augment expects a batch (N, C, H, W), got shape {tuple(images.shape)}")
        size, shape = self.image_size, tuple(images.shape[-2:])
        if min(shape) + 2 * self.padding < size or (self.padding == 0 and shape != (size, size)):
            raise ValueError(f"Augment(image_size={size}, padding={self.padding}) got {shape} images; resize them to {size}")
        x = to_float(images) if images.dtype == torch.uint8 else images
        if len(self.steps) == 0 or x.shape[0] == 0:
            return x
        return self._fast(x) if self.fast else self.steps(x)

    def _fast(self, x: Tensor) -> Tensor:
        """The kornia pipeline's result from the same random draws, by one pad, one gather and one where.

        kornia crops with a Python loop of slices (one per image) and syncs with the host; this
        draws the offsets and flips exactly as kornia does (x starts, y starts, then the flip
        coin, from torch's global CPU generator), so at equal seed the pixels are identical.
        """
        n, p = x.shape[0], self.padding
        if p > 0:
            x = F.pad(x, (p, p, p, p), mode=self.padding_mode)
            x = random_patches(x, patch_size=self.image_size)
        if self.flip:
            coin = torch.bernoulli(torch.full((n,), 0.5)).bool()
            if x.device.type != "cpu":
                coin = coin.to(x.device, non_blocking=True)
            x = torch.where(coin.view(n, 1, 1, 1), x.flip(-1), x)
        return x

    def extra_repr(self) -> str:
        options = f"image_size={self.image_size}, padding={self.padding}, flip={self.flip}"
        return f"{options}, padding_mode={self.padding_mode!r}"


class Mix(nn.Module):
    """Function matching's strongly mixed view of a batch (Beyer et al., "Knowledge distillation: A good teacher
    is patient and consistent", CVPR 2022): each image mixed with a random partner from the same batch.

    Options (keyword-only):
      mode="none": none (identity, no random draws) | mixup (x_i (1 - lam_i) + x_pi(i) lam_i, lam_i ~ Beta(alpha,
        alpha), as kornia's RandomMixUpV2 blends, with Beta weights) | cutmix (kornia's RandomCutMixV2: a box of
        side floor(sqrt(1 - lam) * side), lam ~ Beta(alpha, alpha), pasted from the partner).
      alpha=1.0: the Beta parameter (1: uniform weights).
    The caller feeds the one mixed tensor to teacher and student alike; random draws come from torch's global
    generator, and `last` keeps the latest draw (partners, MixUp weights or CutMix boxes) for inspection.
    """

    def __init__(self, *, mode: str = "none", alpha: float = 1.0) -> None:
        super().__init__()
        import kornia.augmentation as K

        if mode not in MIX_MODES:
            raise ValueError(f"Mix mode must be one of {', '.join(MIX_MODES)}, got {mode!r}")
        if not alpha > 0:
            raise ValueError(f"Mix alpha must be positive, got {alpha!r}")
        self.mode, self.alpha = mode, float(alpha)
        self.cutmix = K.RandomCutMixV2(beta=self.alpha, use_correct_lambda=True, p=1.0) if mode == "cutmix" else None
        self.last: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """The mixed view of a batch (N, C, H, W); the batch itself when mode is none or it has one image."""
        if self.mode == "none" or x.shape[0] < 2:
            return x
        if self.cutmix is not None:
            out = self.cutmix(x)
            params = self.cutmix._params
            self.last = {"pairs": params["mix_pairs"][0], "boxes": params["crop_src"][0]}
            return out
        n = x.shape[0]
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((n,))
        pairs = torch.randperm(n)
        self.last = {"pairs": pairs, "lambdas": lam}
        if x.device.type != "cpu":
            lam, pairs = lam.to(x.device, non_blocking=True), pairs.to(x.device, non_blocking=True)
        return torch.lerp(x, x.index_select(0, pairs), lam.to(x.dtype).view(n, 1, 1, 1))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha}"
