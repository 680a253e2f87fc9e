"""``focalnet.data``: data pipelines for FocalNet training: datasets, transforms, samplers and loaders.

The one entry point the engine uses is :func:`build_loaders`; see :mod:`focalnet.data.loaders` for the contract.
Importing this package also registers the OmegaConf resolver ``folder_num_classes`` that ``data=folder``
uses to infer ``data.num_classes`` from the class folders under ``data.root``, and ``shards_num_classes``
(``data=wds``: from the shards' index), so import it before Hydra composes the config.

This is the repository's top-level ``data/`` folder; it is always imported as ``focalnet.data`` (installed
there by pip; mapped there in a source checkout by :mod:`focalnet.layout`).
"""

if __name__ != "focalnet.data":  # a second copy under another name would duplicate every registry and class
    raise ImportError(f"the data pipelines are the package focalnet.data; import that, not {__name__!r}")

import importlib  # noqa: E402
from collections.abc import Callable  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from focalnet.data.loaders import EpochLoader, Loaders  # noqa: E402
from focalnet.schema import DATA_SCHEMAS, AugConfig, DataConfig, parse  # noqa: E402

Builder = Callable[..., Loaders]  # (data: DataConfig, aug: AugConfig, *, rank, world_size, seed, pin_memory) -> Loaders

# data.name -> its builder, as "module:function", imported on first use (FFCV and the augmentation kernels
# load only when a run needs them). register_builder adds others.
_BUILDERS: dict[str, str | Builder] = {
    "synthetic": "focalnet.data.synthetic:build",
    "imagenet1k": "focalnet.data.folder:build_image_files",
    "imagenet22k": "focalnet.data.folder:build_image_files",
    "folder": "focalnet.data.folder:build_image_files",
    "digits": "focalnet.data.digits:build_digits",
    "imagenet1k_ffcv": "focalnet.data.ffcv_loader:build_ffcv",
    "imagenet22k_ffcv": "focalnet.data.ffcv_loader:build_ffcv",
    "ffcv": "focalnet.data.ffcv_loader:build_ffcv",
    "digits_ffcv": "focalnet.data.digits:build_digits_ffcv",
    "wds": "focalnet.data.shards:build_shards",
    "imagenet1k_wds": "focalnet.data.shards:build_shards",
    "imagenet22k_wds": "focalnet.data.shards:build_shards",
}


def register_builder(name: str, schema: type[DataConfig] = DataConfig) -> Callable[[Builder], Builder]:
    """Decorator: make ``fn`` the builder of ``data.name=name``, whose keys ``schema`` describes (a dataclass
    extending :class:`focalnet.schema.DataConfig`); a ``conf/data/<name>.yaml`` then selects it."""
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        DATA_SCHEMAS[name] = schema
        return fn

    return deco


def build_loaders(data_cfg, aug_cfg=None, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  pin_memory: bool = False) -> Loaders:
    """The train and val loaders (see :mod:`focalnet.data.loaders` for the contract).

    ``pin_memory=True``: hand batches over in page-locked memory, so that copies to a CUDA device are
    asynchronous (``non_blocking``) DMA transfers.

    ``data_cfg`` and ``aug_cfg`` may be mappings, DictConfigs or :mod:`focalnet.schema` instances; they are
    checked against the schema, and keys they lack take the schema's defaults (``aug_cfg=None``: the recipe's).
    """
    data, aug = parse(DataConfig, data_cfg, "data"), parse(AugConfig, aug_cfg, "aug")
    builder = _BUILDERS[data.name]
    if isinstance(builder, str):
        module, function = builder.split(":")
        builder = getattr(importlib.import_module(module), function)
    return builder(data, aug, rank=rank, world_size=world_size, seed=seed, pin_memory=pin_memory)


def _folder_num_classes(root, split="train"):
    from focalnet.data.folder import count_classes

    return count_classes(root, split)


def _shards_num_classes(root, split="train"):
    from focalnet.data.shards import written_num_classes

    return written_num_classes(root, split)


OmegaConf.register_new_resolver("folder_num_classes", _folder_num_classes, replace=True)
OmegaConf.register_new_resolver("shards_num_classes", _shards_num_classes, replace=True)

__all__ = ["EpochLoader", "Loaders", "build_loaders", "register_builder"]
