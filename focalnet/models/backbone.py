"""FocalNet as a dense-prediction backbone: multi-scale feature maps (strides 4/8/16/32) for FPN-style heads.

Like the official detection/segmentation backbones, the classification head is dropped and a LayerNorm
``norm{i}`` is added for each returned stage. The trunk (``body``) is a plain FocalNet with the official names,
so an ImageNet checkpoint loads into it: ``load_checkpoint(backbone.body, path, head="reinit")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from focalnet.models.focalnet import FocalNet
from focalnet.models.registry import create_model


class FocalNetBackbone(nn.Module):
    """``forward(x: (B, 3, H, W)) -> [(B, C_i, H/s_i, W/s_i) for i in out_indices]``.

    Args:
        model: a FocalNet or a registered variant name (built with ``num_classes=0``; ``**overrides`` apply).
        out_indices: stages to return (0..3 for hierarchical models, strides 4/8/16/32).
        norm: add a LayerNorm per returned stage (``norm{i}``), as the official detection backbones do.
    """

    def __init__(
        self, model: FocalNet | str, out_indices: Sequence[int] = (0, 1, 2, 3), norm: bool = True, **overrides
    ):
        super().__init__()
        if isinstance(model, str):
            model = create_model(model, num_classes=0, **overrides)
        n = len(model.layers)
        if not all(0 <= i < n for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} out of range for a {n}-stage FocalNet")
        self.body = model
        self.out_indices = tuple(sorted(out_indices))
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        self.norm = norm
        for i in self.out_indices if norm else ():
            self.add_module(f"norm{i}", nn.LayerNorm(model.embed_dim[i]))

    @property
    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        norms = {str(i): getattr(self, f"norm{i}") for i in self.out_indices} if self.norm else None
        return self.body.forward_features_multiscale(x, self.out_indices, norms=norms)
