"""Square patches of a batch for the discriminator: random ones by one gather, or a grid that covers the image.

The offsets are drawn exactly as kornia's RandomCrop(p=1) draws them (all x starts, then all y
starts, from torch's global CPU generator), so at equal seed the patches are the very same pixels
as `kornia.augmentation.RandomCrop` applied to the batch repeated `copies` times. Only the crop
itself changes: one gather on the images' device instead of a Python loop of slices and a cat,
and no device synchronisation (the offsets travel to the device with a non-blocking copy).
"""
from __future__ import annotations

import torch
from torch import Tensor


def patch_offsets(n: int, *, height: int, width: int, patch_size: int,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Top (y) and left (x) corners of n uniform random patch_size crops, as int64 on `device`."""
    u_x, u_y = torch.rand(n), torch.rand(n)  # kornia's order: x draws, then y draws
    x = (u_x * float(width - patch_size + 1)).floor().long()
    y = (u_y * float(height - patch_size + 1)).floor().long()
    if device is not None and torch.device(device).type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return y, x


def random_patches(images: Tensor, *, patch_size: int, copies: int = 1) -> Tensor:
    """`copies` random patch_size crops of each image, stacked as (copies * B, C, p, p), copy-major.

    Row i crops image i % B, like a crop of `einops.repeat(images, "b c h w -> (n b) c h w", n=copies)`.
    Gradients flow back to `images`.
    """
    if images.ndim != 4:
        raise ValueError(f"random_patches expects a batch (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if not 1 <= p <= min(h, w):
        raise ValueError(f"patch_size={p} must lie in [1, {min(h, w)}] for {h}x{w} images")
    y, x = patch_offsets(copies * b, height=h, width=w, patch_size=p, device=images.device)
    span = torch.arange(p, device=images.device)
    pixels = (y[:, None, None] + span[None, :, None]) * w + (x[:, None, None] + span[None, None, :])  # (n, p, p)
    index = pixels.view(copies, b, 1, p * p).expand(copies, b, c, p * p)
    source = images.reshape(1, b, c, h * w)  # broadcast over the copies without materialising them
    return torch.take_along_dim(source, index, dim=3).reshape(copies * b, c, p, p)


def grid_offsets(size: int, patch_size: int) -> list[int]:
    """Starts of the fewest patch_size crops, evenly spread from border to border, that cover `size` pixels."""
    k = -(-size // patch_size)  # ceil
    if k == 1:
        return [0]
    return [round(i * (size - patch_size) / (k - 1)) for i in range(k)]


def grid_patches(images: Tensor, *, patch_size: int) -> Tensor:
    """The grid of patch_size crops that covers every pixel of each image, stacked (crops * B, C, p, p), crop-major.

    ceil(H / p) x ceil(W / p) crops, the first at the top-left corner and the last at the bottom-right one,
    overlapping evenly when p does not divide the side. Gradients flow back to `images`.
    """
    if images.ndim != 4:
        raise ValueError(f"grid_patches expects a batch (B, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    p = patch_size
    if not 1 <= p <= min(h, w):
        raise ValueError(f"patch_size={p} must lie in [1, {min(h, w)}] for {h}x{w} images")
    return torch.cat([images[:, :, y:y + p, x:x + p] for y in grid_offsets(h, p) for x in grid_offsets(w, p)])
