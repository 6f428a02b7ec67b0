"""The on-disk cache of decoded data sets: one .pt file per (source, size, channels, subset), checked on load."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mosaic.data.base import ImageSet, cache_dir
from mosaic.data.decode import report_corrupt

if TYPE_CHECKING:
    from mosaic.data.sources import Source

CACHE_VERSION = 1


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


def cache_path(
    source: Source, *, image_size: int, channels: int, limit: int | None, seed: int, labelled: bool
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


def load_cache(path: Path, *, on_corrupt: str) -> ImageSet | None:
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
        report_corrupt(name, on_corrupt=on_corrupt, count=count)
    return result


def save_cache(path: Path, result: ImageSet, skipped: list[str]) -> None:
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
