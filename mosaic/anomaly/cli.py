"""`mosaic anomaly fit` and `mosaic anomaly score`: MKD anomaly detection from the command line.

    mosaic anomaly fit source=runs/teacher-cnn_small data=cifar10 normal_class=cat out=runs/mkd-cat
    mosaic anomaly score runs/mkd-cat data=cifar10 split=test normal_class=cat

Options are key=value pairs, optionally after a YAML file holding some of them (defaults < file <
key=value, the same order as `mosaic distill`); the keys and their defaults are FIT_DEFAULTS and
SCORE_DEFAULTS below.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mosaic import config as config_lib

if TYPE_CHECKING:
    import torch

    from mosaic.data import ImageSet

# torch, the data loaders and the engine are imported inside the commands, so that building the
# `mosaic` argument parser stays cheap.

__all__ = ["FIT_DEFAULTS", "SCORE_DEFAULTS", "add_parser", "run", "labelled_subset", "anomaly_labels"]

FIT_DEFAULTS: dict[str, Any] = {
    "source": None,         # frozen source network: model.safetensors (+ .json) or a run folder (required)
    "data": None,           # normal training images: data set name, folder or tar archive (required)
    "split": "train",       # split of data sets that have several
    "normal_class": None,   # keep only this class (name or index) of a labelled data set; null: all images
    "limit": None,          # keep at most this many normal images (random, seeded)
    "root": None,           # data root (see mosaic.data.data_root)
    "cache": True,          # cache decoded images
    "cloner": "cnn_tiny",   # cloner architecture (any create_model name)
    "layers": None,         # source critical layers, e.g. layer2,layer3; null: last num_layers pooling stages
    "cloner_layers": None,  # cloner layers paired with them; null: matched by spatial size
    "num_layers": 3,        # how many default critical layers
    "adapter": False,       # 1x1 conv adapters where source and cloner channel counts differ
    "lambda_dir": 0.01,     # weight of the direction (cosine) term; the paper's 0.01
    "epochs": 20,           # passes over the normal images
    "batch_size": 64,
    "lr": 0.001,            # Adam learning rate (the paper's)
    "weight_decay": 0.0,
    "crop_padding": 0,      # kornia random-crop padding (0: none)
    "flip": False,          # random horizontal flips
    "out": None,            # output folder; default runs/mkd-<cloner>
    "overwrite": False,     # replace an existing output folder
    "seed": 0,
    "cpu": False,           # force the CPU
    "mixed_precision": "no",  # no | fp16 | bf16
    "progress": True,       # tqdm progress bar
}

SCORE_DEFAULTS: dict[str, Any] = {
    "data": None,           # images to score: data set name, folder or tar archive (required)
    "split": "test",
    "normal_class": None,   # class (name or index) that is normal, others anomalous; null: a class named good/normal
    "limit": None,          # score at most this many images (class-balanced, seeded)
    "root": None,
    "cache": True,
    "source": None,         # source checkpoint; null: the path stored when fitting
    "out": None,            # folder for scores.csv, metrics.json, heatmaps.png; default <model folder>/scores
    "batch_size": 128,
    "heatmaps": 16,         # overlays of this many highest-scoring images in heatmaps.png (0: none)
    "masks": None,          # folder of ground-truth masks in the same file order as data: pixel ROC-AUC
    "reduce": "sum",        # channel reduction of the input gradient: sum | max
    "sigma": 1.0,           # Gaussian blur of the maps, pixels (0: none)
    "opening": 3,           # morphological opening kernel size (0: none)
    "seed": 0,
    "cpu": False,
}

NORMAL_NAMES = ("good", "normal", "ok")


def _options(items: Sequence[str], defaults: dict) -> dict:
    """`defaults` < an optional YAML file < key=value items (unknown keys are ConfigErrors with close matches)."""
    yaml_path, overrides = config_lib.split_args(items)
    opts = config_lib.merge(defaults, config_lib.load_yaml(yaml_path)) if yaml_path else defaults
    given = {}
    for item in overrides:
        key, text = item.split("=", 1)
        given[key.strip()] = config_lib.parse_value(text)
    return config_lib.merge(opts, given)


def _class_index(images: ImageSet, normal_class: Any) -> int:
    """Index of `normal_class` (a name or an index) in a labelled set."""
    from mosaic.data import DataError

    if images.labels is None or not images.classes:
        raise DataError(f"normal_class={normal_class} needs a labelled data set, but '{images.name}' has no classes")
    if str(normal_class) in images.classes:
        return images.classes.index(str(normal_class))
    if isinstance(normal_class, int) and 0 <= normal_class < len(images.classes):
        return normal_class
    raise DataError(f"no class {normal_class!r} in '{images.name}'; its classes are {', '.join(images.classes)}")


def labelled_subset(images: ImageSet, normal_class: Any) -> torch.Tensor:
    """uint8 images of class `normal_class` (all images when it is None)."""
    if normal_class is None:
        return images.images
    keep = images.labels == _class_index(images, normal_class)
    return images.images[keep]


def anomaly_labels(images: ImageSet, normal_class: Any) -> Optional[torch.Tensor]:
    """1 for anomalous, 0 for normal images; None when the set says nothing about normality."""
    if normal_class is None:
        names = [c for c in (images.classes or []) if c.lower() in NORMAL_NAMES]
        if images.labels is None or not names:
            return None
        normal_class = names[0]
    return (images.labels != _class_index(images, normal_class)).long()


def _load(opts: dict, *, split: str, image_size: int, channels: int, limit: Optional[int]) -> ImageSet:
    """The images named by data= at the MKD pair's size and channels."""
    from mosaic.data import DataError, load_image_set

    if not opts["data"]:
        raise DataError("give the images with data=<data set name, folder or archive>")
    return load_image_set(str(opts["data"]), split=split, image_size=image_size, channels=channels,
                          root=opts["root"], limit=limit, cache=opts["cache"], seed=opts["seed"])


def cmd_fit(opts: dict) -> dict:
    """Fit a cloner on normal images and save the pair; returns the training stats."""
    import torch

    from mosaic.data import DataError
    from mosaic.engine import RunError

    from .mkd import build_mkd, save_mkd
    from .train import fit

    if not opts["source"]:
        raise RunError("give the frozen source network with source=<model.safetensors or run folder>")
    out = Path(opts["out"] or f"runs/mkd-{opts['cloner']}")
    if out.exists() and any(out.iterdir()) and not opts["overwrite"]:
        raise RunError(f"output folder '{out}' already exists: pass overwrite=true or out=<new folder>")
    mkd = build_mkd(opts["source"], cloner=opts["cloner"], layers=opts["layers"], cloner_layers=opts["cloner_layers"],
                    num_layers=opts["num_layers"], adapter=opts["adapter"], lambda_dir=opts["lambda_dir"])
    data = _load(opts, split=opts["split"], image_size=mkd.image_size, channels=mkd.in_chans, limit=None)
    images = labelled_subset(data, opts["normal_class"])
    if opts["limit"] and opts["limit"] < len(images):
        gen = torch.Generator().manual_seed(opts["seed"])
        images = images[torch.randperm(len(images), generator=gen)[:opts["limit"]].sort().values]
    if len(images) == 0:
        raise DataError(f"no normal images to fit on in '{data.name}'")
    stats = fit(mkd, images, epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
                weight_decay=opts["weight_decay"], crop_padding=opts["crop_padding"], flip=opts["flip"],
                seed=opts["seed"], cpu=opts["cpu"], mixed_precision=opts["mixed_precision"],
                progress=opts["progress"])
    stats = {**stats, "images": len(images), "data": data.name}
    save_mkd(mkd.cpu(), out, options={**opts, "out": str(out), "fit": stats})
    return {**stats, "out": str(out)}


def _write_csv(path: Path, scores: torch.Tensor, labels: Optional[torch.Tensor], data: ImageSet) -> None:
    """One row per image: index, class name, anomalous flag (when known) and score."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "class", "anomalous", "score"])
        for i, score in enumerate(scores.tolist()):
            cls = data.classes[int(data.labels[i])] if data.labels is not None and data.classes else ""
            flag = "" if labels is None else int(labels[i])
            writer.writerow([i, cls, flag, f"{score:.6g}"])


def cmd_score(model: str, opts: dict) -> dict:
    """Score images with a fitted pair: scores.csv, metrics.json (ROC-AUC when labels exist), heatmaps.png."""
    import torch

    from mosaic.data import DataError, load_image_set

    from .localize import REDUCTIONS, localization_maps, save_heatmaps
    from .mkd import load_mkd
    from .roc import roc_auc
    from .train import score_images

    if opts["reduce"] not in REDUCTIONS:
        raise config_lib.ConfigError(f"'reduce' must be one of {', '.join(REDUCTIONS)}, got {opts['reduce']!r}")
    mkd = load_mkd(model, source=opts["source"])
    device = torch.device("cpu") if opts["cpu"] or not torch.cuda.is_available() else torch.device("cuda")
    mkd.to(device)
    data = _load(opts, split=opts["split"], image_size=mkd.image_size, channels=mkd.in_chans, limit=opts["limit"])
    labels = anomaly_labels(data, opts["normal_class"])
    scores = score_images(mkd, data.images, batch_size=opts["batch_size"])
    out = Path(opts["out"] or Path(model) / "scores")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "scores.csv", scores, labels, data)
    result: dict[str, Any] = {"model": str(model), "data": data.name, "images": len(data),
                              "score_mean": float(scores.mean())}
    if labels is not None and 0 < int(labels.sum()) < len(labels):
        result["auroc"] = roc_auc(scores, labels)
        result["anomalous"] = int(labels.sum())
    if opts["masks"]:
        masks = load_image_set(str(opts["masks"]), split=opts["split"], image_size=mkd.image_size, channels=1,
                               root=opts["root"], limit=opts["limit"], cache=False, seed=opts["seed"])
        if len(masks) != len(data):
            raise DataError(f"{len(masks)} masks for {len(data)} images: the mask folder must mirror the images")
        maps = localization_maps(mkd, data.images, reduce=opts["reduce"], sigma=opts["sigma"],
                                 opening=opts["opening"], batch_size=opts["batch_size"])
        truth = masks.images[:, 0] > 127
        if 0 < int(truth.sum()) < truth.numel():
            result["pixel_auroc"] = roc_auc(maps, truth)
    if opts["heatmaps"]:
        top = scores.argsort(descending=True)[:opts["heatmaps"]]
        maps = localization_maps(mkd, data.images[top], reduce=opts["reduce"], sigma=opts["sigma"],
                                 opening=opts["opening"], batch_size=opts["batch_size"])
        result["heatmaps"] = str(save_heatmaps(data.images[top], maps, out / "heatmaps.png"))
    result["scores"] = str(out / "scores.csv")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_parser(sub: Any) -> None:
    """Add the `anomaly` subcommand (with `fit` and `score`) to the `mosaic` parser's subparsers."""
    p = sub.add_parser("anomaly", help="anomaly detection by multi-resolution knowledge distillation (MKD)",
                       description="Fit a cloner of a frozen source network on normal images, then score images "
                                   "by their feature discrepancy. Options are key=value; see mosaic/anomaly/cli.py.")
    actions = p.add_subparsers(dest="action", required=True)
    fit = actions.add_parser("fit", help="train a cloner on normal images",
                             description="Example: mosaic anomaly fit source=runs/teacher-cnn_small data=cifar10 "
                                         "normal_class=cat out=runs/mkd-cat epochs=20")
    fit.add_argument("options", nargs="*", metavar="[config.yaml] key=value",
                     help=f"options: {', '.join(FIT_DEFAULTS)}")
    score = actions.add_parser("score", help="score images (CSV, ROC-AUC, heat maps) with a fitted cloner",
                               description="Example: mosaic anomaly score runs/mkd-cat data=cifar10 normal_class=cat")
    score.add_argument("model", help="folder written by `mosaic anomaly fit`")
    score.add_argument("options", nargs="*", metavar="[config.yaml] key=value",
                       help=f"options: {', '.join(SCORE_DEFAULTS)}")


def run(args: Any) -> int:
    """Run a parsed `mosaic anomaly ...` command; prints its result as JSON."""
    if args.action == "fit":
        result = cmd_fit(_options(args.options, FIT_DEFAULTS))
    else:
        result = cmd_score(args.model, _options(args.options, SCORE_DEFAULTS))
    print(json.dumps(result, indent=2))
    return 0
