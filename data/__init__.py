"""Data pipelines for FocalNet training: datasets, transforms, samplers and loaders.

The one entry point the engine uses is :func:`build_loaders`; see :mod:`data.loaders` for the contract.
"""

from data.loaders import EpochLoader, Loaders, build_loaders, register_builder

__all__ = ["EpochLoader", "Loaders", "build_loaders", "register_builder"]
