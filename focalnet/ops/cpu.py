"""CPU fp32 kernels for FocalNet: oneDNN matmuls, a chunked MLP with recompute, a fused residual.

``use_cpu_kernels(model)`` (applied by ``focalnet.create_model`` unless ``cpu_kernels=False``) swaps the class of
the model's ``nn.Linear`` layers, MLPs, modulation ``h`` convolutions and blocks for the subclasses below. They
add no parameters or buffers, so state-dict names, initialization and checkpoints are unchanged; each one runs
the model's own code wherever its fast path does not apply. The fast paths only run on CPU, in fp32, without
autocast and outside ``torch.compile`` (which generates its own kernels): real ImageNet runs on GPUs in
bf16 never take them.

* Linear layers use oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor emits), about
  2x faster than the BLAS ``addmm`` behind ``F.linear`` on current PyTorch CPU builds for matmuls above ~4M
  MACs, for the forward and both gradients; the MLP's GELU is fused into fc1 at inference. Results equal
  ``F.linear`` to fp32 rounding.
* When an MLP's hidden activation would exceed 32 MB (stage 1-2 at batch 16+), training runs it chunk by chunk
  and recomputes it in backward (:class:`_OneDNNMlpFn`): no page-faulting fresh buffers and ~25% less
  activation memory.
* The modulation's 1x1 convolution ``h`` reads the (B, H, W, C) activations as a linear map over channels.
* Residual, layerscale and drop path are one ``addcmul`` (the same per-sample draws as timm's ``DropPath``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from focalnet.models import focalnet as fm

__all__ = ["use_cpu_kernels", "linear"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Below this many multiply-accumulates per matmul the BLAS call wins (oneDNN's per-call setup dominates).
_ONEDNN_MIN_MACS = 1 << 22
_RECOMPUTE_MLP_BYTES = 32 << 20  # beyond glibc's mmap threshold every hidden activation is a fresh buffer
_CHUNK_BYTES = 16 << 20


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none"):
    # x (..., K) @ weight (N, K)^T + bias, optionally followed by an exact (erf) GELU in the same kernel.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")


class _OneDNNLinearFn(torch.autograd.Function):
    """Linear whose forward and both gradients are oneDNN matmuls (the weight gradient reads transposed views)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)  # (..., N) @ (N, K); the weight view is not copied
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, K) = grad(M, N)^T @ x(M, K) over all tokens M, as a oneDNN matmul."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    # oneDNN copies a transposed *input* to contiguous (the weight operand may stay a view), so make the
    # narrower of the two (M, .) operands the input.
    if g2.shape[1] <= x2.shape[1]:
        return _onednn_linear(g2.t(), x2.t(), None)  # (N, M) @ (M, K)
    return _onednn_linear(x2.t(), g2.t(), None).t().contiguous()  # ((K, M) @ (M, N))^T


class _OneDNNMlpFn(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` over chunks of tokens, keeping no (tokens x 4C) hidden activation alive.

    Forward runs fc1 with GELU fused in the oneDNN matmul and fc2 chunk by chunk, so the hidden chunk stays in
    cache and no large fresh buffer is allocated (each fresh multi-MB CPU buffer costs page faults). Backward
    recomputes the hidden chunk (one extra fc1 matmul) and applies GELU's derivative in place. Only ``x`` is
    saved, so the MLP keeps 1/4 of the activation memory autograd would.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.has_b2 = b2 is not None
        x2 = x.reshape(-1, x.shape[-1])  # (M, C)
        out = x2.new_empty(x2.shape[0], w2.shape[0])  # (M, C_out)
        for rows in _token_chunks(x2.shape[0], w1.shape[0]):
            out[rows] = _onednn_linear(_onednn_linear(x2[rows], w1, b1, "gelu"), w2, b2)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (M, C), (M, C_out)
        grad_x = torch.empty_like(x2) if need[0] else None
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1 = torch.zeros_like(b1) if b1 is not None else None
        w1_t, w2_t = w1.t(), w2.t()
        for rows in _token_chunks(x2.shape[0], w1.shape[0]):
            xc, gc = x2[rows], g2[rows]
            h = _onednn_linear(xc, w1, b1)  # recomputed pre-activation (m, 4C)
            grad_w2 += _weight_grad(gc, F.gelu(h))
            grad_h = _onednn_linear(gc, w2_t, None)  # gradient w.r.t. GELU's output ...
            torch.ops.aten.gelu_backward.grad_input(grad_h, h, grad_input=grad_h)  # ... now w.r.t. h
            grad_w1 += _weight_grad(grad_h, xc)
            if grad_b1 is not None:
                grad_b1 += grad_h.sum(0)
            if grad_x is not None:
                grad_x[rows] = _onednn_linear(grad_h, w1_t, None)
        grad_b2 = g2.sum(0) if ctx.has_b2 and need[4] else None
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _token_chunks(n_tokens: int, hidden: int) -> list[slice]:
    """Row slices whose (rows x hidden) fp32 block is about ``_CHUNK_BYTES``: small enough for the allocator to
    recycle (below the mmap threshold), large enough to keep the number of parallel regions low."""
    step = max(256, _CHUNK_BYTES // (4 * hidden))
    return [slice(i, min(i + step, n_tokens)) for i in range(0, n_tokens, step)]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False):
    """``F.linear`` (+ exact GELU when ``gelu``), on oneDNN where that is faster and numerically the same."""
    if _onednn_ok(x, weight):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return _onednn_linear(x, weight, bias, "gelu" if gelu else "none")
        out = _OneDNNLinearFn.apply(x, weight, bias)
    else:
        out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


if _ONEDNN:
    # So FlopCounterMode (and our tests/benchmarks) count the oneDNN matmuls like aten.mm.
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


# ---- the swapped-in classes (no extra state: only forward differs) ---------------------------------------------


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PointwiseConv(nn.Conv2d):
    """The modulation's 1x1 ``h``: on a channels_last (B, C, H, W) view of (B, H, W, C) memory, a linear map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        w = self.weight.view(self.out_channels, self.in_channels)
        return linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)  # channels_last again


class Mlp(fm.Mlp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        fc1, fc2 = self.fc1, self.fc2
        if not isinstance(self.act, nn.GELU) or self.act.approximate != "none":
            return super().forward(x)
        hidden_bytes = x.numel() // x.shape[-1] * fc1.out_features * x.element_size()
        if (self.drop.p == 0.0 and hidden_bytes > _RECOMPUTE_MLP_BYTES and torch.is_grad_enabled()
                and _onednn_ok(x, fc1.weight)):
            return _OneDNNMlpFn.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        x = self.drop(linear(x, fc1.weight, fc1.bias, gelu=True))
        return self.drop(linear(x, fc2.weight, fc2.bias))


def _residual(shortcut: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None, drop_path: nn.Module):
    """``shortcut + drop_path(gamma * y)`` as one fused op (addcmul) where possible."""
    drop_prob = getattr(drop_path, "drop_prob", 0.0)
    if drop_path.training and drop_prob > 0.0:
        # Per-sample stochastic depth (timm DropPath semantics and draws) folded into the layerscale multiplier.
        keep = 1.0 - drop_prob
        scale = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep).div_(keep)  # (B,1,1,1)
        if gamma is not None:
            scale = scale * gamma  # (B, 1, 1, C)
        return torch.addcmul(shortcut, y, scale)
    if gamma is not None:
        return torch.addcmul(shortcut, y, gamma)
    return shortcut + y


class FocalNetBlock(fm.FocalNetBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        if self.use_postln:
            x = _residual(x, self.norm1(self.modulation(x)), self.gamma_1, self.drop_path)
            return _residual(x, self.norm2(self.mlp(x)), self.gamma_2, self.drop_path)
        x = _residual(x, self.modulation(self.norm1(x)), self.gamma_1, self.drop_path)
        return _residual(x, self.mlp(self.norm2(x)), self.gamma_2, self.drop_path)


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Switch ``model``'s layers to the classes above, in place (parameters, names and init untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is fm.Mlp:
            module.__class__ = Mlp
        elif type(module) is fm.FocalNetBlock:
            module.__class__ = FocalNetBlock
        elif type(module) is fm.FocalModulation and type(module.h) is nn.Conv2d:
            module.h.__class__ = PointwiseConv
    return model
