"""`make demo`: train a small CIFAR-10 teacher, distil it with MosaicKD and with plain KD on OOD images, print a table.

Uses the offline archives in ../shared/data when present, else torchvision downloads
(CIFAR-10 in-domain, CIFAR-100 as the OOD pool). Run folders go to runs/demo-*.
"""
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from suite import load_spec, markdown, run_suite  # noqa: E402


def main() -> int:
    t0 = time.time()
    rows = run_suite("demo", out_dir=Path("runs"), results_dir=None)
    print()
    print(markdown(rows, title="mosaic-kd demo (CIFAR-10 test set)"))
    regime = load_spec("demo")[1].get("regime")
    if regime:  # which regime of the map in experiments/results/README.md this run sits in, and what it predicts
        print(textwrap.fill(" ".join(regime.split()), width=100))
        print()
    print(f"demo finished in {time.time() - t0:.0f}s; run folders under runs/demo-*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
