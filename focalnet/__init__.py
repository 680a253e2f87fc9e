"""FocalNet: Focal Modulation Networks, with a training framework around them.

Public API: ``create_model``, ``list_models``, ``load_checkpoint``, ``FocalNet``, ``FocalModulation``.
"""

from focalnet.models import FocalModulation, FocalNet, create_model, list_models, load_checkpoint

__all__ = ["FocalModulation", "FocalNet", "create_model", "list_models", "load_checkpoint"]
