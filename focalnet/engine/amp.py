"""The mixed-precision optimizer step: autocast, scale -> backward -> unscale -> clip -> step, in one object.

``AmpStep`` owns the ``torch.amp.GradScaler`` (enabled for fp16 only; bf16 and fp32 need no loss scaling)
and is checkpointed through ``state_dict()`` so a resumed fp16 run continues with the same loss scale.
Gradients are clipped once per optimizer step, after accumulation and after unscaling, and the total norm
is returned for logging (computed even without clipping).

Non-finite gradients (from a NaN/inf loss on any rank; DDP has averaged them, so every rank sees the same
norm) never reach the weights: the update is skipped. With a fused optimizer (``build_optimizer`` picks one
wherever torch has the kernels: CUDA and CPU) the skip happens on the device, through the optimizer's
``found_inf`` input (the protocol ``GradScaler`` uses), so a step needs no host sync; other optimizers are
checked on the host. Skipped updates are counted on the device; the trainer reads the counters at its host
checks and calls :meth:`AmpStep.raise_if_diverged`: with fp16 a skip is the normal overflow path (the scaler
lowers the scale), and ``max_nonfinite_updates`` skips in a row mean divergence; fp32/bf16 have no scaler to
recover, so one skipped update means divergence. Either way :class:`NonFiniteLossError` stops training with
the last checkpoint as the last good state.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    """Loss or gradients became NaN/inf: training diverged."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``found_inf`` and skips the update on the device (fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class AmpStep:
    def __init__(self, amp: str, device: torch.device, clip_grad: float | None = None,
                 max_nonfinite_updates: int = 20):
        if amp not in AMP_DTYPES:
            raise ValueError(f"trainer.amp={amp!r}; choose one of {sorted(AMP_DTYPES)}")
        self.amp, self.dtype, self.device_type = amp, AMP_DTYPES[amp], device.type
        self.clip_grad = clip_grad
        # fp16: an overflow skips a step and halves the scale, so a healthy run skips a few in a row at most
        # (16 take the initial scale 2^16 down to 1); a diverged one skips every step from then on.
        self.max_nonfinite_updates = max_nonfinite_updates if amp == "fp16" else 1
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")
        # Device-side counters (no host sync per step): skipped updates in total, skipped in a row now, and the
        # longest run of skips since the last host check.
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped, self.in_a_row, self.longest_run = zero, zero.clone(), zero.clone()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Unscale, clip, step (skipped when the gradients are not finite), zero the grads; returns the total
        gradient norm (a 0-dim tensor). Never waits for the device when ``optimizer`` skips on the device."""
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        norm = get_total_norm(grads, norm_type=2.0)
        bad = ~torch.isfinite(norm)  # (0-dim bool, on the device)
        if self.clip_grad is not None:
            clip_grads_with_norm_(params, self.clip_grad, norm)
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)  # its found_inf skips the update (on the device for fused optimizers)
            self.scaler.update()
        elif skips_on_device(optimizer):
            optimizer.found_inf, optimizer.grad_scale = bad.float(), None  # read by the fused kernel
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        elif not bad.item():  # a host sync per update: optimizers without a device-side skip
            optimizer.step()
        self.skipped += bad
        self.in_a_row.add_(1).mul_(bad)  # +1 on a skip, back to 0 on an applied update
        torch.maximum(self.longest_run, self.in_a_row, out=self.longest_run)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def raise_if_diverged(self, longest_run: int) -> None:
        """At a host check: ``longest_run`` is :attr:`longest_run` read back. Raises NonFiniteLossError when it
        reaches the limit; otherwise starts the next check's window."""
        if longest_run >= self.max_nonfinite_updates:
            if self.scaler.is_enabled():
                raise NonFiniteLossError(
                    f"{longest_run} updates in a row had NaN/inf gradients with trainer.amp=fp16 (loss scale now "
                    f"{self.scaler.get_scale():.3g}): training diverged. They were skipped and nothing more is saved; "
                    "the last checkpoint is the last good state. Lower optimizer.lr or set trainer.clip_grad "
                    "(trainer.max_nonfinite_updates sets the limit)")
            raise NonFiniteLossError(
                f"an update had NaN/inf gradients with trainer.amp={self.amp}: the loss became NaN/inf. The update "
                "was not applied and nothing more is saved; the last checkpoint is the last good state. Lower "
                "optimizer.lr, set trainer.clip_grad, or use trainer.amp=fp16/none.")
        self.longest_run.copy_(self.in_a_row)

    def check(self) -> None:
        """:meth:`raise_if_diverged` with the counter read here (one host sync)."""
        self.raise_if_diverged(int(self.longest_run.item()))

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:  # a disabled scaler's state is empty; loading fp32 weights into an fp16 run keeps defaults
            self.scaler.load_state_dict(state)
