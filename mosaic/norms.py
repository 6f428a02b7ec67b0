"""Per-data-set normalisation constants (no torch): one place for data loading, model configs and benchmarks.

Per-channel (mean, std) in [0, 1]: the values used by the MosaicKD / CMI reference code, so that
teachers trained there and here see the same inputs. (CIFAR-10's std there is the common
0.2023/0.1994/0.2010; the true per-pixel std is about 0.247/0.243/0.261.)
"""
from __future__ import annotations

__all__ = ["KNOWN_STATS", "CIFAR10_MEAN", "CIFAR10_STD"]

KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

CIFAR10_MEAN, CIFAR10_STD = KNOWN_STATS["cifar10"]
