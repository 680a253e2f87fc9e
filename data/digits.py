"""``data=digits`` / ``data=digits_ffcv``: scikit-learn's bundled handwritten digits as a real ImageFolder.

The demo dataset needs no download: scikit-learn ships 1,797 real 8x8 grey-level scans of handwritten
digits (UCI "optdigits" test set, 16 ink levels). :func:`materialize` writes them once as RGB JPEGs,
black ink on white paper, upscaled (bicubic) to ``data.store_size`` pixels, into an ImageFolder::

    <data.root>/train/<0..9>/<index>.jpg     ~80% of each class
    <data.root>/val/<0..9>/<index>.jpg       ~20% of each class (fixed split, same on every machine)
    <data.root>/digits.json                  what was written (sizes, split, counts); marks completion

Training then goes through exactly the ImageNet folder pipeline (:func:`focalnet.data.folder.make_loaders`); the
FFCV variant converts that folder once (:func:`write_betons`) and reads it with the ImageNet FFCV
loader. Creation is atomic and safe when several ranks (or runs) race: each writer fills a private
temporary directory and renames it into place; the first rename wins and the others discard their copy.

Digits are not ImageNet photos: a mirrored digit is a different glyph and a RandomResizedCrop keeping 8%
of a glyph leaves a stroke, so the demo preset sets ``aug.hflip: 0.0`` and ``aug.scale: [0.5, 1.0]``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace

import numpy as np

from focalnet.data.folder import DataConfigError, folder_samples, make_loaders
from focalnet.data.loaders import Loaders
from focalnet.schema import AugConfig, DigitsData, DigitsFFCVData

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_SEED = 20_240_601          # the fixed train/val split (independent of the run's seed)
META_FILE = "digits.json"


def _expand(path) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def digit_images(store_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits -> (uint8 (N, S, S, 3) black-on-white RGB images, int64 (N,) labels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images  # (1797, 8, 8) float, 0 (paper) .. 16 (ink)
    grey = np.clip(255.0 - ink * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # (N, 8, 8)
    out = np.empty((len(grey), store_size, store_size, 3), np.uint8)
    for i, g in enumerate(grey):
        big = Image.fromarray(g, "L").resize((store_size, store_size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(big.convert("RGB"))
    return out, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean (N,) mask of validation samples: ``val_fraction`` of every class, by a fixed generator."""
    rng = np.random.default_rng(SPLIT_SEED)
    is_val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(idx)))
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def _expected_meta(store_size: int, val_fraction: float, jpeg_quality: int) -> dict:
    return {"format": FORMAT_VERSION, "store_size": int(store_size), "val_fraction": float(val_fraction),
            "jpeg_quality": int(jpeg_quality), "split_seed": SPLIT_SEED}


def read_meta(root: str) -> dict | None:
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def materialize(root, *, store_size: int = 64, val_fraction: float = 0.2, jpeg_quality: int = 95) -> str:
    """Write the digits ImageFolder at ``root`` unless it is already there; return the absolute root.

    Atomic: images go to a temporary sibling directory that is renamed to ``root`` when complete (the
    metadata file is written last, inside it). Concurrent callers each build a copy; ``os.rename`` of a
    directory onto an existing non-empty one fails, so exactly one copy lands and the others are removed.
    """
    root = _expand(root)
    want = _expected_meta(store_size, val_fraction, jpeg_quality)
    have = read_meta(root)
    if have is not None:
        have_cmp = {k: have.get(k) for k in want}
        if have_cmp != want:
            raise DataConfigError(f"data.root={root} holds digits written with {have_cmp}, but the config asks for "
                                  f"{want}; point data.root at another directory or delete {root}")
        return root
    if os.path.exists(root) and os.listdir(root):
        raise DataConfigError(f"data.root={root} exists but is not a digits folder ({META_FILE} missing); "
                              "point data.root at an empty or new directory")

    from PIL import Image

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        images, labels = digit_images(store_size)
        is_val = split_indices(labels, val_fraction)
        counts = {"train": 0, "val": 0}
        for i, (img, label) in enumerate(zip(images, labels)):
            split = "val" if is_val[i] else "train"
            d = os.path.join(tmp, split, str(int(label)))
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:04d}.jpg"), quality=jpeg_quality)
            counts[split] += 1
        meta = {**want, "num_classes": int(labels.max()) + 1, "counts": counts,
                "source": "sklearn.datasets.load_digits (UCI optdigits), 8x8 upscaled bicubic",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one: the first writer wins.
            os.rename(tmp, root)
            log.info("wrote the digits ImageFolder to %s: %s", root, counts)
        except OSError:
            if read_meta(root) is None:  # not a lost race: something else is in the way
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return materialize(root, store_size=store_size, val_fraction=val_fraction, jpeg_quality=jpeg_quality)


def _materialize_from_cfg(data: DigitsData | DigitsFFCVData) -> str:
    if not data.root:
        raise DataConfigError("data.root is not set: the directory where the digits ImageFolder is cached")
    return materialize(data.root, store_size=data.store_size, val_fraction=data.val_fraction,
                       jpeg_quality=data.jpeg_quality)


def build_digits(data: DigitsData, aug: AugConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 pin_memory: bool = False) -> Loaders:
    """The digits ImageFolder (written on first use) through the ImageNet folder pipeline."""
    _materialize_from_cfg(data)
    train, val, num_classes = folder_samples(data)
    return make_loaders(train, val, num_classes, data, aug, rank=rank, world_size=world_size,
                        seed=seed, pin_memory=pin_memory, info={"root": _expand(data.root)})


# ------------------------------------------------------------------------------------------------ FFCV
def write_betons(data: DigitsFFCVData, out_dir: str) -> str:
    """The digits folder ``data.root`` as ``out_dir/{train,val}.beton``, once (atomic, cached): the images at
    their stored size, all JPEG at ``data.jpeg_quality``."""
    from focalnet.data.ffcv_writer import write_split

    out_dir = _expand(out_dir)
    done = os.path.join(out_dir, "val.beton.json")
    if os.path.isfile(os.path.join(out_dir, "train.beton.json")) and os.path.isfile(done):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        train, val, num_classes = folder_samples(data)
        log.info("converting the digits folder %s to FFCV files in %s", data.root, out_dir)
        for split, samples in (("train", train), ("val", val)):
            write_split(samples, os.path.join(tmp, f"{split}.beton"), num_classes=num_classes,
                        max_resolution=data.store_size, jpeg_quality=data.jpeg_quality, compress_probability=1.0,
                        num_workers=1, chunk_size=100, source=f"data=digits root={data.root}")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(done):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_digits_ffcv(data: DigitsFFCVData, aug: AugConfig, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, pin_memory: bool = False) -> Loaders:
    """The digits as FFCV files (written from the digits folder on first use) through the FFCV loader."""
    from focalnet.data.ffcv_loader import build_ffcv, require_ffcv

    require_ffcv()
    beton_dir = write_betons(replace(data, root=_materialize_from_cfg(data)), data.beton_dir)
    loaders = build_ffcv(replace(data, root=beton_dir), aug, rank=rank, world_size=world_size, seed=seed,
                         pin_memory=pin_memory)
    loaders.info["root"] = beton_dir
    return loaders
