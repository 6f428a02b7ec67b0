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
UNTAUGHT_SHARE = 0.25  # a class the teacher gives under this fraction of a balanced share of the pool is untaught:
                       #   the animal-only pool leaves truck 0.07, automobile 0.19, ship 0.22; every near pool's
                       #   rarest class is at 0.40 or more


def untaught(counts: list[int], *, share: float = UNTAUGHT_SHARE) -> list[int]:
    """The classes a pool cannot teach: the teacher predicts each for under `share` of a balanced share of it."""
    n, c = sum(counts), len(counts)
    return [i for i, k in enumerate(counts) if k < share * n / c]


def untaught_count(stats: dict) -> int:
    """How many of the teacher's classes a pool leaves untaught (from its stored list, else from its counts)."""
    if "untaught" in stats:
        return len(stats["untaught"])
    return len(untaught(stats["counts"])) if "counts" in stats else 0


def pool_stats(probs: Tensor, *, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Statistics of a teacher's softmax outputs (N, C) over a set of images.

    counts: images per class by the teacher's argmax; rarest_share / commonest_share: the smallest and largest
    share of those; rarest_ratio: rarest_share x C (1 when the classes are balanced, 0 when one is never
    predicted); untaught: the classes given under UNTAUGHT_SHARE of a balanced share (the pool cannot teach them);
    coverage_entropy: entropy of the class histogram / log C (1 = balanced); mean_max_prob: the mean of each image's
    top probability; confident: images per class whose top probability is above each threshold.
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
        "untaught": untaught(counts.tolist()),
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

    A cell is won when MosaicKD - KD is at least half a point on the mean and every seed pair agrees; otherwise it
    is a tie, which counts for kd_ood (the same accuracy for less compute); where a pool was measured at several
    budgets the longest decides (mosaic/regime_cells.json holds the cells). left_out: a pool that leaves this
    many of the teacher's classes untaught (untaught()) goes to MosaicKD first, whatever else it shows: KD cannot
    teach a class its pool never shows (the MosaicKD paper's CIFAR-100 teacher on a CIFAR-10 pool, WRN-40-2 ->
    WRN-16-1: 61.01 against 47.47; issue 34's grayscale task with two classes left out: +23 points; here the pair's
    animal-only pool in cpu-wrn-far measures it). far_ratio: a far pool leaves the
    teacher's rarest class under this fraction of a balanced share. sure_teacher: the teacher's mean top
    probability on the pool. small_pool: pool size. MosaicKD won the far pool with the one-epoch teacher (four seed
    pairs at 400 steps, one at 1,000) and with the paper's WRN-40-2 (+21.60, one pair at 720 steps), tied it with
    the three-epoch teacher at 400 steps (seeds split: no pool statistic tells that cell from the other two, so
    far pools go to MosaicKD and that tie is the rule's one non-decisive exception), won a small near pool read
    by a sure teacher (three-epoch teacher, 1,000 steps, two pairs), and KD won or tied every 10,000-image pool.
    """
    left_out: int = 2            # untaught classes (UNTAUGHT_SHARE) from which a pool goes to MosaicKD first
    far_ratio: float = 0.27      # far pools 0.14, near pools >= 0.40
    small_pool: int = 3000       # MosaicKD won only on 1,000-image pools, KD on every 10,000-image one
    sure_teacher: float = 0.56   # the one-epoch teacher 0.505 to 0.509 on every pool, the three-epoch 0.607 to 0.616

    def __call__(self, stats: dict) -> tuple[str, str]:
        """(method, reason) for a pool's statistics: "mosaic" or "kd_ood"."""
        rarest, sure = stats["rarest_ratio"], stats["mean_max_prob"]
        missing = untaught_count(stats)
        if missing >= self.left_out:
            return "mosaic", (f"the pool leaves {missing} of the teacher's {stats['num_classes']} classes untaught "
                              f"(each under {UNTAUGHT_SHARE} of a balanced share): KD on the pool cannot teach a "
                              f"class it never shows, whatever the teacher's confidence; MosaicKD's generator, held "
                              f"to the teacher's classes in balance, makes images of them")
        far = (f"the teacher's rarest class gets {rarest:.2f} of a balanced share (< {self.far_ratio}): a far pool "
               f"that leaves that class nearly untaught")
        if rarest < self.far_ratio:
            return "mosaic", (f"{far} (teacher's mean top probability here {sure:.2f}): on far pools MosaicKD led KD "
                              f"with the unsure one-epoch teacher (four seed pairs) and the paper's sure WRN-40-2 "
                              f"(+21.60 points, one seed pair) and tied with the three-epoch teacher at 400 steps "
                              f"(seeds split); its class-balance term asks the generator for the class the pool lacks")
        if stats["pool_size"] <= self.small_pool and sure >= self.sure_teacher:
            return "mosaic", (f"a small pool ({stats['pool_size']} <= {self.small_pool} images) that a sure "
                              f"teacher (mean top probability {sure:.2f} >= {self.sure_teacher}) "
                              f"reads: KD re-reads the same images and stalls, generated images keep adding new ones "
                              f"(a lead measured at 1,000 steps, a tie at 400: give MosaicKD the long budget)")
        return "kd_ood", ("the pool covers the teacher's classes"
                          + (f" and is large ({stats['pool_size']} > {self.small_pool} images)"
                             if stats["pool_size"] > self.small_pool else
                             f", and the teacher is unsure on it (mean top probability {sure:.2f} "
                             f"< {self.sure_teacher})")
                          + ": plain KD on the pool's images has led or tied MosaicKD there")


# What "how far" means: one unit is a tenfold pool size, 0.1 of a balanced share for the rarest class,
# 0.05 of mean top probability, 0.05 of coverage entropy, one untaught class; the distance is the largest of the five.
SCALES = {"log10_pool_size": 1.0, "rarest_ratio": 0.1, "mean_max_prob": 0.05, "coverage_entropy": 0.05,
          "untaught": 1.0}
NEAR = 2.0  # a pool further than this from every cell is unlike all of them


def features(stats: dict) -> dict[str, float]:
    """The statistics the distance to a cell is measured on."""
    return {"log10_pool_size": math.log10(max(1, stats["pool_size"])), "rarest_ratio": stats["rarest_ratio"],
            "mean_max_prob": stats["mean_max_prob"], "coverage_entropy": stats["coverage_entropy"],
            "untaught": float(untaught_count(stats))}


def distance(a: dict, b: dict) -> float:
    """How far two pools' statistics are, in SCALES units (the largest per-statistic gap)."""
    fa, fb = features(a), features(b)
    return max(abs(fa[k] - fb[k]) / s for k, s in SCALES.items())


def load_cells(path: Path = CELLS_FILE) -> list[dict]:
    """The measured cells: `name`, `steps`, `winner`, `mosaic_minus_kd` (mean points), `margins` (per seed pair),
    `source` and the `stats` inspect made."""
    if not path.is_file():  # only while experiments/regime_pools.py makes it: the package ships it
        return []
    return json.loads(path.read_text())["cells"]


def cell_line(cell: dict) -> str:
    """A cell's budget, seed pairs and margin in a few words."""
    pairs = len(cell["margins"])
    return (f"{cell['steps']:,} steps, {pairs} seed pair{'s' if pairs > 1 else ''}, {cell['winner']}: MosaicKD - KD "
            f"{cell['mosaic_minus_kd']:+.2f} points")


def advise(stats: dict, *, cells: list[dict] | None = None, rule: Rule = Rule()) -> dict:
    """The advice for a pool: the rule's method, or "both" when the pool is unlike every measured cell.

    Of cells at the same distance the longest budget comes first; cells with its statistics but another budget
    and outcome are named in the text as well.
    """
    cells = load_cells() if cells is None else cells
    method, reason = rule(stats)
    ranked = sorted(cells, key=lambda cell: (distance(stats, cell["stats"]), -cell["steps"]))  # longest first
    nearest = [{"cell": c["name"], "winner": c["winner"], "mosaic_minus_kd": c["mosaic_minus_kd"],
                "margins": c["margins"], "steps": c["steps"], "source": c["source"],
                "distance": round(distance(stats, c["stats"]), 2)} for c in ranked[:3]]
    units = ", ".join(f"{k} {s}" for k, s in SCALES.items())
    evidence = {"rule": reason, "rule_method": method, "nearest_cells": nearest, "cells": [c["name"] for c in cells],
                "distance": f"the largest gap over {units} (one unit each); near means <= {NEAR}"}
    if not nearest or nearest[0]["distance"] > NEAR:
        far = (f" (nearest {nearest[0]['cell']} at {nearest[0]['distance']})" if nearest else
               f" (no measured cells: {CELLS_FILE.name} is missing)")
        missing = untaught_count(stats)
        first = "mosaic" if missing >= rule.left_out else "kd_ood"
        order = (f"mosaic first (the pool leaves {missing} of the teacher's classes untaught, which KD on it cannot "
                 f"teach), then kd_ood" if first == "mosaic" else "kd_ood first (it is cheaper), then mosaic")
        return {"advice": "both", "first": first, "evidence": evidence,
                "text": f"this pool is unlike every measured cell{far}: run both, {order}; the rule alone would say "
                        f"{method}"}
    first = ranked[0]
    twins = [c for c in ranked[1:] if distance(first["stats"], c["stats"]) == 0 and c["winner"] != first["winner"]]
    also = "".join(f"; the same pool statistics at {cell_line(c)}" for c in twins)
    name = {"mosaic": "MosaicKD (method=mosaic)", "kd_ood": "KD on the pool (method=kd_ood)"}[method]
    return {"advice": method, "evidence": evidence,
            "text": f"{name}: {reason}; nearest measured cell {first['name']} (distance {nearest[0]['distance']}, "
                    f"{cell_line(first)}){also}"}
