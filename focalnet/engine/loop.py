"""The training epoch and the validation pass: plain functions with explicit arguments.

``train_one_epoch`` runs the micro-batches of one epoch from the resume position, accumulating
``accum_steps`` micro-batches per optimizer update (DDP gradient sync only on the last one), and after every
update calls ``after_step`` (logging, checkpoints, preemption, max_steps), which may stop the epoch early.
``validate`` sums exact counts over ranks: top-1/top-5 correct, loss and sample count.

Both take a :class:`focalnet.data.loaders.DeviceLoader`: batches arrive on the device, finished (normalized, erased).
Nothing in an update waits for the device (no ``.item()``, no host-side branch on a device value): the loss
is summed on the device and ``after_step`` decides when to read anything back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from focalnet.engine.amp import AmpStep
from focalnet.engine.distributed import all_reduce_sum


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint. A checkpoint is only written between updates."""

    step: int = 0              # optimizer updates done
    epoch: int = 0             # current epoch
    batch_in_epoch: int = 0    # micro-batches of `epoch` consumed
    best_metric: float | None = None


@torch.enable_grad()  # whatever the caller's grad mode
def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    amp: AmpStep,
    *,
    criterion: nn.Module,
    mixup,
    scheduler,
    ema,
    params: list[nn.Parameter],
    state: TrainState,
    accum_steps: int,
    device: torch.device,
    channels_last: bool = False,
    ddp: nn.parallel.DistributedDataParallel | None = None,
    ema_source: nn.Module | None = None,
    after_step: Callable[[TrainState, torch.Tensor, torch.Tensor], str | None] = lambda *a: None,
    peek: Callable[[torch.Tensor, int], None] | None = None,
) -> str | None:
    """Train from ``state.batch_in_epoch`` to the end of the epoch; returns ``after_step``'s stop reason or None.

    The loader (a :class:`focalnet.data.loaders.DeviceLoader`) must already be positioned (``loader.set_epoch(epoch,
    state.batch_in_epoch)``). Micro-batches past the last full accumulation group of the epoch are not used, so
    every update sees the same number.
    ``peek(images, step)``, when given, sees the first micro-batch's model input once (the run's picture of it).
    """
    model.train()
    n_batches = (len(loader) // accum_steps) * accum_steps
    loss_sum = torch.zeros((), device=device)  # summed over the micro-batches since the last update
    batches = iter(loader)
    for i in range(state.batch_in_epoch, n_batches):
        images, targets = next(batches)  # (B, C, H, W) float on the device, (B,) class indices
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)  # targets -> (B, num_classes) soft, label-smoothed
        if peek is not None:
            peek(images, state.step)
            peek = None
        last_micro = (i + 1) % accum_steps == 0
        # Gradients are all-reduced only on the last micro-batch of an update.
        sync = contextlib.nullcontext() if (ddp is None or last_micro) else ddp.no_sync()
        with sync:
            with amp.autocast():
                logits = model(images)  # (B, num_classes)
                loss = criterion(logits, targets)
            amp.backward(loss / accum_steps)
        loss_sum += loss.detach()
        state.batch_in_epoch = i + 1
        if last_micro:
            grad_norm = amp.step(optimizer, params)
            state.step += 1
            if ema is not None:
                ema.update(ema_source if ema_source is not None else model, step=state.step)
            scheduler.step_update(num_updates=state.step)
            stop = after_step(state, loss_sum / accum_steps, grad_norm)
            loss_sum = torch.zeros((), device=device)
            if stop:
                return stop
    return None


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, amp: AmpStep, channels_last: bool = False, *,
             class_indices: list[int] | None = None, keep_topk: int = 0) -> dict:
    """Top-1/top-5 accuracy (%) and mean CE loss over the whole validation set, exact across ranks.

    ``class_indices`` restricts the logits to those columns (a test set on a subset of the classes, e.g.
    ImageNet-A/R). ``keep_topk > 0`` also returns this rank's ranked top-k classes and targets, in loader order,
    as ``preds`` (N, k) and ``targets`` (N,), for metrics computed elsewhere (focalnet.engine.metrics).
    """
    was_training = model.training
    model.eval()
    columns = torch.tensor(class_indices, device=device) if class_indices is not None else None
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    kept_preds, kept_targets = [], []
    for images, targets in loader:  # on the device (a DeviceLoader)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(images)  # (B, num_classes)
        logits = logits.float() if columns is None else logits.float().index_select(1, columns)
        ranked = logits.topk(min(max(5, keep_topk), logits.shape[1]), dim=1).indices  # (B, k)
        hits = ranked[:, :5].eq(targets[:, None])  # (B, <=5)
        totals += torch.stack([hits[:, 0].sum(), hits.sum(), F.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(len(targets), device=device)]).to(torch.float64)
        if keep_topk:
            kept_preds.append(ranked[:, :keep_topk].cpu())
            kept_targets.append(targets.cpu())
    all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    out = {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
           "loss": totals[2].item() / n, "count": int(totals[3].item())}
    if keep_topk:
        out["preds"] = torch.cat(kept_preds) if kept_preds else torch.zeros(0, keep_topk, dtype=torch.long)
        out["targets"] = torch.cat(kept_targets) if kept_targets else torch.zeros(0, dtype=torch.long)
    return out
