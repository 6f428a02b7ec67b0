"""Decoding images into uint8 tensors at the task's size and channels, with corrupt files skipped or refused."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable

import torch

from mosaic.data.base import DataError, select_indices

CHUNK = 1024  # images decoded and resized per step
MAX_CORRUPT_WARNINGS = 10


# ----------------------------------------------------------------------------- decoding


def decode_chunk(blobs: list[bytes], *, channels: int) -> list[torch.Tensor | None]:
    """Decode encoded images to uint8 (C, H, W) tensors with `channels` channels; None for unreadable ones."""
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except ImportError:  # a torchvision without image decoding: Pillow does it all, slower
        return [_decode_with_pil(b, channels=channels) for b in blobs]
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(blobs)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None for b in blobs]
    jpegs = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec; still works
        if jpegs:
            try:  # one call for the whole chunk is about 3x faster than one call per image
                for i, img in zip(jpegs, decode_jpeg([data[i] for i in jpegs], mode=mode)):
                    out[i] = img
            except (RuntimeError, ValueError):
                pass  # a bad one among them: decode them one by one below to find it
        for i, tensor in enumerate(data):
            if out[i] is not None or tensor is None:
                continue
            try:
                out[i] = decode_image(tensor, mode=mode)
            except (RuntimeError, ValueError):
                out[i] = _decode_with_pil(blobs[i], channels=channels)
    return [None if img is None else _as_uint8(img[0] if img.ndim == 4 else img) for img in out]  # GIF: first frame


def _decode_with_pil(blob: bytes, *, channels: int) -> torch.Tensor | None:
    """Fallback for formats torchvision cannot read (BMP, TIFF, PPM...); None when PIL fails too."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    except Exception:  # PIL raises many types for bad data
        return None
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]


def _as_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    if img.is_floating_point():
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)
    top = 65535 if img.dtype in (torch.uint16, torch.int32) else torch.iinfo(img.dtype).max
    return (img.to(torch.float32) * (255 / top)).round().clamp(0, 255).to(torch.uint8)


def _to_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a uint8 (N, C, H, W) batch to 1 or 3 channels (alpha dropped, ITU-R 601 grayscale)."""
    c = batch.shape[1]
    if c in (2, 4):
        batch, c = batch[:, : c - 1], c - 1
    if c == channels:
        return batch
    if c == 1 and channels == 3:
        return batch.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (batch.to(torch.float32) * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert images with {batch.shape[1]} channels to {channels}; use 1- or 3-channel images")


def _fit(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) batch so its shorter side is `size` (antialiased), then center-crop square."""
    from torchvision.transforms.v2 import functional as TF

    h, w = batch.shape[-2:]
    if min(h, w) != size:
        batch = TF.resize(batch, [size], antialias=True)
    if tuple(batch.shape[-2:]) != (size, size):
        batch = TF.center_crop(batch, [size, size])
    return batch


def _fit_all(images: list[torch.Tensor], out: torch.Tensor, positions: list[int]) -> None:
    """Write resized images into `out` at `positions`, resizing images that share a size as one batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    for members in groups.values():
        batch = torch.stack([images[k] for k in members])
        batch = _to_channels(batch, out.shape[1])
        out[[positions[k] for k in members]] = _fit(batch, out.shape[-1])


def decode_files(
    read: Callable[[int], bytes], shown: list[str], *, image_size: int, channels: int, on_corrupt: str, where: Path
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode and resize files 0..len(shown)-1; returns (images, mask of kept files, skipped file names)."""
    n = len(shown)
    out = torch.empty((n, channels, image_size, image_size), dtype=torch.uint8)
    kept = torch.ones(n, dtype=torch.bool)
    skipped: list[str] = []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        blobs = []
        for i in range(start, stop):
            try:
                blobs.append(read(i))
            except OSError:
                blobs.append(b"")
        decoded = decode_chunk(blobs, channels=channels)
        good = []
        for i, img in zip(range(start, stop), decoded):
            if img is None or img.ndim != 3 or min(img.shape[-2:]) == 0:
                kept[i] = False
                skipped.append(shown[i])
                report_corrupt(shown[i], on_corrupt=on_corrupt, count=len(skipped))
            else:
                good.append((i, img))
        if good:
            _fit_all([img for _, img in good], out, [i for i, _ in good])
    if not bool(kept.any()):
        raise DataError(f"no readable images in {where} ({n} files could not be decoded)")
    if len(skipped) > MAX_CORRUPT_WARNINGS:
        _warn_line(f"skipped {len(skipped)} unreadable images in {where} in total")
    return (out if bool(kept.all()) else out[kept].contiguous()), kept, skipped


def report_corrupt(name: str, *, on_corrupt: str, count: int) -> None:
    if on_corrupt == "error":
        raise DataError(f"cannot decode image {name}; delete or fix it, or pass on_corrupt='warn' to skip it")
    if count <= MAX_CORRUPT_WARNINGS:
        _warn_line(f"skipping unreadable image {name}")


def _warn_line(message: str) -> None:
    """A UserWarning printed as one line: attributed to mosaic.data at line 0, so no source line is echoed."""
    # warnings.warn would print the calling line of code under the message; filter with module="mosaic.data"
    warnings.warn_explicit(message, UserWarning, filename="mosaic.data", lineno=0, module="mosaic.data")


# ----------------------------------------------------------------------------- torchvision conversion


def convert_dataset(dataset, *, image_size: int, channels: int, limit: int | None, seed: int):
    """Turn a torchvision-style data set into (uint8 images, labels or None, classes or None, [])."""
    import numpy as np

    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = getattr(dataset, "labels", None)
    labels = [int(y) for y in np.asarray(targets).reshape(-1)] if targets is not None else None
    if labels is not None and (len(labels) != n or all(y < 0 for y in labels)):
        labels = None  # e.g. STL-10 'unlabeled' marks every label -1
    order = select_indices(n, labels, limit=limit, seed=seed)
    data = getattr(dataset, "data", None)
    out = torch.empty((len(order), channels, image_size, image_size), dtype=torch.uint8)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if torch.is_tensor(data) and data.dtype == torch.uint8 and data.ndim in (3, 4) and len(data) == n:
        batch = data[order]
        if batch.ndim == 3:
            batch = batch[:, None]
        elif batch.shape[-1] in (1, 3, 4) and batch.shape[1] not in (1, 3, 4):
            batch = batch.permute(0, 3, 1, 2)  # (N, H, W, C) as in CIFAR -> (N, C, H, W)
        for start in range(0, len(order), CHUNK * 8):
            chunk = _to_channels(batch[start : start + CHUNK * 8].contiguous(), channels)
            out[start : start + len(chunk)] = _fit(chunk, image_size)
    else:  # generic data set: read item by item
        item_labels = []
        for start in range(0, len(order), CHUNK):
            items = [dataset[i] for i in order[start : start + CHUNK]]
            pairs = [x if isinstance(x, (tuple, list)) else (x, -1) for x in items]
            _fit_all([_item_tensor(x[0]) for x in pairs], out, list(range(start, start + len(pairs))))
            item_labels.extend(int(x[1]) if len(x) > 1 and x[1] is not None else -1 for x in pairs)
        if labels is None and item_labels and min(item_labels) >= 0:
            labels = {i: y for i, y in zip(order, item_labels)}
    label_tensor = torch.tensor([labels[i] for i in order], dtype=torch.int64) if labels is not None else None
    classes = [str(c) for c in getattr(dataset, "classes", [])] or None
    if label_tensor is not None and classes is None:
        classes = [str(k) for k in range(int(label_tensor.max()) + 1)]
    return out, label_tensor, classes, []


def _item_tensor(img) -> torch.Tensor:
    """A data set item's image (PIL image, HWC/HW numpy array or CHW tensor) as a uint8 (C, H, W) tensor."""
    import numpy as np

    if hasattr(img, "convert") and hasattr(img, "mode"):  # PIL image
        img = np.array(img.convert("RGB") if img.mode not in ("L", "RGB", "RGBA") else img)
    if isinstance(img, np.ndarray):
        tensor = torch.from_numpy(np.array(img, copy=not img.flags.writeable or not img.flags.c_contiguous))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    elif torch.is_tensor(img):
        tensor = img[None] if img.ndim == 2 else img
    else:
        raise DataError(f"data set items must be PIL images, arrays or tensors, got {type(img).__name__}")
    return _as_uint8(tensor)


# ----------------------------------------------------------------------------- stats


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units, exact via value histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(round(float(mean), 6))
        stds.append(round(float(var.sqrt()), 6))
    return tuple(means), tuple(stds)
