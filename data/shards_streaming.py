"""``data.mode=streaming``: webdataset shards read front to back through webdataset's pipeline, with a shuffle
buffer instead of an index.

The shard list is ``<root>/<split>.json`` (our index without its per-sample part) or a brace pattern / list of
URLs in ``data.train_split`` / ``data.val_split`` (any webdataset shards whose samples have an image and a
``.cls`` label; then ``data.train_size`` / ``data.val_size`` give the sample counts). Any URL webdataset
opens works, ``pipe:`` commands included.

Guarantees, which are weaker than the indexed mode's (README "22K at scale"):

* Training: each epoch the shards are shuffled (seed, epoch) and dealt to ranks and loader workers; each
  worker streams its shards through a shuffle buffer of ``data.shuffle_buffer`` samples. Every rank
  yields ``(N // world_size) // batch_size`` batches, so a worker whose shards run out starts over on them
  and one with more stops early: when shard sizes do not divide evenly, some samples are seen twice in an
  epoch and others not at all. Mixing is limited to the buffer.
* Resume: exact for the same world size and ``data.num_workers`` (the streams are deterministic; a resumed
  epoch re-reads, without decoding, what came before its batch).
* Validation: every shard is read by exactly one worker, so every sample exactly once.
* Bad samples are skipped and counted; in training the worker's previous good sample takes the place of one
  (so batches stay full and a resume can count samples without decoding them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import random

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from focalnet.data.folder import DataConfigError, file_limits
from focalnet.data.loaders import DeviceLoader, Loaders, handover_collate, sample_seed
from focalnet.data.shards import is_remote, join, read_text, redact, register_url_schemes, shard_root
from focalnet.data.transforms import (
    BadImage,
    BatchFinisher,
    EvalSampleTransform,
    TrainSampleTransform,
    open_image,
    seeded,
)
from focalnet.schema import AugConfig, ShardData

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif", "ppm", "gif")


def shard_list(data_cfg: ShardData, split_key: str) -> tuple[list[str], int]:
    """(shard URLs, samples) of a split: from its ``<split>.json`` or a brace pattern plus ``data.<split>_size``."""
    import braceexpand

    split = getattr(data_cfg, split_key)
    name = split_key.removesuffix("_split")
    root = data_cfg.root
    if "{" in split or split.endswith(".tar") or "," in split:
        urls = [u for part in split.split(",") for u in braceexpand.braceexpand(part.strip())]
        urls = [join(str(root), u) for u in urls] if root else urls
        size = getattr(data_cfg, f"{name}_size")
        if not size:
            raise DataConfigError(f"data.{split_key} is a shard pattern: set data.{name}_size to its number of samples")
        return urls, int(size)
    root = shard_root(data_cfg)
    try:
        spec = json.loads(read_text(join(root, f"{split}.json")))
    except (OSError, ValueError) as e:
        raise DataConfigError(f"data.root={redact(root)}: cannot read {split}.json ({redact(e)}); write it with "
                              f"scripts/write_shards.py or give data.{split_key} as a shard pattern") from None
    return [join(root, s["url"]) for s in spec["shardlist"]], sum(int(s["nsamples"]) for s in spec["shardlist"])


class StreamingShards(IterableDataset):
    """The samples of one rank's loader workers for one epoch, as ``(uint8 image, label, seed)``."""

    def __init__(self, urls: list[str], size: int, transform, *, train: bool, batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int, shuffle_buffer: int, num_classes: int, name: str,
                 limits: dict | None = None):
        self.urls, self.size, self.transform, self.train, self.name = urls, size, transform, train, name
        self.limits = limits or {}  # open_image's max_file_bytes / max_pixels (focalnet.data.folder.file_limits)
        self.num_classes = num_classes
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers, self.shuffle_buffer = max(num_workers, 1), shuffle_buffer
        self.epoch, self.start_batch = 0, 0
        self._skipped = mp.get_context().Value("q", 0)

    def num_batches(self) -> int:
        """Batches per rank and epoch: training drops a last partial batch; validation keeps it (an estimate
        on several ranks, whose shares follow the shards they read)."""
        if self.train:
            return max((self.size // self.world_size) // self.batch_size, 1)
        return max(math.ceil(self.size / self.world_size / self.batch_size), 1)

    def _my_shards(self, worker: int) -> list[str]:
        order = list(self.urls)
        if self.train:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        g, n = self.rank * self.workers + worker, self.world_size * self.workers
        if self.train and len(order) < n:  # every worker needs data: some read the same shard
            return [order[g % len(order)]]
        return order[g::n]

    def _count_skip(self, what: str, error) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
        log.warning("%s: skipping unreadable sample %s (%s)", self.name, redact(what), redact(error))

    def _raw(self, worker: int):
        """The worker's raw samples (dicts of bytes) in stream order; training cycles and shuffles."""
        import webdataset as wds

        def on_error(exn) -> bool:
            self._count_skip("in a shard", exn)
            return True

        shards = self._my_shards(worker)
        rounds = 0
        while shards:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:{rounds}")
            order = list(shards)
            if self.train:
                rng.shuffle(order)
            stream = wds.tarfile_to_samples(handler=on_error)(iter([{"url": u} for u in order]))
            if self.train:
                stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
            yield from stream
            if not self.train:
                return
            rounds += 1

    def __iter__(self):
        register_url_schemes()  # in this (worker) process
        info = get_worker_info()
        j = info.id if info is not None else 0
        if not self.train:
            for raw in self._raw(j):
                out = self._decode(raw)
                if out is not None:
                    yield out
            return
        # DataLoader worker j hands out batches start_batch + j, + W, ...: in the uninterrupted epoch those were
        # worker (start_batch + j) % W's, which first produced the batches before start_batch. Every raw sample
        # makes one output (a bad one is replaced by the worker's previous good output), so the samples before
        # the resume point are counted, not decoded.
        nb, w = self.num_batches(), self.workers
        worker = (self.start_batch + j) % w
        skip = len(range(worker, self.start_batch, w)) * self.batch_size
        end = skip + len(range(self.start_batch + j, nb, w)) * self.batch_size
        count, previous = 0, None
        for raw in self._raw(worker):
            if count >= end:
                return
            if count < skip and previous is not None:
                count += 1
                continue
            out = self._decode(raw)
            if out is None and previous is None:
                continue  # nothing to stand in for it yet: the next sample takes its place
            previous = out = out if out is not None else previous
            count += 1
            if count > skip:
                yield out

    def _decode(self, raw: dict):
        image = next((raw[k] for k in IMAGE_EXTENSIONS if k in raw), None)
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        if image is None or "cls" not in raw:
            self._count_skip(where, "no image or no .cls")
            return None
        label = int(raw["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{redact(where)}: label {label} outside [0, data.num_classes={self.num_classes})")
        seed = sample_seed(self.seed, self.epoch, hash_key(raw.get("__key__", "")))
        try:
            with seeded(seed, preserve=get_worker_info() is None):
                return self.transform(open_image(image, **self.limits)), label, seed
        except BadImage as e:
            self._count_skip(where, e)
            return None

    def stats(self) -> dict[str, int]:
        return {"skipped_images": int(self._skipped.value)}


def hash_key(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class StreamingLoader:
    """The loader contract (``set_epoch``, ``len``, ``handover``, ``finisher``, ``stats``) over a
    :class:`StreamingShards` stream: uint8 batches handed over as the folder path's (:mod:`focalnet.data.loaders`)."""

    def __init__(self, dataset: StreamingShards, finisher: BatchFinisher, num_workers: int, pin_memory: bool = False):
        self.dataset, self.num_workers, self.finisher, self.pin_memory = dataset, num_workers, finisher, pin_memory

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.dataset.epoch, self.dataset.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def handover(self):
        # Workers start afresh each epoch (never persistent): they must see this epoch's set_epoch.
        loader = DataLoader(self.dataset, batch_size=self.dataset.batch_size, num_workers=self.num_workers,
                            collate_fn=handover_collate, pin_memory=self.pin_memory, persistent_workers=False,
                            # a private generator: starting workers must not draw from the global torch RNG
                            generator=torch.Generator().manual_seed(self.dataset.seed))
        return iter(loader)

    def __iter__(self):
        return iter(DeviceLoader(self, "cpu"))

    def stats(self) -> dict[str, int]:
        return self.dataset.stats()


def build_streaming(data_cfg: ShardData, aug_cfg: AugConfig, *, rank: int = 0, world_size: int = 1,
                    seed: int = 0, pin_memory: bool = False) -> Loaders:
    size = data_cfg.img_size
    workers, batch = data_cfg.num_workers, data_cfg.batch_size
    loaders, sizes, limits = {}, {}, file_limits(data_cfg)
    for split_key, train in (("train_split", True), ("val_split", False)):
        urls, n = shard_list(data_cfg, split_key)
        transform = (TrainSampleTransform(aug_cfg, size, jpeg_draft=getattr(data_cfg, "jpeg_draft", False)) if train
                     else EvalSampleTransform(size, aug_cfg.test_crop, aug_cfg.interpolation))
        ds = StreamingShards(urls, n, transform, train=train, batch_size=batch, rank=rank, world_size=world_size,
                             seed=seed, num_workers=workers, shuffle_buffer=data_cfg.shuffle_buffer,
                             num_classes=data_cfg.num_classes, name=f"{data_cfg.name}/{split_key.removesuffix('_split')}",
                             limits=limits)
        finisher = BatchFinisher(aug_cfg, train=train)
        loaders[split_key], sizes[split_key] = StreamingLoader(ds, finisher, workers, pin_memory), n
        if train and len(urls) < world_size * max(workers, 1):
            log.warning("data.%s: %d shards for %d ranks x %d workers: some read the same shard in an epoch",
                        split_key, len(urls), world_size, max(workers, 1))
    log.info("data=%s streaming: %d + %d samples, remote=%s", data_cfg.name, sizes["train_split"], sizes["val_split"],
             is_remote(data_cfg.root or ""))
    return Loaders(train=loaders["train_split"], val=loaders["val_split"], num_classes=data_cfg.num_classes,
                   info={"train_size": sizes["train_split"], "val_size": sizes["val_split"]})
