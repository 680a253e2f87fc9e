"""FocalNet (Focal Modulation Networks, Yang et al. 2022) with the official state-dict names.

The module tree and parameter names/shapes follow microsoft/FocalNet ``classification/focalnet.py``
(``patch_embed``, ``layers.i.blocks.j.modulation.{f,h,proj,focal_layers.k.0,ln}``, ``gamma_1/2``,
``layers.i.downsample`` at the END of stage i, ``norm``, ``head``), so released checkpoints load with
``strict=True`` and our checkpoints load into the official code.

Internal layout (why it is fast on CPU): activations live as (B, H, W, C) contiguous tensors for the whole
network. Linear layers and LayerNorm work on the last dim directly, and the depthwise focal convolutions see
the same memory as an NCHW tensor in ``channels_last`` format (``x.permute(0, 3, 1, 2)`` is a free view),
which oneDNN convolves ~2.5x faster than NCHW and without the permute+contiguous copies the official code
makes around every modulation (and timm's NCHW LayerNorm2d makes around every norm).

Linear layers (official ``nn.Linear`` parameters) run through ``linear()`` below: on CPU fp32 it uses oneDNN's
matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor emits), which is ~2x faster than the
BLAS ``addmm`` behind ``F.linear`` on current PyTorch CPU builds (for matmuls above ~4M MACs), and fuses the
MLP's GELU at inference. Results equal ``F.linear`` to fp32 rounding; anything else (CUDA, autocast, other
dtypes, torch.compile, meta tensors) takes plain ``F.linear``. When the MLP's hidden activation would exceed
32 MB (stage 1-2 at batch 16+), training runs it chunk by chunk and recomputes it in backward
(``_OneDNNMlpFn``): no page-faulting fresh buffers and ~25% less activation memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import register_flop_formula

from focalnet.models.registry import register_model

__all__ = ["FocalModulation", "FocalNetBlock", "BasicLayer", "PatchEmbed", "FocalNet", "Mlp", "linear"]


# ---- oneDNN linear ------------------------------------------------------------------------------------------
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Below this many multiply-accumulates per matmul the BLAS call wins (oneDNN's per-call setup dominates).
_ONEDNN_MIN_MACS = 1 << 22


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


_RECOMPUTE_MLP_BYTES = 32 << 20


_CHUNK_BYTES = 16 << 20


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


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout on (..., C) tokens (official names ``fc1``/``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        # Large hidden activations (beyond glibc's 32 MB mmap threshold every one is a fresh, page-faulting
        # buffer) are cheaper to recompute chunk by chunk than to keep; small ones are kept as autograd would.
        hidden_bytes = x.numel() // x.shape[-1] * fc1.out_features * x.element_size()
        if (
            self.drop.p == 0.0
            and hidden_bytes > _RECOMPUTE_MLP_BYTES
            and torch.is_grad_enabled()
            and _onednn_ok(x, fc1.weight)
        ):
            return _OneDNNMlpFn.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        x = self.drop(linear(x, fc1.weight, fc1.bias, gelu=True))
        return self.drop(linear(x, fc2.weight, fc2.bias))


class FocalModulation(nn.Module):
    """Focal modulation: ``out = proj(q * h(sum_l gate_l * ctx_l + gate_L * global_ctx))``.

    Usable alone as a token mixer: input (B, H, W, C) by default, or (B, C, H, W) when ``channels_first``
    (constructor default, overridable per call). The output has the input's layout.

    Gates and modulator are kept for visualization only when asked: pass ``return_maps=True`` to get
    ``(out, {"gates": (B, L+1, H, W), "modulator": (B, C, H, W)})``, or set ``store_maps = True`` to keep
    the last ones (detached) on ``self.gates`` / ``self.modulator`` like the official module does.
    """

    def __init__(
        self,
        dim: int,
        focal_window: int = 3,
        focal_level: int = 2,
        focal_factor: int = 2,
        bias: bool = True,
        proj_drop: float = 0.0,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
        channels_first: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.focal_window = focal_window
        self.focal_level = focal_level
        self.focal_factor = focal_factor
        self.use_postln_in_modulation = use_postln_in_modulation
        self.normalize_modulator = normalize_modulator
        self.channels_first = channels_first
        self.store_maps = False

        # f: C -> (q: C, ctx: C, gates: L+1); h: 1x1 conv (a Conv2d in the official weights); proj: C -> C.
        self.f = nn.Linear(dim, 2 * dim + (focal_level + 1), bias=bias)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, stride=1, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_sizes = [focal_factor * k + focal_window for k in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=k, stride=1, groups=dim, padding=k // 2, bias=False),
                nn.GELU(),
            )
            for k in self.kernel_sizes
        )
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, channels_first: bool | None = None, return_maps: bool = False):
        channels_first = self.channels_first if channels_first is None else channels_first
        if channels_first:
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C) view
        C, L = self.dim, self.focal_level

        # (B, H, W, 2C+L+1): one GEMM; q/ctx/gates are views of it.
        x = linear(x, self.f.weight, self.f.bias)
        q, ctx, gates = torch.split(x, (C, C, L + 1), dim=-1)

        # Hierarchical context: each level convolves the previous level's output. The depthwise convs run on
        # the channels_last NCHW view of (B, H, W, C) memory and return channels_last, so no copies.
        ctx_all = None
        for level, focal_layer in enumerate(self.focal_layers):
            ctx = focal_layer(ctx.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
            gate = gates[..., level : level + 1]  # (B, H, W, 1)
            # ctx_all is our own temporary that no backward formula saves, so accumulating in place is safe.
            ctx_all = ctx * gate if ctx_all is None else ctx_all.addcmul_(ctx, gate)
        ctx_global = self.act(ctx.mean((1, 2), keepdim=True))  # (B, 1, 1, C)
        ctx_all = ctx_all.addcmul_(ctx_global, gates[..., L:])
        if self.normalize_modulator:
            ctx_all = ctx_all / (L + 1)

        # h is a 1x1 conv in the official weights; on (B, H, W, C) it is a linear map with the (C, C) matrix.
        modulator = linear(ctx_all, self.h.weight.view(C, C), self.h.bias)  # (B, H, W, C)
        out = q * modulator
        if self.use_postln_in_modulation:
            out = self.ln(out)
        out = self.proj_drop(linear(out, self.proj.weight, self.proj.bias))

        if self.store_maps:
            self.gates = gates.detach().permute(0, 3, 1, 2)
            self.modulator = modulator.detach().permute(0, 3, 1, 2)
        if channels_first:
            out = out.permute(0, 3, 1, 2)  # back to (B, C, H, W) (channels_last memory)
        if return_maps:
            return out, {"gates": gates.permute(0, 3, 1, 2), "modulator": modulator.permute(0, 3, 1, 2)}
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, focal_level={self.focal_level}, kernel_sizes={self.kernel_sizes}, "
            f"normalize_modulator={self.normalize_modulator}"
        )


def _residual(shortcut: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None, drop_path: nn.Module):
    """``shortcut + drop_path(gamma * y)`` as one fused op (addcmul) where possible."""
    drop_prob = getattr(drop_path, "drop_prob", 0.0)
    if drop_path.training and drop_prob > 0.0:
        # Per-sample stochastic depth (timm DropPath semantics) folded into the layerscale multiplier.
        keep = 1.0 - drop_prob
        scale = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep).div_(keep)  # (B,1,1,1)
        if gamma is not None:
            scale = scale * gamma  # (B, 1, 1, C)
        return torch.addcmul(shortcut, y, scale)
    if gamma is not None:
        return torch.addcmul(shortcut, y, gamma)
    return shortcut + y


class FocalNetBlock(nn.Module):
    """Pre-LN (or post-LN) residual block: focal modulation, then MLP, on (B, H, W, C) tokens."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        focal_level: int = 2,
        focal_window: int = 3,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.mlp_ratio = mlp_ratio
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim,
            focal_window=focal_window,
            focal_level=focal_level,
            proj_drop=drop,
            use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if self.use_postln:
            x = _residual(x, self.norm1(self.modulation(x)), self.gamma_1, self.drop_path)
            x = _residual(x, self.norm2(self.mlp(x)), self.gamma_2, self.drop_path)
        else:
            x = _residual(x, self.modulation(self.norm1(x)), self.gamma_1, self.drop_path)
            x = _residual(x, self.mlp(self.norm2(x)), self.gamma_2, self.drop_path)
        return x


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm: the stem (patch 4/16, or conv-embed k7 s4 p2) and the stage downsample
    (k2 s2, or conv-embed k3 s2 p1). Takes (B, C, H, W) in any memory format, returns (B, H', W', C')."""

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        use_conv_embed: bool = False,
        norm: bool = True,
        is_stem: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:
            kernel_size, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel_size, stride, padding = patch_size, patch_size, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last in -> channels_last out, so the permute to (B, H, W, C) is a free view.
        x = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x


class BasicLayer(nn.Module):
    """One stage: ``depth`` FocalNetBlocks, then (except in the last stage) the downsample."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        depth: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: Sequence[float] | float = 0.0,
        downsample: bool = False,
        focal_level: int = 2,
        focal_window: int = 3,
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            FocalNetBlock(
                dim=dim,
                mlp_ratio=mlp_ratio,
                drop=drop,
                drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path,
                focal_level=focal_level,
                focal_window=focal_window,
                use_layerscale=use_layerscale,
                layerscale_value=layerscale_value,
                use_postln=use_postln,
                use_postln_in_modulation=use_postln_in_modulation,
                normalize_modulator=normalize_modulator,
            )
            for i in range(depth)
        )
        self.downsample = (
            PatchEmbed(patch_size=2, in_chans=dim, embed_dim=out_dim, use_conv_embed=use_conv_embed)
            if downsample
            else None
        )

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        return x


class FocalNet(nn.Module):
    """Focal Modulation Network (hierarchical, or isotropic when ``depths`` has one stage).

    ``forward(x: (B, 3, H, W)) -> (B, num_classes)``; ``forward_features`` -> normed (B, H/32, W/32, C);
    ``forward_features_multiscale`` -> per-stage (B, C_i, H_i, W_i) maps (strides 4/8/16/32).
    ``img_size`` is accepted for config compatibility only: the network takes any input size divisible by
    the total stride.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (3, 3, 3, 3),
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ):
        super().__init__()
        self.num_layers = len(depths)
        embed_dims = [embed_dim * (2**i) for i in range(self.num_layers)]
        self.img_size = img_size
        self.num_classes = num_classes
        self.embed_dim = embed_dims
        self.num_features = embed_dims[-1]
        self.mlp_ratio = mlp_ratio
        self.arch = dict(
            patch_size=patch_size, embed_dim=embed_dim, depths=tuple(depths), focal_levels=tuple(focal_levels),
            focal_windows=tuple(focal_windows), use_conv_embed=use_conv_embed, use_layerscale=use_layerscale,
            use_postln=use_postln, use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator,
        )  # fmt: skip

        self.patch_embed = PatchEmbed(
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dims[0],
            use_conv_embed=use_conv_embed,
            norm=patch_norm,
            is_stem=True,
        )
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            self.layers.append(
                BasicLayer(
                    dim=embed_dims[i],
                    out_dim=None if last else embed_dims[i + 1],
                    depth=depths[i],
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=not last,
                    focal_level=focal_levels[i],
                    focal_window=focal_windows[i],
                    use_conv_embed=use_conv_embed,
                    use_layerscale=use_layerscale,
                    layerscale_value=layerscale_value,
                    use_postln=use_postln,
                    use_postln_in_modulation=use_postln_in_modulation,
                    normalize_modulator=normalize_modulator,
                )
            )
            reduction = patch_size * 2**i
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"layers.{i}"))

        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: Linear trunc_normal(.02)/zero bias, LayerNorm 1/0, convs keep PyTorch's default.
        if getattr(m, "weight", None) is not None and m.weight.is_meta:
            return  # a meta-device model (shapes only) has no values to draw
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- training helpers -------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (non-reentrant torch.utils.checkpoint) to save memory."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Nothing by name: norms, biases and layerscale gammas are 1-D and excluded by the usual ndim rule.
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialized ``num_classes``-way one (0 = no head)."""
        self.num_classes = num_classes
        w = self.norm.weight
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    # ---- forward ----------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, h, w, C) normed
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((1, 2))  # (B, C): average over tokens
        if pre_logits:
            return x
        return linear(x, self.head.weight, self.head.bias) if isinstance(self.head, nn.Linear) else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features_multiscale(
        self, x: torch.Tensor, out_indices: Sequence[int] = (0, 1, 2, 3), norms: Mapping[str, nn.Module] | None = None
    ) -> list[torch.Tensor]:
        """Stage outputs before each downsample, as (B, C_i, H/s_i, W/s_i) with s_i = 4, 8, 16, 32.

        ``norms`` optionally maps ``str(i)`` to a LayerNorm applied to stage i's (B, H, W, C) output (the
        per-stage norms detection/segmentation backbones use). Outputs are channels_last-strided views.
        """
        outs = []
        x = self.pos_drop(self.patch_embed(x))
        last = max(out_indices)
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x)
            if i in out_indices:
                y = norms[str(i)](x) if norms is not None and str(i) in norms else x
                outs.append(y.permute(0, 3, 1, 2))
            if i == last:
                break
            if layer.downsample is not None:
                x = layer.downsample(x.permute(0, 3, 1, 2))
        return outs


# ---- registry -----------------------------------------------------------------------------------------------

_CONFIGS: dict[str, dict] = {
    # ImageNet-1K hierarchical models: SRF = focal level 2, LRF = focal level 3, windows 3.
    "focalnet_tiny_srf": dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(2,) * 4),
    "focalnet_tiny_lrf": dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3,) * 4),
    "focalnet_small_srf": dict(embed_dim=96, depths=(2, 2, 18, 2), focal_levels=(2,) * 4),
    "focalnet_small_lrf": dict(embed_dim=96, depths=(2, 2, 18, 2), focal_levels=(3,) * 4),
    "focalnet_base_srf": dict(embed_dim=128, depths=(2, 2, 18, 2), focal_levels=(2,) * 4),
    "focalnet_base_lrf": dict(embed_dim=128, depths=(2, 2, 18, 2), focal_levels=(3,) * 4),
    # Isotropic (ViT-like): patch 16, one stage of 12 blocks, no downsample (official yaml: level 3, window 3).
    "focalnet_tiny_iso": dict(embed_dim=192, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,)),
    "focalnet_small_iso": dict(embed_dim=384, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,)),
    "focalnet_base_iso": dict(
        embed_dim=768, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,),
        use_layerscale=True, use_postln=True,
    ),
    # ImageNet-22K models (official yamls): conv-embed, layerscale 1e-4, post-LN.
    "focalnet_large_fl3": dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_large_fl4": dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, normalize_modulator=True,
    ),
    "focalnet_xlarge_fl3": dict(
        embed_dim=256, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_xlarge_fl4": dict(
        embed_dim=256, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_huge_fl3": dict(
        embed_dim=352, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
    ),
    "focalnet_huge_fl4": dict(
        embed_dim=352, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
    ),
    # Tiny demo/test model (not in the paper): ~1.4M params (10 classes), fast on CPU.
    "focalnet_micro": dict(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(2,) * 4, focal_windows=(3,) * 4),
}  # fmt: skip
# The paper's headline models are the LRF ones.
for _size in ("tiny", "small", "base"):
    _CONFIGS[f"focalnet_{_size}"] = _CONFIGS[f"focalnet_{_size}_lrf"]

def _create(name: str, overrides: dict) -> FocalNet:
    """Build a variant; ``overrides`` replace its defaults (weights: ``create_model(name, pretrained=...)``)."""
    kwargs = dict(_CONFIGS[name])
    kwargs.update(overrides)
    # Per-stage lists given as a scalar (e.g. focal_levels=3) apply to every stage.
    n = len(kwargs["depths"])
    for key in ("focal_levels", "focal_windows"):
        if isinstance(kwargs.get(key), int):
            kwargs[key] = (kwargs[key],) * n
    return FocalNet(**kwargs)


def _make_constructor(name: str):
    def constructor(**overrides) -> FocalNet:
        return _create(name, overrides)

    constructor.__name__ = name
    constructor.__qualname__ = name
    cfg = _CONFIGS[name]
    constructor.__doc__ = f"FocalNet variant ``{name}``: {cfg}. Keyword arguments override these defaults."
    return constructor


for _name in _CONFIGS:
    globals()[_name] = register_model(_make_constructor(_name))

del _name, _size

