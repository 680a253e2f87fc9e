"""Evaluation sets: the training data's val split, and ImageNet-ReaL / -V2 / -A / -R by label remapping.

The remapping uses the label files timm ships in ``timm/data/_info`` (timm 1.0.31 has all of them):

=========  ==========================================  =====================================  ===================
eval_set   images                                      targets                                model logits used
=========  ==========================================  =====================================  ===================
val        ``data.val_split`` as the data config        the data config's labels               all
           builds it (folder, FFCV, synthetic, ...)
real       ImageNet-1K val, ``root/<wnid>/ILSVRC2012_   the val labels, plus ReaL's label sets  all 1000
           val_NNNNNNNN.JPEG``                          (``imagenet_real_labels.json``; 3163
                                                       images have none and are left out of
                                                       the ReaL scores)
v2         ImageNetV2 as released: ``root/<0..999>/``   the folder *number* (sorted folder     all 1000
           (or wnid folders)                            names would put "10" before "2")
a          ImageNet-A ``root/<wnid>/``, 200 wnids       position in ``imagenet_a_synsets.txt``  the 200 columns of
                                                                                               ``imagenet_a_indices``
r          ImageNet-R ``root/<wnid>/``, 200 wnids       position in ``imagenet_r_synsets.txt``  ``imagenet_r_indices``
=========  ==========================================  =====================================  ===================

Every set iterates over each image exactly once across ranks (the val sampler), with the eval transform of
the data pipeline (``data.img_size``, ``aug.test_crop``, ``aug.interpolation``), so evaluation under torchrun
sums exact counts. For ``val`` on ImageNet-style folders only the val images are listed (class names come
from the train split's folder names, or the val split's when there is no train split): evaluating does not
walk 1.28M training files.
"""

from __future__ import annotations

import json
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from data.folder import (
    DataConfigError,
    FolderEpochLoader,
    ImageFileDataset,
    Sample,
    check_num_classes,
    file_limits,
    list_classes,
    scan_folder,
)
from data.loaders import build_loaders
from data.transforms import BatchFinisher, EvalSampleTransform

EVAL_SETS = ("val", "real", "v2", "a", "r")
IN1K_CLASSES = 1000


@dataclass
class EvalSet:
    """A loader plus what the evaluator needs to map model outputs onto the set's targets."""

    name: str
    loader: Any                                  # yields (images (B, 3, S, S) float, targets (B,) int64)
    num_classes: int                             # size of the target space
    size: int                                    # images in the set (all ranks)
    class_indices: list[int] | None = None       # 1K logit column of each target class (A/R); None = all
    class_names: list[str] | None = None         # one name per target class, when known (wnids)
    real_labels: list[list[int]] | None = None   # ReaL label set of each sample of THIS rank, in loader order
    notes: list[str] = field(default_factory=list)


def timm_info_file(name: str) -> str:
    """Text of a label file shipped with timm (``timm/data/_info/<name>``)."""
    blob = pkgutil.get_data("timm.data", f"_info/{name}")
    if blob is None:
        raise FileNotFoundError(f"timm does not ship _info/{name}")
    return blob.decode("utf-8")


def imagenet1k_wnids() -> list[str]:
    return timm_info_file("imagenet_synsets.txt").split()


def subset_classes(which: str) -> tuple[list[str], list[int]]:
    """(wnids, 1K indices) of ImageNet-A (``which='a'``) or ImageNet-R (``'r'``): 200 classes each."""
    wnids = timm_info_file(f"imagenet_{which}_synsets.txt").split()
    indices = [int(i) for i in timm_info_file(f"imagenet_{which}_indices.txt").split()]
    if len(wnids) != len(indices):
        raise RuntimeError(f"timm's imagenet_{which} files disagree: {len(wnids)} synsets, {len(indices)} indices")
    return wnids, indices


def load_real_labels(path: str | None = None) -> list[list[int]]:
    """ImageNet-ReaL: one list of 1K labels per val image (ILSVRC2012_val_00000001 first)."""
    text = open(path).read() if path else timm_info_file("imagenet_real_labels.json")
    labels = json.loads(text)
    if not isinstance(labels, list) or not all(isinstance(x, list) for x in labels):
        raise DataConfigError(f"real_labels={path}: expected a JSON list of label lists (ReaL's real.json)")
    return labels


# ------------------------------------------------------------------------------------------------ loaders
def _aug_value(aug_cfg, key, default):
    value = aug_cfg.get(key, default) if aug_cfg is not None else default
    return default if value is None else value


def eval_loader(samples: list[Sample], data_cfg, aug_cfg, *, rank: int, world_size: int, seed: int,
                name: str) -> FolderEpochLoader:
    """The data pipeline's val loader (eval transform, exact sharding) over an explicit sample list."""
    transform = EvalSampleTransform(int(data_cfg.img_size), bool(_aug_value(aug_cfg, "test_crop", True)),
                                    str(_aug_value(aug_cfg, "interpolation", "bicubic")))
    dataset = ImageFileDataset(samples, transform, name=name, limits=file_limits(data_cfg))
    return FolderEpochLoader(dataset, BatchFinisher(aug_cfg, train=False),
                             batch_size=int(data_cfg.batch_size), rank=rank, world_size=world_size, seed=seed,
                             train=False, num_workers=int(data_cfg.get("num_workers", 0)), persistent_workers=False)


def _require_dir(path: str | None, key: str, what: str) -> str:
    if not path:
        raise DataConfigError(f"{key} is not set: point it at the {what}")
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise DataConfigError(f"{key}={path}: no such directory (expected the {what})")
    return path


def _imagenet_val_split(data_cfg) -> tuple[str, list[str]]:
    """(val dir, class names) of an ImageFolder dataset without listing the training images."""
    root = _require_dir(data_cfg.get("root"), "data.root", "dataset root holding the val split")
    val_dir = os.path.join(root, str(data_cfg.get("val_split", "val")))
    train_dir = os.path.join(root, str(data_cfg.get("train_split", "train")))
    classes = list_classes(train_dir if os.path.isdir(train_dir) else val_dir, "data.root/data.train_split")
    return val_dir, classes


def _rank_order(loader: FolderEpochLoader) -> list[int]:
    """Dataset indices in the order this rank's loader yields them."""
    return [index for index, _ in loader.sampler]


def build_eval_set(name: str, data_cfg, aug_cfg=None, *, root: str | None = None, real_labels: str | None = None,
                   rank: int = 0, world_size: int = 1, seed: int = 0) -> EvalSet:
    """Build ``name`` (one of :data:`EVAL_SETS`); ``root`` is the class-folder directory for v2/a/r."""
    common = dict(rank=rank, world_size=world_size, seed=seed)
    if name not in EVAL_SETS:
        raise DataConfigError(f"eval_set={name!r}; choose one of {', '.join(EVAL_SETS)}")

    if name == "val":
        if data_cfg.name in ("imagenet1k", "folder") and not int(data_cfg.get("val_count", 0) or 0):
            val_dir, classes = _imagenet_val_split(data_cfg)
            check_num_classes(data_cfg, len(classes), f"the class folders of data.root ({len(classes)})")
            _, samples = scan_folder(val_dir, "data.root/data.val_split", {c: i for i, c in enumerate(classes)},
                                     allow_empty_classes=True)
            loader = eval_loader(samples, data_cfg, aug_cfg, name=f"{data_cfg.name}/val", **common)
            return EvalSet("val", loader, int(data_cfg.num_classes), len(samples), class_names=classes)
        # Any other pipeline (synthetic, FFCV, 22K map files, held-out val): exactly the training val loader.
        loaders = build_loaders(data_cfg, aug_cfg, **common)
        return EvalSet("val", loaders.val, int(data_cfg.num_classes), int(loaders.info.get("val_size", -1)))

    if name == "real":
        val_dir = root or _imagenet_val_split(data_cfg)[0]
        val_dir = _require_dir(val_dir, "eval_root", "ImageNet-1K val folder (<wnid>/ILSVRC2012_val_*.JPEG)")
        wnids = imagenet1k_wnids()
        _, samples = scan_folder(val_dir, "eval_root (ImageNet-1K val)", {w: i for i, w in enumerate(wnids)},
                                 allow_empty_classes=True)
        labels = load_real_labels(real_labels)
        by_file = {f"ILSVRC2012_val_{i + 1:08d}": lab for i, lab in enumerate(labels)}
        stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in samples]
        unknown = [s for s in stems if s not in by_file]
        if unknown:
            raise DataConfigError(f"eval_set=real: {len(unknown)} images are not ImageNet val files with ReaL labels "
                                  f"(expected ILSVRC2012_val_NNNNNNNN.JPEG), e.g. {unknown[:3]}")
        loader = eval_loader(samples, data_cfg, aug_cfg, name="imagenet_real", **common)
        mine = [by_file[stems[i]] for i in _rank_order(loader)]
        notes = [f"ReaL labels from {real_labels or 'timm/data/_info/imagenet_real_labels.json'}; images with an "
                 f"empty ReaL label set are left out of real_top1/real_top5"]
        return EvalSet("real", loader, IN1K_CLASSES, len(samples), class_names=wnids, real_labels=mine, notes=notes)

    if name == "v2":
        v2_dir = _require_dir(root, "eval_root", "ImageNetV2 folder (class folders 0..999)")
        folders = list_classes(v2_dir, "eval_root (ImageNetV2)")
        wnids = imagenet1k_wnids()
        if all(f.isdigit() for f in folders):
            # The released ImageNetV2 tarballs name folders by 1K class index; sorted order would be wrong.
            mapping = {f: int(f) for f in folders}
            bad = [f for f, i in mapping.items() if not 0 <= i < IN1K_CLASSES]
            if bad:
                raise DataConfigError(f"eval_root: ImageNetV2 class folders must be 0..999, found {bad[:3]}")
        else:
            mapping = {w: i for i, w in enumerate(wnids)}
        _, samples = scan_folder(v2_dir, "eval_root (ImageNetV2)", mapping, allow_empty_classes=True)
        loader = eval_loader(samples, data_cfg, aug_cfg, name="imagenet_v2", **common)
        return EvalSet("v2", loader, IN1K_CLASSES, len(samples), class_names=wnids)

    # ImageNet-A / -R: 200-class subsets of ImageNet-1K.
    set_dir = _require_dir(root, "eval_root", f"ImageNet-{name.upper()} folder (<wnid>/ images)")
    wnids, indices = subset_classes(name)
    _, samples = scan_folder(set_dir, f"eval_root (ImageNet-{name.upper()})", {w: i for i, w in enumerate(wnids)},
                             allow_empty_classes=True)
    loader = eval_loader(samples, data_cfg, aug_cfg, name=f"imagenet_{name}", **common)
    return EvalSet(name, loader, len(wnids), len(samples), class_indices=indices, class_names=wnids,
                   notes=[f"logits restricted to the {len(indices)} ImageNet-{name.upper()} classes "
                          f"(timm imagenet_{name}_indices.txt)"])
