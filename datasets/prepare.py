#!/usr/bin/env python
"""Put data sets where mosaic-kd reads them, and check what is there.

Examples:
  python datasets/prepare.py cifar10-jpeg --root data            # extract the offline archive into data/cifar10-jpeg/
  python datasets/prepare.py all --root data                     # extract every offline archive found
  python datasets/prepare.py cifar100 svhn --download --root data  # torchvision download (needs internet)
  python datasets/prepare.py --check --root data                 # load every available source and print counts

Offline archives are looked for in --source (default: the data root, then ../shared/data).
Extraction is optional: the loaders also read the .tar.gz archives directly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from mosaic.data import DataError, data_root, load_image_set  # noqa: E402
from mosaic.data.sources import OFFLINE, TORCHVISION, open_torchvision  # noqa: E402

SPLITS = {
    "cifar10-jpeg": ("train", "test"),
    "tiny-imagenet-test": ("train",),
    "tiny-imagenet-val": ("train",),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn": ("train", "test"),
    "stl10": ("train", "test", "unlabeled"),
}
NAMES = list(SPLITS)


def find_archive(stem: str, places: list[Path]) -> Path | None:
    """First `<stem>.tar.gz` (or .tgz / .tar) found in `places`."""
    for place in places:
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if (place / f"{stem}{suffix}").is_file():
                return place / f"{stem}{suffix}"
    return None


def safe_members(archive: tarfile.TarFile, where: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders of an archive, refusing paths that would land outside the target."""
    members = []
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise DataError(f"archive {where} holds an unsafe path {member.name!r}; refusing to extract it")
        if member.isfile() or member.isdir():
            members.append(member)
    return members


def extract(name: str, *, root: Path, places: list[Path]) -> None:
    """Extract one offline archive into <root>/<stem>/ unless that folder already exists."""
    stem = OFFLINE[name][0]
    target = root / stem
    if target.is_dir():
        print(f"{name}: already extracted at {target}")
        return
    archive_path = find_archive(stem, places)
    if archive_path is None:
        print(f"{name}: no {stem}.tar.gz in {', '.join(map(str, places))}; skipped")
        return
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{stem}-") as tmp:
        with tarfile.open(archive_path) as archive:
            archive.extractall(tmp, members=safe_members(archive, archive_path))
        inner = Path(tmp) / stem
        shutil.move(str(inner if inner.is_dir() else Path(tmp)), str(target))
    print(f"{name}: extracted {archive_path} -> {target} in {time.time() - start:.1f}s")


def download(name: str, *, root: Path) -> None:
    """Download every split of a torchvision data set into <root>/<name>."""
    target = root / TORCHVISION[name][1]
    for split in SPLITS[name]:
        try:
            open_torchvision(name, split=split, target=target, download=True, root=root)
            print(f"{name} {split}: ready under {target}")
        except DataError as err:
            print(f"{name} {split}: {err}")


def check(names: list[str], *, root: Path, limit: int | None) -> int:
    """Load each available source with load_image_set and print what it holds; returns the number loaded."""
    loaded = 0
    for name in names:
        for split in SPLITS[name]:
            start = time.time()
            try:
                images = load_image_set(name, split=split, root=str(root), limit=limit)
            except DataError as err:
                print(f"{name:20s} {split:10s} not available: {err}")
                continue
            loaded += 1
            classes = images.num_classes if images.num_classes is not None else "unlabelled"
            print(
                f"{name:20s} {split:10s} {len(images):7d} images {tuple(images.images.shape[1:])} "
                f"classes={classes} mean={images.mean} std={images.std} ({time.time() - start:.1f}s) {images.name}"
            )
    return loaded


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: extract, download and/or check data sets."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("names", nargs="*", default=["all"], help=f"data sets: {', '.join(NAMES)} or all (default: all)")
    add("--root", default=None, help="data root to fill (default: $MOSAIC_DATA_ROOT, ./data, ../shared/data)")
    add("--source", default=None, help="folder holding the offline .tar.gz archives (default: root, then ../shared/data)")
    add("--download", action="store_true", help="download torchvision sets (cifar10/cifar100/svhn/stl10); needs internet")
    add("--check", action="store_true", help="load each available source and print image counts")
    add("--limit", type=int, default=None, help="with --check: load at most this many images per split")
    args = parser.parse_args(argv)

    names = NAMES if "all" in args.names else args.names
    unknown = [n for n in names if n not in SPLITS]
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(NAMES)} or all")
    root = data_root(args.root)
    places = [Path(args.source)] if args.source else [root, REPO.parent / "shared" / "data", Path("../shared/data")]
    try:
        if not args.check or any(n in OFFLINE for n in args.names):
            for name in names:
                if name in OFFLINE:
                    extract(name, root=root, places=places)
                elif args.download:
                    download(name, root=root)
                elif not args.check:
                    target = root / TORCHVISION[name][1]
                    print(f"{name}: torchvision data set; pass --download to fetch it into {target}")
        if args.check:
            if check(names, root=root, limit=args.limit) == 0:
                print(f"nothing could be loaded from {root}", file=sys.stderr)
                return 1
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
