"""Image-file datasets: ``data=imagenet1k``, ``data=imagenet22k`` and ``data=folder`` (any ImageFolder).

Layouts
-------
* ImageFolder: ``<data.root>/<data.train_split>/<class>/<image>`` and the same under ``data.val_split``.
  Class indices follow the sorted folder names (for ImageNet-1K wnids this is the standard 1K order).
* ImageNet-22K (fall11) as folders: extract ``fall11_whole.tar`` (one ``<wnid>.tar`` per synset, 21841
  synsets, ~14.2M images) so that each synset tar lands in ``<data.root>/train/<wnid>/``::

      mkdir -p $ROOT/train && cd $ROOT/train && tar xf /path/fall11_whole.tar
      for t in n*.tar; do mkdir -p "${t%.tar}" && tar xf "$t" -C "${t%.tar}" && rm "$t"; done

  Labels are the synsets' positions in FocalNet's 21842-way head, ``timm.data.ImageNetInfo('imagenet22k_ms')``
  (``data.label_layout=imagenet22k_ms``; the first 1000 indices are ImageNet-1K), so a 22K-pretrained
  head maps to 1K by slicing. ``data.label_layout=sorted`` uses sorted folder order instead.
  fall11 has no validation split: ``data.val_count=N`` holds out N training images (a fixed choice,
  independent of the run's seed), or point ``data.val_split`` / ``data.val_map`` at your own.
* Swin/FocalNet map files: ``data.train_map`` / ``data.val_map`` name files (relative to ``data.root``)
  listing ``relative/path<TAB>label`` lines, or Swin's ImageNet-22K annotation JSON ``[[relative/path, label],
  ...]`` (microsoft/Swin-Transformer ``data/imagenet22k_dataset.py``); paths are relative to
  ``data.root/data.image_dir``. Labels come from the synset (wnid) in each path, placed by
  ``data.label_layout`` like the folders (Swin's files number the classes in its own 21841-class order, where
  the ImageNet-1K classes are scattered); when the file's integers disagree, one warning says how many and
  the synset wins. ``data.map_labels=file`` takes the integers as written instead (paths without a synset).

Every dataset yields ``(uint8 image (3, S, S), label, sample seed)``; the loader hands them over as uint8
batches with their seeds, and :class:`focalnet.data.transforms.BatchFinisher` normalizes and erases them on the
training device (see :mod:`focalnet.data.loaders`). Unreadable images are
skipped, counted in shared memory (workers are processes) and replaced deterministically by the next
index, so every rank keeps the same batch count and size.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from focalnet.data.file_index import FileSamples, list_entries, list_image_files
from focalnet.data.loaders import EpochLoader, Loaders, ResumableDistributedSampler
from focalnet.data.transforms import (
    MAX_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    BadImage,
    BatchFinisher,
    EvalSampleTransform,
    TrainSampleTransform,
    open_image,
    seeded,
)
from focalnet.schema import AugConfig, ConfigError, DataConfig, ImageFolderData, parse

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MAX_REPLACEMENTS = 64
Sample = tuple[str, int]
Samples = Sequence[Sample]  # a list, or FileSamples (a cached folder listing without an object per file)


class DataConfigError(ConfigError):
    """A data config that cannot work (missing root, empty split, class-count mismatch)."""


# ----------------------------------------------------------------------------------------------- scanning
def require_root(data_cfg) -> str:
    """``data.root`` of ``data_cfg``, expanded, once it is known to be a directory."""
    return check_root(data_cfg.root, data_cfg.name)


def check_root(root: str | None, name: str) -> str:
    """``root`` (the ``data.root`` of ``data=name``), expanded, once it is known to be a directory."""
    if not root:
        raise DataConfigError(
            f"data.root is not set for data={name}: pass data.root=/path/to/dataset"
            + (" (or set IMAGENET_ROOT)" if str(name).startswith("imagenet") else ""))
    root = os.path.expanduser(str(root))
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataConfigError(f"data.root={root} is a file, not a directory: point data.root at the dataset folder")
    if not os.path.isdir(root):
        raise DataConfigError(f"data.root={root}: no such directory")
    return root


def list_classes(split_dir: str, key: str) -> list[str]:
    """Sorted class folder names under ``split_dir``; ``key`` names the config key for the message."""
    if not os.path.isdir(split_dir):
        raise DataConfigError(f"{key}: no such directory {split_dir}")
    classes = list_entries(split_dir, want_dir=True)
    if not classes:
        raise DataConfigError(f"{key}: {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    return classes


def count_classes(root: str | None, split: str = "train") -> int:
    """OmegaConf resolver ``${folder_num_classes:${data.root},${data.train_split}}`` for ``data=folder``."""
    if not root:
        raise DataConfigError("data.root is not set: data=folder infers data.num_classes from data.root")
    root = check_root(root, "folder")
    return len(list_classes(os.path.join(root, str(split)), "data.root/data.train_split"))


def scan_folder(split_dir: str, key: str, class_to_idx: dict[str, int] | None = None, *,
                allow_empty_classes: bool = False) -> tuple[list[str], Samples]:
    """``split_dir/<class>/<image>`` -> (class names, (path, label) samples) in a deterministic order.

    A class folder without images is an error unless ``allow_empty_classes`` (evaluation splits): training
    would give the head a class it never sees. The file list is cached (:mod:`focalnet.data.file_index`): built once,
    then only changed class folders are listed.
    """
    classes = list_classes(split_dir, key)
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataConfigError(f"{key}: {len(unknown)} class folders of {split_dir} are not in the label layout "
                                  f"(the training classes, or data.label_layout), e.g. {unknown[:3]}: remove them "
                                  f"or fix data.root")
    files = list_image_files(split_dir, classes, IMG_EXTENSIONS)
    empty = [c for c, n in zip(classes, np.diff(files.class_starts).tolist()) if n == 0]
    if empty and len(files) and not allow_empty_classes:
        raise DataConfigError(f"{key}: {len(empty)} class folders of {split_dir} hold no images "
                              f"({', '.join(IMG_EXTENSIONS)}), e.g. {empty[:3]}: add images or remove the folders "
                              f"(the model would get {len(classes)} classes, {len(empty)} never seen)")
    if not len(files):
        raise DataConfigError(f"{key}: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return classes, files.samples([class_to_idx[c] for c in classes])


def read_map_file(map_path: str, key: str) -> list[Sample]:
    """``(relative path, label)`` pairs of a map file: ``relative/path<TAB>label`` lines (whitespace also
    accepted; Swin's ImageNet-1K ``*_map.txt``) or a JSON list ``[[relative/path, label], ...]`` (Swin's
    ImageNet-22K ``ILSVRC2011fall_whole_map_*.txt``, read with ``json.load`` by its ``IN22KDATASET``)."""
    if not os.path.isfile(map_path):
        raise DataConfigError(f"{key}: no such map file {map_path}")
    with open(map_path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataConfigError(f"{key}: {map_path} is not valid JSON ({e})") from e
        pairs = []
        for n, entry in enumerate(entries):
            if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], int | str) and str(entry[1]).lstrip("-").isdigit()):
                raise DataConfigError(f"{key}: {map_path} entry {n}: expected [relative_path, label], got {entry!r}")
            pairs.append((entry[0], int(entry[1])))
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise DataConfigError(f"{key}: {map_path}:{n}: expected 'path<TAB>label', got {line!r}")
            pairs.append((parts[0], int(parts[1])))
    if not pairs:
        raise DataConfigError(f"{key}: map file {map_path} is empty")
    return pairs


_WNID = re.compile(r"n\d{8}")


def synset_of(path: str) -> str | None:
    """The wnid a path names: its folder (``.../n01440764/x.JPEG``) or its file prefix (``n01440764_10026.JPEG``)."""
    parts = path.replace("\\", "/").split("/")
    if len(parts) >= 2 and _WNID.fullmatch(parts[-2]):
        return parts[-2]
    m = _WNID.match(parts[-1])
    return m.group(0) if m and parts[-1][m.end():m.end() + 1] in ("_", ".") else None


@functools.cache
def swin_22k_labels() -> dict[str, int]:
    """wnid -> the label Swin's ImageNet-22K files give it: its index among the 21843 ids of Google's BiT list
    (``timm.data.ImageNetInfo('imagenet21k_goog')``), the last two moved to the two imageless ids 9205 and 15027
    (microsoft/Swin-Transformer data/imagenet22k_dataset.py: "map 21841->9205; 21842->15027")."""
    from timm.data import ImageNetInfo

    labels = {s: i for i, s in enumerate(ImageNetInfo("imagenet21k_goog").label_names())}
    return {s: {21841: 9205, 21842: 15027}.get(i, i) for s, i in labels.items()}


def map_file_samples(pairs: list[tuple[str, int]], image_root: str, class_to_idx: dict[str, int] | None,
                     key: str, map_path: str, layout: str) -> list[Sample]:
    """Map-file pairs -> samples. ``class_to_idx`` (data.map_labels=wnid): each label is the index of the
    path's synset; disagreeing integers in the file are counted and reported once. ``None``: labels as written."""
    if class_to_idx is None:
        return [(os.path.join(image_root, p), lab) for p, lab in pairs]
    samples, differ, swin, example = [], 0, 0, None
    for p, written in pairs:
        wnid = synset_of(p)
        if wnid is None or wnid not in class_to_idx:
            what = "no synset (nXXXXXXXX folder or file prefix)" if wnid is None else \
                f"synset {wnid}, which is not in data.label_layout={layout}"
            raise DataConfigError(f"{key}: {map_path}: {p!r} has {what}; data.map_labels=file takes the file's "
                                  "labels as written")
        label = class_to_idx[wnid]
        if written != label:
            differ += 1
            swin += written == swin_22k_labels().get(wnid)
            example = example or f"{p}: {written} in the file, {label} for {wnid}"
        samples.append((os.path.join(image_root, p), label))
    if differ:
        order = (" They are Swin's 21841-class order (BiT's ids, two remapped; microsoft/Swin-Transformer "
                 "data/imagenet22k_dataset.py).") if swin == differ else ""
        log.warning("%s: %d of %d labels in %s differ from their synset's index in data.label_layout=%s (e.g. %s)."
                    "%s Using the synsets' indices; data.map_labels=file uses the file's labels as written.",
                    key, differ, len(pairs), map_path, layout, example, order)
    return samples


def imagenet22k_class_to_idx(layout: str) -> dict[str, int]:
    """wnid -> index in FocalNet's 22K head (``imagenet22k_ms``: 21842 classes, 1K classes first)."""
    from timm.data import ImageNetInfo

    return {s: i for i, s in enumerate(ImageNetInfo(layout).label_names())}


def hold_out(samples: Samples, count: int, key: str) -> tuple[Samples, Samples]:
    """Split ``count`` samples off for validation with a fixed generator (the same for every run and rank)."""
    if not 0 < count < len(samples):
        raise DataConfigError(f"{key}={count} must be between 1 and the training set size - 1 ({len(samples) - 1})")
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(20_211_102))
    is_val = np.zeros(len(samples), dtype=bool)
    is_val[perm[:count].numpy()] = True
    if isinstance(samples, FileSamples):
        return samples.subset(np.flatnonzero(~is_val)), samples.subset(np.flatnonzero(is_val))
    return [s for s, v in zip(samples, is_val) if not v], [s for s, v in zip(samples, is_val) if v]


def check_num_classes(data_cfg, found: int, where: str) -> int:
    expected = data_cfg.num_classes
    if expected is not None and expected != found:  # None (data=folder from Python): the folders decide
        raise DataConfigError(
            f"{where} has {found} classes but data.num_classes={expected} (model.num_classes defaults to it); "
            f"set data.num_classes={found} or fix data.root")
    return found


def check_labels(samples: Samples, num_classes: int, where: str) -> None:
    labels = samples.labels() if isinstance(samples, FileSamples) else np.array([lab for _, lab in samples])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise DataConfigError(f"{where}: label {bad[0]} outside [0, data.num_classes={num_classes})")


# ----------------------------------------------------------------------------------------------- dataset
class ImageFileDataset(Dataset):
    """A list of ``(path, label)`` decoded robustly and augmented with per-sample seeds.

    ``__getitem__((index, seed))`` returns ``(uint8 (3, S, S), label, seed)``. A file that cannot be
    decoded is logged, counted and replaced by the next index (its seed derived from the original), so the
    output depends only on the key: identical across workers, ranks and resumes.
    """

    def __init__(self, samples: Samples, transform, *, name: str = "dataset", limits: dict | None = None):
        self.samples, self.transform, self.name = samples, transform, name
        self.limits = limits or {}  # open_image's max_file_bytes / max_pixels (see file_limits)
        # Shared memory: workers are separate processes, and the count must reach the main process.
        self._skipped = mp.get_context().Value("q", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (int(key), 0)
        for attempt in range(_MAX_REPLACEMENTS):
            path, label = self.samples[index]
            try:
                # In a worker process nobody else reads the global RNGs: seed without save/restore.
                with seeded(seed, preserve=get_worker_info() is None):
                    image = self.transform(self.open(path))
                return image, label, seed
            except BadImage as e:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning("%s: skipping unreadable image %s (%s)", self.name, path, e)
                index = (index + 1) % len(self.samples)
                seed = (seed * 6364136223846793005 + attempt + 1) & ((1 << 63) - 1)
        raise RuntimeError(f"{self.name}: {_MAX_REPLACEMENTS} unreadable images in a row near {path}")

    def open(self, source):
        """A sample's image, opened (header only); :class:`BadImage` when it cannot be read."""
        return open_image(source, **self.limits)

    def stats(self) -> dict[str, int]:
        return {"skipped_images": int(self._skipped.value)}


class FolderEpochLoader(EpochLoader):
    """:class:`EpochLoader` handing over uint8 batches that ``finisher`` normalizes (and erases, in training)
    on the training device."""

    def __init__(self, dataset: ImageFileDataset, finisher: BatchFinisher, **kwargs):
        super().__init__(dataset, finisher=finisher, **kwargs)


def file_limits(data: DataConfig) -> dict:
    """``open_image`` limits from ``data.max_file_mb`` and ``data.max_image_pixels`` (folder pipelines; eval sets
    read with other pipelines get the defaults, :data:`focalnet.data.transforms.MAX_FILE_BYTES`/``MAX_IMAGE_PIXELS``)."""
    mb = getattr(data, "max_file_mb", MAX_FILE_BYTES >> 20)
    limits = {"max_file_bytes": mb << 20, "max_pixels": getattr(data, "max_image_pixels", MAX_IMAGE_PIXELS)}
    # Pillow refuses images above twice its own limit before we can look: keep it out of the way of ours.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, limits["max_pixels"])
    return limits


def make_loaders(train_samples: Samples, val_samples: Samples, num_classes: int, data: DataConfig, aug: AugConfig,
                 *, rank: int, world_size: int, seed: int, pin_memory: bool = False, info: dict | None = None,
                 dataset: Callable[..., ImageFileDataset] = ImageFileDataset,
                 sampler: Callable[..., ResumableDistributedSampler] = ResumableDistributedSampler.for_dataset,
                 ) -> Loaders:
    """Train and val loaders over ``(source, label)`` samples. ``dataset(samples, transform, name=, limits=)`` reads
    them (files by default; :mod:`focalnet.data.shards` passes its shard reader) and ``sampler(dataset, **kwargs)``
    orders them (:class:`ResumableDistributedSampler`'s keyword arguments; the shard path visits shards locally)."""
    size = data.img_size
    limits = file_limits(data)
    train_tf = TrainSampleTransform(aug, size, jpeg_draft=getattr(data, "jpeg_draft", False))
    train_ds = dataset(train_samples, train_tf, name=f"{data.name}/train", limits=limits)
    val_ds = dataset(val_samples, EvalSampleTransform(size, aug.test_crop, aug.interpolation), name=f"{data.name}/val",
                     limits=limits)

    def loader(ds: ImageFileDataset, train: bool) -> FolderEpochLoader:
        order = sampler(ds, batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=train,
                        train=train)
        return FolderEpochLoader(ds, BatchFinisher(aug, train=train), sampler=order, num_workers=data.num_workers,
                                 persistent_workers=data.persistent_workers, seed=seed, pin_memory=pin_memory)

    return Loaders(train=loader(train_ds, True), val=loader(val_ds, False), num_classes=num_classes,
                   info={"train_size": len(train_ds), "val_size": len(val_ds), **(info or {})})


def _split_paths(data_cfg, root: str) -> tuple[str, str]:
    return os.path.join(root, data_cfg.train_split), os.path.join(root, data_cfg.val_split)


def folder_samples(data_cfg) -> tuple[Samples, Samples, int]:
    """(train, val, num_classes) of an ImageFolder dataset; ``data.val_count`` holds out a val set."""
    data_cfg = parse(DataConfig, data_cfg, "data")
    root = require_root(data_cfg)
    train_dir, val_dir = _split_paths(data_cfg, root)
    classes, train = scan_folder(train_dir, "data.root/data.train_split")
    num_classes = check_num_classes(data_cfg, len(classes), f"data.root/data.train_split ({train_dir})")
    val_count = data_cfg.val_count
    if val_count > 0:
        train, val = hold_out(train, val_count, "data.val_count")
    elif os.path.isdir(val_dir):
        _, val = scan_folder(val_dir, "data.root/data.val_split", {c: i for i, c in enumerate(classes)},
                             allow_empty_classes=True)
    else:
        raise DataConfigError(f"data.root/data.val_split: no such directory {val_dir} "
                              "(add it, or hold out training images with data.val_count=N)")
    return train, val, num_classes


def dataset_samples(data_cfg) -> tuple[Samples, Samples, int]:
    """(train, val, num_classes) for any file-based ``data`` config (used by scripts/write_ffcv.py too)."""
    data_cfg = parse(DataConfig, data_cfg, "data")
    name = data_cfg.name.removesuffix("_ffcv")
    return imagenet22k_samples(data_cfg) if name == "imagenet22k" else folder_samples(data_cfg)


def build_image_files(data: ImageFolderData, aug: AugConfig, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, pin_memory: bool = False) -> Loaders:
    train, val, num_classes = dataset_samples(data)
    return make_loaders(train, val, num_classes, data, aug, rank=rank, world_size=world_size, seed=seed,
                        pin_memory=pin_memory)


def imagenet22k_samples(data_cfg) -> tuple[Samples, Samples, int]:
    """(train, val, num_classes) for ``data=imagenet22k`` from map files or synset folders."""
    data_cfg = parse(DataConfig, data_cfg, "data")
    root = require_root(data_cfg)
    num_classes = data_cfg.num_classes
    image_root = os.path.join(root, data_cfg.image_dir or "")
    val: Samples | None = None
    layout = data_cfg.label_layout
    if data_cfg.train_map:
        maps = {k: os.path.join(root, getattr(data_cfg, k)) for k in ("train_map", "val_map") if getattr(data_cfg, k)}
        pairs = {k: read_map_file(path, f"data.{k}") for k, path in maps.items()}
        class_to_idx = None
        if data_cfg.map_labels == "wnid" and layout == "sorted":
            class_to_idx = {c: i for i, c in enumerate(sorted({synset_of(p) for p, _ in pairs["train_map"]} - {None}))}
        elif data_cfg.map_labels == "wnid":
            class_to_idx = imagenet22k_class_to_idx(layout)
        if class_to_idx is not None:
            check_num_classes(data_cfg, len(class_to_idx), f"data.label_layout={layout} (data.map_labels=wnid)")
        train = map_file_samples(pairs["train_map"], image_root, class_to_idx, "data.train_map", maps["train_map"],
                                 layout)
        if "val_map" in pairs:
            val = map_file_samples(pairs["val_map"], image_root, class_to_idx, "data.val_map", maps["val_map"], layout)
    else:
        train_dir, val_dir = _split_paths(data_cfg, root)
        if layout == "sorted":
            classes, train = scan_folder(train_dir, "data.root/data.train_split")
            class_to_idx = {c: i for i, c in enumerate(classes)}
            check_num_classes(data_cfg, len(classes), f"data.root/data.train_split ({train_dir})")
        else:
            class_to_idx = imagenet22k_class_to_idx(layout)
            check_num_classes(data_cfg, len(class_to_idx), f"data.label_layout={layout}")
            _, train = scan_folder(train_dir, "data.root/data.train_split", class_to_idx)
        if os.path.isdir(val_dir) and not data_cfg.val_count:
            _, val = scan_folder(val_dir, "data.root/data.val_split", class_to_idx, allow_empty_classes=True)
    if val is None:
        count = data_cfg.val_count
        if count <= 0:
            raise DataConfigError("data=imagenet22k has no validation split: set data.val_count=N to hold out "
                                  "N training images, or data.val_map / data.val_split")
        train, val = hold_out(train, count, "data.val_count")
    check_labels(train, num_classes, "data.train_map/data.train_split")
    check_labels(val, num_classes, "data.val_map/data.val_split")
    return train, val, num_classes
