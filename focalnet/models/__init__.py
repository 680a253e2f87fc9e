"""FocalNet and DAT models, the registry, and checkpoint loading/conversion."""

from focalnet.models import dat, zoo  # noqa: F401  (register the dat_* and focalnet_* models)
from focalnet.models.checkpoint import load_checkpoint
from focalnet.models.focalnet import FocalModulation, FocalNet
from focalnet.models.registry import create_model, list_models, register_model

__all__ = ["FocalModulation", "FocalNet", "create_model", "list_models", "load_checkpoint", "register_model"]
