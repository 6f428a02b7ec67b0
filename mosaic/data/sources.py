"""Where images come from: named data sets (offline archives, torchvision), folders and tar archives, their layouts."""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mosaic.data.base import DataError, select_indices
from mosaic.data.decode import convert_dataset, decode_files

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
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


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where images come from and how to read them; `load` returns (images, labels, classes, skipped)."""

    name: str
    path: Path
    kind: str  # "files" (folder or archive) or "torchvision"
    split: str | None
    stats_key: str | None = None
    load: Callable[..., tuple] | None = None


def resolve_source(spec: str, *, split: str, root: Path, download: bool) -> Source:
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


def _offline_source(name: str, path: Path, split: str) -> Source:
    readable = OFFLINE[name][1]
    form = "offline JPEG folder" if path.is_dir() else "offline JPEG archive"
    if name == "cifar10-jpeg":
        if split not in ("train", "test"):
            raise DataError(f"CIFAR-10 has splits 'train' and 'test', got split={split!r}")
        label = f"{readable} ({form}, {split})"
        return _files_source(path.resolve(), split=split, label=label, stats_key="cifar10")
    label = f"{readable} ({form}{', unlabelled' if name == 'tiny-imagenet-test' else ''})"
    return _files_source(path.resolve(), split=None, label=label, stats_key=None)


def _files_source(path: Path, *, split: str | None, label: str | None, stats_key: str | None) -> Source:
    is_archive = path.is_file()
    if is_archive and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        suffixes = ", ".join(ARCHIVE_SUFFIXES)
        raise DataError(f"{path} is a file but not a tar archive ({suffixes}); pass a folder or an archive")
    kind = "tar archive" if is_archive else "folder"
    source = Source(name=label or f"{kind} {path}", path=path, kind="files", split=split, stats_key=stats_key)

    def load(*, image_size, channels, limit, seed, on_corrupt):
        """List the files, pick the layout and subset, decode."""
        names, read = _scan_archive(path) if is_archive else _scan_folder(path)
        picked, labels, classes, layout = _layout(names, split=split, where=path)
        if label is None:
            source.name = f"{kind} {path} ({layout})"
        order = select_indices(len(picked), labels, limit=limit, seed=seed)
        files = [names[picked[i]] for i in order]
        shown = [f"{path}:{n}" if is_archive else str(path / n) for n in files]
        images, kept, skipped = decode_files(
            lambda i: read(files[i]), shown, image_size=image_size, channels=channels, on_corrupt=on_corrupt, where=path
        )
        label_tensor = None
        if labels is not None:
            label_tensor = torch.tensor([labels[i] for i in order], dtype=torch.int64)[kept]
        return images, label_tensor, classes, skipped

    source.load = load
    return source


def _torchvision_source(name: str, *, split: str, root: Path, download: bool) -> Source:
    cls_name, folder, splits, readable = TORCHVISION[name]
    if name == "stl10" and split == "unlabelled":
        split = "unlabeled"
    if split not in splits:
        raise DataError(f"{readable} has splits {', '.join(splits)}; got split={split!r}")
    target = root / folder
    source = Source(
        name=f"{name} (torchvision, {split})", path=target, kind="torchvision", split=split, stats_key=name
    )

    def load(*, image_size, channels, limit, seed, on_corrupt):
        """Open (or download) the torchvision set and convert it."""
        dataset = open_torchvision(name, split=split, target=target, download=download, root=root)
        return convert_dataset(dataset, image_size=image_size, channels=channels, limit=limit, seed=seed)

    source.load = load
    return source


def open_torchvision(name: str, *, split: str, target: Path, download: bool, root: Path):
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
