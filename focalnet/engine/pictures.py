"""The pictures a run leaves in its run directory (and in W&B): learning curves, modulation maps, inputs.

* ``metrics.png``: train/val loss, learning rate and validation accuracy against the optimizer step, read
  from ``metrics.jsonl`` (:func:`plot_metrics`); the trainer redraws it at every validation, and
  ``scripts/plot_metrics.py`` draws it for any run.
* ``modulation*.png``: per image, the modulator magnitude and the focal-level gates of the last block of
  every stage (:func:`record_maps` + :func:`draw_modulation`): the picture ``scripts/visualize_modulation.py``
  draws, and the trainer's for a fixed set of validation images every ``logger.pictures.modulation_every``
  epochs.
* ``inputs.png``: the first augmented training batch as the model receives it (:func:`input_grid`).

matplotlib draws through its object API (no pyplot: no display, no global state), so the trainer can draw
``metrics.png`` in a background thread while training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

log = logging.getLogger(__name__)

# ---- learning curves ------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The JSON records of ``metrics.jsonl``; a truncated last line (a live or killed run) is ignored."""
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):  # the last line may be half-written (a live run) or cut (a killed one)
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
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    panels = [
        ("loss", [("train/loss", "train"), ("val/loss", "val"), ("val_ema/loss", "val (EMA)")], "linear"),
        ("learning rate", [("train/lr", "lr")], "linear"),
        ("accuracy (%)", [("val/top1", "val top-1"), ("val/top5", "val top-5"), ("val_ema/top1", "val top-1 (EMA)")],
         "linear"),
    ]
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
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
        raise ValueError("no train/loss, train/lr or val/* values in the metrics: nothing to plot")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ---- modulation maps ------------------------------------------------------------------------------------


@torch.no_grad()
def record_maps(model, images: torch.Tensor, block: int = -1):
    """Forward ``images`` (B, 3, S, S) once in eval mode; per stage the (gates (B, L+1, h, w), modulator
    (B, C, h, w)) on the CPU, and the class probabilities (B, K)."""
    was_training = model.training
    model.eval()
    chosen = [layer.blocks[block].modulation for layer in model.layers]
    for m in chosen:
        m.store_maps = True
    try:
        logits = model(images)  # (B, num_classes)
        maps = [(m.gates.float().cpu(), m.modulator.float().cpu()) for m in chosen]
    finally:
        model.train(was_training)
        for m in chosen:  # switch off and drop the stored tensors: they pin activations otherwise
            m.store_maps = False
            m.gates = m.modulator = None
    return logits.float().softmax(-1).cpu(), maps


def draw_modulation(rows, maps, probs, out: Path, class_names=None) -> Path:
    """rows: [(uint8 (3, S, S) image, title)]; maps: per stage (gates, modulator); probs: (B, K)."""
    from matplotlib.figure import Figure

    columns = [("input", None, None)]
    shown = [s for s, (gates, _) in enumerate(maps) if gates.shape[-1] * gates.shape[-2] > 1]
    for s in shown:  # a 1x1 map (the last stage of a small input) has nothing spatial to show
        gates = maps[s][0]
        levels = gates.shape[1] - 1
        columns.append((f"stage {s + 1}\n|m|", s, "mod"))
        columns += [(f"stage {s + 1}\ng{lv}" if lv < levels else f"stage {s + 1}\ng_glob", s, lv)
                    for lv in range(levels + 1)]
    n_rows, n_cols = len(rows), len(columns)
    fig = Figure(figsize=(1.25 * n_cols, 1.45 * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
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


def fixed_val_images(loader, count: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``count`` validation images that stay the same all run: (uint8 pixels (B, 3, S, S) to show, the
    normalized batch the model sees, labels). Image-file datasets give images spread over the classes (as
    ``scripts/visualize_modulation.py --val N`` picks them); other pipelines the first images of this rank."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "samples"):
        from data.transforms import BatchFinisher

        items = [dataset[(i, 0)] for i in spread_over_classes(dataset.samples, count)]  # (uint8 image, label, seed)
        pixels = torch.stack([item[0] for item in items])
        finisher = getattr(loader, "finisher", None) or BatchFinisher(train=False)
        return pixels, finisher(pixels, None), [int(item[1]) for item in items]
    images, targets = next(iter(loader))
    return to_uint8(images[:count]), images[:count].float(), [int(t) for t in targets[:count]]


class RunPictures:
    """The trainer's pictures (rank 0), each a PNG in the run directory and an image in W&B:

    * ``inputs.png`` (W&B ``pictures/inputs``): the first augmented training batch of a fresh run (after
      mixup/cutmix: what the model receives), when ``logger.pictures.inputs`` is true;
    * ``metrics.png``: redrawn from ``metrics.jsonl`` after every validation (not sent to W&B, which draws
      its own charts);
    * ``modulation.png`` (the latest) and ``pictures/modulation_step<N>.png`` (W&B ``pictures/modulation``):
      the modulation maps of ``logger.pictures.modulation_images`` fixed validation images every
      ``logger.pictures.modulation_every`` epochs and at the end (0: never).

    ``metrics.png`` is drawn in a background thread (training goes on; :meth:`close` waits for it); the
    pictures that go to W&B are drawn in the training thread, so they are logged at the step they show. A
    failed drawing is logged, never fatal.
    """

    def __init__(self, run_dir: Path, cfg: dict, logger, model, val_loader, enabled: bool):
        p = cfg["logger"]["pictures"]
        self.run_dir, self.logger, self.model, self.enabled = Path(run_dir), logger, model, enabled
        self.want_inputs = enabled and p["inputs"]
        self.every = p["modulation_every"] if enabled else 0
        self.class_names = [str(i) for i in range(10)] if str(cfg["data"]["name"]).startswith("digits") else None
        self.fixed = fixed_val_images(val_loader, p["modulation_images"]) if self.every else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pictures") if enabled else None

    @staticmethod
    def _draw(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:
            log.warning("could not draw %s: %s: %s", fn.__name__.strip("_"), type(e).__name__, e)

    def inputs(self, images: torch.Tensor, step: int) -> None:
        """The first training batch (normalized, B x 3 x H x W), once."""
        if not self.want_inputs:
            return
        self.want_inputs = False
        self._draw(self._inputs, images, step)

    def _inputs(self, images: torch.Tensor, step: int) -> None:
        path = input_grid(images, self.run_dir / "inputs.png")
        self.logger.log_images({"pictures/inputs": path}, step=step,
                               captions={"pictures/inputs": f"augmented training inputs, step {step}"})

    def validated(self) -> None:
        if self.enabled:
            self._pool.submit(self._draw, self._metrics)

    def _metrics(self) -> None:
        try:
            plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "metrics.png",
                         title=self.run_dir.name)
        except ValueError:  # nothing plottable yet
            pass

    def epoch_end(self, epoch: int, step: int, final: bool) -> None:
        if not self.every or not (epoch % self.every == 0 or final):
            return
        self._draw(self._modulation, epoch, step)

    def _modulation(self, epoch: int, step: int) -> None:
        pixels, batch, labels = self.fixed
        probs, maps = record_maps(self.model, batch.to(next(self.model.parameters()).device))
        path = draw_modulation(list(zip(pixels, labels)), maps, probs,
                               self.run_dir / "pictures" / f"modulation_step{step}.png", self.class_names)
        tmp = self.run_dir / ".modulation.png.tmp"
        tmp.write_bytes(path.read_bytes())
        tmp.replace(self.run_dir / "modulation.png")
        self.logger.log_images({"pictures/modulation": path}, step=step,
                               captions={"pictures/modulation": f"modulation maps at step {step} (epoch {epoch})"})

    def close(self) -> None:
        """Wait for the metrics plot being drawn."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
