"""DAT: Vision Transformer with Deformable Attention (Xia et al., CVPR 2022), the original v1 model.

Pure PyTorch (``grid_sample`` + ``scaled_dot_product_attention``; no custom CUDA, no natten), written
from the paper and the official code at LeapLabTHU/DAT commit 566a593 (``models/dat.py``,
``models/dat_blocks.py``, ``configs/dat_*.yaml``).

Architecture (one module per paper concept):
- ``patch_proj``: 4x4/4 conv + LayerNorm stem; ``down_projs``: 2x2/2 conv (no bias) + LayerNorm between
  stages.
- ``TransformerStage``: pre-norm blocks ``x + DropPath(attn(LN(x)))``, ``x + DropPath(mlp(LN(x)))``; each
  block uses one token mixer picked by the stage spec letter:
  L = ``LocalAttention`` (Swin window attention with a relative position bias table),
  S = ``ShiftWindowAttention`` (shift = ceil(window / 2), masked like Swin),
  D = ``DeformableAttention`` (``DAttentionBaseline`` in the official code): per group of channels, an offset
  network (depthwise kxk conv -> LayerNorm -> GELU -> 1x1 conv to 2 channels) moves a uniform grid of
  reference points; keys/values are bilinearly sampled there (``grid_sample``); every query attends to the
  sampled points; the relative position bias is a (heads, 2H-1, 2W-1) table sampled at the
  query-to-key displacement with ``grid_sample``.
- head: LayerNorm -> global average pool -> Linear.

State-dict names are the official ones (``patch_proj.0``, ``patch_proj.1.norm``,
``stages.i.layer_norms.j.norm``,
``stages.i.attns.j.{proj_qkv,proj_out,relative_position_bias_table,relative_position_index,attn_mask}``,
``stages.i.attns.j.{conv_offset.{0,1.norm,3},proj_q,proj_k,proj_v,proj_out,rpe_table}``,
``stages.i.mlps.j.chunk.{linear1,linear2}``, ``down_projs.i.{0,1.norm}``, ``cls_norm.norm``, ``cls_head``),
including the persistent ``relative_position_index``/``attn_mask`` buffers, so released checkpoints load
with ``strict=True``. Internally tokens stay channels-last (B, H, W, C): LayerNorm, MLP and window
partitioning need no permutes; the official 1x1 convolutions are applied as ``F.linear`` on their weights.

Differences from the official code (none changes the function of a released checkpoint):
- ``forward`` returns logits only; ``forward_with_points`` also returns the sampling positions and
  reference points (what the official forward returns) for visualization.
- Initialization: the official ``reset_parameters`` iterates ``self.parameters()`` and tests them for being
  ``nn.Linear``/``nn.Conv2d``, so it never does anything (had it run, ``zeros_(None)`` on the bias-free convs
  would crash). The released models were therefore trained with PyTorch's default initialization plus
  ``trunc_normal_(std=0.01)`` position tables, which is exactly what we do, deliberately.
- Unused v1 switches (``dwc_pes``, ``fixed_pes``, ``no_offs``, ``use_dwc_mlps``, ``use_conv_patches``,
  ``sr_ratios``, ``ns_per_pts``) are not implemented: every released configuration leaves them off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

from focalnet.models.registry import register_model

__all__ = [
    "DAT",
    "DeformableAttention",
    "LocalAttention",
    "ShiftWindowAttention",
    "resize_position_tables",
    "fvcore_flop_formulas",
    "dat_tiny",
    "dat_small",
    "dat_base",
    "dat_base_384",
    "dat_micro",
]

# Name fragments of the learned position tables (the engine skips weight decay on them, as DAT does).
POSITION_TABLE_KEYWORDS = ("relative_position_bias_table", "rpe_table")


class LayerNormProxy(nn.Module):
    """LayerNorm over channels of a channels-last tensor.

    Exists only so the parameter names carry the official ``.norm.`` level (``LayerNormProxy.norm``).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return self.norm(x)


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 ``nn.Conv2d`` (official parameter layout) to a channels-last tensor (..., C_in)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _reference_points(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uniform (h, w, 2) grid of (y, x) points in [-1, 1], as the official ``_get_ref_points``.

    The points are pixel centres in the align_corners=False convention ((i + 0.5) / n * 2 - 1) although
    ``grid_sample`` is then called with align_corners=True; we keep this so released weights compute the same.
    """
    ys = torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device).div(h).mul(2).sub(1)
    xs = torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device).div(w).mul(2).sub(1)
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((ref_y, ref_x), dim=-1)  # (h, w, 2)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float
):
    """softmax(q k^T / sqrt(hc) + bias) v for (B, heads, Lq, hc) x (B, heads, Lk, hc) -> (B, heads, Lq, hc).

    The official code's math (it scales q first; same result). ``scaled_dot_product_attention`` is used
    where it has a fused kernel for it: on GPU, and on CPU when the bias needs no gradient (inference). When
    the bias is learned (training on CPU) PyTorch falls back to its unfused math path plus a "safe softmax"
    pass, which the explicit form below beats by ~1.2-1.8x (measured at DAT-T shapes).
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    if bias is None or not (q.device.type == "cpu" and bias.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    attn = F.dropout(attn.softmax(dim=-1), p=dropout_p)
    return attn @ v


class LocalAttention(nn.Module):
    """Window multi-head self-attention with a Swin relative position bias (stage letter L)."""

    def __init__(
        self, dim: int, heads: int, window_size: int, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), query - key
        # Persistent like the official buffer: released checkpoints contain it, strict loading expects it.
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])

    def _bias(self) -> torch.Tensor:
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)

    def _window_attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        nh, nw = h // ws, w // ws
        # (B, H, W, C) -> (B, nW, N, C), windows in row-major order like the official rearrange.
        xw = x.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, ws * ws, c)
        n_win, n, hc = nh * nw, ws * ws, c // self.heads
        qkv = self.proj_qkv(xw).view(b, n_win, n, 3, self.heads, hc).permute(3, 0, 1, 4, 2, 5)
        # Windows folded into the head axis, (B, nW*heads, N, hc): the bias then broadcasts over the batch
        # as a 4-D view, which lets CPU SDPA use its fused kernel.
        q, k, v = qkv.reshape(3, b, n_win * self.heads, n, hc).unbind(0)
        bias = self._bias()[None]  # (1, heads, N, N)
        if mask is not None:  # (nW, N, N), -100 across shifted-window seams
            bias = bias + mask[:, None]
        bias = bias.expand(n_win, -1, -1, -1).reshape(n_win * self.heads, n, n)
        out = _attention(q, k, v, bias.expand(b, -1, -1, -1), self.attn_drop if self.training else 0.0)
        out = out.view(b, n_win, self.heads, n, hc).transpose(2, 3).reshape(b, n_win, n, c)
        out = self.proj_drop(self.proj_out(out))
        return out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return self._window_attention(x, None)


class ShiftWindowAttention(LocalAttention):
    """Shifted-window attention (stage letter S): roll by -shift, masked window attention, roll back."""

    def __init__(
        self,
        dim: int,
        heads: int,
        window_size: int,
        fmap_size: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__(dim, heads, window_size, attn_drop, proj_drop)
        self.shift_size = math.ceil(window_size / 2)  # official: ceil (Swin uses floor)
        if not 0 < self.shift_size < window_size:
            raise ValueError(f"shifted windows need window_size >= 2, got {window_size}")
        ws, s = window_size, self.shift_size
        region = torch.zeros(fmap_size, fmap_size)
        slices = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
        for i, hs in enumerate(slices):
            for j, wsl in enumerate(slices):
                region[hs, wsl] = i * 3 + j
        n = fmap_size // ws
        region = region.view(n, ws, n, ws).permute(0, 2, 1, 3).reshape(n * n, ws * ws)  # (nW, N)
        mask = region[:, None, :] - region[:, :, None]
        self.register_buffer("attn_mask", torch.where(mask != 0, -100.0, 0.0))  # (nW, N, N), persistent

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        s = self.shift_size
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self._window_attention(x, self.attn_mask)
        return torch.roll(x, shifts=(s, s), dims=(1, 2))


class DeformableAttention(nn.Module):
    """Deformable multi-head attention (stage letter D; ``DAttentionBaseline`` in the official code).

    Channels are split into ``groups``; each group predicts one offset field shared by its heads. Queries are
    dense (every pixel); keys and values come from ``Hk x Wk`` sampled points (Hk = ceil(H / stride)).
    """

    def __init__(
        self,
        fmap_size: int,
        heads: int,
        head_channels: int,
        groups: int,
        stride: int,
        offset_range_factor: float,
        offset_kernel_size: int,
        use_pe: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if heads % groups:
            raise ValueError(f"heads {heads} must be divisible by groups {groups}")
        self.heads, self.head_channels, self.groups = heads, head_channels, groups
        self.nc = heads * head_channels
        self.group_channels = self.nc // groups
        self.fmap_size = fmap_size
        self.stride = stride
        self.offset_range_factor = offset_range_factor
        self.use_pe = use_pe
        self.attn_drop = attn_drop
        gc, k = self.group_channels, offset_kernel_size

        # Offset network on grouped queries: depthwise kxk conv (stride r) -> LN -> GELU -> 1x1 conv to y, x.
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, k, stride, k // 2, groups=gc),
            LayerNormProxy(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, 1, 0, bias=False),
        )
        self.proj_q = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_k = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_v = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_out = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        if use_pe:
            self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * fmap_size - 1, 2 * fmap_size - 1))
            trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None

    def _offsets(self, q: torch.Tensor) -> torch.Tensor:
        """Grouped queries (B*g, Cg, H, W) -> offsets (B*g, Hk, Wk, 2) as (y, x) in normalized units."""
        dw, norm, act, pw = self.conv_offset
        off = dw(q).permute(0, 2, 3, 1)  # (B*g, Hk, Wk, Cg)
        # Positions stay fp32 even under bf16/fp16 autocast (bf16 cannot resolve a 2/56 grid step).
        off = F.linear(act(norm(off)), pw.weight.flatten(1)).float()  # (B*g, Hk, Wk, 2)
        if self.offset_range_factor > 0:
            hk, wk = off.shape[1], off.shape[2]
            # tanh bounds the offset to +-factor/Hk (y) and +-factor/Wk (x) in the [-1, 1] frame.
            scale = torch.tensor([1.0 / hk, 1.0 / wk], dtype=off.dtype, device=off.device)
            off = off.tanh() * (scale * self.offset_range_factor)
        return off

    def forward(self, x: torch.Tensor, return_points: bool = False):
        """(B, H, W, C) -> (B, H, W, C); ``return_points`` adds positions/references (B, g, Hk, Wk, 2)."""
        b, h, w, c = x.shape
        g, gc, nh, hc = self.groups, self.group_channels, self.heads, self.head_channels

        q = _conv1x1(self.proj_q, x)  # (B, H, W, C)
        q_grouped = q.permute(0, 3, 1, 2).reshape(b * g, gc, h, w)
        offset = self._offsets(q_grouped)  # (B*g, Hk, Wk, 2)
        hk, wk = offset.shape[1], offset.shape[2]
        reference = _reference_points(hk, wk, torch.float32, x.device).expand(b * g, -1, -1, -1)
        pos = offset + reference if self.offset_range_factor >= 0 else (offset + reference).tanh()

        # Bilinear sampling of the (normalized) input at the deformed points; grid_sample wants (x, y).
        x_grouped = x.permute(0, 3, 1, 2).reshape(b * g, gc, h, w)
        grid = pos.flip(-1).to(x_grouped.dtype)  # autocast runs grid_sample in fp32 anyway
        sampled = F.grid_sample(x_grouped, grid, mode="bilinear", align_corners=True)  # (B*g, Cg, Hk, Wk)
        ns = hk * wk
        sampled = sampled.reshape(b, c, ns).transpose(1, 2)  # (B, Ns, C), channel = group * Cg + j
        k = _conv1x1(self.proj_k, sampled).view(b, ns, nh, hc).transpose(1, 2)  # (B, heads, Ns, hc)
        v = _conv1x1(self.proj_v, sampled).view(b, ns, nh, hc).transpose(1, 2)
        q = q.view(b, h * w, nh, hc).transpose(1, 2)  # (B, heads, HW, hc)

        bias = None
        if self.rpe_table is not None:
            if (h, w) != (self.fmap_size, self.fmap_size):
                raise ValueError(
                    f"deformable attention built for a {self.fmap_size}x{self.fmap_size} map got {h}x{w}; "
                    "build the model with the matching img_size"
                )
            # Bias for query i and key j = table sampled at (q_i - p_j) / 2, in the table's [-1, 1] frame.
            q_grid = _reference_points(h, w, torch.float32, x.device).reshape(1, h * w, 1, 2)
            displacement = (q_grid - pos.reshape(b * g, 1, ns, 2)).mul(0.5)  # (B*g, HW, Ns, 2)
            # Heads of a group share the group's positions: (heads, 2H-1, 2W-1) -> (B*g, heads/g, 2H-1, 2W-1).
            table = self.rpe_table.expand(b, -1, -1, -1).reshape(b * g, nh // g, 2 * h - 1, 2 * w - 1)
            grid = displacement.flip(-1).to(table.dtype)
            bias = F.grid_sample(table, grid, mode="bilinear", align_corners=True)
            bias = bias.reshape(b, nh, h * w, ns)  # (B, heads, HW, Ns)

        out = _attention(q, k, v, bias, self.attn_drop if self.training else 0.0)  # (B, heads, HW, hc)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        y = self.proj_drop(_conv1x1(self.proj_out, out))
        if return_points:
            return y, pos.reshape(b, g, hk, wk, 2), reference.reshape(b, g, hk, wk, 2)
        return y


class TransformerMLP(nn.Module):
    """Linear -> GELU -> Linear (expansion x), channels-last; official names ``chunk.linear1/linear2``."""

    def __init__(self, dim: int, expansion: int, drop: float = 0.0):
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module("linear1", nn.Linear(dim, dim * expansion))
        self.chunk.add_module("act", nn.GELU())
        self.chunk.add_module("drop1", nn.Dropout(drop))
        self.chunk.add_module("linear2", nn.Linear(dim * expansion, dim))
        self.chunk.add_module("drop2", nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return self.chunk(x)


class TransformerStage(nn.Module):
    """One resolution of DAT: ``depth`` pre-norm blocks whose mixers follow ``stage_spec`` (L/S/D letters).

    The official code keeps the blocks' pieces in parallel lists (``layer_norms`` holds two per block,
    ``attns``, ``mlps``, ``drop_path``); we keep that layout for the state-dict names.
    """

    def __init__(
        self,
        fmap_size: int,
        window_size: int,
        dim_in: int,
        dim: int,
        depth: int,
        stage_spec: Sequence[str],
        groups: int,
        use_pe: bool,
        heads: int,
        stride: int,
        offset_range_factor: float,
        offset_kernel_size: int,
        attn_drop: float,
        proj_drop: float,
        expansion: int,
        drop: float,
        drop_path: Sequence[float],
    ):
        super().__init__()
        if len(stage_spec) != depth:
            raise ValueError(f"stage_spec {list(stage_spec)} has {len(stage_spec)} letters for depth {depth}")
        self.depth = depth
        self.grad_checkpointing = False
        # Channel change at stage entry (1x1 conv); identity in every released configuration.
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else None
        self.layer_norms = nn.ModuleList([LayerNormProxy(dim) for _ in range(2 * depth)])
        self.mlps = nn.ModuleList([TransformerMLP(dim, expansion, drop) for _ in range(depth)])
        self.attns = nn.ModuleList()
        for letter in stage_spec:
            if letter == "L":
                self.attns.append(LocalAttention(dim, heads, window_size, attn_drop, proj_drop))
            elif letter == "S":
                self.attns.append(
                    ShiftWindowAttention(dim, heads, window_size, fmap_size, attn_drop, proj_drop)
                )
            elif letter == "D":
                self.attns.append(
                    DeformableAttention(
                        fmap_size,
                        heads,
                        dim // heads,
                        groups,
                        stride,
                        offset_range_factor,
                        offset_kernel_size,
                        use_pe,
                        attn_drop,
                        proj_drop,
                    )
                )
            else:
                raise ValueError(
                    f"stage spec letter {letter!r} is not one of L (window), S (shifted), D (deformable)"
                )
        self.drop_path = nn.ModuleList([DropPath(p) if p > 0 else nn.Identity() for p in drop_path])

    def _block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path[d](self.attns[d](self.layer_norms[2 * d](x)))
        return x + self.drop_path[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C_in) -> (B, H, W, C)
        if self.proj is not None:
            x = _conv1x1(self.proj, x)
        for d in range(self.depth):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, d, x, use_reentrant=False)
            else:
                x = self._block(d, x)
        return x

    def forward_with_points(self, x: torch.Tensor):
        """Like ``forward`` but also returns each block's sampling positions and references (None for L/S)."""
        if self.proj is not None:
            x = _conv1x1(self.proj, x)
        positions, references = [], []
        for d in range(self.depth):
            y = self.layer_norms[2 * d](x)
            pos = ref = None
            if isinstance(self.attns[d], DeformableAttention):
                y, pos, ref = self.attns[d](y, return_points=True)
            else:
                y = self.attns[d](y)
            x = x + self.drop_path[d](y)
            x = x + self.drop_path[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))
            positions.append(pos)
            references.append(ref)
        return x, positions, references


class DAT(nn.Module):
    """Vision Transformer with Deformable Attention (v1). Arguments follow the official yaml keys.

    The model is built for one ``img_size`` (the shifted-window masks and the deformable position tables are
    sized by the feature maps); see ``resize_position_tables`` to load weights trained at another size.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        num_classes: int = 1000,
        expansion: int = 4,
        dim_stem: int = 96,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes: Sequence[int] = (7, 7, 7, 7),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        strides: Sequence[int] = (-1, -1, 1, 1),
        offset_range_factor: Sequence[float] = (-1, -1, 2, 2),
        stage_spec: Sequence[Sequence[str]] = (("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D")),
        groups: Sequence[int] = (-1, -1, 3, 6),
        use_pes: Sequence[bool] = (False, False, True, True),
        offset_kernel_sizes: Sequence[int] = (9, 7, 5, 3),  # official: fixed per stage index
        in_chans: int = 3,
    ):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self._check_sizes(img_size, patch_size, window_sizes, stage_spec)

        self.patch_proj = nn.Sequential(
            nn.Conv2d(in_chans, dim_stem, patch_size, patch_size), LayerNormProxy(dim_stem)
        )
        # Stochastic depth rises linearly over all blocks (explicit CPU: works under torch.device("meta")).
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        fmap = img_size // patch_size
        self.stages = nn.ModuleList()
        for i in range(4):
            self.stages.append(
                TransformerStage(
                    fmap,
                    window_sizes[i],
                    dim_stem if i == 0 else dims[i - 1] * 2,
                    dims[i],
                    depths[i],
                    stage_spec[i],
                    groups[i],
                    use_pes[i],
                    heads[i],
                    strides[i],
                    offset_range_factor[i],
                    offset_kernel_sizes[i],
                    attn_drop_rate,
                    drop_rate,
                    expansion,
                    drop_rate,
                    dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                )
            )
            fmap //= 2
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 2, 2, bias=False), LayerNormProxy(dims[i + 1]))
            for i in range(3)
        )
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_sizes(img_size, patch_size, window_sizes, stage_spec) -> None:
        """Fail at construction, naming the fix, when windows do not tile the feature maps."""
        fmap = img_size // patch_size
        for i in range(4):
            if "L" in stage_spec[i] or "S" in stage_spec[i]:
                if fmap % window_sizes[i]:
                    raise ValueError(
                        f"DAT window_sizes[{i}]={window_sizes[i]} does not tile the {fmap}x{fmap} "
                        f"stage-{i + 1} map of a {img_size}px input; pick img_size with "
                        f"(img_size/{patch_size}/8) divisible by "
                        f"the window (the official 384px model uses window_sizes=[12, 12, 12, 12])"
                    )
            fmap //= 2

    # --- engine hooks ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments of parameters DAT trains without weight decay (the position tables)."""
        return set(POSITION_TABLE_KEYWORDS)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the position tables (timm's ``create_optimizer_v2`` convention)."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in POSITION_TABLE_KEYWORDS)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit a state dict trained at another resolution/window to this model (resize_position_tables)."""
        return resize_position_tables(state_dict, self)

    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.cls_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------------------------
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"DAT built for {self.img_size}px input got {tuple(x.shape[-2:])}")
        x = self.patch_proj[0](x).permute(0, 2, 3, 1)  # (B, H/4, W/4, C) channels-last from here on
        return self.patch_proj[1](x)

    def _down(self, i: int, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.down_projs[i]
        return norm(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, H/2, W/2, C')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalized final feature map (B, H/32, W/32, C), channels-last."""
        x = self._stem(x)
        for i in range(4):
            x = self.stages[i](x)
            if i < 3:
                x = self._down(i, x)
        return self.cls_norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(x.mean(dim=(1, 2)))  # global average pool -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))

    def forward_with_points(self, x: torch.Tensor):
        """The official forward: logits, plus per stage per block the deformable sampling positions and
        reference points ((B, groups, Hk, Wk, 2) as (y, x) in [-1, 1]; None for window blocks)."""
        x = self._stem(x)
        positions, references = [], []
        for i in range(4):
            x, pos, ref = self.stages[i].forward_with_points(x)
            positions.append(pos)
            references.append(ref)
            if i < 3:
                x = self._down(i, x)
        return self.forward_head(self.cls_norm(x)), positions, references


@torch.no_grad()
def resize_position_tables(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` whose position-dependent entries fit ``model`` (e.g. 224 -> 384).

    - ``relative_position_bias_table`` ((2w-1)^2, heads) and ``rpe_table`` (heads, 2h-1, 2w-1): bicubic
      interpolation to the model's size, as the official ``load_pretrained`` does.
    - ``relative_position_index`` and ``attn_mask``: deterministic buffers, taken from the model.
    Entries whose shapes already match, and keys the model lacks, are left alone (strict loading then reports
    the latter). Other shape mismatches are left for the loader to report.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key]
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "relative_position_bias_table":
            n_old, heads = value.shape
            n_new = want.shape[0]
            l_old, l_new = math.isqrt(n_old), math.isqrt(n_new)
            grid = value.float().T.reshape(1, heads, l_old, l_old)
            grid = F.interpolate(grid, size=(l_new, l_new), mode="bicubic", align_corners=False)
            out[key] = grid.reshape(heads, n_new).T.contiguous().to(value.dtype)
        elif leaf == "rpe_table":
            grid = F.interpolate(
                value.float()[None], size=tuple(want.shape[1:]), mode="bicubic", align_corners=False
            )
            out[key] = grid[0].to(value.dtype)
        elif leaf in ("relative_position_index", "attn_mask"):
            out[key] = want.clone()
    return out


def fvcore_flop_formulas(elementwise: bool = True) -> dict:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode`` that counts DAT like the paper.

    The paper's numbers (DAT-T 4.59 / S 9.01 / B 15.79 G) are fvcore counts: matmuls and convolutions (one
    multiply-accumulate = 1), plus 5 per LayerNorm element and 4 per ``grid_sample`` output element; softmax,
    additions and the bias gathers count 0. FlopCounterMode counts 2 per multiply-accumulate and, on CPU,
    misses the fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) and LayerNorm/grid_sample.
    With this
    mapping, ``FlopCounterMode(custom_mapping=fvcore_flop_formulas()).get_total_flops() / 2`` reproduces the
    paper's GMACs within 0.05%; with ``elementwise=False`` (attention added, no LayerNorm/grid_sample terms)
    it counts matmuls and convolutions only, about 0.5% lower.
    """
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    def layer_norm(x, *args, out_shape=None, **kwargs) -> int:
        return 2 * 5 * math.prod(x)  # FlopCounterMode's unit is flops = 2 x MACs

    def grid_sampler(x, grid, *args, out_shape=None, **kwargs) -> int:
        return 2 * 4 * math.prod(out_shape)

    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward,
    }
    if elementwise:
        formulas.update({aten.native_layer_norm: layer_norm, aten.grid_sampler_2d: grid_sampler})
    return formulas


# --- registered variants (official configs/dat_*.yaml at LeapLabTHU/DAT 566a593) ----------------------------
# Architecture only: drop path is a training setting, in conf/model/dat_*.yaml (the DAT class default is 0).


def _build(defaults: dict, overrides: dict) -> DAT:
    return DAT(**{**defaults, **overrides})


_DAT_T = dict(
    dim_stem=96,
    dims=(96, 192, 384, 768),
    depths=(2, 2, 6, 2),
    heads=(3, 6, 12, 24),
    groups=(-1, -1, 3, 6),
    stage_spec=(("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D")),
)
_DAT_S = dict(
    _DAT_T,
    depths=(2, 2, 18, 2),
    stage_spec=(("L", "S"), ("L", "S"), ("L", "D") * 9, ("L", "D")),
)
_DAT_B = dict(
    _DAT_S,
    dim_stem=128,
    dims=(128, 256, 512, 1024),
    heads=(4, 8, 16, 32),
    groups=(-1, -1, 4, 8),
)


@register_model
def dat_tiny(**overrides) -> DAT:
    """DAT-T: 28.3M params, 4.59 GMACs, 82.0% top-1 (ImageNet-1K, 224)."""
    return _build(_DAT_T, overrides)


@register_model
def dat_small(**overrides) -> DAT:
    """DAT-S: 49.7M params, 9.01 GMACs, 83.7% top-1."""
    return _build(_DAT_S, overrides)


@register_model
def dat_base(**overrides) -> DAT:
    """DAT-B: 87.9M params, 15.79 GMACs, 84.0% top-1."""
    return _build(_DAT_B, overrides)


@register_model
def dat_base_384(**overrides) -> DAT:
    """DAT-B fine-tuned at 384 (official configs/dat_base_384.yaml: window 12): 84.8% top-1."""
    return _build(dict(_DAT_B, img_size=384, window_sizes=(12, 12, 12, 12)), overrides)


@register_model
def dat_micro(**overrides) -> DAT:
    """A tiny DAT for demos and tests (64px: maps 16/8/4/2), with all three block kinds."""
    return _build(
        dict(
            img_size=64,
            dim_stem=32,
            dims=(32, 64, 128, 256),
            depths=(1, 1, 2, 2),
            heads=(1, 2, 4, 8),
            groups=(-1, -1, 2, 4),
            window_sizes=(4, 4, 4, 2),
            stage_spec=(("S",), ("S",), ("L", "D"), ("L", "D")),
        ),
        overrides,
    )
