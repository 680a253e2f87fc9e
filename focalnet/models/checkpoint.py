"""Checkpoint loading for FocalNet (first version: official/our formats, strict)."""

from __future__ import annotations

import torch
import torch.nn as nn


def load_checkpoint(model: nn.Module, path_or_state_dict, *, key: str = "model", strict: bool = True):
    """Load a dict with a ``key`` entry or a bare state dict (``weights_only=True``) into ``model``."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    if key in sd and isinstance(sd[key], dict):
        sd = sd[key]
    return model.load_state_dict(sd, strict=strict)
