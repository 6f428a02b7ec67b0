"""How far a bf16 teacher's soft targets are from fp32: the linear head in fp32 vs logits as bf16 gives them.

    python experiments/logit_precision.py --teacher runs/cpu-small-t3-ood1k-teacher/model.safetensors

On `--images` CIFAR-10 test images (the offline archive) the teacher runs three ways: fp32; bf16 autocast
with the classifier in fp32 (what the engine does: features in bf16, logits from an fp32 matmul); and
bf16 autocast over the whole forward (the logits rounded to bf16). For each: the largest logit error
against fp32, the relative error of the KD loss (T=4) of a fixed random student against those targets,
top-1 agreement with the fp32 teacher, and seconds per forward of the whole set (median of --reps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mosaic.augment import normalize, to_float  # noqa: E402
from mosaic.data import load_image_set  # noqa: E402
from mosaic.losses import kd_loss  # noqa: E402
from mosaic.models import create_model, load_classifier  # noqa: E402
from mosaic.precision import cpu_name, resolve_precision  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint (as teacher= reads it)")
    p.add_argument("--images", type=int, default=2048, help="CIFAR-10 test images")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--temperature", type=float, default=4.0)
    args = p.parse_args(argv)

    teacher, meta = load_classifier(args.teacher, in_chans=3, default_classes=10, image_size=32)
    teacher.eval().to(memory_format=torch.channels_last)
    test = load_image_set("cifar10", split="test", image_size=32)
    x = normalize(to_float(test.images[:args.images]), meta["mean"], meta["std"])
    x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    student = create_model("cnn_tiny", num_classes=10).eval()
    bf16 = resolve_precision("bf16", "auto", torch.device("cpu"))

    def fp32():
        return teacher(x)

    def head_fp32():  # the engine's way: autocast over the features, the classifier outside it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        return F.linear(pooled.float(), teacher.get_classifier().weight, teacher.get_classifier().bias)

    def as_they_come():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return teacher(x).float()

    with torch.no_grad():
        s_logits = student(x)
        ref = fp32()
        ref_kd = kd_loss(s_logits, ref, temperature=args.temperature).item()
        print(f"CPU {cpu_name()} ({bf16.capability}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"teacher {args.teacher} ({meta.get('arch')}), {len(x)} CIFAR-10 test images, KD at T="
              f"{args.temperature:g} against a random cnn_tiny\n")
        print("| teacher logits | max abs logit error | KD loss relative error | top-1 agreement with fp32 "
              "| s per forward (median) |")
        print("|---|---:|---:|---:|---:|")
        for name, fn in (("fp32", fp32), ("bf16 features, fp32 classifier (the engine)", head_fp32),
                         ("bf16 whole forward (logits rounded to bf16)", as_they_come)):
            out = fn()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            kd = kd_loss(s_logits, out, temperature=args.temperature).item()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            print(f"| {name} | {(out - ref).abs().max().item():.4f} | {abs(kd - ref_kd) / ref_kd:.2e} "
                  f"| {100 * agree:.2f}% | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
