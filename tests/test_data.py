"""Tests of mosaic.data (loading, layouts, limit, cache, stats), mosaic.augment and datasets/prepare.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mosaic.data as data
import mosaic.data.decode as decode
from mosaic.augment import Augment, normalize, to_float
from mosaic.data import DataError, ImageSet, data_root, load_image_set
from mosaic.data.base import select_indices

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_cifar = pytest.mark.skipif(
    not (SHARED / "cifar10-jpeg.tar.gz").is_file(), reason=f"offline CIFAR-10 archive not found in {SHARED}"
)
needs_tiny = pytest.mark.skipif(
    not (SHARED / "tiny-imagenet-200-test.tar.gz").is_file(),
    reason=f"offline Tiny-ImageNet archives not found in {SHARED}",
)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own empty cache and no data root from the environment."""
    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOSAIC_DATA_ROOT", raising=False)


def write_image(path: Path, *, size=(16, 16), color=(10, 20, 30), mode="RGB", noise: int = 0) -> None:
    """Write a solid (optionally noisy) image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    base = np.broadcast_to(np.array(color if mode == "RGB" else color[0], dtype=np.int32), shape)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, size=shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode=mode).save(path)


def make_tree(root: Path, counts: dict[str, int], *, sizes=((16, 16), (20, 12), (40, 40)), mode="RGB") -> Path:
    """ImageFolder tree: one folder per class, images of mixed sizes and formats."""
    for k, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            suffix = ".png" if i % 2 else ".jpg"
            size = sizes[i % len(sizes)]
            write_image(root / name / f"{i:03d}{suffix}", size=size, color=(40 * k, 100, 200), mode=mode)
    return root


# ----------------------------------------------------------------------------- folders and layouts


def test_image_folder_mixed_sizes(tmp_path):
    root = make_tree(tmp_path / "tree", {"cat": 4, "dog": 3})
    result = load_image_set(str(root), image_size=8)
    assert isinstance(result, ImageSet)
    assert result.images.shape == (7, 3, 8, 8) and result.images.dtype == torch.uint8
    assert result.images.is_contiguous() and result.images.device.type == "cpu"
    assert result.classes == ["cat", "dog"] and result.num_classes == 2 and len(result) == 7
    assert result.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] and result.labels.dtype == torch.int64
    assert str(root) in result.name and "ImageFolder" in result.name
    # solid colours survive resizing: the red channel carries the class colour (0 or 40)
    assert abs(result.images[4, 0].float().mean().item() - 40) < 3


def test_resize_then_center_crop(tmp_path):
    # 40 wide x 20 tall: outer quarters red, middle half green -> shorter side to 10, centre 10x10 is all green
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 30:, 0] = 255
    pixels[:, 10:30, 1] = 255
    (tmp_path / "flat").mkdir()
    Image.fromarray(pixels).save(tmp_path / "flat" / "wide.png")
    result = load_image_set(str(tmp_path / "flat"), image_size=10)
    image = result.images[0].float()
    assert result.images.shape == (1, 3, 10, 10)
    assert image[1, :, 1:-1].min() > 200 and image[0, :, 1:-1].max() < 50


def test_corrupt_image_warns_and_is_skipped(tmp_path):
    root = make_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (root / "b" / "broken.jpg").write_bytes(b"this is not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = load_image_set(str(root), image_size=8)
    assert len(result) == 4 and result.labels.tolist() == [0, 0, 1, 1]


def test_corrupt_image_error_names_file(tmp_path):
    root = make_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="broken.png"):
        load_image_set(str(root), image_size=8, on_corrupt="error")


def test_only_corrupt_images_is_an_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable images"):
        load_image_set(str(tmp_path / "bad"))


def test_skipped_images_are_one_line_each_then_a_summary(tmp_path):
    """Each skipped file prints as one warning line (no echoed source line); after 10 only the total follows."""
    write_image(tmp_path / "pool" / "a.png")
    write_image(tmp_path / "pool" / "b.png")
    for i in range(12):
        (tmp_path / "pool" / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
    code = ("from mosaic.data import load_image_set; "
            f"print(len(load_image_set({str(tmp_path / 'pool')!r}, image_size=8, cache=False)))")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr
    lines = done.stderr.strip().splitlines()
    expected = [f"skipping unreadable image {tmp_path / 'pool' / f'bad{i:02d}.jpg'}" for i in range(10)]
    expected.append(f"skipped 12 unreadable images in {tmp_path / 'pool'} in total")
    assert lines == [f"mosaic.data:0: UserWarning: {text}" for text in expected]


def test_grayscale_28(tmp_path):
    root = make_tree(tmp_path / "digits", {"0": 3, "1": 3}, sizes=((28, 28),), mode="L")
    result = load_image_set(str(root), image_size=28, channels=1)
    assert result.images.shape == (6, 1, 28, 28) and len(result.mean) == 1 and len(result.std) == 1
    rgb = load_image_set(str(root), image_size=28, channels=3)
    assert rgb.images.shape == (6, 3, 28, 28)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])  # gray -> RGB repeats the channel


def test_rgb_to_gray_matches_pil(tmp_path):
    write_image(tmp_path / "flat" / "c.png", size=(8, 8), color=(200, 100, 50))
    result = load_image_set(str(tmp_path / "flat"), image_size=8, channels=1)
    expected = np.asarray(Image.open(tmp_path / "flat" / "c.png").convert("L")).astype(int)
    assert np.abs(result.images[0, 0].numpy().astype(int) - expected).max() <= 1


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        write_image(tmp_path / "flat" / f"{i}.jpg", size=(30, 24))
    result = load_image_set(str(tmp_path / "flat"), image_size=16)
    assert result.images.shape == (5, 3, 16, 16)
    assert result.labels is None and result.classes is None and result.num_classes is None


def test_split_subfolders(tmp_path):
    make_tree(tmp_path / "ds" / "train", {"a": 3, "b": 3})
    make_tree(tmp_path / "ds" / "test", {"a": 1, "b": 2})
    train = load_image_set(str(tmp_path / "ds"), image_size=8)
    test = load_image_set(str(tmp_path / "ds"), split="test", image_size=8)
    assert len(train) == 6 and len(test) == 3 and test.labels.tolist() == [0, 1, 1]
    assert "split 'test'" in test.name
    with pytest.raises(DataError, match="no 'val'"):
        load_image_set(str(tmp_path / "ds"), split="val")


def test_tar_archive_matches_folder(tmp_path):
    make_tree(tmp_path / "ds" / "train", {"a": 2, "b": 3})
    make_tree(tmp_path / "ds" / "test", {"a": 1, "b": 1})
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "ds", arcname="ds")  # a wrapper folder above the split folders
    folder = load_image_set(str(tmp_path / "ds"), split="test", image_size=8)
    packed = load_image_set(str(archive), split="test", image_size=8)
    assert torch.equal(folder.images, packed.images) and torch.equal(folder.labels, packed.labels)
    assert packed.classes == ["a", "b"] and "tar archive" in packed.name


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty"):
        load_image_set(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="nope"):
        load_image_set(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a tar archive"):
        load_image_set(str(tmp_path / "file.txt"))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"channels": 2}, "channels"),
        ({"on_corrupt": "ignore"}, "on_corrupt"),
        ({"limit": 0}, "limit"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_options(tmp_path, options, match):
    with pytest.raises(DataError, match=match):
        load_image_set(str(tmp_path), **options)


def test_limit_is_balanced_and_deterministic(tmp_path):
    root = make_tree(tmp_path / "tree", {"a": 10, "b": 10, "c": 10}, sizes=((8, 8),))
    first = load_image_set(str(root), image_size=8, limit=7, seed=3, cache=False)
    again = load_image_set(str(root), image_size=8, limit=7, seed=3, cache=False)
    other = load_image_set(str(root), image_size=8, limit=7, seed=4, cache=False)
    counts = torch.bincount(first.labels, minlength=3)
    assert len(first) == 7 and counts.max() - counts.min() <= 1
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert select_indices(30, [i // 10 for i in range(30)], limit=7, seed=3) != select_indices(
        30, [i // 10 for i in range(30)], limit=7, seed=4
    )
    assert len(other) == 7
    assert len(load_image_set(str(root), image_size=8, limit=100)) == 30  # more than there is: everything


def test_limit_unlabelled_random_subset(tmp_path):
    for i in range(20):
        write_image(tmp_path / "flat" / f"{i:02d}.png", size=(8, 8), color=(i * 10, 0, 0))
    a = load_image_set(str(tmp_path / "flat"), image_size=8, limit=5, seed=1)
    b = load_image_set(str(tmp_path / "flat"), image_size=8, limit=5, seed=1, cache=False)
    reds = sorted(int(v) for v in a.images[:, 0, 0, 0])
    assert len(a) == 5 and torch.equal(a.images, b.images) and reds != [0, 10, 20, 30, 40]


def test_labelled_false_drops_labels(tmp_path):
    root = make_tree(tmp_path / "tree", {"a": 2, "b": 2})
    result = load_image_set(str(root), image_size=8, labelled=False, limit=2)
    assert result.labels is None and result.classes is None and "labels dropped" in result.name
    assert len(result) == 2


def test_cache_hit_does_not_decode(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", {"a": 3, "b": 3})
    first = load_image_set(str(root), image_size=8)
    assert list((tmp_path / "cache").glob("*.pt")) and not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoder called on a cache hit")

    monkeypatch.setattr(decode, "decode_chunk", no_decoding)
    second = load_image_set(str(root), image_size=8)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.mean == first.mean and second.name == first.name
    with pytest.raises(AssertionError, match="decoder called"):
        load_image_set(str(root), image_size=8, cache=False)
    with pytest.raises(AssertionError, match="decoder called"):
        load_image_set(str(root), image_size=16)  # another size is another key
    write_image(root / "a" / "new.png")
    with pytest.raises(AssertionError, match="decoder called"):
        load_image_set(str(root), image_size=8)  # the folder changed


def test_cache_remembers_skipped_files(tmp_path):
    root = make_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (root / "a" / "broken.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="broken.jpg"):
        load_image_set(str(root), image_size=8)
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert len(load_image_set(str(root), image_size=8)) == 4
    with pytest.raises(DataError, match="broken.jpg"):
        load_image_set(str(root), image_size=8, on_corrupt="error")


def test_stats_match_hand_computation(tmp_path):
    # two 2x2 solid PNGs: (0, 51, 255) and (255, 153, 255) -> per channel two values, half the pixels each
    write_image(tmp_path / "flat" / "1.png", size=(2, 2), color=(0, 51, 255))
    write_image(tmp_path / "flat" / "2.png", size=(2, 2), color=(255, 153, 255))
    result = load_image_set(str(tmp_path / "flat"), image_size=2)
    expected_mean = [(0 + 1) / 2, (0.2 + 0.6) / 2, 1.0]
    expected_std = [0.5, 0.2, 0.0]  # population std of two equally frequent values is half their gap
    assert result.mean == pytest.approx(expected_mean, abs=1e-5)
    assert result.std == pytest.approx(expected_std, abs=1e-5)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_root("/some/where") == Path("/some/where")
    monkeypatch.setenv("MOSAIC_DATA_ROOT", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("MOSAIC_DATA_ROOT")
    (tmp_path / "data").mkdir()
    assert data_root() == (tmp_path / "data").resolve()


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="neither a known name"):
        load_image_set("imagenet-42")


def test_offline_archive_fake_and_prepare(tmp_path):
    """A stand-in cifar10-jpeg archive: read directly, extracted by datasets/prepare.py, then read from the folder."""
    make_tree(tmp_path / "src" / "cifar10-jpeg" / "train", {"cat": 2, "dog": 2}, sizes=((32, 32),))
    make_tree(tmp_path / "src" / "cifar10-jpeg" / "test", {"cat": 1, "dog": 1}, sizes=((32, 32),))
    (tmp_path / "archives").mkdir()
    with tarfile.open(tmp_path / "archives" / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    packed = load_image_set("cifar10", split="test", root=str(tmp_path / "archives"))
    assert packed.name == "cifar10 (offline JPEG archive, test)" and len(packed) == 2
    assert packed.mean == data.KNOWN_STATS["cifar10"][0]
    with pytest.raises(DataError, match="splits"):
        load_image_set("cifar10", split="val", root=str(tmp_path / "archives"))

    spec = importlib.util.spec_from_file_location("prepare", REPO / "datasets" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path / "out"
    assert prepare.main(["cifar10-jpeg", "--root", str(out), "--source", str(tmp_path / "archives")]) == 0
    assert (out / "cifar10-jpeg" / "train" / "cat").is_dir()
    assert prepare.main(["cifar10-jpeg", "--check", "--root", str(out), "--source", str(tmp_path / "archives")]) == 0
    extracted = load_image_set("cifar10-jpeg", split="test", root=str(out))
    assert extracted.name == "cifar10 (offline JPEG folder, test)"
    assert torch.equal(extracted.images, packed.images)


# ----------------------------------------------------------------------------- offline archives


@needs_cifar
def test_offline_cifar10_test_split():
    result = load_image_set("cifar10", split="test", limit=200, root=str(SHARED))
    assert result.images.shape == (200, 3, 32, 32) and result.images.dtype == torch.uint8
    assert result.num_classes == 10 and result.classes[0] == "airplane" and result.classes[-1] == "truck"
    assert torch.bincount(result.labels, minlength=10).tolist() == [20] * 10
    assert "offline JPEG archive" in result.name
    assert 40 < result.images.float().mean().item() < 200


@needs_tiny
def test_offline_tiny_imagenet():
    result = load_image_set("tiny-imagenet", limit=100, root=str(SHARED), image_size=32)
    assert result.images.shape == (100, 3, 32, 32) and result.labels is None
    assert all(0.2 < m < 0.7 for m in result.mean) and all(0.1 < s < 0.4 for s in result.std)
    val = load_image_set("tiny-imagenet-val", limit=202, root=str(SHARED))
    assert val.num_classes == 202 and torch.bincount(val.labels).tolist() == [1] * 202


# ----------------------------------------------------------------------------- torchvision sources


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_torchvision_missing_without_download(tmp_path, name):
    with pytest.raises(DataError, match="download"):
        load_image_set(name, split="test", root=str(tmp_path))


def test_torchvision_bad_split(tmp_path):
    with pytest.raises(DataError, match="splits"):
        load_image_set("svhn", split="val", root=str(tmp_path))


class FakeCIFAR:
    """CIFAR-like stand-in: numpy (N, H, W, C) uint8 data, `targets`, `classes`."""

    def __init__(self, root, train=True, download=False):
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 3 for i in range(12)]
        self.classes = ["x", "y", "z"]

    def __len__(self):
        return len(self.data)


class FakeSVHN:
    """SVHN-like stand-in: numpy (N, C, H, W) data and `labels`, no class names."""

    def __init__(self, root, split="train", download=False):
        self.data = np.full((6, 3, 32, 32), 7, dtype=np.uint8)
        self.labels = np.array([0, 1, 2, 0, 1, 2])

    def __len__(self):
        return len(self.data)


class FakeSTL10Unlabeled:
    """STL-10 'unlabeled'-like stand-in: items are (PIL image 96x96, -1), no `data` attribute."""

    def __init__(self, root, split="train", download=False):
        self.split = split

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return Image.new("RGB", (96, 96), (i * 50, 0, 0)), -1


class FakePILItems:
    """A data set that only supports indexing: (PIL image, label) items of size 40x40."""

    classes = ["p", "q"]

    def __init__(self, root, train=True, download=False):
        pass

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return Image.new("L", (40, 40), 30 * i), i % 2


class Offline:
    """Stand-in whose download fails as it does without network."""

    def __init__(self, root, download=False, **kwargs):
        if download:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


def test_torchvision_conversion_numpy_nhwc(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR)
    (tmp_path / "cifar100").mkdir()
    result = load_image_set("cifar100", root=str(tmp_path))
    expected = torch.from_numpy(FakeCIFAR(None).data).permute(0, 3, 1, 2)
    assert torch.equal(result.images, expected) and result.labels.tolist() == FakeCIFAR(None).targets
    assert result.classes == ["x", "y", "z"] and result.name == "cifar100 (torchvision, train)"
    assert result.mean == data.KNOWN_STATS["cifar100"][0]
    small = load_image_set("cifar100", root=str(tmp_path), limit=6, image_size=16, channels=1)
    assert small.images.shape == (6, 1, 16, 16) and torch.bincount(small.labels).tolist() == [2, 2, 2]


def test_torchvision_conversion_nchw_labels(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    (tmp_path / "svhn").mkdir()
    result = load_image_set("svhn", split="test", root=str(tmp_path))
    assert result.images.shape == (6, 3, 32, 32) and int(result.images.max()) == 7
    assert result.labels.tolist() == [0, 1, 2, 0, 1, 2] and result.classes == ["0", "1", "2"]


def test_torchvision_conversion_pil_items(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10Unlabeled)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakePILItems)
    (tmp_path / "stl10").mkdir()
    (tmp_path / "cifar10").mkdir()
    unlabeled = load_image_set("stl10", split="unlabeled", root=str(tmp_path), image_size=32)
    assert unlabeled.images.shape == (4, 3, 32, 32) and unlabeled.labels is None
    assert [int(v) for v in unlabeled.images[:, 0, 5, 5]] == [0, 50, 100, 150]
    items = load_image_set("cifar10", root=str(tmp_path))  # no offline archive under tmp_path
    assert items.images.shape == (6, 3, 32, 32) and items.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert items.classes == ["p", "q"] and int(items.images[2, 1, 0, 0]) == 60


def test_torchvision_download_failure_is_clear(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(DataError, match="could not download CIFAR-100.*internet"):
        load_image_set("cifar100", root=str(tmp_path), download=True)
    (tmp_path / "cifar100").mkdir()
    with pytest.raises(DataError, match="incomplete or corrupt.*download"):
        load_image_set("cifar100", root=str(tmp_path))


# ----------------------------------------------------------------------------- augment


def test_to_float_and_normalize():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    x = to_float(images)
    assert x.dtype == torch.float32 and x.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    y = normalize(x, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert y.flatten().tolist() == pytest.approx([0.0, 0.0, 2.0])
    assert normalize(x[0].double(), (0, 0, 0), (1, 1, 1)).dtype == torch.float64
    with pytest.raises(ValueError, match="one per channel"):
        normalize(x, (0.5,), (0.5,))


def test_augment_shape_dtype_range():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = Augment(image_size=32)(images)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert Augment(image_size=32)(to_float(images)).dtype == torch.float32
    with pytest.raises(ValueError, match="padding_mode"):
        Augment(image_size=32, padding_mode="wrap")
    with pytest.raises(ValueError, match="batch"):
        Augment(image_size=32)(images[0])


def test_augment_flip_only_is_exact():
    torch.manual_seed(0)
    images = to_float(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8))
    out = Augment(image_size=8, padding=0)(images)
    flipped = [torch.equal(o, x.flip(-1)) for o, x in zip(out, images)]
    kept = [torch.equal(o, x) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    torch.manual_seed(1)
    images = to_float(torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8))
    out = Augment(image_size=8, padding=2, flip=False)(images)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for o, p in zip(out, padded):
        assert any(torch.equal(o, p[:, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5))


def test_augment_is_reproducible_under_seed():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    augment = Augment(image_size=32, padding_mode="reflect")
    torch.manual_seed(7)
    a = augment(images)
    torch.manual_seed(7)
    b = augment(images)
    c = augment(images)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("shape, size, padding, flip", [((7, 3, 12, 12), 12, 4, True), ((5, 1, 10, 14), 10, 2, True),
                                                         ((4, 3, 8, 8), 8, 3, False), ((6, 3, 9, 9), 9, 0, True)])
def test_fast_augment_is_kornias_pixel_for_pixel(mode, shape, size, padding, flip):
    """The one-gather path draws like kornia's RandomCrop + RandomHorizontalFlip and gives the same pixels."""
    from mosaic.augment import Augment
    torch.manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    for seed in range(3):
        torch.manual_seed(seed)
        slow = Augment(image_size=size, padding=padding, flip=flip, padding_mode=mode, fast=False)(x)
        after_slow = torch.rand(1)
        torch.manual_seed(seed)
        fast = Augment(image_size=size, padding=padding, flip=flip, padding_mode=mode, fast=True)(x)
        assert torch.equal(fast, slow)
        assert torch.equal(torch.rand(1), after_slow)  # the same random numbers were consumed


def test_select_ood_keeps_the_highest_teacher_entropy_and_caches_the_choice(tmp_path):
    """select_ood keeps the images on which the teacher is least sure, in pool order, and reuses its cached choice."""
    from accelerate import Accelerator

    from mosaic.methods import Context
    from mosaic.ood_select import select_ood

    class MeanTeacher(torch.nn.Module):
        """Logits (20 |m - 0.5|, 0, 0) for an image of mean m: the further from grey, the surer."""
        def forward(self, x):
            s = 20 * (x.mean(dim=(1, 2, 3)) - 0.5).abs()
            return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], dim=1)

    levels = torch.tensor([0, 250, 120, 200, 131, 60, 255, 128])
    pool = ImageSet(images=levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous(), labels=None,
                    classes=None, name="grey levels", mean=(0.5,) * 3, std=(0.25,) * 3)
    ctx = Context(cfg={"eval_batch_size": 3}, opts={}, teacher=MeanTeacher(), student=torch.nn.Identity(),
                  num_classes=3, image_size=4, channels=3, mean=torch.zeros(3), std=torch.ones(3),
                  device=torch.device("cpu"), accelerator=Accelerator(cpu=True), steps=1, batch_size=1)
    teacher_file = tmp_path / "teacher.safetensors"
    teacher_file.write_bytes(b"weights")
    kept = select_ood(pool, ctx, keep=3, teacher_file=str(teacher_file), batch_size=3)
    # by hand: |level/255 - 0.5| is smallest for 128, 131, 120 (indices 7, 4, 2), kept in pool order
    assert kept.images[:, 0, 0, 0].tolist() == [120, 131, 128]
    assert "top-3 entropy" in kept.name and kept.labels is None
    cached = list((Path(data.cache_dir()) / "ood_select").glob("*.pt"))
    assert len(cached) == 1

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cached choice must be reused, not recomputed")
    ctx.teacher = Broken()
    assert torch.equal(select_ood(pool, ctx, keep=3, teacher_file=str(teacher_file)).images, kept.images)
    assert select_ood(pool, ctx, keep=8, teacher_file=str(teacher_file)) is pool  # nothing to drop
