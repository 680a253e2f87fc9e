"""The mixed-precision optimizer step: autocast, scale -> backward -> unscale -> clip -> step, in one object.

``AmpStep`` owns the ``torch.amp.GradScaler`` (enabled for fp16 only; bf16 and fp32 need no loss scaling)
and is checkpointed through ``state_dict()`` so a resumed fp16 run continues with the same loss scale.
Gradients are clipped once per optimizer step, after accumulation and after unscaling, and the total norm
is returned for logging (computed even without clipping).

Non-finite gradients (from a NaN/inf loss on any rank; DDP has averaged them, so every rank sees the same
norm): with fp16 the scaler skips the step and lowers the scale, which is the normal overflow path, until
``max_nonfinite_updates`` updates in a row were skipped (divergence: :class:`NonFiniteLossError`); with
fp32/bf16 there is no scaler to recover, so :class:`NonFiniteLossError` stops training before the bad
update reaches the weights, leaving the last checkpoint as the last good state.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    """Loss or gradients became NaN/inf in fp32/bf16 training."""


class AmpStep:
    def __init__(self, amp: str, device: torch.device, clip_grad: float | None = None,
                 max_nonfinite_updates: int = 20):
        if amp not in AMP_DTYPES:
            raise ValueError(f"trainer.amp={amp!r}; choose one of {sorted(AMP_DTYPES)}")
        self.amp, self.dtype, self.device_type = amp, AMP_DTYPES[amp], device.type
        self.clip_grad = clip_grad
        # fp16: an overflow skips a step and halves the scale, so a healthy run skips a few in a row at most
        # (16 take the initial scale 2^16 down to 1); a diverged one skips every step from then on.
        self.max_nonfinite_updates, self.nonfinite_in_a_row = max_nonfinite_updates, 0
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")
        # Count of fp16 steps skipped by the scaler, kept on device: no host sync per step.
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Unscale, clip, step, zero the grads; returns the total gradient norm (a 0-dim tensor)."""
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        norm = get_total_norm(grads, norm_type=2.0)
        if self.scaler.is_enabled():
            self.skipped += (~torch.isfinite(norm)).long()
            if self.clip_grad is not None:
                clip_grads_with_norm_(params, self.clip_grad, norm)
            self.scaler.step(optimizer)  # skips the update itself when grads are inf/NaN (it syncs for that)
            self.scaler.update()
            self.nonfinite_in_a_row = 0 if torch.isfinite(norm) else self.nonfinite_in_a_row + 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_updates:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"the last {self.nonfinite_in_a_row} updates all had NaN/inf gradients with trainer.amp=fp16 "
                    f"(loss scale now {self.scaler.get_scale():.3g}): training diverged. They were skipped and "
                    "nothing more is saved; the last checkpoint is the last good state. Lower optimizer.lr or set "
                    "trainer.clip_grad (trainer.max_nonfinite_updates sets the limit)")
        else:
            if not torch.isfinite(norm):  # one host sync per optimizer step; rank-consistent after DDP
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"gradient norm is {norm.item()} with trainer.amp={self.amp}: the loss became NaN/inf. "
                    "The update was not applied and nothing more is saved; the last checkpoint is the last "
                    "good state. Lower optimizer.lr, set trainer.clip_grad, or use trainer.amp=fp16/none.")
            if self.clip_grad is not None:
                clip_grads_with_norm_(params, self.clip_grad, norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:  # a disabled scaler's state is empty; loading fp32 weights into an fp16 run keeps defaults
            self.scaler.load_state_dict(state)
