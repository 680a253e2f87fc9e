"""FocalNet (Focal Modulation Networks, Yang et al. 2022) with the official state-dict names.

The module tree and parameter names/shapes follow microsoft/FocalNet ``classification/focalnet.py``
(``patch_embed``, ``layers.i.blocks.j.modulation.{f,h,proj,focal_layers.k.0,ln}``, ``gamma_1/2``,
``layers.i.downsample`` at the END of stage i, ``norm``, ``head``), so released checkpoints load with
``strict=True`` and our checkpoints load into the official code. The official variants are registered in
:mod:`focalnet.models.zoo`.

Layout: activations live as (B, H, W, C) contiguous tensors for the whole network, as in the official code
around its linear layers. Linear layers and LayerNorm work on the last dim directly, and the depthwise focal
convolutions read the same memory as an NCHW tensor in ``channels_last`` format (``x.permute(0, 3, 1, 2)`` is a
free view), which oneDNN convolves ~2.5x faster than NCHW and without the permute+contiguous copies the
official code makes around every modulation (and timm's NCHW LayerNorm2d makes around every norm).
CPU-specific kernels live in :mod:`focalnet.ops.cpu`, swapped in by ``create_model``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

__all__ = ["FocalModulation", "FocalNetBlock", "BasicLayer", "PatchEmbed", "FocalNet", "Mlp"]


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout on (..., C) tokens (official names ``fc1``/``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


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

        x = self.f(x)  # (B, H, W, 2C + L + 1)
        q, ctx, gates = torch.split(x, (C, C, L + 1), dim=-1)  # (B, H, W, C), (B, H, W, C), (B, H, W, L + 1)

        # Hierarchical context: each level convolves the previous level's output (depthwise conv + GELU, on the
        # channels_last NCHW view of the (B, H, W, C) memory), and the levels are summed under their gates.
        ctx_all = 0
        for level, focal_layer in enumerate(self.focal_layers):
            ctx = focal_layer(ctx.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
            ctx_all = ctx_all + ctx * gates[..., level : level + 1]
        ctx_global = self.act(ctx.mean((1, 2), keepdim=True))  # (B, 1, 1, C): the last level, pooled
        ctx_all = ctx_all + ctx_global * gates[..., L:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (L + 1)

        modulator = self.h(ctx_all.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # 1x1 conv: (B, H, W, C)
        out = q * modulator
        if self.use_postln_in_modulation:
            out = self.ln(out)
        out = self.proj_drop(self.proj(out))

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


def _layerscale(gamma: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``gamma * y``; without layerscale (``gamma`` None) ``y`` itself (the official code multiplies by 1.0)."""
    return y if gamma is None else gamma * y


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
        if self.use_postln:  # x + drop_path(gamma * norm(f(x)))
            x = x + self.drop_path(_layerscale(self.gamma_1, self.norm1(self.modulation(x))))
            x = x + self.drop_path(_layerscale(self.gamma_2, self.norm2(self.mlp(x))))
        else:  # x + drop_path(gamma * f(norm(x)))
            x = x + self.drop_path(_layerscale(self.gamma_1, self.modulation(self.norm1(x))))
            x = x + self.drop_path(_layerscale(self.gamma_2, self.mlp(self.norm2(x))))
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
        return self.head(x)

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
