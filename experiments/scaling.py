"""Data-parallel scaling of a MosaicKD run: 1 process against N processes, same per-process batch.

    python experiments/scaling.py --processes 2 --cpu          # 2 CPU processes over gloo
    python experiments/scaling.py --processes 4                  # 4 GPUs

Each setting runs `mosaic distill` (under `accelerate launch` for N > 1) for a fixed number of
steps on the demo teacher and writes a row to experiments/results/scaling-<device>.md:
wall time, steps per second and student images per second (5 updates on B generated + B OOD per step).
On CPU each process gets cores / N threads, so the machine is used the same way in both rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(processes: int, *, steps: int, batch: int, cpu: bool, out: Path, teacher: str, threads: int) -> dict:
    """One timed run; returns its results.json plus the launcher's wall time."""
    name = f"scaling-{processes}p"
    args = ["distill", f"teacher={teacher}", "student.arch=cnn_tiny", "mosaic.ngf=32", "mosaic.ndf=64",
            f"steps={steps}", f"batch_size={batch}", "eval_every=0", "sample_every=0", "ckpt_every=0",
            "progress=false", "data.test_limit=1000", f"out_dir={out}", f"name={name}", "overwrite=true",
            f"cpu={str(cpu).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, "-m", "mosaic", *args]
    else:
        if cpu:
            env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu: N gloo processes (--cpu alone starts one)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mosaic", *args]
    t0 = time.time()
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / name / "results.json").read_text())
    res["launch_s"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="N of the N-process row (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="MosaicKD outer steps per run (default 20)")
    parser.add_argument("--batch", type=int, default=64, help="per-process batch (default 64)")
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo")
    parser.add_argument("--teacher", default="runs/demo-teacher/model.safetensors")
    parser.add_argument("--out", default="runs", help="parent of the run folders")
    parser.add_argument("--no-table", action="store_true", help="print only")
    a = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    for n in (1, a.processes):
        threads = max(1, cores // n) if a.cpu else 1
        res = run(n, steps=a.steps, batch=a.batch, cpu=a.cpu, out=Path(a.out), teacher=a.teacher, threads=threads)
        images = res["global_batch"] * 2 * 5 * res["steps"]  # each step: 5 student updates on B generated + B OOD
        rows.append({"processes": n, "threads_each": threads, "global_batch": res["global_batch"],
                     "steps": res["steps"], "wall_s": res["wall_s"], "steps_per_s": round(res["steps"] / res["wall_s"], 3),
                     "student_images_per_s": round(images / res["wall_s"], 1), "device": res["device"]})
        print(json.dumps(rows[-1]), flush=True)
    speedup = rows[1]["student_images_per_s"] / rows[0]["student_images_per_s"]
    print(f"throughput x{speedup:.2f} with {a.processes} processes")
    if not a.no_table:
        dev = "cpu" if a.cpu else "gpu"
        cols = list(rows[0])
        lines = [f"# Data-parallel scaling, MosaicKD cnn_small -> cnn_tiny ({dev})", "",
                 f"`python experiments/scaling.py {' '.join(argv or sys.argv[1:])}`; wall time of the training loop "
                 f"(results.json `wall_s`), per-process batch {a.batch}. Throughput x{speedup:.2f}.", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        path = HERE / "results" / f"scaling-{dev}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
