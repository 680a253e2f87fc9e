"""Model registry: ``create_model(name, **overrides)`` and ``list_models()`` for FocalNet and DAT."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name (``focalnet_tiny_srf``, ``dat_tiny``...)."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword overrides replace the variant's defaults (e.g. num_classes)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**overrides)
