"""Model registry: ``create_model(name, pretrained=SOURCE, **overrides)`` and ``list_models()`` for FocalNet and DAT."""

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


def create_model(name: str, pretrained=False, *, checkpoint_path: str | None = None, **overrides) -> nn.Module:
    """Build a registered model; keyword overrides replace the variant's defaults (e.g. num_classes).

    ``pretrained``: a weight SOURCE (``focalnet.models.sources``): a file, a directory (transformers/timm hub
    layout), ``hf-hub:ORG/REPO[@REV]``, a URL, or ``True``/a tag (``"in1k"``, ``"in22k"``) for the variant's
    published weights; those also set ``num_classes`` to the released head's unless you pass it (as timm does).
    The head is loaded, sliced 21842 -> 1000 or re-initialized as ``load_checkpoint(head="auto")`` decides.
    ``checkpoint_path`` (timm's name) is the same as ``pretrained=PATH``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if checkpoint_path is not None and pretrained not in (False, None):
        raise ValueError("pass pretrained=... or checkpoint_path=..., not both")
    source = checkpoint_path if checkpoint_path is not None else pretrained
    if source in (False, None, "", "false", "False"):
        source = None
    if source is not None:
        from focalnet.models.sources import published

        entry = published(name, source)
        if entry is not None:
            overrides.setdefault("num_classes", entry.num_classes)
    model = _MODELS[name](**overrides)
    model.default_cfg = dict(architecture=name)
    if source is not None:
        from focalnet.models.checkpoint import load_checkpoint

        load_checkpoint(model, source, head="auto")
    return model
