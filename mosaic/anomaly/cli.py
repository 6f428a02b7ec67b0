"""`mosaic anomaly fit` and `mosaic anomaly score`: MKD anomaly detection from the command line.

    mosaic anomaly fit source=runs/teacher-cnn_small data=cifar10 normal_class=cat out=runs/mkd-cat
    mosaic anomaly score runs/mkd-cat data=cifar10 split=test normal_class=cat

`fit` is an engine run of the `mkd` method (`mosaic distill method=mkd ...` with FIT_BASE's defaults and
FIT_ALIASES' short names): any engine key works too (resume=true, overwrite=true, ckpt_every=..., test=<labelled
set> for ROC-AUC during the run, guard.*), and it runs under `accelerate launch -m mosaic anomaly fit ...`.
`out=<folder>` names the run folder (out_dir + name; default runs/mkd-<cloner>). `score` reads that folder; its
options and their defaults are SCORE_DEFAULTS. Both take key=value pairs, optionally after a YAML file holding
some of them (defaults < file < key=value, as for `mosaic distill`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mosaic import config as config_lib

if TYPE_CHECKING:
    import torch

    from mosaic.data import ImageSet

# torch, the data loaders and the engine are imported inside the commands, so that building the
# `mosaic` argument parser stays cheap.

__all__ = ["FIT_ALIASES", "FIT_BASE", "SCORE_DEFAULTS", "add_parser", "fit_config", "run", "score_options"]

# What `anomaly fit` changes in the engine defaults: the MKD recipe (Adam at mkd.lr=1e-3, constant rate,
# no augmentation, a cnn_tiny cloner), no OOD pool, evaluation only at the end and only when test= is given.
FIT_BASE: dict[str, Any] = {
    "method": "mkd",
    "student": {"arch": "cnn_tiny"},
    "epochs": 20,
    "batch_size": 64,
    "schedule": "constant",
    "log_every": 20,
    "eval_every": 0,
    "sample_every": 0,
    "data": {"test": None, "ood": None, "crop_padding": 0, "flip": False},
}

# Short names of `anomaly fit` (also at the top level of its YAML file), besides `mosaic distill`'s
# (teacher=, train=, test=, student=, ...).
FIT_ALIASES: dict[str, str] = {
    **config_lib.ALIASES,
    "source": "teacher.checkpoint",    # frozen source network: model.safetensors (+ .json) or a run folder
    "data": "data.train",              # normal training images: data set name, folder or tar archive
    "normal_class": "data.train_classes",  # keep only this class (name or index, or a list); null: all images
    "limit": "data.train_limit",       # keep at most this many normal images (seeded)
    "root": "data.root",
    "cache": "data.cache",
    "crop_padding": "data.crop_padding",  # random-crop padding (0: none)
    "flip": "data.flip",               # random horizontal flips
    "cloner": "student.arch",          # cloner architecture (any create_model name)
    "layers": "mkd.layers",            # source critical layers, e.g. layer2,layer3
    "cloner_layers": "mkd.cloner_layers",
    "num_layers": "mkd.num_layers",
    "adapter": "mkd.adapter",          # 1x1 conv adapters where channel counts differ
    "lambda_dir": "mkd.lambda_dir",    # weight of the direction (cosine) term
    "lr": "mkd.lr",                    # Adam learning rate
    "weight_decay": "mkd.weight_decay",
}

SCORE_DEFAULTS: dict[str, Any] = {
    "data": None,           # images to score: data set name, folder or tar archive (required)
    "split": "test",
    "normal_class": None,   # class (name or index, or a list) that is normal, others anomalous; null: a class named good/normal
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


def _source_meta(checkpoint: Any) -> dict:
    """The source's model.json (empty when it has none)."""
    path = Path(str(checkpoint))
    twin = path / "model.json" if path.is_dir() else path.with_suffix(".json")
    try:
        return json.loads(twin.read_text()) if twin.is_file() else {}
    except json.JSONDecodeError:
        return {}  # load_classifier reports it when the run starts


def fit_config(items: Sequence[str]) -> dict:
    """The engine config of `mosaic anomaly fit [fit.yaml] key=value ...` (FIT_BASE < file < key=value).

    The image size and channels follow the source's model.json unless given (data.image_size=, data.channels=).
    """
    from mosaic.methods import method_defaults

    yaml_path, overrides = config_lib.split_args(items)
    user = config_lib.user_config(yaml_path=yaml_path, overrides=overrides, base=FIT_BASE, aliases=FIT_ALIASES)
    out = user.pop("out", None)
    if out:
        user["out_dir"], user["name"] = str(Path(str(out)).parent), Path(str(out)).name
    checkpoint = user.get("teacher", {}).get("checkpoint")
    meta = _source_meta(checkpoint) if checkpoint else {}
    data = user.setdefault("data", {})
    for key, meta_key in (("image_size", "image_size"), ("channels", "in_chans")):
        if key not in data and meta.get(meta_key):
            data[key] = meta[meta_key]
    cfg = config_lib.complete(user, method_defaults=method_defaults)
    if not cfg["teacher"]["checkpoint"]:
        raise config_lib.ConfigError("give the frozen source network with source=<model.safetensors or run folder>")
    if cfg["method"] != "mkd":
        raise config_lib.ConfigError(f"`mosaic anomaly fit` runs method=mkd, got method={cfg['method']}: "
                                     f"use `mosaic distill` for other methods")
    return cfg


def score_options(items: Sequence[str]) -> dict:
    """The options of `mosaic anomaly score MODEL [score.yaml] key=value ...` (SCORE_DEFAULTS < file < key=value)."""
    yaml_path, overrides = config_lib.split_args(items)
    return config_lib.merge(SCORE_DEFAULTS, config_lib.user_config(yaml_path=yaml_path, overrides=overrides,
                                                                   aliases={}))


def _load(opts: dict, *, split: str, image_size: int, channels: int, limit: Optional[int]) -> ImageSet:
    """The images named by data= at the MKD pair's size and channels."""
    from mosaic.data import DataError, load_image_set

    if not opts["data"]:
        raise DataError("give the images with data=<data set name, folder or archive>")
    return load_image_set(str(opts["data"]), split=split, image_size=image_size, channels=channels,
                          root=opts["root"], limit=limit, cache=opts["cache"], seed=opts["seed"])


def cmd_fit(cfg: dict) -> dict:
    """Fit a cloner on normal images as an engine run; returns a summary of its results.json."""
    from mosaic.engine import run_dir, train

    results = train(cfg)
    summary = {"out": str(run_dir(cfg)), "images": results["images"]["train"], "data": cfg["data"]["train"]}
    keep = ("steps", "wall_s", "device", "processes", "auroc")
    return {**summary, **{k: results[k] for k in keep if k in results}, "loss": results["final_losses"].get("loss")}


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
    from .method import anomaly_labels
    from .mkd import load_mkd, score_images
    from .roc import roc_auc

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
    fit = actions.add_parser("fit", help="train a cloner on normal images (an engine run of method=mkd)",
                             description="Example: mosaic anomaly fit source=runs/teacher-cnn_small data=cifar10 "
                                         "normal_class=cat out=runs/mkd-cat epochs=20")
    fit.add_argument("options", nargs="*", metavar="[config.yaml] key=value",
                     help=f"any engine key (as for `mosaic distill`), out=<run folder>, and the short names "
                          f"{', '.join(k for k in FIT_ALIASES if k not in config_lib.ALIASES)}")
    score = actions.add_parser("score", help="score images (CSV, ROC-AUC, heat maps) with a fitted cloner",
                               description="Example: mosaic anomaly score runs/mkd-cat data=cifar10 normal_class=cat")
    score.add_argument("model", help="run folder written by `mosaic anomaly fit`")
    score.add_argument("options", nargs="*", metavar="[config.yaml] key=value",
                       help=f"options: {', '.join(SCORE_DEFAULTS)}")


def run(args: Any) -> int:
    """Run a parsed `mosaic anomaly ...` command; prints its result as JSON."""
    if args.action == "fit":
        result = cmd_fit(fit_config(args.options))
        if int(os.environ.get("RANK", "0")) != 0:  # one report per run, not one per process
            return 0
    else:
        result = cmd_score(args.model, score_options(args.options))
    print(json.dumps(result, indent=2))
    return 0
