"""The typed description of every config group: types, defaults and allowed values, in one place.

Every option of a group in ``conf/`` starts from one of the dataclasses below and sets only what differs, e.g.
``conf/optimizer/sgd.yaml``::

    defaults:
      - /schema/optimizer_sgd@_here_
    name: sgd
    lr: 0.1

The dataclasses are registered in Hydra's ConfigStore (``/schema/<name>``, :data:`STORED`) as their default
values, so ``--cfg job`` shows every key. Types and allowed values are checked by :func:`check` once the config is
composed and resolved (``focalnet.engine.config.validate_config``), and by the data pipelines on what they are
given (:func:`parse`): each problem is one line naming the key and what is allowed, and the command exits with
code 2 before any work. (Registered as typed nodes, Hydra would check types itself while composing, with a
multi-line message and exit code 1; it still rejects keys that do not exist.) NaN and inf are never allowed.

A field's type annotation is its type; ``metadata`` bounds numbers (``ge``, ``gt``, ``le``, ``lt``), fixes a
list's ``length`` and allows an ``empty`` string (strings are non-empty otherwise). Defaults that are interpolations (``${data.num_classes}``) are resolved before checking.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ConfigError", "check", "parse", "schema_defaults", "DATA_SCHEMAS", "OPTIMIZER_SCHEMAS",
           "TrainConfig", "EvalConfig", "AugConfig", "DataConfig"]


class ConfigError(ValueError):
    """A configuration problem, detected before any work starts (exit code 2)."""


def value(default: Any, **limits) -> Any:
    """A dataclass field with ``default`` (copied per instance when mutable) and bounds for :func:`check`."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=limits)
    return field(default=default, metadata=limits)


def required(**limits) -> Any:
    """A field without default: every group option sets it (``???``, Hydra's MISSING, until then)."""
    return field(metadata=limits)


REQUIRED = "???"


# ---- model ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """``model``: which network ``focalnet.engine.build.build_model`` creates."""

    name: str = required()                            # a registered model (focalnet.list_models()) or a timm name
    library: Literal["focalnet", "timm"] = "focalnet"
    num_classes: int = value("${data.num_classes}", ge=1)
    drop_path_rate: float = value(0.1, ge=0, le=1)    # each model's paper value is in conf/model/<name>.yaml
    # weights to start from: true / a tag, a file or directory, hf-hub:ORG/REPO[@REV], a URL (focalnet.models.sources)
    pretrained: str | bool | None = None
    grad_checkpointing: bool = "${trainer.grad_checkpointing}"
    kwargs: dict[str, Any] = value({})               # extra create_model overrides, e.g. {use_layerscale: true}


# ---- data -----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """``data``: keys every pipeline has. ``data.name`` selects the pipeline and its keys (:data:`DATA_SCHEMAS`)."""

    name: str = required()
    root: str | None = None
    num_classes: int = required(ge=1)                 # model.num_classes defaults to it
    img_size: int = value(224, ge=1)                  # training/eval resolution
    batch_size: int = value(128, ge=1)                # per process
    num_workers: int = value(8, ge=0)


@dataclass(kw_only=True, frozen=True)
class _Splits:
    train_split: str = "train"                        # sub-folders of root
    val_split: str = "val"
    val_count: int = value(0, ge=0)                   # > 0: hold out this many training images as val (fixed)


@dataclass(kw_only=True, frozen=True)
class _ImageFiles:
    """Keys of the pipelines that decode image files (folders, shards)."""

    persistent_workers: bool = True
    max_file_mb: int = value(256, ge=1)               # larger files are skipped and counted without being read
    # larger images are skipped and counted before decoding (Pillow's decompression-bomb threshold)
    max_image_pixels: int = value(89478485, ge=1)


@dataclass(kw_only=True, frozen=True)
class ImageFolderData(_ImageFiles, _Splits, DataConfig):
    """An ImageFolder: ``${data.root}/${data.train_split}/<class>/<image>`` (and the val split)."""


@dataclass(kw_only=True, frozen=True)
class PhotoFolderData(ImageFolderData):
    """``data=imagenet1k|folder``: an ImageFolder of photos, typically large JPEGs (not ``data=digits``)."""

    # true: decode large JPEGs at 1/2..1/8 scale for training crops (libjpeg's DCT-domain downscaling, PIL draft:
    # faster, but other pixels than a full decode; see the README)
    jpeg_draft: bool = False


@dataclass(kw_only=True, frozen=True)
class FolderData(PhotoFolderData):
    """``data=folder``: any ImageFolder; ``num_classes`` is the number of class folders (conf/data/folder.yaml
    infers it; null, e.g. from Python, takes it from the folders)."""

    num_classes: int | None = value(None, ge=1)


@dataclass(kw_only=True, frozen=True)
class ImageNet22kData(PhotoFolderData):
    """``data=imagenet22k``: synset folders or Swin/FocalNet map files, FocalNet's 21842-way label layout."""

    label_layout: Literal["imagenet22k_ms", "imagenet22k", "sorted"] = "imagenet22k_ms"
    train_map: str | None = None                      # `relative/path<TAB>label` lines, e.g. ..._map_train.txt
    val_map: str | None = None
    image_dir: str = value("", empty=True)            # map-file paths are relative to ${data.root}/${data.image_dir}
    # wnid: each label is the synset in the path, placed by label_layout | file: the file's labels as written
    map_labels: Literal["wnid", "file"] = "wnid"


@dataclass(kw_only=True, frozen=True)
class FFCVData(DataConfig):
    """``data=imagenet1k_ffcv|imagenet22k_ffcv``: .beton files written by scripts/write_ffcv.py."""

    train_path: str = "train.beton"                   # relative to root (or absolute)
    val_path: str = "val.beton"
    os_cache: bool = True                             # false: FFCV's process cache (datasets larger than RAM)
    batches_ahead: int = value(3, ge=1)
    decode_threads: int | None = value(None, ge=1)    # FFCV decode threads (null: num_workers / 4, at least 1)


@dataclass(kw_only=True, frozen=True)
class _DigitsFiles:
    num_classes: int = value(10, ge=1)                # the ten digits
    store_size: int = value(64, ge=8)                 # px of the written JPEGs (8x8 scans upscaled bicubic)
    val_fraction: float = value(0.2, gt=0, lt=1)      # of every class, held out for val/ (fixed generator)
    jpeg_quality: int = value(95, ge=1, le=100)


@dataclass(kw_only=True, frozen=True)
class DigitsData(_DigitsFiles, ImageFolderData):
    """``data=digits``: scikit-learn's handwritten digits written once as a JPEG ImageFolder under ``root``."""


@dataclass(kw_only=True, frozen=True)
class DigitsFFCVData(_DigitsFiles, _Splits, FFCVData):
    """``data=digits_ffcv``: the digits folder (``root``) converted once to FFCV files in ``beton_dir``."""

    beton_dir: str = "${data.root}_ffcv"


@dataclass(kw_only=True, frozen=True)
class SyntheticData(DataConfig):
    """``data=synthetic``: deterministic generated tensors with a learnable class signal (tests, benchmarks)."""

    train_size: int = value(1024, ge=1)
    val_size: int = value(256, ge=1)
    signal: float = value(1.0, ge=0)                  # class pattern strength against unit noise


@dataclass(kw_only=True, frozen=True)
class ShardData(_ImageFiles, DataConfig):
    """``data=wds|imagenet1k_wds|imagenet22k_wds``: webdataset tar shards written by scripts/write_shards.py, in
    a directory or behind a URL (``focalnet.data.shards``)."""

    jpeg_draft: bool = False                          # as for folders (PhotoFolderData): JPEG training crops
    #                                                   decoded at 1/2..1/8 scale when that much larger
    train_split: str = "train"                        # reads <root>/<split>.json + <split>.idx.npy
    #                                                   (streaming: also a brace pattern of shards)
    val_split: str = "val"
    # indexed: exact epochs and resume (random access by the index) | streaming: front to back, shuffle buffer
    mode: Literal["indexed", "streaming"] = "indexed"
    # indexed: global (a permutation of the split) | shards (a few shards at a time) | auto (global for local roots)
    shuffle: Literal["auto", "global", "shards"] = "auto"
    shuffle_window: int = value(4, ge=1)              # shuffle=shards: shards whose samples are shuffled together
    cache_dir: str | None = None                      # URL roots: where shards are fetched
    #                                                   (null: ${FOCALNET_CACHE:-~/.cache/focalnet}/shards/<hash>)
    cache_limit_gb: float | None = value(None, gt=0)  # URL roots: keep at most this much in cache_dir
    shuffle_buffer: int = value(10000, ge=1)          # streaming: samples in webdataset's shuffle buffer
    train_size: int | None = value(None, ge=1)        # streaming from a brace pattern without an index:
    val_size: int | None = value(None, ge=1)          # samples per epoch of each split


# data.name -> its keys (conf/data/<option>.yaml sets data.name; focalnet.data.build_loaders has the builders)
DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "imagenet1k": PhotoFolderData, "folder": FolderData, "imagenet22k": ImageNet22kData,
    "imagenet1k_ffcv": FFCVData, "imagenet22k_ffcv": FFCVData, "ffcv": FFCVData,
    "digits": DigitsData, "digits_ffcv": DigitsFFCVData, "synthetic": SyntheticData,
    "wds": ShardData, "imagenet1k_wds": ShardData, "imagenet22k_wds": ShardData,
}


# ---- optimizer, schedule ----------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """``optimizer=adamw`` (the paper's). ``lr`` and the schedule's LRs are per 512 images: the run uses
    ``lr * data.batch_size * world_size * trainer.accum_steps / 512`` (the official linear scaling rule)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = value(5.0e-4, gt=0)
    weight_decay: float = value(0.05, ge=0)
    betas: list[float] = value([0.9, 0.999], ge=0, le=1, length=2)  # AdamW only
    eps: float = value(1.0e-8, gt=0)                  # AdamW only
    momentum: float = value(0.9, ge=0, le=1)          # SGD only
    # true reproduces the official code, which (by a bug) applies weight decay to no parameter at all.
    official_no_weight_decay: bool = False


@dataclass(kw_only=True, frozen=True)
class SGDConfig(OptimizerConfig):
    """``optimizer=sgd``."""

    name: Literal["adamw", "sgd"] = "sgd"
    lr: float = value(0.1, gt=0)
    weight_decay: float = value(1.0e-4, ge=0)
    nesterov: bool = False


OPTIMIZER_SCHEMAS: dict[str, type[OptimizerConfig]] = {"adamw": OptimizerConfig, "sgd": SGDConfig}


@dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """``schedule``: per-step LR after a linear warmup; ``warmup_lr``/``min_lr`` are per 512 images like the LR.
    ``cosine`` decays to ``min_lr``; ``step`` multiplies by ``decay_rate`` every ``decay_epochs``; ``constant``."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = value(20, ge=0)
    warmup_lr: float = value(5.0e-7, ge=0)
    min_lr: float = value(5.0e-6, ge=0)
    decay_epochs: float = value(30, gt=0)             # step only
    decay_rate: float = value(0.1, gt=0)              # step only
    # true: warmup is a prefix (the cosine spans only the steps after it; step decays count from its end), as
    # Swin's later WARMUP_PREFIX; false: the official FocalNet curve (microsoft/FocalNet @9253a7f lr_scheduler.py)
    warmup_prefix: bool = False


# ---- augmentation -------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class AugConfig:
    """``aug``: the training augmentation and the eval transform. The defaults are the FocalNet recipe
    (``aug=deit``): microsoft/FocalNet ``config.py`` ``_C.AUG`` (DeiT/Swin's), applied with timm."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null: none
    color_jitter: float | None = value(0.4, ge=0)     # ignored while RandAugment is on (as in timm)
    reprob: float = value(0.25, ge=0, le=1)           # random erasing probability
    remode: Literal["pixel", "const", "rand"] = "pixel"
    recount: int = value(1, ge=1)
    interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = "bicubic"
    hflip: float = value(0.5, ge=0, le=1)             # RandomHorizontalFlip probability
    scale: list[float] | None = value([0.08, 1.0], gt=0, le=1, length=2)  # RandomResizedCrop area range
    #                                                   (null: resize + center crop, as for eval)
    ratio: list[float] = value([0.75, 1.3333333333333333], gt=0, length=2)  # RandomResizedCrop aspect range
    mixup: float = value(0.8, ge=0)                   # mixup alpha
    cutmix: float = value(1.0, ge=0)                  # cutmix alpha
    cutmix_minmax: list[float] | None = value(None, ge=0, le=1, length=2)
    mixup_prob: float = value(1.0, ge=0, le=1)
    mixup_switch_prob: float = value(0.5, ge=0, le=1)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = value(0.1, ge=0, le=1)   # applied inside timm Mixup when mixup/cutmix is on
    test_crop: bool = True                            # eval: resize 256/224*size, center crop (false: squash)


# ---- trainer, logger, paths -----------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class TrainerConfig:
    """``trainer``: the training loop."""

    epochs: int = value(300, ge=0)
    max_steps: int | None = value(None, ge=1)         # stop after this many optimizer steps (overrides epochs)
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    accum_steps: int = value(1, ge=1)
    clip_grad: float | None = value(5.0, gt=0)        # max total grad norm; null disables
    ema_decay: float | None = value(None, gt=0, le=1)  # e.g. 0.9998; null = no EMA
    compile: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False
    resume: str | None = "auto"                       # auto (newest intact checkpoint of this run dir) | PATH | null
    resume_allow_changes: list[str] = value([])       # keys a resume may change although they change the saved state
    max_nonfinite_updates: int = value(20, ge=1)      # fp16: stop after this many consecutive NaN/inf-skipped updates
    init_from: str | bool | None = None               # pretrained weights only (fine-tuning): a weight SOURCE
    init_head: Literal["auto", "keep", "reinit", "slice_22k_to_1k"] = "auto"  # head handling for init_from
    ckpt_every_steps: int | None = value(1000, ge=1)  # also write checkpoints/last.pt every N updates
    save_epoch_ckpts: bool = False                    # also keep checkpoints/epoch_N.pt
    eval_every: int = value(1, ge=0)                  # validate every N epochs (0: only after the last one)
    log_every: int = value(50, ge=1)                  # steps
    check_every_s: float = value(2.0, ge=0)           # seconds between host checks of stop signals and divergence
    async_save: bool = True                           # write checkpoints in a background thread
    ddp_static_graph: Literal["auto", True, False] = "auto"  # DDP static_graph (auto: our models, no accumulation)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = value(0, ge=0)


@dataclass(kw_only=True, frozen=True)
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online when a W&B key is set
    project: str | None = None                        # null: $WANDB_PROJECT, else focalnet
    entity: str | None = None                         # null: $WANDB_ENTITY, else your default entity
    name: str | None = None
    tags: list[str] = value([])
    # null: the sweep's id for a -m sweep, else the parent run's (fine-tune), else this run's id
    group: str | None = None
    # false | best (each new best.pt) | last (the final last.pt) | all (every checkpoint), as W&B artifacts
    log_checkpoints: Literal[False, "best", "last", "all"] = False


@dataclass(kw_only=True, frozen=True)
class PicturesConfig:
    """PNGs in the run directory, also logged to W&B as images."""

    inputs: bool = True                               # inputs.png: the first augmented training batch
    modulation_every: int = value(0, ge=0)            # modulation maps of fixed val images every N epochs (0: off)
    modulation_images: int = value(4, ge=1)


@dataclass(kw_only=True, frozen=True)
class LoggerConfig:
    """``logger``: metrics go to ``metrics.jsonl`` always, and to Weights & Biases unless disabled."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    pictures: PicturesConfig = field(default_factory=PicturesConfig)


@dataclass(kw_only=True, frozen=True)
class PathsConfig:
    output_root: str = "${oc.env:FOCALNET_OUTPUT_ROOT,outputs}"  # where run directories go
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's directory (identical on every rank)


# ---- the two root configs ---------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """``train.py``'s config (conf/config.yaml)."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    aug: AugConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    paths: PathsConfig


EvalSetName = Literal["val", "real", "v2", "a", "r"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True, frozen=True)
class ThroughputConfig:
    """``eval.py mode=throughput``: like the official ``main.py --throughput`` (50 warm-up, 30 timed batches)."""

    batch_size: int = value(128, ge=1)
    warmup_iters: int = value(50, ge=0)
    iters: int = value(30, ge=1)
    img_size: int = value("${data.img_size}", ge=1)
    precisions: list[Precision] = value(["fp32", "bf16", "fp16"])  # autocast dtypes; fp32 = no autocast
    compile: list[bool] = value([False, True])      # eager and torch.compile
    flops: bool = True                                # count GMACs (torch.utils.flop_counter, batch 1)


@dataclass(kw_only=True, frozen=True)
class EvalOptions:
    """eval.py's own keys (conf/eval.yaml)."""

    checkpoint: str | bool | None = None              # a weight SOURCE: our .pt, an official .pth, timm/transformers
    #                                                   files, hf-hub:ORG/REPO, a URL, or true/a tag with model=NAME
    weights: Literal["auto", "model", "ema"] = "auto"  # auto: the `model` entry, else the file's one weights entry
    mode: Literal["accuracy", "throughput"] = "accuracy"
    eval_set: EvalSetName = "val"                         # val: data.val_split as the data config builds it
    eval_root: str | None = None                      # folder of class folders for v2/a/r (real: the val split)
    real_labels: str | None = None                    # ImageNet-ReaL labels (json); null: the copy timm ships
    per_class: bool = False                           # also report per-class top-1/top-5 (in eval.json)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)


@dataclass(kw_only=True, frozen=True)
class EvalConfig(EvalOptions):
    """``eval.py``'s config: its own keys plus the training groups it reuses (``model`` is optional)."""

    model: ModelConfig | None = None
    data: DataConfig
    aug: AugConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    paths: PathsConfig


@dataclass(kw_only=True, frozen=True)
class DetectorChoice:
    """``detector``: an Ultralytics model (conf/detector/) and the trainer it takes."""

    model: str = required()                           # a shipped YAML by name, a model YAML, or a local path
    task: Literal["detect", "rtdetr"] = required()    # Ultralytics' DetectionTrainer | RTDETRTrainer


@dataclass(kw_only=True, frozen=True)
class ShapesData:
    root: str = required()                            # where the generated shapes set is written on first use
    train_images: int = required(ge=1)
    val_images: int = required(ge=1)
    img_size: int = required(ge=32)
    seed: int = required(ge=0)


@dataclass(kw_only=True, frozen=True)
class DetectData:
    yaml: str | None = required()                     # an Ultralytics dataset YAML; null = the generated shapes
    shapes: ShapesData = required()


@dataclass(kw_only=True, frozen=True)
class DetectTrain:
    """Ultralytics train arguments (its cfg/default.yaml); any other one goes in ``extra``."""

    epochs: int = required(ge=1)
    imgsz: int = required(ge=32)
    batch: int = required(ge=1)
    device: str = required()                          # cpu, or one CUDA device index
    workers: int = required(ge=0)
    seed: int = required(ge=0)
    optimizer: str = required()
    plots: bool = required()
    resume: bool = required()
    extra: dict[str, Any] = required()


@dataclass(kw_only=True, frozen=True)
class DetectConfig:
    """``scripts/train_detector.py``'s config: types and allowed values; its values are in conf/detect.yaml
    (not registered in the ConfigStore). ``logger`` and ``paths`` are train.py's groups."""

    detector: DetectorChoice
    data: DetectData
    train: DetectTrain
    ultralytics_dir: str
    logger: LoggerConfig
    paths: PathsConfig


# Registered in Hydra's ConfigStore as /schema/<name> (the values of every field; see the module docstring).
STORED: dict[str, type] = {
    "model": ModelConfig, "optimizer": OptimizerConfig, "optimizer_sgd": SGDConfig, "schedule": ScheduleConfig,
    "aug": AugConfig, "trainer": TrainerConfig, "logger": LoggerConfig, "paths": PathsConfig,
    "eval": EvalOptions, "data_image_folder": PhotoFolderData, "data_imagenet22k": ImageNet22kData,
    "data_ffcv": FFCVData, "data_digits": DigitsData, "data_digits_ffcv": DigitsFFCVData,
    "data_synthetic": SyntheticData, "data_wds": ShardData,
}
_BY_NAME: dict[type, dict[str, type]] = {DataConfig: DATA_SCHEMAS, OptimizerConfig: OPTIMIZER_SCHEMAS}


def schema_defaults(cls: type) -> dict:
    """The default value of every field of ``cls`` (nested dataclasses as dicts, required ones as ``???``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            out[f.name] = schema_defaults(type(made)) if dataclasses.is_dataclass(made) else made
        else:
            out[f.name] = REQUIRED
    return out


# ---- checking -------------------------------------------------------------------------------------------------


def _number_bounds(meta: Mapping) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[k]} {meta[k]}" for k in words if k in meta)


def _describe(tp, meta: Mapping) -> str:
    """What a value of type ``tp`` (with bounds ``meta``) may be, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if type(None) in args:
        return "null or " + _describe(_without_none(args), meta)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, meta) for a in args)
    if origin is list:
        n = f"{meta['length']} " if "length" in meta else ""
        return f"a list of {n}values, each {_describe(args[0], {k: v for k, v in meta.items() if k != 'length'})}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return " ".join(["an integer", _number_bounds(meta)]).strip()
    if tp is float:
        return " ".join(["a finite number", _number_bounds(meta)]).strip()
    if tp is str:
        return "a string" if meta.get("empty") else "a non-empty string"
    if origin is dict or tp is dict:
        return "a mapping (without NaN or inf inside)"
    return "anything but NaN or inf"


def _without_none(args: tuple) -> Any:
    """The type ``T | None`` allows besides None (a union when there are several)."""
    inner = tuple(a for a in args if a is not type(None))
    return inner[0] if len(inner) == 1 else typing.Union[inner]  # noqa: UP007  (built from a tuple)


def _in_bounds(v: float, meta: Mapping) -> bool:
    return not (("ge" in meta and v < meta["ge"]) or ("gt" in meta and v <= meta["gt"])
                or ("le" in meta and v > meta["le"]) or ("lt" in meta and v >= meta["lt"]))


def _fits(v, tp, meta: Mapping) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return v in args and type(v) in {type(a) for a in args}
    if type(None) in args:
        return v is None or _fits(v, _without_none(args), meta)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a, meta) for a in args)
    if origin is list:
        inner = {k: x for k, x in meta.items() if k != "length"}
        return (isinstance(v, list | tuple) and ("length" not in meta or len(v) == meta["length"])
                and all(_fits(x, args[0], inner) for x in v))
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool) and _in_bounds(v, meta)
    if tp is float:
        return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and _in_bounds(v, meta))
    if tp is str:
        return isinstance(v, str) and (v != "" or bool(meta.get("empty")))
    if origin is dict or tp is dict:
        return isinstance(v, Mapping) and not _non_finite(v)
    return not _non_finite(v)  # Any


def _non_finite(v) -> bool:
    """A NaN/inf float anywhere inside ``v`` (free-form values such as model.kwargs)."""
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, Mapping):
        return any(_non_finite(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_non_finite(x) for x in v)
    return False


def _schema_for(cls: type, node: Mapping, key: str, errors: list[str]) -> type | None:
    """The dataclass that describes ``node``: ``cls`` itself, or the one its ``name`` selects."""
    table = _BY_NAME.get(cls)
    if table is None:
        return cls
    name = node.get("name")
    if name not in table:
        errors.append(f"{key}.name={name!r} is not allowed; it must be one of: {', '.join(table)}")
        return None
    return table[name]


def check(cls: type, node: Mapping, key: str = "", errors: list[str] | None = None) -> list[str]:
    """Every problem of the resolved ``node`` against the dataclass ``cls``, one line each (``key`` is its path).

    Keys ``node`` lacks take their defaults; keys the dataclass does not have are errors.
    """
    errors = [] if errors is None else errors
    prefix = f"{key}." if key else ""
    if not isinstance(node, Mapping):
        errors.append(f"{key} must be a group (mapping), got {node!r}")
        return errors
    cls = _schema_for(cls, node, key, errors)
    if cls is None:
        return errors
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in node:
        if name not in fields:
            errors.append(f"unknown key {prefix}{name}; known keys in {key or 'the root'}: {', '.join(sorted(fields))}")
    for name, f in fields.items():
        if name not in node:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                optional = type(None) in typing.get_args(hints[name])
                if not optional:
                    errors.append(f"missing key {prefix}{name}")
            continue
        tp, v = hints[name], node[name]
        group = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if group is not None:
            if v is not None or group is tp:
                check(group, v, prefix + name, errors)
        elif not _fits(v, tp, f.metadata):
            errors.append(f"{prefix}{name}={v!r} is not allowed; it must be {_describe(tp, f.metadata)}")
    return errors


def parse(cls: type, node, key: str) -> Any:
    """``node`` (a mapping, a DictConfig, an instance of ``cls`` or None) as a checked instance of ``cls`` (or of
    the dataclass its ``name`` selects); keys it lacks take their defaults. Raises :class:`ConfigError`."""
    if dataclasses.is_dataclass(node) and isinstance(node, cls):
        return node
    if node is None:
        node = {}
    elif not isinstance(node, Mapping) or type(node).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    errors = check(cls, node, key)
    if errors:
        raise ConfigError("; ".join(errors))
    return _build(_schema_for(cls, node, key, []), node)


def _build(cls: type, node: Mapping):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in node:
            v = node[f.name]
            group = next((a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)),
                         None)
            kwargs[f.name] = _build(group, v) if group is not None and v is not None else v
    return cls(**kwargs)


def _store() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in STORED.items():
        cs.store(group="schema", name=name, node=schema_defaults(cls))


_store()
