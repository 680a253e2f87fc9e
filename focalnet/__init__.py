"""FocalNet: Focal Modulation Networks, with a training framework around them.

Public API: ``create_model``, ``list_models``, ``load_checkpoint``, ``FocalNet``, ``FocalModulation``.
Subpackages: ``focalnet.models``, ``focalnet.engine``, ``focalnet.data`` (the repository's ``data/`` folder,
see :mod:`focalnet.layout`).
"""

from focalnet import layout

layout.use_checkout_data()  # before anything imports focalnet.data

from focalnet import schema  # noqa: E402,F401  (registers the config schemas /schema/* in Hydra's ConfigStore)
from focalnet.models import FocalModulation, FocalNet, create_model, list_models, load_checkpoint  # noqa: E402

__all__ = ["FocalModulation", "FocalNet", "create_model", "list_models", "load_checkpoint"]
