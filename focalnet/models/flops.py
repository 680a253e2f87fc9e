"""Multiply-accumulates of one image, counted the way each model's paper counts them (its "GFLOPs")."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, img_size: int, device: torch.device | str = "cpu") -> float:
    """MACs of one ``img_size`` image: FlopCounterMode flops / 2, plus DAT's fvcore rules for DAT models
    (plain FlopCounterMode misses the fused CPU attention kernel, LayerNorm and grid_sample there)."""
    from focalnet.models.dat import DAT, fvcore_flop_formulas

    mapping = fvcore_flop_formulas() if isinstance(model, DAT) else {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(torch.randn(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2
