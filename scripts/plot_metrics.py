"""Plot a run's loss, learning-rate and accuracy curves from its ``metrics.jsonl`` (no W&B needed).

    python scripts/plot_metrics.py outputs/<run>                 # -> outputs/<run>/metrics.png
    python scripts/plot_metrics.py outputs/<run>/metrics.jsonl -o curves.png

Three panels against the optimizer step: train loss (and val loss), the learning rate, and validation
top-1/top-5 (and the EMA model's top-1 when the run kept one). A resumed run appends to the same file and
re-logs the steps after its checkpoint; for each step the last record wins, so the curves show what the
final weights went through.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The JSON records of ``metrics.jsonl``; a truncated last line (a killed run) is ignored."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{n}: skipping an unreadable line", file=sys.stderr)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, one value per step (the last one logged), sorted by step."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and "step" in r:
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(records: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = [
        ("loss", [("train/loss", "train"), ("val/loss", "val"), ("val_ema/loss", "val (EMA)")], "linear"),
        ("learning rate", [("train/lr", "lr")], "linear"),
        ("accuracy (%)", [("val/top1", "val top-1"), ("val/top5", "val top-5"), ("val_ema/top1", "val top-1 (EMA)")],
         "linear"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    drawn = 0
    for ax, (ylabel, keys, scale) in zip(axes, panels):
        for key, label in keys:
            steps, values = series(records, key)
            if not steps:
                continue
            marker = "o" if key.startswith("val") else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.4)
            drawn += 1
            if key == "val/top1":
                ax.annotate(f"{values[-1]:.1f}", (steps[-1], values[-1]), textcoords="offset points",
                            xytext=(-10, -14), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    if drawn == 0:
        plt.close(fig)
        raise ValueError("no train/loss, train/lr or val/* values in the metrics: nothing to plot")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
        plot(read_metrics(path), out, title=str(path.parent.name))
    except ValueError as e:
        p.error(f"{path}: {e}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
