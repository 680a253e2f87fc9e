"""``focalnet.data``: data pipelines for FocalNet training: datasets, transforms, samplers and loaders.

The one entry point the engine uses is :func:`build_loaders`; see :mod:`focalnet.data.loaders` for the contract.
Importing this package also registers the OmegaConf resolver ``folder_num_classes`` that ``data=folder``
uses to infer ``data.num_classes`` from the class folders under ``data.root`` (so import it before Hydra
composes the config).

This is the repository's top-level ``data/`` folder; it is always imported as ``focalnet.data`` (installed
there by pip; mapped there in a source checkout by :mod:`focalnet.layout`).
"""

if __name__ != "focalnet.data":  # a second copy under another name would duplicate every registry and class
    raise ImportError(f"the data pipelines are the package focalnet.data; import that, not {__name__!r}")

from omegaconf import OmegaConf  # noqa: E402

from focalnet.data.loaders import EpochLoader, Loaders, build_loaders, register_builder  # noqa: E402


def _folder_num_classes(root, split="train"):
    from focalnet.data.folder import count_classes

    return count_classes(root, split)


OmegaConf.register_new_resolver("folder_num_classes", _folder_num_classes, replace=True)

__all__ = ["EpochLoader", "Loaders", "build_loaders", "register_builder"]
