"""Plot a run's loss, learning-rate and accuracy curves from its ``metrics.jsonl`` (no W&B needed).

    python scripts/plot_metrics.py outputs/<run>                 # -> outputs/<run>/metrics.png
    python scripts/plot_metrics.py outputs/<run>/metrics.jsonl -o curves.png

Three panels against the optimizer step: train loss (and val loss), the learning rate, and validation
top-1/top-5 (and the EMA model's top-1 when the run kept one). A resumed run appends to the same file and
re-logs the steps after its checkpoint; for each step the last record wins, so the curves show what the
final weights went through. The trainer redraws ``metrics.png`` itself at every validation; this script
is for runs in progress on another machine, or another output file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from focalnet.engine.pictures import plot_metrics, read_metrics, series  # noqa: E402, F401  (series: tests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory or its metrics.jsonl")
    p.add_argument("-o", "--out", type=Path, help="PNG to write (default: <run dir>/metrics.png)")
    args = p.parse_args(argv)
    path = args.run / "metrics.jsonl" if args.run.is_dir() else args.run
    if not path.is_file():
        p.error(f"{path}: no such file (a run directory holds metrics.jsonl)")
    out = args.out or path.with_name("metrics.png")
    try:
        plot_metrics(read_metrics(path), out, title=str(path.parent.name))
    except ValueError as e:
        p.error(f"{path}: {e}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
