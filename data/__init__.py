"""Data pipelines for FocalNet training: datasets, transforms, samplers and loaders.

The one entry point the engine uses is :func:`build_loaders`; see :mod:`data.loaders` for the contract.
Importing this package also registers the OmegaConf resolver ``folder_num_classes`` that ``data=folder``
uses to infer ``data.num_classes`` from the class folders under ``data.root``, and ``shards_num_classes``
(``data=wds``: from the shards' index), so import ``data`` before Hydra composes the config.
"""

from omegaconf import OmegaConf

from data.loaders import EpochLoader, Loaders, build_loaders, register_builder


def _folder_num_classes(root, split="train"):
    from data.folder import count_classes

    return count_classes(root, split)


def _shards_num_classes(root, split="train"):
    from data.shards import written_num_classes

    return written_num_classes(root, split)


OmegaConf.register_new_resolver("folder_num_classes", _folder_num_classes, replace=True)
OmegaConf.register_new_resolver("shards_num_classes", _shards_num_classes, replace=True)

__all__ = ["EpochLoader", "Loaders", "build_loaders", "register_builder"]
