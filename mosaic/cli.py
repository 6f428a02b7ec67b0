"""The `mosaic` command: train-teacher, distill, evaluate, and listings.

    mosaic train-teacher [config.yaml] [key=value ...]
    mosaic distill [config.yaml] [key=value ...]
    mosaic evaluate MODEL [key=value ...]
    mosaic inspect [config.yaml] teacher=... ood=... [test=...] [key=value ...] [out=DIR]   # before distilling
    mosaic export RUN --format onnx|torchscript [--opset N] [--batch N]   # needs [export] for onnx
    mosaic anomaly fit|score [...]              # MKD anomaly detection (mosaic/anomaly/cli.py)
    accelerate launch -m mosaic distill ...      # several processes / GPUs / machines
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mosaic import config as config_lib

# What `train-teacher` changes in the defaults: a supervised run with the classic CIFAR recipe.
TEACHER_BASE = {
    "method": "supervised",
    "student": {"arch": "resnet34_cifar", "lr": 0.1, "weight_decay": 5e-4},
    "schedule": "onecycle",
    "batch_size": 128,
    "epochs": 30,
    "eval_every": 0,
    "sample_every": 0,
    "data": {"ood": None},
}

EXAMPLES = {
    "train-teacher": "mosaic train-teacher student.arch=wrn40_2 epochs=60 name=teacher-wrn40_2",
    "distill": "mosaic distill teacher=runs/teacher-wrn40_2 student.arch=wrn16_1 ood=tiny-imagenet steps=2000",
    "evaluate": "mosaic evaluate runs/mosaic-wrn16_1/model.safetensors data.test=cifar10",
    "export": "mosaic export runs/mosaic-wrn16_1 --format onnx",
    "inspect": "mosaic inspect teacher=runs/teacher-wrn40_2 ood=tiny-imagenet test=cifar10 out=runs/inspect-tin",
}


def _resolve(items: Sequence[str], base: dict | None = None) -> dict:
    from mosaic.methods import method_defaults
    yaml_path, overrides = config_lib.split_args(items)
    return config_lib.resolve(yaml_path=yaml_path, overrides=overrides, base=base, method_defaults=method_defaults)


def _cmd_train(items: Sequence[str], *, base: dict | None, print_config: bool) -> int:
    cfg = _resolve(items, base)
    if cfg["name"] is None and base is TEACHER_BASE:
        cfg["name"] = f"teacher-{cfg['student']['arch']}"
    if print_config:
        print(config_lib.yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from mosaic.engine import run_dir, train
    results = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one report per run, not one per process
        print(json.dumps(results, indent=2))
        print(f"run folder: {run_dir(cfg)}")
    return 0


def _cmd_evaluate(model: str, items: Sequence[str]) -> int:
    from mosaic.engine import evaluate
    cfg = _resolve(items, {"data": {"ood": None}})
    print(json.dumps(evaluate(model, cfg), indent=2))
    return 0


def _cmd_inspect(items: Sequence[str]) -> int:
    from pathlib import Path

    from mosaic.inspect_pool import inspect_pool, text_report
    outs = [x for x in items if x.startswith("out=")]
    items = [x for x in items if not x.startswith("out=")]
    out = Path(outs[-1][len("out="):] if outs else "runs/inspect")
    # only the data sets given count (no default in-domain sets), the pool at its full size unless limited
    cfg = _resolve(items, {"data": {"train": None, "test": None}})
    if (out / "inspect.json").exists() and not cfg["overwrite"]:
        raise config_lib.ConfigError(f"{out} already holds an inspect.json: pass overwrite=true or out=<new folder>")
    report = inspect_pool(cfg, out)
    print(text_report(report))
    print(f"wrote {out / 'inspect.json'} and {out / 'inspect.png'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `mosaic` command."""
    parser = argparse.ArgumentParser(prog="mosaic", description="Knowledge distillation without the teacher's data.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train-teacher", "train a classifier on labelled in-domain data (the teacher)"),
                       ("distill", "distil a teacher into a student with a method (default: MosaicKD)")):
        p = sub.add_parser(name, help=text, description=f"{text}. Config = defaults < YAML file < key=value overrides "
                           f"(dotted keys, e.g. data.ood=tiny-imagenet). Example: {EXAMPLES[name]}")
        p.add_argument("args", nargs="*", metavar="[config.yaml] key=value",
                       help="optional YAML config file, then overrides (shorthands: teacher=, student=, ood=, "
                            "train=, test=, arch=)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p = sub.add_parser("evaluate", help="top-1 of a saved model on an in-domain test set",
                       description=f"Top-1 of a saved model (and agreement with a teacher). Example: {EXAMPLES['evaluate']}")
    p.add_argument("model", help="model.safetensors (with its .json) or a run folder")
    p.add_argument("args", nargs="*", metavar="key=value", help="overrides, e.g. data.test=cifar10 teacher=PATH")
    p = sub.add_parser("inspect", help="before distilling: what the teacher sees in an OOD pool, and advice",
                       description="One teacher pass over the OOD pool (and the in-domain test set when test= is "
                       "given): class spread, confidence, the images the teacher is surest of per class, and which "
                       "method the measured regime map favours. Writes DIR/inspect.json and DIR/inspect.png "
                       f"(default DIR: runs/inspect). Example: {EXAMPLES['inspect']}")
    p.add_argument("args", nargs="*", metavar="[config.yaml] key=value",
                   help="teacher=, ood=, optional test=, data.ood_limit / data.ood_classes / data.ood_select=N, "
                        "out=DIR")
    p = sub.add_parser("export", help="write a run's model as ONNX or TorchScript, checked against PyTorch",
                       description="Write RUN/model.onnx or RUN/model.torchscript.pt (input: normalised float "
                       "images; mean, std, size, channels, classes and arch stored in the file) and check its "
                       f"outputs against PyTorch on the run's test images. Example: {EXAMPLES['export']}")
    p.add_argument("run", help="run folder holding model.safetensors and model.json")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default: onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    p.add_argument("--batch", type=int, default=16, help="test images in the check (default: 16)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed max abs difference to PyTorch's logits (default: 1e-4)")
    from mosaic.anomaly.cli import add_parser as add_anomaly_parser
    add_anomaly_parser(sub)  # mosaic anomaly fit / score
    sub.add_parser("list-models", help="the CIFAR-style networks registered in timm (any timm name also works)")
    sub.add_parser("list-methods", help="registered distillation methods")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mosaic` console script."""
    args = build_parser().parse_args(argv)
    from mosaic.data import DataError
    from mosaic.engine import RunError
    from mosaic.export import ExportError
    from mosaic.guard import DivergenceError
    from mosaic.models import CheckpointError, ModelError
    try:
        if args.command == "train-teacher":
            return _cmd_train(args.args, base=TEACHER_BASE, print_config=args.print_config)
        if args.command == "distill":
            return _cmd_train(args.args, base={}, print_config=args.print_config)
        if args.command == "evaluate":
            return _cmd_evaluate(args.model, args.args)
        if args.command == "inspect":
            return _cmd_inspect(args.args)
        if args.command == "export":
            from mosaic.export import export
            export(args.run, fmt=args.format, opset=args.opset, batch=args.batch, tolerance=args.tolerance)
            return 0
        if args.command == "anomaly":
            from mosaic.anomaly.cli import run as run_anomaly
            return run_anomaly(args)
        if args.command == "list-models":
            from mosaic.models import list_cifar_models
            print("\n".join(list_cifar_models()))
            return 0
        if args.command == "list-methods":
            from mosaic.methods import get_method, list_methods
            for name in list_methods():
                cls = get_method(name)
                doc = (cls.__doc__ or "").strip().splitlines()
                recipes = f" (recipes: paper, {', '.join(cls.recipes)})" if cls.recipes else ""
                print(f"{name:14s} {doc[0] if doc else ''}{recipes}")
            return 0
    except (config_lib.ConfigError, DataError, RunError, CheckpointError, ModelError, DivergenceError,
            ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
