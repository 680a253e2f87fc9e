"""``data=imagenet1k_ffcv`` / ``data=imagenet22k_ffcv``: FFCV ``.beton`` files with the full FocalNet recipe.

FFCV decodes JPEG (or copies raw pixels) and does RandomResizedCrop / center crop in compiled, threaded
code; it has no RandAugment or RandomErasing, so the rest of the recipe runs on its output exactly as in
the folder path: flip + timm RandAugment per sample (in a process pool, ``data.num_workers`` processes),
then normalize + timm RandomErasing per sample (:class:`data.transforms.BatchFinisher`).

Determinism and resume: the sample order is :class:`data.loaders.ResumableDistributedSampler`'s (a
function of seed and epoch, sharded over ranks, resumable at any batch), installed as FFCV's traversal
order. The crop decoder seeds NumPy per sample inside its compiled loop from (seed, epoch, index), and the
Python stages are seeded per sample too, so no result depends on thread scheduling or the resume point.
The decoder bakes the epoch's seed in at compile time, so the pipeline is recompiled once per epoch.

Pipelines are built only in :func:`image_pipeline` (FFCV issue #396: some orders of compiled and
uncompiled ops hang the Loader constructor); tests construct each one under a timeout.
FFCV is imported inside functions so the package imports without it.

Bad images were skipped when the ``.beton`` was written (``scripts/write_ffcv.py`` stores them with label
-1); they are filtered out here and reported by ``stats()``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import queue
from collections import deque

import numpy as np
import torch

from data.folder import DataConfigError
from data.loaders import Loaders, ResumableDistributedSampler, register_builder, sample_seed
from data.transforms import BatchFinisher, TrainSampleTransform, seeded

IMAGE_FIELD, LABEL_FIELD = "image", "label"


def require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError("FFCV data (data=*_ffcv, scripts/write_ffcv.py) needs the `ffcv` extra: "
                          "`make install` (or pip install --no-build-isolation -e '.[ffcv]' after "
                          "apt-get install pkg-config libturbojpeg0-dev libopencv-dev)") from e


@functools.cache
def _decoder_classes():
    """FFCV decoder subclasses, defined on first use so that importing this module never needs FFCV."""
    require_ffcv()
    from ffcv.fields.rgb_image import (
        IMAGE_MODES,
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        get_random_crop,
    )
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    jpg_mode = IMAGE_MODES["jpg"]

    def seeded_decoder_code(op, get_crop, seed_crops: bool):
        # FFCV's ResizedCropRGBImageDecoder loop plus a per-sample seed (splitmix64 of epoch seed, index).
        mem_read = op.memory_read
        my_range = Compiler.get_iterator()
        # Helpers are compiled once per decoder (one loader: its epochs never compile concurrently) and
        # reused by each epoch's recompiled loop. Not shared between loaders: two loader threads compiling
        # one dispatcher at once race inside numba; and dropping a dispatcher trips a numba finalizer bug.
        if getattr(op, "_helpers", None) is None:
            op._helpers = tuple(Compiler.compile(f) for f in (imdecode, resize_crop, get_crop))
        imdecode_c, resize_crop_c, get_crop_c = op._helpers
        scale = np.array(op.scale if op.scale is not None else (1.0, 1.0))
        ratio = np.array(op.ratio) if isinstance(op.ratio, tuple) else op.ratio
        base = np.uint64(op.epoch_seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                if seed_crops:
                    z = base + np.uint64(source_ix) * np.uint64(0x9E3779B97F4A7C15)
                    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                    np.random.seed(np.uint32((z ^ (z >> np.uint64(31))) >> np.uint64(33)))
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg_mode:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode

    class SeededRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
        """FFCV's RandomResizedCrop decoder with crops a function of (``epoch_seed``, sample index)."""

        epoch_seed = 0

        def generate_code(self):
            return seeded_decoder_code(self, get_random_crop, True)

    def full_image(height, width, _scale, _ratio):
        return 0, 0, height, width

    class SquashDecoder(CenterCropRGBImageDecoder):
        """Resize the whole image to (S, S): the official eval without TEST.CROP (384 fine-tunes)."""

        epoch_seed = 0

        def __init__(self, output_size):
            super().__init__(output_size, ratio=1.0)

        def generate_code(self):
            return seeded_decoder_code(self, full_image, False)

    return SeededRandomResizedCropDecoder, SquashDecoder


def image_pipeline(train: bool, img_size: int, aug_cfg=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> list:
    """The image field's ops. Decoder (compiled) then ToTensor (plain): no compiled op after a plain one."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.transforms import ToTensor

    seeded_rrc, squash = _decoder_classes()
    size = (int(img_size), int(img_size))
    if train:
        decoder = seeded_rrc(size, scale=tuple(scale), ratio=tuple(ratio))
    elif aug_cfg is None or aug_cfg.get("test_crop", True):
        decoder = CenterCropRGBImageDecoder(size, ratio=224 / 256)  # = resize 256/224*S, center crop S
    else:
        decoder = squash(size)
    return [decoder, ToTensor()]


def label_pipeline() -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    return [IntDecoder(), ToTensor()]


# Process-pool side of the per-sample stage. The transform and two shared-memory batch rings (uint8 crops in,
# finished float images out) are inherited at fork: tasks carry only (slot, range, seeds), because pushing
# 750 KB per image through the pool's pipes costs about as much as RandAugment itself.
_POOL: dict = {}
_RING_SLOTS = 3  # batches in flight in the pool (2) + one being copied out


def _pool_init(transform: TrainSampleTransform, finisher: BatchFinisher, ring_in: torch.Tensor,
               ring_out: torch.Tensor) -> None:
    _POOL.update(transform=transform, finisher=finisher, ring_in=ring_in, ring_out=ring_out)
    torch.set_num_threads(1)


def finish_sample(tf: TrainSampleTransform, finisher: BatchFinisher, arr: np.ndarray, seed: int,
                  preserve: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """(S, S, 3) uint8 FFCV crop -> flip, RandAugment, normalize, erasing -> (3, S, S) float32 (in ``out``)."""
    with seeded(seed, preserve=preserve):
        aug = tf.augment_array(arr)  # a new array: ``arr`` (a ring slot) is only read
    x = torch.from_numpy(aug).permute(2, 0, 1)  # (3, S, S) uint8 view
    return finisher.finish_one(x, seed, out=out, preserve=preserve)


def _augment_range(task: tuple[int, int, int, list[int]]) -> None:
    slot, lo, hi, seeds = task  # a pool process: its global RNGs are its own, no need to restore them
    ring_in, ring_out = _POOL["ring_in"], _POOL["ring_out"]
    for i, seed in zip(range(lo, hi), seeds):
        finish_sample(_POOL["transform"], _POOL["finisher"], ring_in[slot, i].numpy(), seed, preserve=False,
                      out=ring_out[slot, i])


def read_sidecar(path: str) -> dict:
    meta = path + ".json"
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f)
    return {}


class FFCVEpochLoader:
    """The :mod:`data.loaders` loader contract over an FFCV ``Loader`` (train or eval)."""

    def __init__(self, path: str, *, train: bool, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, img_size: int, aug_cfg=None, os_cache: bool = True, batches_ahead: int = 3):
        require_ffcv()
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder  # noqa: F401  (import check)
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.traversal_order.base import TraversalOrder

        self.path, self.train, self.batch_size, self.seed = path, train, batch_size, seed
        labels = Reader(path).metadata[f"f{self._label_field_index(path)}"]
        self.valid = np.flatnonzero(labels >= 0).astype(np.uint64)  # label -1: skipped at write time
        if not len(self.valid):
            raise DataConfigError(f"{path} holds no readable images (data.train_path / data.val_path)")
        self.skipped_at_write = int(len(labels) - len(self.valid))
        self.labels = labels
        self.sampler = ResumableDistributedSampler(len(self.valid), batch_size=batch_size, rank=rank,
                                                   world_size=world_size, seed=seed, shuffle=train, train=train)
        self.finisher = BatchFinisher(aug_cfg, train=train)
        self.sample_tf = TrainSampleTransform(aug_cfg, img_size) if train else None
        self.num_workers = int(num_workers)
        # Fork the augmentation pool before FFCV starts any thread in this process.
        self.pool = None
        if train and self.num_workers > 0:
            size = int(img_size)
            self.ring_in = torch.empty((_RING_SLOTS, batch_size, size, size, 3), dtype=torch.uint8).share_memory_()
            self.ring_out = torch.empty((_RING_SLOTS, batch_size, 3, size, size)).share_memory_()
            self.pool = mp.get_context("fork").Pool(self.num_workers, _pool_init, (
                self.sample_tf, self.finisher, self.ring_in, self.ring_out))

        class EpochOrder(TraversalOrder):
            order = np.arange(0, dtype=np.uint64)

            def sample_order(self, epoch):
                return EpochOrder.order

        self._order_cls = EpochOrder
        rrc = self.sample_tf.rrc if train else None
        pipelines = {
            # aug.scale=null (rrc None): training crops like evaluation (center-crop decoder), then augments.
            IMAGE_FIELD: image_pipeline(rrc is not None, img_size, aug_cfg, *((rrc.scale, rrc.ratio) if rrc else ())),
            LABEL_FIELD: label_pipeline(),
        }
        self.decoder = pipelines[IMAGE_FIELD][0]
        threads = torch.get_num_threads()
        self.loader = Loader(path, batch_size=batch_size, num_workers=max(self.num_workers, 1), os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=False,
                             batches_ahead=batches_ahead)
        torch.set_num_threads(threads)  # FFCV's Compiler.set_num_threads also sets torch's; undo that
        self.loader.traversal_order = EpochOrder(self.loader)
        self._compiled_epoch = None

    @staticmethod
    def _label_field_index(path: str) -> int:
        from ffcv.reader import Reader

        names = list(Reader(path).handlers)
        if IMAGE_FIELD not in names or LABEL_FIELD not in names:
            raise DataConfigError(f"{path}: expected fields {IMAGE_FIELD!r}, {LABEL_FIELD!r} (scripts/write_ffcv.py), "
                                  f"found {names}")
        return names.index(LABEL_FIELD)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def stats(self) -> dict[str, int]:
        # Nothing is skipped while reading: unreadable files were dropped by the writer (counted apart, so
        # that summing skipped_images over ranks and epochs stays a count of read-time skips).
        return {"skipped_images": 0, "skipped_at_write": self.skipped_at_write}

    def _augment(self, b: int, images: torch.Tensor, seeds: list[int]):
        """Start the per-sample stage for batch ``b``; returns what :meth:`_finish` needs."""
        n = images.shape[0]
        if self.pool is None:
            return [finish_sample(self.sample_tf, self.finisher, a, s, preserve=True) for a, s in
                    zip(images.numpy(), seeds)], None, n
        slot = b % _RING_SLOTS
        self.ring_in[slot, :n].copy_(images)  # (n, S, S, 3) uint8, FFCV's buffer is reused after this
        step = -(-n // self.num_workers)
        tasks = [(slot, lo, min(lo + step, n), seeds[lo:lo + step]) for lo in range(0, n, step)]
        return self.pool.map_async(_augment_range, tasks), slot, n

    def __iter__(self):
        pairs = list(self.sampler)  # [(position in self.valid, sample seed)] for this rank, from start_batch
        if not pairs:
            return
        self._order_cls.order = self.valid[np.array([p for p, _ in pairs], dtype=np.int64)]
        seeds = [s for _, s in pairs]
        epoch = self.sampler.epoch
        if self.train and self._compiled_epoch != epoch:
            # The crop seed is a compile-time constant of the decoder: recompile once per epoch.
            self.decoder.epoch_seed = sample_seed(self.seed, epoch, -1)
            self.loader.generate_code()
            self._compiled_epoch = epoch
        threads = torch.get_num_threads()
        it = iter(self.loader)
        pending: deque = deque()
        try:
            for b, (images, labels) in enumerate(_batches(it)):
                torch.set_num_threads(threads)
                batch_seeds = seeds[b * self.batch_size:(b + 1) * self.batch_size]
                labels = labels.view(-1).long().clone()  # FFCV reuses its buffers: copy out
                if not self.train:
                    x = images.permute(0, 3, 1, 2)  # (B, S, S, 3) uint8 view -> (B, 3, S, S)
                    yield self.finisher(x, batch_seeds).contiguous(), labels
                    continue
                pending.append((*self._augment(b, images, batch_seeds), labels))
                if len(pending) > 1:  # keep one batch in flight in the pool while the caller trains
                    yield self._finish(*pending.popleft())
            while pending:
                yield self._finish(*pending.popleft())
        finally:
            it.close()

    def _finish(self, result, slot, n, labels):
        if slot is None:
            return torch.stack(result), labels  # (B, 3, S, S) float32, finished inline
        result.get()  # re-raises a pool error here
        return self.ring_out[slot, :n].clone(), labels  # a copy: the slot is reused two batches later

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def __del__(self):
        self.close()


def _batches(it):
    """FFCV's ``EpochIterator.__next__``, but an exception in its worker thread raises instead of hanging.

    FFCV's thread dies silently on an error (e.g. in numba compilation) and ``__next__`` then waits forever.
    """
    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
        except queue.Empty:
            if not it.is_alive():
                raise RuntimeError(f"FFCV's loader thread for {it.loader.fname} died; see its traceback above") from None
            continue
        if item is None:
            it.close()
            return
        slot, result = item
        if torch.cuda.is_available() and getattr(it, "cuda_streams", None):
            it.current_stream.wait_stream(it.cuda_streams[slot])  # as FFCV does: the copy must be done
        yield result


def _beton_path(data_cfg, key: str) -> str:
    value = data_cfg.get(key)
    if not value:
        raise DataConfigError(f"data.{key} is not set: the path of the .beton file (scripts/write_ffcv.py)")
    path = os.path.expanduser(str(value))
    if not os.path.isabs(path) and data_cfg.get("root"):
        path = os.path.join(os.path.expanduser(str(data_cfg.root)), path)
    if not os.path.isfile(path):
        raise DataConfigError(f"data.{key}={value}: no such file {path} (write it with scripts/write_ffcv.py)")
    return path


@register_builder("imagenet1k_ffcv")
@register_builder("imagenet22k_ffcv")
@register_builder("ffcv")
def build_ffcv(data_cfg, aug_cfg=None, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> Loaders:
    require_ffcv()
    train_path, val_path = _beton_path(data_cfg, "train_path"), _beton_path(data_cfg, "val_path")
    num_classes = int(data_cfg.num_classes)
    common = dict(batch_size=int(data_cfg.batch_size), rank=rank, world_size=world_size, seed=seed,
                  num_workers=int(data_cfg.get("num_workers", 0)), img_size=int(data_cfg.img_size),
                  aug_cfg=aug_cfg, os_cache=bool(data_cfg.get("os_cache", True)),
                  batches_ahead=int(data_cfg.get("batches_ahead", 3)))
    loaders = {}
    for split, path in (("train", train_path), ("val", val_path)):
        meta = read_sidecar(path)
        if meta.get("num_classes") is not None and int(meta["num_classes"]) != num_classes:
            raise DataConfigError(f"data.{split}_path={path} was written with {meta['num_classes']} classes but "
                                  f"data.num_classes={num_classes} (model.num_classes defaults to it)")
        loaders[split] = FFCVEpochLoader(path, train=split == "train", **common)
        top = int(loaders[split].labels.max())
        if top >= num_classes:
            raise DataConfigError(f"data.{split}_path={path} has label {top} >= data.num_classes={num_classes}")
    return Loaders(train=loaders["train"], val=loaders["val"], num_classes=num_classes,
                   info={"train_size": len(loaders["train"].valid), "val_size": len(loaders["val"].valid),
                         "skipped_at_write": loaders["train"].skipped_at_write})
