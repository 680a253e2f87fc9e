"""The pictures a run leaves in its run directory (and in W&B): learning curves, modulation maps, inputs.

* ``metrics.png``: train/val loss, learning rate and validation accuracy against the optimizer step, read
  from ``metrics.jsonl`` (:func:`plot_metrics`); the trainer redraws it at every validation, and
  ``scripts/plot_metrics.py`` draws it for any run.
* ``modulation*.png``: per image, the modulator magnitude and the focal-level gates of the last block of
  every stage (:func:`record_maps` + :func:`draw_modulation`): the picture ``scripts/visualize_modulation.py``
  draws, and the trainer's for a fixed set of validation images every ``logger.pictures.modulation_every``
  epochs.
* ``inputs.png``: the first augmented training batch as the model receives it (:func:`input_grid`).

matplotlib draws with its Agg backend (files only, no display).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# ---- learning curves ------------------------------------------------------------------------------------


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


def plot_metrics(records: list[dict], out: Path, title: str = "") -> Path:
    """Three panels against the optimizer step: train/val loss, learning rate, val top-1/top-5 (+ EMA top-1)."""
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


# ---- modulation maps ------------------------------------------------------------------------------------


@torch.no_grad()
def record_maps(model, images: torch.Tensor, block: int):
    """Forward ``images`` (B, 3, S, S) once; per stage the (gates (B, L+1, h, w), modulator (B, C, h, w))."""
    chosen = [layer.blocks[block].modulation for layer in model.layers]
    for m in chosen:
        m.store_maps = True
    try:
        logits = model(images)  # (B, num_classes)
        maps = [(m.gates.float(), m.modulator.float()) for m in chosen]
    finally:
        for m in chosen:  # switch off and drop the stored tensors: they pin activations otherwise
            m.store_maps = False
            m.gates = m.modulator = None
    return logits.float().softmax(-1), maps


def draw_modulation(rows, maps, probs, out: Path, class_names=None) -> Path:
    """rows: [(uint8 (3, S, S) image, title)]; maps: per stage (gates, modulator); probs: (B, K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("input", None, None)]
    shown = [s for s, (gates, _) in enumerate(maps) if gates.shape[-1] * gates.shape[-2] > 1]
    for s in shown:  # a 1x1 map (the last stage of a small input) has nothing spatial to show
        gates = maps[s][0]
        levels = gates.shape[1] - 1
        columns.append((f"stage {s + 1}\n|m|", s, "mod"))
        columns += [(f"stage {s + 1}\ng{lv}" if lv < levels else f"stage {s + 1}\ng_glob", s, lv)
                    for lv in range(levels + 1)]
    n_rows, n_cols = len(rows), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.25 * n_cols, 1.45 * n_rows + 0.5), squeeze=False)
    size = rows[0][0].shape[-1]
    extent = (0, size, size, 0)
    grey = [img.float().mean(0).numpy() / 255.0 for img, _ in rows]  # (S, S) luminance in [0, 1]
    for r, (image, label) in enumerate(rows):
        top = int(probs[r].argmax())
        name = class_names[top] if class_names else str(top)
        for c, (title, stage, what) in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if stage is None:
                ax.imshow(image.permute(1, 2, 0).numpy())
                truth = "" if label is None else f" (true {class_names[label] if class_names else label})"
                ax.set_xlabel(f"pred {name} {100 * probs[r, top]:.0f}%{truth}", fontsize=6)
                continue
            gates, modulator = maps[stage]
            if what == "mod":
                heat = modulator[r].abs().mean(0)  # (h, w)
                ax.imshow(heat.numpy(), cmap="inferno", extent=extent, interpolation="nearest")
            else:
                heat = gates[r, what]  # (h, w), raw gate values
                lim = float(heat.abs().max()) or 1.0
                ax.imshow(heat.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, extent=extent, interpolation="nearest")
                ax.set_xlabel(f"±{lim:.2g}", fontsize=5, labelpad=1)
            # The outline of the input's dark strokes, to relate map cells to the object.
            ax.contour(grey[r], levels=[0.5], colors="lime", linewidths=0.5, origin="upper",
                       extent=(0, size, 0, size))
    hidden = [str(s + 1) for s in range(len(maps)) if s not in shown]
    fig.suptitle("FocalNet modulator magnitude |m| (inferno) and focal-level gates g (blue < 0 < red), last block "
                 "of each stage; green: outline of the input's dark strokes"
                 + (f"; stage {', '.join(hidden)} omitted (1x1 maps)" if hidden else ""), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


# ---- inputs -------------------------------------------------------------------------------------------


def to_uint8(batch: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """A normalized float batch (B, 3, H, W) back to uint8 pixels (out-of-range values clipped)."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch.detach().float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def input_grid(batch: torch.Tensor, out: Path, max_images: int = 32) -> Path:
    """Save up to ``max_images`` images of a normalized batch (B, 3, H, W) as one PNG grid, 2 px apart."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = to_uint8(batch[:max_images])
    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=255)  # (3, H', W')
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def spread_over_classes(samples: list[tuple], count: int) -> list[int]:
    """Indices of ``count`` samples ``(..., label)`` taking classes in turn: the first sample of every class
    (in class order), then the second of every class, and so on."""
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(int(sample[-1]), []).append(index)
    picked, rank = [], 0
    while len(picked) < count and any(rank < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if rank < len(by_class[label]) and len(picked) < count:
                picked.append(by_class[label][rank])
        rank += 1
    return picked

