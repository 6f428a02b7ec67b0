"""Synthesis cost of DeepInversion, CMI, Fast and NAYER side by side: wall seconds per 1,000 synthesised images.

All three methods are built in one process as the engine builds them (config, Context), on the
same teacher, and each synthesises `--batches` batches of `--batch` images with its own options
(the published per-batch iterations unless `--set` changes them: DeepInversion 2,000 Adam steps
on the pixels, CMI 200 generator steps, Fast 5 inner steps plus its meta update, NAYER 40 generator steps per
round and 2 rounds per synthesis, each round a batch, with a fresh generator every 10 syntheses). The student is
a random cnn_tiny (only the adversarial terms read it). Fast's claim (AAAI 2022) is 10x-100x less
synthesis time than DeepInversion.

    python experiments/synthesis_cost.py                                   # cpu-small shape, paper iterations
    python experiments/synthesis_cost.py --teacher runs/demo-teacher/model.safetensors --out cost.md
    python experiments/synthesis_cost.py --batches 1 --batch 8 --set deepinversion.di_iters=4 \\
        --set cmi.g_steps=2 --set fast.g_steps=2 --set nayer.g_steps=2   # a seconds-long check
    python experiments/synthesis_cost.py --precisions no auto            # fp32 against the default, side by side

Each precision (`mixed_precision`, channels_last as the engine's default `auto`) gets its own copy of the
teacher, prepared as a run prepares it (memory format, per-forward autocast).

Without `--teacher` (or when the file is missing) a random `--arch` teacher stands in: the cost
does not depend on the weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mosaic.config import resolve  # noqa: E402
from mosaic.engine.task import prepare_frozen  # noqa: E402
from mosaic.methods import Context, get_method, method_defaults  # noqa: E402
from mosaic.models import create_model, freeze, load_classifier  # noqa: E402
from mosaic.norms import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from mosaic.precision import resolve_precision  # noqa: E402

METHODS = ("deepinversion", "cmi", "fast", "nayer")
ITERATIONS = {"deepinversion": "di_iters", "cmi": "g_steps", "fast": "g_steps", "nayer": "g_steps"}


def build(name: str, teacher, args, accelerator, precision: str):
    """The method object as mosaic.engine.train builds it (no run folder, no players prepared) at `precision`."""
    sets = [s for s in args.set if s.startswith(f"{name}.") or "." not in s.split("=")[0]]
    cfg = resolve(overrides=[f"method={name}", f"batch_size={args.batch}", f"data.image_size={args.size}",
                             f"seed={args.seed}", "cpu=true", *sets, f"mixed_precision={precision}"],
                  method_defaults=method_defaults)
    resolved = resolve_precision(cfg["mixed_precision"], cfg["channels_last"], torch.device("cpu"))
    teacher = prepare_frozen(copy.deepcopy(teacher), resolved, torch.device("cpu"))
    opts = cfg[name]
    if name == "deepinversion":
        opts["pool_size"] = args.batch * (args.batches + args.warmup)  # room for every batch
        steps = args.batches + args.warmup + 1
    else:
        rounds = opts.get("loops", 1)  # NAYER: batches per synthesis
        opts["pool_size"], opts["warmup"], steps = args.batch * (args.batches + args.warmup) * rounds, 0, 10
    student = create_model("cnn_tiny", num_classes=args.classes)
    ctx = Context(cfg=cfg, opts=opts, teacher=teacher, student=student, num_classes=args.classes,
                  image_size=args.size, channels=3, mean=torch.tensor(CIFAR10_MEAN), std=torch.tensor(CIFAR10_STD),
                  device=torch.device("cpu"), accelerator=accelerator, steps=steps, batch_size=args.batch,
                  precision=resolved)
    method = get_method(name)(ctx)
    student.to(memory_format=torch.channels_last if resolved.wants_channels_last(student) else torch.contiguous_format)
    return method, resolved


def synthesize_once(method) -> None:
    """One synthesis into the pool, as a run's synthesis step makes it (NAYER's: `loops` batches)."""
    if method.name == "deepinversion":
        method.synthesis_step()
    else:
        method.synthesize(adversarial=True)
        method.syntheses += 1  # as InterleavedSynthesis.step counts them (NAYER re-builds its generator by them)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/demo-teacher/model.safetensors",
                   help="teacher checkpoint; a random --arch teacher when missing")
    p.add_argument("--arch", default="cnn_small", help="teacher architecture when no checkpoint is given")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="images per synthesised batch")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--batches", type=int, default=2, help="timed batches per method")
    p.add_argument("--warmup", type=int, default=0, help="untimed batches per method first (one-time set-up costs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--set", action="append", default=[], help="override, e.g. deepinversion.di_iters=100")
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "no", "bf16"],
                   help="mixed_precision values to time, each method at each (default: auto)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    if args.teacher and Path(args.teacher).exists():
        teacher, _ = load_classifier(args.teacher, in_chans=3, default_classes=args.classes, image_size=args.size)
        source = args.teacher
    else:
        teacher, source = create_model(args.arch, num_classes=args.classes), f"random {args.arch}"
    teacher = freeze(teacher)
    rows, base, first = [], {}, {}
    for name in args.methods:
        for precision in args.precisions:
            method, resolved = build(name, teacher, args, accelerator, precision)
            for _ in range(args.warmup):
                synthesize_once(method)
            made, start = method.pool.added, time.perf_counter()
            for _ in range(args.batches):
                synthesize_once(method)
            wall = time.perf_counter() - start
            per_1k = wall / (method.pool.added - made) * 1000
            if name == "deepinversion":
                base[precision] = per_1k
            first.setdefault(name, per_1k)
            compute = f"{precision} -> {'fp32' if resolved.mixed_precision == 'no' else resolved.mixed_precision}"
            rows.append((name, compute, precision, method.opts[ITERATIONS[name]], wall / args.batches, per_1k,
                         first[name] / per_1k))
            print(f"{name} ({compute}): {wall / args.batches:.2f} s per synthesis of {args.batch} images a batch, "
                  f"{per_1k:.1f} s per 1,000 images", flush=True)
    lines = [f"Synthesis cost, one process, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), CPU {resolved.device} (native bf16: "
             f"{resolved.capability}), teacher {source}, {args.size}x{args.size}, batch {args.batch}, "
             f"{args.batches} timed batches per method after {args.warmup} untimed.", "",
             f"| method | mixed_precision | iterations per batch | s per synthesis | s per 1,000 images "
             f"| speed-up vs DeepInversion | speed-up vs {args.precisions[0]} |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, compute, precision, iters, per_batch, per_1k, vs_first in rows:
        ratio = f"{base[precision] / per_1k:.1f}x" if precision in base and name != "deepinversion" else "-"
        lines.append(f"| {name} | {compute} | {iters} | {per_batch:.2f} | {per_1k:.1f} | {ratio} | {vs_first:.2f}x |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
