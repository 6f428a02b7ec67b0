"""Localisation: the input gradient of the MKD loss, smoothed (kornia), coloured and overlaid on the images."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from mosaic.augment import to_float

from .mkd import MKD

__all__ = ["input_gradient", "smooth_map", "localization_maps", "colorize", "overlay", "save_heatmaps"]

REDUCTIONS = ("sum", "max")


def input_gradient(mkd: MKD, x: Tensor) -> Tensor:
    """d(sum of per-image MKD losses)/dx for float images x in [0, 1] (eval mode); same shape as x."""
    mkd.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = mkd(x).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def smooth_map(maps: Tensor, *, sigma: float = 1.0, opening: int = 3) -> Tensor:
    """Gaussian blur (sigma=1.0 px; 0 skips it) then a k x k morphological opening (opening=3; 0 skips it).

    `maps` is (N, H, W) or (N, 1, H, W); the result has the same shape.
    """
    import kornia

    squeeze = maps.ndim == 3
    out = maps[:, None] if squeeze else maps
    if sigma > 0:
        k = 2 * int(torch.tensor(3 * sigma).ceil()) + 1
        out = kornia.filters.gaussian_blur2d(out, (k, k), (sigma, sigma), border_type="reflect")
    if opening > 0:
        out = kornia.morphology.opening(out, torch.ones(opening, opening, device=out.device, dtype=out.dtype))
    return out[:, 0] if squeeze else out


def localization_maps(mkd: MKD, images: Tensor, *, reduce: str = "sum", sigma: float = 1.0, opening: int = 3,
                      batch_size: int = 64) -> Tensor:
    """Anomaly maps (N, H, W) on the CPU: |input gradient|, reduced over channels (sum or max), then smoothed."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    device = next(mkd.cloner.parameters()).device
    maps = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        grad = input_gradient(mkd, to_float(x) if x.dtype == torch.uint8 else x).abs()
        grad = grad.sum(1) if reduce == "sum" else grad.amax(1)
        maps.append(smooth_map(grad, sigma=sigma, opening=opening).cpu())
    return torch.cat(maps) if maps else torch.empty(0)


def colorize(maps: Tensor) -> Tensor:
    """A blue-cyan-yellow-red ("jet"-like) RGB image (N, 3, H, W) of maps (N, H, W), each scaled to [0, 1] first."""
    flat = maps.flatten(1)
    low, high = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    v = (maps - low) / (high - low).clamp_min(1e-12)
    # each channel is a tent centred at 3/4 (red), 1/2 (green) and 1/4 (blue) of the range, clipped at 1
    channels = [(1.5 - (4 * v - centre).abs()).clamp(0, 1) for centre in (3.0, 2.0, 1.0)]
    return torch.stack(channels, 1)


def overlay(images: Tensor, maps: Tensor, *, alpha: float = 0.5) -> Tensor:
    """Images (uint8 or float [0, 1], (N, C, H, W)) blended with their coloured maps; float (N, 3, H, W)."""
    x = to_float(images.cpu()) if images.dtype == torch.uint8 else images.cpu().float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (1 - alpha) * x + alpha * colorize(maps.cpu().float())


def save_heatmaps(images: Tensor, maps: Tensor, path: Union[str, Path], *, alpha: float = 0.5) -> Path:
    """Write a PNG grid: each image beside its overlay, one pair per row-slot (torchvision make_grid)."""
    from torchvision.utils import make_grid, save_image

    x = to_float(images.cpu()) if images.dtype == torch.uint8 else images.cpu().float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    pairs = torch.stack([x, overlay(x, maps, alpha=alpha)], 1).flatten(0, 1)  # image, overlay, image, ...
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(pairs, nrow=8, padding=2, pad_value=1.0), str(path))
    return path
