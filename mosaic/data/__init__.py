"""Image data sets decoded once into a uint8 tensor (N, C, H, W), with an on-disk cache.

`load_image_set` reads a named data set (CIFAR-10/100, SVHN, STL-10, Tiny-ImageNet) or any
folder / tar archive of images, resizes every image to the task's size, and returns an
`ImageSet`. The engine moves `ImageSet.images` to the training device once and augments there.

    base.py     ImageSet, DataError, data_root, cache_dir, seeded subsets
    sources.py  named sets, folders and archives, and their layouts
    decode.py   bytes -> uint8 tensors at the task's size; torchvision sets converted
    cache.py    the decoded-tensor cache
"""
from __future__ import annotations

import dataclasses
import os

import torch

from mosaic.data.base import DataError, ImageSet, cache_dir, data_root, select_indices
from mosaic.data.cache import cache_path, load_cache, save_cache
from mosaic.data.decode import channel_stats
from mosaic.data.sources import IMAGE_EXTENSIONS, resolve_source
from mosaic.norms import KNOWN_STATS  # per-data-set (mean, std) of the named sets

__all__ = ["DataError", "ImageSet", "data_root", "load_image_set", "load_split", "class_index", "keep_classes",
           "cache_dir", "IMAGE_EXTENSIONS", "KNOWN_STATS"]


# ----------------------------------------------------------------------------- public entry


def load_image_set(
    spec: str,
    *,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    root: str | None = None,
    download: bool = False,
    limit: int | None = None,
    labelled: bool = True,
    on_corrupt: str = "warn",
    cache: bool = True,
    seed: int = 0,
) -> ImageSet:
    """Load a named data set, image folder or tar archive as an ImageSet at image_size x image_size.

    Options (all keyword-only):
      split="train": which split of sets that have several (train/test/val/...); single-split sources ignore it.
      image_size=32: shorter side resized (antialiased) to this, then center-cropped square.
      channels=3: 3 = RGB, 1 = grayscale (converted as needed).
      root=None: data root, see `data_root`.
      download=False: let torchvision download CIFAR/SVHN/STL-10 into <root>/<name> (needs internet).
      limit=None: keep at most this many images; class-balanced when the source has labels, else a
        random subset; chosen with `seed`.
      labelled=True: False drops labels and class names (out-of-domain use).
      on_corrupt="warn": "warn" skips unreadable images with a warning naming them, "error" raises.
      cache=True: reuse / store the decoded tensor under `cache_dir()`.
      seed=0: seed of the `limit` subset.
    """
    _check_options(spec, split, image_size, channels, limit, on_corrupt)
    source = resolve_source(spec, split=split, root=data_root(root), download=download)
    options = dict(image_size=image_size, channels=channels, limit=limit, seed=seed, labelled=labelled)
    path = cache_path(source, **options) if cache else None
    if path is not None and path.is_file():
        hit = load_cache(path, on_corrupt=on_corrupt)
        if hit is not None:
            return hit
    images, labels, classes, skipped = source.load(
        image_size=image_size, channels=channels, limit=limit, seed=seed, on_corrupt=on_corrupt
    )
    name = source.name
    if not labelled and labels is not None:
        labels, classes, name = None, None, f"{name}, labels dropped"
    known = KNOWN_STATS.get(source.stats_key or "")
    mean, std = known if known and channels == 3 else channel_stats(images)
    result = ImageSet(images=images, labels=labels, classes=classes, name=name, mean=mean, std=std)
    if cache:
        path = path or cache_path(source, **options)  # a torchvision download creates the files only now
        if path is not None:
            save_cache(path, result, skipped)
    return result


def load_split(cfg: dict, key: str, *, image_size: int | None = None, channels: int | None = None) -> ImageSet:
    """Decode (or read from cache) `data.<key>` ("train", "test" or "ood") of a resolved run config.

    For "train" and "ood", `data.train_classes` / `data.ood_classes` keep only those classes (the OOD pool is
    read with its class folders for that, then returned unlabelled), and `data.<key>_limit` then counts their images.
    """
    d = cfg["data"]
    split = "test" if key == "test" else "train"
    classes = d.get(f"{key}_classes") if key in ("train", "ood") else None
    limit = d[f"{key}_limit"]
    images = load_image_set(d[key], split=split, image_size=image_size or d["image_size"],
                            channels=channels or d["channels"], root=d["root"], download=d["download"],
                            limit=None if classes is not None else limit,
                            labelled=key != "ood" or classes is not None,
                            on_corrupt=d["on_corrupt"], cache=d["cache"], seed=cfg["seed"])
    if classes is None:
        return images
    images = keep_classes(images, classes, limit=limit, seed=cfg["seed"])
    if key == "ood":  # the pool stays unlabelled downstream: only its images are used
        images = dataclasses.replace(images, labels=None, classes=None)
    return images


def class_index(images: ImageSet, cls: str | int) -> int:
    """Index of class `cls` (its name, or an index) in a labelled set; unknown classes are an error naming the known ones."""
    if images.labels is None or not images.classes:
        raise DataError(f"'{images.name}' has no classes (no class folders), so class {cls!r} cannot be picked from "
                        f"it: give a labelled data set")
    if str(cls) in images.classes:
        return images.classes.index(str(cls))
    if isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < len(images.classes):
        return cls
    raise DataError(f"no class {cls!r} in '{images.name}'; its classes are {', '.join(images.classes)}")


def keep_classes(images: ImageSet, classes: str | int | list, *, limit: int | None = None, seed: int = 0) -> ImageSet:
    """The images of `classes` (a name or index, or a list of them) only, then at most `limit` of them (seeded).

    Labels and class names are kept as they are (indices into the full class list).
    """
    wanted = [class_index(images, c) for c in (classes if isinstance(classes, list) else [classes])]
    names = ", ".join(images.classes[i] for i in wanted)
    keep = torch.isin(images.labels, torch.tensor(wanted, dtype=images.labels.dtype)).nonzero().flatten()
    if len(keep) == 0:
        raise DataError(f"'{images.name}' has no images of class {names}")
    keep = keep[select_indices(len(keep), images.labels[keep].tolist(), limit=limit, seed=seed)]
    return ImageSet(images=images.images[keep], labels=images.labels[keep], classes=images.classes,
                    name=f"{images.name}, class {names}", mean=images.mean, std=images.std)


def _check_options(spec, split, image_size, channels, limit, on_corrupt) -> None:
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DataError(f"data set spec must be a name or a path, got {spec!r}")
    if not isinstance(split, str) or not split:
        raise DataError(f"split must be a name such as 'train' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if on_corrupt not in ("warn", "error"):
        raise DataError(f"on_corrupt must be 'warn' or 'error', got {on_corrupt!r}")
