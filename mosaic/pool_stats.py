"""What a teacher's predictions over an image pool say, and which method the measured regime map favours for it.

`pool_stats` turns the teacher's softmax outputs over a set of images into the statistics `mosaic inspect`
reports; `advise` applies the rule fitted on the measured cells of the regime map
(experiments/results/README.md, "Regime map"), whose statistics `mosaic inspect` itself made and
mosaic/regime_cells.json stores, and says how far the pool is from the nearest of them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CELLS_FILE = Path(__file__).with_name("regime_cells.json")
THRESHOLDS = (0.5, 0.9)  # the max-probability levels `confident` counts images above


def pool_stats(probs: Tensor, *, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Statistics of a teacher's softmax outputs (N, C) over a set of images.

    counts: images per class by the teacher's argmax; rarest_share / commonest_share: the smallest and largest
    share of those; rarest_ratio: rarest_share x C (1 when the classes are balanced, 0 when one is never
    predicted); coverage_entropy: entropy of the class histogram / log C (1 = balanced); mean_max_prob: the mean
    of each image's top probability; confident: images per class whose top probability is above each threshold.
    """
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (N, C) with N > 0, got shape {tuple(probs.shape)}")
    probs = probs.float()
    n, c = probs.shape
    top, pred = probs.max(dim=1)
    counts = torch.bincount(pred, minlength=c)
    share = counts.double() / n
    used = share[share > 0]
    entropy = float(-(used * used.log()).sum()) / math.log(c) if c > 1 else 1.0
    return {
        "pool_size": n,
        "num_classes": c,
        "counts": counts.tolist(),
        "rarest_share": float(share.min()),
        "commonest_share": float(share.max()),
        "rarest_ratio": float(share.min()) * c,
        "coverage_entropy": entropy,
        "mean_max_prob": float(top.double().mean()),
        "confident": {str(t): torch.bincount(pred[top > t], minlength=c).tolist() for t in thresholds},
    }


def most_uncertain(logits: Tensor, keep: int) -> Tensor:
    """Sorted indices of the `keep` images with the highest teacher entropy (MosaicKD's `data.ood_select`)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return torch.argsort(entropy, descending=True)[:keep].sort().values


@dataclass(frozen=True)
class Rule:
    """The regime map as a rule over pool statistics; thresholds sit halfway between cells with different winners.

    far_ratio: a pool whose rarest class gets under this fraction of a balanced share leaves that class
    nearly untaught, and MosaicKD's class-balance term makes up for it. small_pool / sure_teacher: a pool
    this small, re-read by KD, stalls while generated images keep adding inputs, but only with a teacher
    sure enough on it (mean top probability). The cells' statistics: mosaic/regime_cells.json. A cell
    measured as a tie (within half a point) counts for kd_ood: the same accuracy for less compute.
    """
    far_ratio: float = 0.27      # far pools 0.14, near pools >= 0.40
    small_pool: int = 3000       # MosaicKD won only on 1,000-image pools, KD on every 10,000-image one
    sure_teacher: float = 0.56   # 1k near pool: the one-epoch teacher 0.507 (KD won), the three-epoch 0.607 (MosaicKD)

    def __call__(self, stats: dict) -> tuple[str, str]:
        """(method, reason) for a pool's statistics: "mosaic" or "kd_ood"."""
        if stats["rarest_ratio"] < self.far_ratio:
            return "mosaic", (f"the teacher's rarest class gets {stats['rarest_ratio']:.2f} of a balanced share "
                              f"(< {self.far_ratio}): the pool leaves it nearly untaught and MosaicKD's "
                              f"class-balance term makes up for it")
        if stats["pool_size"] <= self.small_pool and stats["mean_max_prob"] >= self.sure_teacher:
            return "mosaic", (f"a small pool ({stats['pool_size']} <= {self.small_pool} images) that a sure "
                              f"teacher (mean top probability {stats['mean_max_prob']:.2f} >= {self.sure_teacher}) "
                              f"reads: KD re-reads the same images and stalls, generated images keep adding new ones")
        return "kd_ood", ("the pool covers the teacher's classes"
                          + (f" and is large ({stats['pool_size']} > {self.small_pool} images)"
                             if stats["pool_size"] > self.small_pool else
                             f", and the teacher is unsure on it (mean top probability {stats['mean_max_prob']:.2f} "
                             f"< {self.sure_teacher})")
                          + ": plain KD on the pool's images has led MosaicKD there")


# What "how far" means: one unit is a tenfold pool size, 0.1 of a balanced share for the rarest class,
# 0.05 of mean top probability, 0.05 of coverage entropy; the distance is the largest of the four.
SCALES = {"log10_pool_size": 1.0, "rarest_ratio": 0.1, "mean_max_prob": 0.05, "coverage_entropy": 0.05}
NEAR = 2.0  # a pool further than this from every cell is unlike all of them


def features(stats: dict) -> dict[str, float]:
    """The statistics the distance to a cell is measured on."""
    return {"log10_pool_size": math.log10(max(1, stats["pool_size"])), "rarest_ratio": stats["rarest_ratio"],
            "mean_max_prob": stats["mean_max_prob"], "coverage_entropy": stats["coverage_entropy"]}


def distance(a: dict, b: dict) -> float:
    """How far two pools' statistics are, in SCALES units (the largest per-statistic gap)."""
    fa, fb = features(a), features(b)
    return max(abs(fa[k] - fb[k]) / s for k, s in SCALES.items())


def load_cells(path: Path = CELLS_FILE) -> list[dict]:
    """The measured cells: `name`, `winner`, `mosaic_minus_kd` (points), `source` and the `stats` inspect made."""
    if not path.is_file():  # only while experiments/regime_pools.py makes it: the package ships it
        return []
    return json.loads(path.read_text())["cells"]


def advise(stats: dict, *, cells: list[dict] | None = None, rule: Rule = Rule()) -> dict:
    """The advice for a pool: the rule's method, or "both" when the pool is unlike every measured cell."""
    cells = load_cells() if cells is None else cells
    method, reason = rule(stats)
    ranked = sorted(cells, key=lambda cell: distance(stats, cell["stats"]))
    nearest = [{"cell": c["name"], "winner": c["winner"], "mosaic_minus_kd": c["mosaic_minus_kd"], "source": c["source"],
                "distance": round(distance(stats, c["stats"]), 2)} for c in ranked[:3]]
    units = ", ".join(f"{k} {s}" for k, s in SCALES.items())
    evidence = {"rule": reason, "rule_method": method, "nearest_cells": nearest, "cells": [c["name"] for c in cells],
                "distance": f"the largest gap over {units} (one unit each); near means <= {NEAR}"}
    if not nearest or nearest[0]["distance"] > NEAR:
        far = (f" (nearest {nearest[0]['cell']} at {nearest[0]['distance']})" if nearest else
               f" (no measured cells: {CELLS_FILE.name} is missing)")
        return {"advice": "both", "evidence": evidence,
                "text": f"this pool is unlike every measured cell{far}: run both, kd_ood first (it is cheaper), "
                        f"then mosaic; the rule alone would say {method}"}
    name = {"mosaic": "MosaicKD (method=mosaic)", "kd_ood": "KD on the pool (method=kd_ood)"}[method]
    return {"advice": method, "evidence": evidence,
            "text": f"{name}: {reason}; nearest measured cell {nearest[0]['cell']} (distance "
                    f"{nearest[0]['distance']}, {nearest[0]['winner']}: MosaicKD - KD "
                    f"{nearest[0]['mosaic_minus_kd']:+.2f} points)"}
