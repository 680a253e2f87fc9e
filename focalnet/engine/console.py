"""What a run prints: one block when it starts, one when it ends, and its progress in between.

Progress follows where stderr goes. On a terminal: a tqdm bar for training (loss, lr, img/s) and one for
each validation pass, and every log record is written through ``tqdm.write`` (tqdm's ``logging_redirect_tqdm``)
so it lands above the bars instead of breaking them. Anywhere else (a SLURM log file, a pipe, ``nohup``):
no bar and no carriage return, but one plain log line every ``trainer.log_every`` updates and a line at
each quarter of a validation pass. Only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    from focalnet.engine.trainer import TrainRun

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """3725.4 -> '1:02:05'."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Training progress (and validation progress through :meth:`validation`) for rank 0.

    ``interactive`` (default: whether stderr is a terminal) picks the bar or the plain lines; ``file`` is where
    bars go (default stderr). Use as a context manager: while it is open, log records go through tqdm.
    """

    def __init__(self, *, total: int, initial: int, log_every: int, enabled: bool = True,
                 interactive: bool | None = None, file=None):
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.file = file
        self.interactive = (file or sys.stderr).isatty() if interactive is None else interactive
        self.bar: tqdm | None = None
        self._stack = contextlib.ExitStack()
        self._initial = initial

    def __enter__(self) -> Progress:
        if self.enabled and self.interactive:
            self._stack.enter_context(logging_redirect_tqdm())
            self.bar = self._stack.enter_context(tqdm(total=self.total, initial=self._initial, desc="train",
                                                      dynamic_ncols=True, mininterval=1.0, file=self.file))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.bar = None

    def update(self, step: int, metrics: dict | None = None) -> None:
        """One optimizer update done; ``metrics`` (train/loss, train/lr, ...) on logging steps."""
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                     img_s=f"{metrics['train/img_per_s']:.0f}", refresh=False)
        elif self.enabled and metrics:
            log.info("train step %d/%d (%.1f%%) epoch %d: loss %.4f, lr %.3e, %.0f img/s, eta %s", step,
                     self.total, 100.0 * step / self.total, metrics["epoch"] + 1, metrics["train/loss"],
                     metrics["train/lr"], metrics["train/img_per_s"], duration(metrics["train/eta_s"]))

    def validation(self, loader: Iterable, desc: str = "val") -> Iterable:
        """``loader``, iterated with a progress display (a bar that disappears, or lines at each quarter)."""
        if not self.enabled:
            return loader
        if self.interactive:
            return tqdm(loader, total=len(loader), desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                        file=self.file)
        return _quarter_lines(loader, desc)


def _quarter_lines(loader, desc: str) -> Iterator:
    n = len(loader)
    marks = {max(1, round(n * q / 4)) for q in (1, 2, 3)} - {n}
    for i, batch in enumerate(loader, 1):
        yield batch
        if i in marks:
            log.info("%s: %d/%d batches", desc, i, n)


# ---- start and end blocks -------------------------------------------------------------------------------


def _block(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * 100
    return "\n".join([f"{title} {line[len(title) + 1:]}", *(f"  {k:<{width}}  {v}" for k, v in rows), line])


def _devices(run: TrainRun) -> str:
    n, device = run.info.world_size, run.device
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    where = f"{n // local} nodes x {local}" if local < n and n % local == 0 else str(n)
    kind = device.type
    if kind == "cuda":
        kind = f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{where} process{'es' if n > 1 else ''} on {kind}"


def _gmacs(run: TrainRun) -> str:
    from focalnet.models.flops import count_macs

    size = run.cfg["data"]["img_size"]
    try:
        with torch.random.fork_rng(devices=[]):  # the counting forward draws an input: keep the run's streams
            return f"{count_macs(run.model, size, run.device) / 1e9:.3g} GMACs at {size} px"
    except Exception as e:  # a model the counter cannot trace: say so, never stop the run for it
        return f"GMACs not counted ({type(e).__name__})"


def start_block(run: TrainRun) -> str:
    cfg, t, d, data = run.cfg, run.t, run.derived, run.cfg["data"]
    params = sum(p.numel() for p in run.model.parameters())
    info = run.loaders.info
    sizes = (f"{info['train_size']:,} train / {info['val_size']:,} val images, "
             if "train_size" in info and "val_size" in info else "")
    root = info.get("root") or data.get("root")
    epochs = f"{run.epochs} epoch{'s' if run.epochs > 1 else ''} x {run.updates_per_epoch:,} updates"
    if t["max_steps"]:
        epochs = (f"max_steps {run.total_steps:,} ({run.epochs} epoch{'s' if run.epochs > 1 else ''} of "
                  f"{run.updates_per_epoch:,} updates)")
    resume = f"; resuming at update {run.state.step:,} (epoch {run.state.epoch + 1})" if run.state.step else ""
    sched = cfg["schedule"]
    rows = [
        ("model", f"{cfg['model']['name']}: {params / 1e6:.2f}M params, {_gmacs(run)}"),
        ("data", f"{data['name']}{f' ({root})' if root else ''}: {sizes}{run.loaders.num_classes} classes"),
        ("devices", _devices(run)),
        ("batch", f"{data['batch_size']} per process x {run.info.world_size} x {t['accum_steps']} accumulation "
                  f"= {d['total_batch']} per update"),
        ("precision", f"{t['amp']}{' autocast' if t['amp'] != 'none' else ' (fp32)'}, compile "
                      f"{'on' if t['compile'] else 'off'}, channels_last {'on' if t['channels_last'] else 'off'}"),
        ("steps", f"{epochs} = {run.total_steps:,} updates{resume}"),
        ("lr", f"{d['lr']:.3g} ({cfg['optimizer']['name']}, per-512 {cfg['optimizer']['lr']:.3g} x "
               f"{d['total_batch']}/512), {sched['name']} schedule, warmup {sched['warmup_epochs']} epochs from "
               f"{d['warmup_lr']:.3g}, min {d['min_lr']:.3g}"),
        ("run dir", str(run.run_dir)),
        ("W&B", run.logger.describe()),
    ]
    return _block("run", rows)


def end_block(run: TrainRun, final: dict, wall_s: float, train_s: float, images: int) -> str:
    def top1(prefix: str) -> str | None:
        return f"{final[prefix + '/top1']:.2f}%" if prefix + "/top1" in final else None

    best = run.state.best_metric
    acc = f"best {best:.2f}%, final {top1('val') or '-'}" if best is not None else "not validated"
    if top1("val_ema"):
        acc += f"; EMA final {top1('val_ema')}"
    ckpts = sorted(p.name for p in run.ckpt_dir.glob("*.pt")) if run.ckpt_dir.is_dir() else []
    rows = [
        ("top-1", acc),
        ("time", f"{duration(wall_s)} wall, {duration(train_s)} training: "
                 f"{images / train_s if train_s > 0 else 0.0:,.0f} img/s mean over {images:,} images"),
        ("checkpoints", f"{run.ckpt_dir}/{{{', '.join(ckpts)}}}" if ckpts else "none written"),
    ]
    return _block(f"done at update {run.state.step:,}", rows)
