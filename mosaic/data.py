"""Image data sets decoded once into a uint8 tensor (N, C, H, W), with an on-disk cache.

`load_image_set` reads a named data set (CIFAR-10/100, SVHN, STL-10, Tiny-ImageNet) or any
folder / tar archive of images, resizes every image to the task's size, and returns an
`ImageSet`. The engine moves `ImageSet.images` to the training device once and augments there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mosaic.norms import KNOWN_STATS  # per-data-set (mean, std) of the named sets

__all__ = ["DataError", "ImageSet", "data_root", "load_image_set", "load_split", "class_index", "keep_classes",
           "cache_dir", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CACHE_VERSION = 1
CHUNK = 1024  # images decoded and resized per step
MAX_CORRUPT_WARNINGS = 10

# Offline JPEG archives: spec -> (folder / archive stem under the data root, readable name).
OFFLINE = {
    "cifar10-jpeg": ("cifar10-jpeg", "cifar10"),
    "tiny-imagenet-test": ("tiny-imagenet-200-test", "tiny-imagenet test"),
    "tiny-imagenet-val": ("tiny-imagenet-200-val", "tiny-imagenet val"),
}
# torchvision sets: spec -> (class name, folder under the data root, splits, readable name).
TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar10", ("train", "test"), "CIFAR-10"),
    "cifar100": ("CIFAR100", "cifar100", ("train", "test"), "CIFAR-100"),
    "svhn": ("SVHN", "svhn", ("train", "test", "extra"), "SVHN"),
    "stl10": ("STL10", "stl10", ("train", "test", "unlabeled"), "STL-10"),
}
ALIASES = {
    "tiny-imagenet": "tiny-imagenet-test",
    "tinyimagenet": "tiny-imagenet-test",
    "tiny-imagenet-200": "tiny-imagenet-test",
    "tinyimagenet-val": "tiny-imagenet-val",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
}
SPLIT_DIRS = {"train": {"train"}, "test": {"test"}, "val": {"val", "valid", "validation"}}
SPLIT_DIRS["valid"] = SPLIT_DIRS["validation"] = SPLIT_DIRS["val"]
ALL_SPLIT_DIRS = {"train", "test", "val", "valid", "validation"}


class DataError(ValueError):
    """A data set could not be found, read or understood; the message says what to do."""


@dataclass(eq=False)
class ImageSet:
    """A whole data set as one uint8 tensor (N, C, H, W) plus optional labels and its channel stats."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.images) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"ImageSet {self.name!r}: images must be a uint8 tensor (N, C, H, W)")
        if self.labels is not None and (self.labels.ndim != 1 or len(self.labels) != len(self.images)):
            raise DataError(f"ImageSet {self.name!r}: labels must be a 1-D tensor with one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        classes = "unlabelled" if self.labels is None else f"{self.num_classes} classes"
        return f"ImageSet({self.name!r}, images={tuple(self.images.shape)} uint8, {classes})"

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None when the set has no class names."""
        return len(self.classes) if self.classes is not None else None


# ----------------------------------------------------------------------------- locations


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: explicit root > $MOSAIC_DATA_ROOT > ./data if it exists > ../shared/data if it exists > ./data.

    The two relative candidates are tried from the working directory, then from the repository root.
    """
    if root:
        return Path(root).expanduser().absolute()
    env = os.environ.get("MOSAIC_DATA_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    repo = Path(__file__).resolve().parents[1]
    for candidate in (Path("data"), Path("../shared/data"), repo / "data", repo.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("data").absolute()


def cache_dir() -> Path:
    """Folder of decoded-tensor cache files: $MOSAIC_CACHE, default ~/.cache/mosaic-kd."""
    return Path(os.environ.get("MOSAIC_CACHE") or "~/.cache/mosaic-kd").expanduser()


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
    source = _resolve(spec, split=split, root=data_root(root), download=download)
    options = dict(image_size=image_size, channels=channels, limit=limit, seed=seed, labelled=labelled)
    path = _cache_path(source, **options) if cache else None
    if path is not None and path.is_file():
        hit = _load_cache(path, on_corrupt=on_corrupt)
        if hit is not None:
            return hit
    images, labels, classes, skipped = source.load(
        image_size=image_size, channels=channels, limit=limit, seed=seed, on_corrupt=on_corrupt
    )
    name = source.name
    if not labelled and labels is not None:
        labels, classes, name = None, None, f"{name}, labels dropped"
    known = KNOWN_STATS.get(source.stats_key or "")
    mean, std = known if known and channels == 3 else _channel_stats(images)
    result = ImageSet(images=images, labels=labels, classes=classes, name=name, mean=mean, std=std)
    if cache:
        path = path or _cache_path(source, **options)  # a torchvision download creates the files only now
        if path is not None:
            _save_cache(path, result, skipped)
    return result


def load_split(cfg: dict, key: str, *, image_size: int | None = None, channels: int | None = None) -> ImageSet:
    """Decode (or read from cache) `data.<key>` ("train", "test" or "ood") of a resolved run config.

    For "train", `data.train_classes` keeps only those classes, and `data.train_limit` then counts their images.
    """
    d = cfg["data"]
    split = "test" if key == "test" else "train"
    classes = d.get("train_classes") if key == "train" else None
    limit = d[f"{key}_limit"]
    images = load_image_set(d[key], split=split, image_size=image_size or d["image_size"],
                            channels=channels or d["channels"], root=d["root"], download=d["download"],
                            limit=None if classes is not None else limit, labelled=key != "ood",
                            on_corrupt=d["on_corrupt"], cache=d["cache"], seed=cfg["seed"])
    return images if classes is None else keep_classes(images, classes, limit=limit, seed=cfg["seed"])


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
    keep = keep[_select(len(keep), images.labels[keep].tolist(), limit=limit, seed=seed)]
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


# ----------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """Where images come from and how to read them; `load` returns (images, labels, classes, skipped)."""

    name: str
    path: Path
    kind: str  # "files" (folder or archive) or "torchvision"
    split: str | None
    stats_key: str | None = None
    load: Callable[..., tuple] | None = None


def _resolve(spec: str, *, split: str, root: Path, download: bool) -> _Source:
    text = str(spec).strip()
    name = ALIASES.get(text.lower(), text.lower())
    if name == "cifar10":
        found = _find_offline(root, "cifar10-jpeg")
        if found is not None:
            return _offline_source("cifar10-jpeg", found, split)
        return _torchvision_source(name, split=split, root=root, download=download)
    if name in OFFLINE:
        found = _find_offline(root, OFFLINE[name][0])
        if found is None:
            stem = OFFLINE[name][0]
            raise DataError(
                f"{name} was not found under {root} (looked for {stem}/ and {stem}.tar.gz); put the archive there "
                f"or set data.root / $MOSAIC_DATA_ROOT to the folder that holds it (see datasets/README.md)"
            )
        return _offline_source(name, found, split)
    if name in TORCHVISION:
        return _torchvision_source(name, split=split, root=root, download=download)
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(sorted([*TORCHVISION, *OFFLINE, "tiny-imagenet"]))
        raise DataError(f"data set {text!r} is neither a known name ({known}) nor an existing file or folder")
    return _files_source(path.resolve(), split=split, label=None, stats_key=None)


def _find_offline(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, *(root / f"{stem}{suffix}" for suffix in (".tar.gz", ".tgz", ".tar"))):
        if candidate.exists():
            return candidate
    return None


def _offline_source(name: str, path: Path, split: str) -> _Source:
    readable = OFFLINE[name][1]
    form = "offline JPEG folder" if path.is_dir() else "offline JPEG archive"
    if name == "cifar10-jpeg":
        if split not in ("train", "test"):
            raise DataError(f"CIFAR-10 has splits 'train' and 'test', got split={split!r}")
        label = f"{readable} ({form}, {split})"
        return _files_source(path.resolve(), split=split, label=label, stats_key="cifar10")
    label = f"{readable} ({form}{', unlabelled' if name == 'tiny-imagenet-test' else ''})"
    return _files_source(path.resolve(), split=None, label=label, stats_key=None)


def _files_source(path: Path, *, split: str | None, label: str | None, stats_key: str | None) -> _Source:
    is_archive = path.is_file()
    if is_archive and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        suffixes = ", ".join(ARCHIVE_SUFFIXES)
        raise DataError(f"{path} is a file but not a tar archive ({suffixes}); pass a folder or an archive")
    kind = "tar archive" if is_archive else "folder"
    source = _Source(name=label or f"{kind} {path}", path=path, kind="files", split=split, stats_key=stats_key)

    def load(*, image_size, channels, limit, seed, on_corrupt):
        """List the files, pick the layout and subset, decode."""
        names, read = _scan_archive(path) if is_archive else _scan_folder(path)
        picked, labels, classes, layout = _layout(names, split=split, where=path)
        if label is None:
            source.name = f"{kind} {path} ({layout})"
        order = _select(len(picked), labels, limit=limit, seed=seed)
        files = [names[picked[i]] for i in order]
        shown = [f"{path}:{n}" if is_archive else str(path / n) for n in files]
        images, kept, skipped = _decode_files(
            lambda i: read(files[i]), shown, image_size=image_size, channels=channels, on_corrupt=on_corrupt, where=path
        )
        label_tensor = None
        if labels is not None:
            label_tensor = torch.tensor([labels[i] for i in order], dtype=torch.int64)[kept]
        return images, label_tensor, classes, skipped

    source.load = load
    return source


def _torchvision_source(name: str, *, split: str, root: Path, download: bool) -> _Source:
    cls_name, folder, splits, readable = TORCHVISION[name]
    if name == "stl10" and split == "unlabelled":
        split = "unlabeled"
    if split not in splits:
        raise DataError(f"{readable} has splits {', '.join(splits)}; got split={split!r}")
    target = root / folder
    source = _Source(
        name=f"{name} (torchvision, {split})", path=target, kind="torchvision", split=split, stats_key=name
    )

    def load(*, image_size, channels, limit, seed, on_corrupt):
        """Open (or download) the torchvision set and convert it."""
        dataset = _open_torchvision(name, split=split, target=target, download=download, root=root)
        return _convert_dataset(dataset, image_size=image_size, channels=channels, limit=limit, seed=seed)

    source.load = load
    return source


def _open_torchvision(name: str, *, split: str, target: Path, download: bool, root: Path):
    """Construct the torchvision data set, turning its failures into one-line DataErrors."""
    import torchvision.datasets as tvd

    cls_name, _, _, readable = TORCHVISION[name]
    kwargs = {"train": split == "train"} if name.startswith("cifar") else {"split": split}
    if not download and not target.exists():
        raise _not_found(name, readable, root, target)
    try:
        return getattr(tvd, cls_name)(str(target), download=download, **kwargs)
    except ImportError as err:
        raise DataError(f"{readable} needs a missing package ({err}); install it, e.g. pip install scipy") from None
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
        if download:
            raise DataError(
                f"could not download {readable} into {target} ({type(err).__name__}: {err}); check the internet "
                f"connection, or place the files there by hand"
            ) from None
        raise _not_found(name, readable, root, target) from None


def _not_found(name: str, readable: str, root: Path, target: Path) -> DataError:
    extra = " (looked for cifar10-jpeg/, cifar10-jpeg.tar.gz and cifar10/)" if name == "cifar10" else ""
    prepare = "cifar10-jpeg" if name == "cifar10" else f"{name} --download"
    problem = f"is incomplete or corrupt at {target}" if target.exists() else f"was not found under {root}{extra}"
    return DataError(
        f"{readable} {problem}; pass data.download=true (needs internet) "
        f"or run `python datasets/prepare.py {prepare} --root {root}`"
    )


# ----------------------------------------------------------------------------- listing files


def _is_image_name(name: str) -> bool:
    if name[name.rfind("."):].lower() not in IMAGE_EXTENSIONS:
        return False
    return not any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


def _scan_folder(path: Path) -> tuple[list[str], Callable[[str], bytes]]:
    """Relative posix paths of the image files under a folder, sorted, and a reader."""
    names = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, path)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        names.extend(prefix + f for f in filenames if _is_image_name(prefix + f))
    if not names:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder {path}")
    names.sort()
    return names, lambda name: (path / name).read_bytes()


def _scan_archive(path: Path) -> tuple[list[str], Callable[[str], bytes]]:
    """Stream a tar archive once, keeping the bytes of its image members in memory."""
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isfile() and _is_image_name(name):
                    handle = archive.extractfile(member)
                    blobs[name] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise DataError(f"cannot read archive {path} ({problem}); check that it is a complete tar file") from None
    if not blobs:
        raise DataError(f"no image files found in archive {path}")
    return sorted(blobs), blobs.__getitem__


def _layout(
    names: list[str], *, split: str | None, where: Path
) -> tuple[list[int], list[int] | None, list[str] | None, str]:
    """Read the folder layout from relative paths: split folders, wrapper folders, class folders or flat.

    Returns (indices of the files to use, their labels or None, class names or None, a description).
    A level whose subfolders are all split names (train/test/val) picks `split`; a level with one
    subfolder and no files is a wrapper and is entered; then subfolders are classes (ImageFolder,
    files directly beside them are ignored) or, if there are none, the folder is flat (unlabelled).
    """
    parts = [n.split("/") for n in names]
    keep = list(range(len(names)))
    depth, chosen = 0, None
    while True:
        folders = {parts[i][depth] for i in keep if len(parts[i]) > depth + 1}
        has_files = any(len(parts[i]) == depth + 1 for i in keep)
        if chosen is None and folders and all(f.lower() in ALL_SPLIT_DIRS for f in folders):
            if split is None:
                split = "train"
            wanted = SPLIT_DIRS.get(split.lower(), {split.lower()})
            matches = sorted(f for f in folders if f.lower() in wanted)
            if not matches:
                found = ", ".join(sorted(folders))
                raise DataError(f"{where} has split folders {found} but no {split!r}; pass split= one of them")
            chosen = matches[0]
            keep = [i for i in keep if len(parts[i]) > depth + 1 and parts[i][depth] == chosen]
            depth += 1
            continue
        if len(folders) == 1 and not has_files:
            depth += 1
            continue
        break
    where_split = f"split {chosen!r}, " if chosen else ""
    if not folders:
        return keep, None, None, f"{where_split}flat, unlabelled"
    classes = sorted(folders)
    index = {c: k for k, c in enumerate(classes)}
    keep = [i for i in keep if len(parts[i]) > depth + 1]
    labels = [index[parts[i][depth]] for i in keep]
    return keep, labels, classes, f"{where_split}ImageFolder, {len(classes)} classes"


def _select(n: int, labels: list[int] | None, *, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of `limit` items (class-balanced when labels are given), in original order."""
    if limit is None or limit >= n:
        return list(range(n))
    rng = random.Random(seed)
    if labels is None:
        return sorted(rng.sample(range(n), limit))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    pools = [by_class[c] for c in sorted(by_class)]
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)  # which classes get the remainder when limit is not a multiple of the class count
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for pool in pools:
            if depth < len(pool) and len(picked) < limit:
                picked.append(pool[depth])
        depth += 1
    return sorted(picked)


# ----------------------------------------------------------------------------- decoding


def _decode_chunk(blobs: list[bytes], *, channels: int) -> list[torch.Tensor | None]:
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


def _decode_files(
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
        decoded = _decode_chunk(blobs, channels=channels)
        good = []
        for i, img in zip(range(start, stop), decoded):
            if img is None or img.ndim != 3 or min(img.shape[-2:]) == 0:
                kept[i] = False
                skipped.append(shown[i])
                _report_corrupt(shown[i], on_corrupt=on_corrupt, count=len(skipped))
            else:
                good.append((i, img))
        if good:
            _fit_all([img for _, img in good], out, [i for i, _ in good])
    if not bool(kept.any()):
        raise DataError(f"no readable images in {where} ({n} files could not be decoded)")
    if len(skipped) > MAX_CORRUPT_WARNINGS:
        _warn_line(f"skipped {len(skipped)} unreadable images in {where} in total")
    return (out if bool(kept.all()) else out[kept].contiguous()), kept, skipped


def _report_corrupt(name: str, *, on_corrupt: str, count: int) -> None:
    if on_corrupt == "error":
        raise DataError(f"cannot decode image {name}; delete or fix it, or pass on_corrupt='warn' to skip it")
    if count <= MAX_CORRUPT_WARNINGS:
        _warn_line(f"skipping unreadable image {name}")


def _warn_line(message: str) -> None:
    """A UserWarning printed as one line: attributed to this module at line 0, so no source line is echoed."""
    # warnings.warn would print the calling line of code under the message; filter with module="mosaic.data"
    warnings.warn_explicit(message, UserWarning, filename=__name__, lineno=0, module=__name__)


# ----------------------------------------------------------------------------- torchvision conversion


def _convert_dataset(dataset, *, image_size: int, channels: int, limit: int | None, seed: int):
    """Turn a torchvision-style data set into (uint8 images, labels or None, classes or None, [])."""
    import numpy as np

    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = getattr(dataset, "labels", None)
    labels = [int(y) for y in np.asarray(targets).reshape(-1)] if targets is not None else None
    if labels is not None and (len(labels) != n or all(y < 0 for y in labels)):
        labels = None  # e.g. STL-10 'unlabeled' marks every label -1
    order = _select(n, labels, limit=limit, seed=seed)
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


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# ----------------------------------------------------------------------------- cache


def _fingerprint(path: Path) -> list | None:
    """Cheap change detector: size and mtime of a file, or the mtimes of every folder in a tree."""
    if not path.exists():
        return None
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    marks = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        marks.append([os.path.relpath(dirpath, path), os.stat(dirpath).st_mtime_ns, len(filenames)])
    return marks


def _cache_path(
    source: _Source, *, image_size: int, channels: int, limit: int | None, seed: int, labelled: bool
) -> Path | None:
    """Cache file named by a hash of all the decoded tensor depends on; None while the source does not exist."""
    mark = _fingerprint(source.path)
    if mark is None:
        return None
    fields = {
        "version": CACHE_VERSION, "kind": source.kind, "path": str(source.path), "mark": mark,
        "split": source.split, "image_size": image_size, "channels": channels, "limit": limit,
        "seed": seed if limit is not None else None, "labelled": labelled,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{_slug(source.name)}-{digest[:20]}.pt"


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.split("(")[0].strip().lower())
    return "-".join(p for p in keep.split("-") if p)[-40:] or "images"


def _load_cache(path: Path, *, on_corrupt: str) -> ImageSet | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        result = ImageSet(
            images=blob["images"], labels=blob["labels"], classes=blob["classes"], name=blob["name"],
            mean=tuple(blob["mean"]), std=tuple(blob["std"]),
        )
        skipped = list(blob["skipped"])
    except Exception as err:  # a broken cache file is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache file {path} ({type(err).__name__}); decoding again", stacklevel=3)
        return None
    for count, name in enumerate(skipped, 1):
        _report_corrupt(name, on_corrupt=on_corrupt, count=count)
    return result


def _save_cache(path: Path, result: ImageSet, skipped: list[str]) -> None:
    blob = {
        "images": result.images, "labels": result.labels, "classes": result.classes, "name": result.name,
        "mean": list(result.mean), "std": list(result.std), "skipped": skipped,
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write cache file {path} ({err}); continuing without cache", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
