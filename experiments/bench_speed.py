"""Time one MosaicKD outer iteration: the project's step against a plain eager fp32 reference.

One outer iteration = 1 discriminator step + 1 generator step + `student_steps` (5) student
steps, plus drawing the OOD batches. Both sides run in the same process, interleaved, on
the same random-initialised models (no checkpoint, no data: a random uint8 pool stands in
for the OOD images):

  ours       the MosaicKD method object built as mosaic.engine.train builds it (Context,
             players and LR schedulers from mosaic.engine.prepare_players, device-resident OOD stream with
             kornia augmentation) and timed as the engine calls it: streams, then
             `method.step` (each network forward autocast on its own, as the run's precision
             resolves: mixed_precision / channels_last, default auto), then the schedulers.
  reference  the paper's algorithm written out step by step in plain eager fp32 torch:
             OOD batches augmented per image on the host (pad-4 crop + flip) and copied
             to the device, torchvision normalisation, patch crops one slice at a time,
             default Adam (G, D) and SGD (student), `loss.backward()` on the whole graph.

Prints seconds per iteration (median over --reps after --warmup untimed iterations),
speed-up (reference / ours), student images per second, peak memory, FLOPs per iteration
(torch.utils.flop_counter: convolutions and matmuls), achieved TFLOP/s and its fraction of the
machine's measured matmul peak in the variant's compute dtype (--peak). Each variant resolves its
own precision (`--variant 'fp32: mixed_precision=no'` works: autocast is per forward, not global).

    python experiments/bench_speed.py                         # CPU: cnn_small -> cnn_tiny, 64+64, ngf 32
    python experiments/bench_speed.py --device cuda           # GPU: resnet34_cifar -> resnet18_cifar, 256+256
    python experiments/bench_speed.py --sweep --out experiments/results/speed-cpu.md
    python experiments/bench_speed.py --variant 'fp32: mixed_precision=no channels_last=false' --peak
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mosaic.augment import Augment  # noqa: E402
from mosaic.config import resolve  # noqa: E402
from mosaic.engine import prepare_players  # noqa: E402
from mosaic.engine.task import memory_format, prepare_frozen  # noqa: E402
from mosaic.methods import Context, get_method, method_defaults  # noqa: E402
from mosaic.models import create_model, freeze  # noqa: E402
from mosaic.norms import KNOWN_STATS  # noqa: E402
from mosaic.precision import Precision, cpu_bf16, cpu_name, resolve_precision  # noqa: E402
from mosaic.stream import Stream  # noqa: E402

from bench_measure import count_flops, matmul_peak, peak_memory, sync, time_interleaved  # noqa: E402
from bench_reference import Reference  # noqa: E402

SWITCHES = ("fast_crop", "batch_teacher", "inference_mode", "fused_optim")
MEAN, STD = KNOWN_STATS["cifar10"]  # what data.py normalises CIFAR-10 with


@dataclass
class Setup:
    """One benchmarked configuration."""
    device: torch.device
    teacher: str
    student: str
    batch: int
    image_size: int
    ngf: int
    ndf: int
    num_classes: int = 10
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # extra `key=value` config overrides for ours


def random_pool(setup: Setup) -> Tensor:
    """A random uint8 image pool on the host, big enough for several iterations without repeats."""
    n = max(4096, 8 * setup.batch)
    g = torch.Generator().manual_seed(setup.seed)
    return torch.randint(0, 256, (n, 3, setup.image_size, setup.image_size), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- ours: the engine's code path

class Ours:
    """The MosaicKD method object, built and called as mosaic.engine.train does (no run folder)."""

    def __init__(self, setup: Setup, pool: Tensor, accelerator, *, overrides: list[str] = ()) -> None:
        s = setup
        base = [f"batch_size={s.batch}", f"data.image_size={s.image_size}", f"student.arch={s.student}",
                f"mosaic.ngf={s.ngf}", f"mosaic.ndf={s.ndf}", f"seed={s.seed}", f"cpu={s.device.type == 'cpu'}"]
        cfg = resolve(overrides=[*base, *s.overrides, *overrides], method_defaults=method_defaults)
        self.cfg, self.device, self.accelerator = cfg, s.device, accelerator
        method_cls = get_method("mosaic")
        self.needs = method_cls.stream_needs(cfg["mosaic"])
        self.precision: Precision = resolve_precision(cfg["mixed_precision"], cfg["channels_last"], s.device)
        torch.manual_seed(s.seed)
        teacher = freeze(create_model(s.teacher, num_classes=s.num_classes)).to(s.device)
        student = create_model(s.student, num_classes=s.num_classes)
        student = student.to(s.device, memory_format=memory_format(student, self.precision))
        ctx = Context(cfg=cfg, opts=cfg["mosaic"], teacher=teacher, student=student, num_classes=s.num_classes,
                      image_size=s.image_size, channels=3, mean=torch.tensor(MEAN, device=s.device),
                      std=torch.tensor(STD, device=s.device), device=s.device, accelerator=accelerator,
                      steps=10_000, batch_size=s.batch, precision=self.precision)
        method = method_cls(ctx)
        # the reference's copies, taken before the teacher and players get their memory format and autocast
        self.initial = {name: copy.deepcopy(getattr(method, name)) for name in ("teacher", *method.players)}
        prepare_frozen(teacher, self.precision, s.device)  # in place: method.teacher is this module
        self.schedulers, _ = prepare_players(method, cfg, accelerator)  # exactly as a run prepares them
        augment = Augment.from_config(cfg["data"], image_size=s.image_size).to(s.device)
        self.streams = {key: Stream(pool.to(s.device), seed=s.seed, augment=augment) for key in self.needs}
        self.method, self.step = method, 0

    def iteration(self) -> None:
        """One engine loop turn: draw the batches, run the step, step the schedules."""
        batch = {key: self.streams[key].next(n * self.cfg["batch_size"])[0] for key, n in self.needs.items()}
        self.method.step(batch, self.step)
        for sched in self.schedulers:
            sched.step()
        self.step += 1

    @property
    def student_images(self) -> int:
        """Images the student trains on per iteration (generated + OOD, every student step)."""
        o = self.cfg["mosaic"]
        return o["student_steps"] * ((o["synthetic_batch"] or self.cfg["batch_size"]) + self.cfg["batch_size"])


def count_syncs(ours: Ours) -> int:
    """Host-device synchronisations CUDA reports during one `method.step` (streams excluded)."""
    import warnings

    batch = {key: ours.streams[key].next(n * ours.cfg["batch_size"])[0] for key, n in ours.needs.items()}
    sync(ours.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ours.method.step(batch, ours.step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def device_name(device: torch.device) -> str:
    """A readable device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"native bf16 as torch reports it: {cpu_bf16()}, flags: {' '.join(cpu_flags()) or 'none of interest'}")


def cpu_flags() -> list[str]:
    """The CPU's matrix / vector flags that decide bf16 and fp32 speed (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        flags = next(ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in wanted if f in flags]


def bench(setup: Setup, accelerator, *, variants: dict[str, list[str]], reps: int, warmup: int,
          measure_extras: bool = True, peaks: dict[str, float] | None = None) -> list[dict]:
    """Rows (one per implementation) for one configuration."""
    pool = random_pool(setup)
    ours = {label: Ours(setup, pool, accelerator, overrides=extra) for label, extra in variants.items()}
    first = next(iter(ours.values()))
    impls: dict[str, Callable[[], None]] = {
        "reference": Reference(first.initial, first.cfg, setup.device, pool).iteration}
    impls.update({label: o.iteration for label, o in ours.items()})
    warm: dict[str, list[float]] = {}
    times = time_interleaved(impls, setup.device, reps=reps, warmup=warmup, first=warm)
    ref_s = statistics.median(times["reference"])
    rows = []
    for label, run in impls.items():
        sec = statistics.median(times[label])
        dtype = ours[label].precision.mixed_precision if label in ours else "no"
        row = {"impl": label, "s_iter": sec, "speedup": ref_s / sec, "times": times[label],
               "warmup_s": warm.get(label, []),
               "images_s": first.student_images / sec, "dtype": "fp32" if dtype == "no" else dtype,
               "precision": ours[label].precision if label in ours else None}
        if measure_extras:
            row["peak_bytes"] = peak_memory(run, setup.device)
            compiled = label in ours and ours[label].cfg["compile"]
            flops = None if compiled else count_flops(run)  # the counter would force recompiles: same FLOPs as ours
            row["gflop"] = flops / 1e9 if flops is not None else None
            row["tflops"] = flops / sec / 1e12 if flops is not None else None
            peak = (peaks or {}).get(row["dtype"])
            row["of_peak"] = row["tflops"] / peak if peak and row["tflops"] is not None else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reporting

def fmt(value, spec: str) -> str:
    """Format a number, or n/a."""
    return "n/a" if value is None else format(value, spec)


def main_table(rows: list[dict]) -> list[str]:
    """Markdown table of one configuration's rows."""
    lines = ["| implementation | compute | s / iteration (median) | speed-up vs reference | student images / s "
             "| peak memory (MiB) | GFLOP / iteration | achieved TFLOP/s | of matmul peak | all timings (s) "
             "| untimed warm-up iterations (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("precision")
        compute = "fp32, contiguous" if p is None else (
            f"{r['dtype']}, " + {"auto": "channels-last convnets", True: "channels-last", False: "contiguous"}.get(
                p.channels_last, str(p.channels_last)))
        lines.append(f"| {r['impl']} | {compute} | {r['s_iter']:.3f} | {r['speedup']:.2f}x | {r['images_s']:.0f} "
                     f"| {fmt(r.get('peak_bytes') and r['peak_bytes'] / 2**20, '.0f')} | {fmt(r.get('gflop'), '.1f')} "
                     f"| {fmt(r.get('tflops'), '.4f')} | {fmt(r.get('of_peak') and 100 * r['of_peak'], '.1f')}% "
                     f"| {' '.join(f'{t:.2f}' for t in r['times'])} "
                     f"| {' '.join(f'{t:.2f}' for t in r.get('warmup_s', [])) or '-'} |")
    return lines


def write_markdown(path: Path, *, header: list[str], main: list[str], sweep: list[str]) -> None:
    """Write (or rewrite, as sweep points arrive) the results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*header, "", *main, "", *sweep]).rstrip() + "\n")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'label: key=value key=value' -> (label, overrides)."""
    label, _, rest = text.partition(":")
    return label.strip(), rest.split()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--teacher", default=None, help="teacher arch (default: cnn_small on CPU, resnet34_cifar on GPU)")
    p.add_argument("--student", default=None, help="student arch (default: cnn_tiny on CPU, resnet18_cifar on GPU)")
    p.add_argument("--batch", type=int, default=None, help="OOD batch = generated batch (default 64 CPU, 256 GPU)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--ngf", type=int, default=None, help="generator width (default 32 CPU, 64 GPU)")
    p.add_argument("--ndf", type=int, default=None, help="discriminator width (default 64 CPU, 128 GPU)")
    p.add_argument("--reps", type=int, default=5, help="timed iterations per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per implementation first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for ours (repeatable), e.g. channels_last=true compile=true")
    p.add_argument("--switches-off", action="store_true",
                   help="also time ours with every MosaicKD speed switch off (mosaic.fast_crop=false ...)")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL: KEY=VALUE ...'",
                   help="also time ours with these extra overrides (repeatable; each resolves its own precision)")
    p.add_argument("--peak", action="store_true",
                   help="measure the machine's matmul peak (fp32, and bf16 where native) for the %% of peak column")
    p.add_argument("--check-syncs", action="store_true", help="CUDA: count host syncs in one step of ours")
    p.add_argument("--sweep", action="store_true", help="also time batch 64,128,256,512 x image size 32,64")
    p.add_argument("--sweep-batches", default="64,128,256,512")
    p.add_argument("--sweep-sizes", default="32,64")
    p.add_argument("--sweep-reps", type=int, default=None, help="timed iterations per sweep point (default --reps)")
    p.add_argument("--sweep-warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = p.parse_args(argv)

    from accelerate import Accelerator

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    setup = Setup(device=device, teacher=args.teacher or ("resnet34_cifar" if gpu else "cnn_small"),
                  student=args.student or ("resnet18_cifar" if gpu else "cnn_tiny"),
                  batch=args.batch or (256 if gpu else 64), image_size=args.image_size,
                  ngf=args.ngf or (64 if gpu else 32), ndf=args.ndf or (128 if gpu else 64),
                  overrides=list(args.overrides))
    precision = resolve(overrides=setup.overrides, method_defaults=method_defaults)["mixed_precision"]
    # autocast is per forward (mosaic/precision.py); Accelerate only keeps fp16's gradient scaler
    accelerator = Accelerator(cpu=not gpu, mixed_precision="fp16" if precision == "fp16" else "no")
    variants = {"ours": []}
    if args.switches_off:
        variants["ours, speed switches off"] = [f"mosaic.{k}=false" for k in SWITCHES]
    variants.update(parse_variant(v) for v in args.variant)

    command = "python experiments/bench_speed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = [f"# MosaicKD outer-iteration speed ({device.type})", "",
              f"- device: {device_name(device)}; torch {torch.__version__}",
              f"- command: `{command}`",
              f"- configuration: teacher {setup.teacher} -> student {setup.student}, batch {setup.batch} OOD + "
              f"{setup.batch} generated, image {setup.image_size}px, ngf {setup.ngf}, ndf {setup.ndf}, "
              f"overrides for ours: {' '.join(setup.overrides) or 'none'}",
              "- one iteration = OOD batches + 1 D step + 1 G step + 5 student steps; median of "
              f"{args.reps} timed iterations after {args.warmup} untimed ones, implementations interleaved",
              "- speed-up = reference s/iter / ours s/iter (> 1: ours faster); student images/s = 5 x (generated + "
              "OOD) / s; peak memory: " + ("torch.cuda.max_memory_allocated" if gpu else
                                           "peak tensor bytes allocated above the iteration's start "
                                           "(torch.profiler allocator events; no CPU max_memory_allocated exists)"),
              "- FLOPs: torch.utils.flop_counter (convolutions and matmuls only); the reference counts more "
              "because its G step also back-propagates into D and student weights, as plain `loss.backward()` does"]
    peaks = None
    if args.peak:
        peaks = {"fp32": matmul_peak(torch.float32, device)}
        if gpu or cpu_bf16() != "none":
            peaks["bf16"] = matmul_peak(torch.bfloat16, device)
        header.append("- matmul peak (the % of peak column): the best of 5 timed torch.mm of two 2048 x 2048 "
                      "matrices in the compute dtype on this device, same threads: " +
                      ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()) +
                      " (a measured ceiling for dense GEMM, not the vendor's nominal peak)")
    print("\n".join(header), flush=True)
    if args.check_syncs and gpu:
        n = count_syncs(Ours(setup, random_pool(setup), accelerator))
        header.append(f"- host-device synchronisations in one step of ours (torch.cuda.set_sync_debug_mode): {n}")
        print(header[-1], flush=True)
    rows = bench(setup, accelerator, variants=variants, reps=args.reps, warmup=args.warmup, peaks=peaks)
    resolved = [f"{r['impl']}: {r['precision'].summary()}" for r in rows if r.get("precision") is not None]
    header.append("- precision of each variant as the engine resolves it: " + "; ".join(resolved))
    main_lines = ["## One configuration", "", *main_table(rows)]
    print("\n".join(main_lines), flush=True)
    sweep_lines: list[str] = []
    if args.out:
        write_markdown(args.out, header=header, main=main_lines, sweep=sweep_lines)
    if args.sweep:
        reps = args.sweep_reps or args.reps
        sweep_lines = ["## Sweep", "", f"Median of {reps} timed iterations after {args.sweep_warmup} untimed; "
                       "same models and options as above.", "",
                       "| image size | batch | ours s/iter | reference s/iter | speed-up | ours student images/s |",
                       "|---|---|---|---|---|---|"]
        for size in (int(v) for v in args.sweep_sizes.split(",")):
            for batch in (int(v) for v in args.sweep_batches.split(",")):
                point = Setup(**{**setup.__dict__, "batch": batch, "image_size": size})
                r = {row["impl"]: row for row in bench(point, accelerator, variants={"ours": []}, reps=reps,
                                                      warmup=args.sweep_warmup, measure_extras=False)}
                ours, ref = r["ours"], r["reference"]
                sweep_lines.append(f"| {size} | {batch} | {ours['s_iter']:.3f} | {ref['s_iter']:.3f} "
                                   f"| {ours['speedup']:.2f}x | {ours['images_s']:.0f} |")
                print(sweep_lines[-1], flush=True)
                if args.out:
                    write_markdown(args.out, header=header, main=main_lines, sweep=sweep_lines)


if __name__ == "__main__":
    main()
