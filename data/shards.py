"""``data=wds``, ``data=imagenet1k_wds``, ``data=imagenet22k_wds``: webdataset tar shards on a local disk, a
shared file system or an object store.

What ``scripts/write_shards.py`` writes for each split S (``train``, ``val``) into ``data.root``:

    S-000000.tar ...  webdataset shards: per sample ``<key>.<jpg|png|...>`` (the original image bytes) and
                      ``<key>.cls`` (its label in our order, ASCII); samples in a fixed random order
    S.json            the shard list in wids's index format (``wids-shard-index-v1``) plus our metadata
    S.idx.npy         per sample: the byte offset and size of its image inside its shard, and its label
    _info.json        the split description timm's ``wds/`` reader uses

``data.mode=indexed`` (default): the index gives random access to every sample, so this path keeps the
folder path's guarantees. The epoch order is a :class:`~focalnet.data.loaders.ResumableDistributedSampler` (every
sample once per epoch across ranks, exact resume at any batch); images go through the folder path's
transforms (the same bytes give the same pixels) and unreadable ones are skipped, counted and replaced by
the next sample. ``data.shuffle`` chooses the order:

* ``global``: a permutation of the whole split, as the folder path; for local disks and shared file
  systems, where any sample is one ``pread`` away;
* ``shards``: a permutation that visits the shards in random order, ``data.shuffle_window`` at a time,
  shuffling the samples within each window, and gives each rank its own run of shards; for object
  stores, where a shard is fetched whole into ``data.cache_dir`` before its samples are read, so each
  node downloads about its share of the data per epoch instead of a shard per sample;
* ``auto`` (default): ``global`` for a local ``data.root``, ``shards`` for a URL.

``data.mode=streaming`` reads shards front to back through webdataset's own pipeline with a shuffle
buffer and needs no index (:mod:`focalnet.data.shards_streaming`).

Remote roots: ``https://``/``http://`` (webdataset runs ``curl``), ``s3://`` (the ``aws`` CLI; registered here
as webdataset's ``s3`` URL scheme) and ``gs://`` (``gsutil``), or any scheme through webdataset's
``GOPEN_REWRITE`` (e.g. ``s3://=pipe:s5cmd cat s3://``). Credentials come from the tools' environment
(``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``~/.netrc``) and are never logged: every URL we log has its
user, password and query string removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from focalnet.data.file_index import exclusive_lock
from focalnet.data.folder import DataConfigError, ImageFileDataset, make_loaders
from focalnet.data.loaders import Loaders, ResumableDistributedSampler
from focalnet.data.transforms import BadImage, open_image
from focalnet.schema import AugConfig, ShardData

log = logging.getLogger(__name__)

SAMPLE_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u4"), ("label", "<i4")])
INDEX_KIND = "wids-shard-index-v1"


# ------------------------------------------------------------------------------------------------ URLs
def is_remote(path: str) -> bool:
    """A URL that is not a local file (``file://`` and plain paths are local)."""
    scheme = urlsplit(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


def local_path(path: str) -> str:
    return os.path.expanduser(str(path)[len("file://"):] if str(path).startswith("file://") else str(path))


def join(root: str, name: str) -> str:
    """``name`` (relative, or itself a URL/absolute path) inside ``root``."""
    if is_remote(name) or os.path.isabs(name):
        return name
    return root.rstrip("/") + "/" + name if is_remote(root) else os.path.join(local_path(root), name)


def redact(text: str) -> str:
    """``text`` with the user, password and query string of every URL in it removed: safe to log."""
    def clean(m: re.Match) -> str:
        parts = urlsplit(m.group(0))
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+", clean, str(text))


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    """webdataset URL handler for ``s3://``: the AWS CLI streams the object (credentials from its environment;
    ``AWS_ENDPOINT_URL`` for S3-compatible stores)."""
    from webdataset.gopen import gopen_pipe

    if mode[0] != "r":
        raise ValueError(f"{redact(url)}: only reading is supported")
    return gopen_pipe(f"pipe:aws s3 cp --only-show-errors {shlex.quote(url)} -", mode, bufsize)


def register_url_schemes() -> None:
    """Add ``s3://`` to webdataset's URL schemes (unless a handler is there already) in this process."""
    import webdataset

    webdataset.gopen_schemes.setdefault("s3", _gopen_s3)


def gopen(url: str, mode: str = "rb"):
    """Open a local path or URL with webdataset's ``gopen`` (curl, gsutil, pipes; ``s3://`` added here)."""
    import webdataset

    register_url_schemes()
    return webdataset.gopen(url, mode)


class ShardFetchError(OSError):
    """A shard or index could not be read from its URL (after the transfer tool's own retries)."""


def fetch(url: str, dest: str, expected_size: int | None = None) -> str:
    """Download ``url`` to ``dest`` atomically (a complete file or none), once for all processes of a node."""
    if _complete(dest, expected_size):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with exclusive_lock(dest + ".lock"):
        if _complete(dest, expected_size):  # another process fetched it while we waited
            return dest
        tmp = f"{dest}.tmp.{os.getpid()}"
        started = time.perf_counter()
        try:
            with gopen(url) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            size = os.path.getsize(tmp)
            if expected_size is not None and size != expected_size:
                raise ShardFetchError(f"got {size} bytes, the index says {expected_size} (an interrupted transfer?)")
            os.replace(tmp, dest)
        except Exception as e:
            raise ShardFetchError(f"could not fetch {redact(url)}: {redact(e)}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.debug("fetched %s (%.0f MB, %.1f s)", redact(url), os.path.getsize(dest) / 1e6,
                  time.perf_counter() - started)
    return dest


def _complete(path: str, expected_size: int | None) -> bool:
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    return expected_size is None or size == expected_size


def read_text(url: str) -> str:
    with gopen(url) as f:
        return f.read().decode()


# ------------------------------------------------------------------------------------------------ the index
def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


@dataclass
class ShardIndex:
    """One split's shards (``urls``, ``filesizes``), sample ranges (``starts``) and per-sample records."""

    root: str
    split: str
    urls: list[str]
    filesizes: list[int]
    starts: np.ndarray        # (K + 1,) int64: shard k holds samples starts[k]:starts[k + 1]
    samples: np.ndarray       # (N,) SAMPLE_DTYPE (memory-mapped)
    meta: dict

    @property
    def names(self) -> list[str]:
        return [redact(u).rsplit("/", 1)[-1] for u in self.urls]

    @classmethod
    def load(cls, root: str, split: str, cache_dir: str | None) -> ShardIndex:
        """Read ``<root>/<split>.json`` and its ``.idx.npy`` (fetched into ``cache_dir`` when ``root`` is a URL)."""
        spec_url = join(root, f"{split}.json")
        try:
            spec = json.loads(read_text(spec_url))
        except FileNotFoundError:
            raise DataConfigError(f"data.root={redact(root)}: no {split}.json (write the shards with "
                                  f"scripts/write_shards.py; an unfinished write has no index yet)") from None
        except (OSError, ValueError) as e:
            raise DataConfigError(f"data.root={redact(root)}: cannot read {split}.json ({redact(e)})") from None
        ours = spec.get("focalnet") or {}
        if spec.get("__kind__") != INDEX_KIND or "sample_index" not in ours:
            raise DataConfigError(f"{redact(spec_url)} is not a shard index written by scripts/write_shards.py "
                                  "(for other webdataset shards use data.mode=streaming)")
        shards = spec["shardlist"]
        starts = np.zeros(len(shards) + 1, np.int64)
        np.cumsum([int(s["nsamples"]) for s in shards], out=starts[1:])
        idx_url = join(root, ours["sample_index"])
        if is_remote(root):
            # Content-addressed: a rewritten dataset gets a new file, an unchanged one is not fetched again.
            idx_path = fetch(idx_url, os.path.join(cache_dir, "index", f"{ours['sample_index_sha256']}.npy"),
                             int(ours["sample_index_bytes"]))
        else:
            idx_path = local_path(idx_url)
        try:
            samples = np.load(idx_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataConfigError(f"data.root={redact(root)}: cannot read {ours['sample_index']} ({e})") from None
        if samples.dtype != SAMPLE_DTYPE or len(samples) != starts[-1]:
            raise DataConfigError(f"{redact(idx_url)}: {len(samples)} records of {samples.dtype}, expected "
                                  f"{int(starts[-1])} of {SAMPLE_DTYPE} ({split}.json and the index disagree)")
        return cls(root, split, [join(root, s["url"]) for s in shards], [int(s["filesize"]) for s in shards],
                   starts, samples, ours)


class ShardReader:
    """Reads byte ranges of shards: one ``pread`` on a local file (kept open, up to ``max_open``); a remote shard
    is first fetched whole into ``cache_dir`` (see :func:`fetch`), where at most ``cache_limit`` bytes are kept."""

    def __init__(self, index: ShardIndex, cache_dir: str | None, cache_limit: int | None = None, max_open: int = 64):
        self.urls, self.filesizes, self.names = index.urls, index.filesizes, index.names
        self.remote = is_remote(index.root)
        self.cache_dir, self.cache_limit, self.max_open = cache_dir, cache_limit, max_open
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self):  # open files stay with their process
        return {**self.__dict__, "_fds": OrderedDict()}

    def read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise BadImage(f"{self.names[shard]} ends before byte {offset + size} (a truncated shard?)")
        return data

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self._local(shard)
        fd = os.open(path, os.O_RDONLY)
        self._fds[shard] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _local(self, shard: int) -> str:
        if not self.remote:
            return local_path(self.urls[shard])
        path = fetch(self.urls[shard], os.path.join(self.cache_dir, self.names[shard]), self.filesizes[shard])
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently opened shards are evicted first
        if self.cache_limit:
            evict(self.cache_dir, self.cache_limit, keep=path)
        return path

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def evict(cache_dir: str, limit: int, keep: str) -> None:
    """Delete the least recently opened shards of ``cache_dir`` until its shards take at most ``limit`` bytes.
    A process still reading a deleted shard keeps its open file; a later reader fetches it again."""
    shards = []
    with contextlib.suppress(OSError):
        for e in os.scandir(cache_dir):
            if e.name.endswith(".tar") and e.is_file():
                with contextlib.suppress(OSError):
                    st = e.stat()
                    shards.append((st.st_mtime, st.st_size, e.path))
    total = sum(s for _, s, _ in shards)
    for _, size, path in sorted(shards):
        if total <= limit:
            break
        if path != keep:
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size


class ShardRef(NamedTuple):
    """Where one sample's image is: ``size`` bytes at ``offset`` of shard number ``shard``."""

    shard: int
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (bytes {self.offset}..{self.offset + self.size})"


class ShardSamples(Sequence):
    """``(ShardRef, label)`` per sample of a :class:`ShardIndex`, in index order, and the reader of their bytes."""

    def __init__(self, index: ShardIndex, reader: ShardReader):
        self.starts, self.records, self.names, self.reader = index.starts, index.samples, index.names, reader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if not 0 <= i < len(self.records):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        r = self.records[i]
        return ShardRef(k, int(r["offset"]), int(r["size"]), self.names[k]), int(r["label"])


class ShardDataset(ImageFileDataset):
    """:class:`~focalnet.data.folder.ImageFileDataset` whose samples are byte ranges of shards (:class:`ShardSamples`)."""

    def open(self, ref: ShardRef):
        limit = self.limits.get("max_file_bytes")
        if limit and ref.size > limit:  # refused unread, as the folder path refuses such a file
            raise BadImage(f"image of {ref.size / 2**20:.0f} MiB is over data.max_file_mb={limit >> 20} (not read)")
        return open_image(self.samples.reader.read(ref.shard, ref.offset, ref.size), **self.limits)


# ------------------------------------------------------------------------------------------------ order
class ShardLocalSampler(ResumableDistributedSampler):
    """An exact, resumable epoch order that reads shards a few at a time (``data.shuffle=shards``).

    Per epoch (a function of seed and epoch only): the shards are permuted, the samples of every
    ``window`` consecutive shards of that permutation are shuffled together, and each rank takes a
    contiguous run of the result (train: padded and cut like the base class, so every rank has the same
    number of full batches; eval: exactly its share, nothing padded). So every sample is seen once per epoch
    across ranks, and at any moment a rank reads from about ``window`` shards.
    """

    def __init__(self, size: int, *, starts: np.ndarray, window: int, **kwargs):
        super().__init__(size, **kwargs)
        self.starts, self.window = np.asarray(starts, np.int64), max(int(window), 1)

    @classmethod
    def for_dataset(cls, dataset, **kwargs) -> ShardLocalSampler:
        return cls(len(dataset), starts=dataset.samples.starts, **kwargs)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        shards = torch.randperm(len(self.starts) - 1, generator=g).numpy()
        order = np.concatenate([np.arange(self.starts[k], self.starts[k + 1]) for k in shards])
        ends = np.cumsum((self.starts[1:] - self.starts[:-1])[shards])  # where each visited shard ends
        cuts = [0, *ends[self.window - 1::self.window].tolist()]
        if cuts[-1] != len(order):
            cuts.append(len(order))
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # shuffle within each window of shards
            order[lo:hi] = order[lo:hi][torch.randperm(hi - lo, generator=g).numpy()]
        return order

    def _indices(self) -> list[int]:
        order = self._order()
        if not self.train:
            counts = [len(range(r, self.size, self.world_size)) for r in range(self.world_size)]
            lo = sum(counts[:self.rank])
            return order[lo:lo + counts[self.rank]].tolist()
        per_rank = -(-self.size // self.world_size)
        total = per_rank * self.world_size
        order = np.resize(order, total)  # pads by repeating from the start, as the base class does
        return order[self.rank * per_rank:(self.rank + 1) * per_rank][: self.num_batches() * self.batch_size].tolist()


# ------------------------------------------------------------------------------------------------ builder
def written_num_classes(root: str | None, split: str = "train") -> int:
    """OmegaConf resolver ``${shards_num_classes:${data.root},${data.train_split}}`` for ``data=wds``."""
    if not root:
        raise DataConfigError("data.root is not set: data=wds reads data.num_classes from the shards' index there")
    try:
        return int(json.loads(read_text(join(str(root), f"{split}.json")))["focalnet"]["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataConfigError(f"data.root={redact(root)}: cannot read data.num_classes from {split}.json ({redact(e)}); "
                              "set data.num_classes=N") from None


def cache_dir_for(data_cfg: ShardData) -> str:
    """``data.cache_dir``, or ``${FOCALNET_CACHE:-~/.cache/focalnet}/shards/<hash of the root URL>``."""
    if data_cfg.cache_dir:
        return os.path.expanduser(str(data_cfg.cache_dir))
    base = os.path.expanduser(os.environ.get("FOCALNET_CACHE") or "~/.cache/focalnet")
    return os.path.join(base, "shards", hashlib.sha256(redact(str(data_cfg.root)).encode()).hexdigest()[:16])


def shard_root(data_cfg: ShardData) -> str:
    root = data_cfg.root
    if not root:
        raise DataConfigError(f"data.root is not set for data={data_cfg.name}: pass data.root=DIR or a URL "
                              "(the --out of scripts/write_shards.py)")
    root = str(root)
    if not is_remote(root) and not os.path.isdir(local_path(root)):
        raise DataConfigError(f"data.root={root}: no such directory")
    return root


def resolve_shuffle(data_cfg: ShardData, root: str) -> str:
    shuffle = data_cfg.shuffle  # auto, global or shards (focalnet.schema.ShardData)
    if shuffle == "auto":
        shuffle = "shards" if is_remote(root) else "global"
    return shuffle


def build_shards(data_cfg: ShardData, aug_cfg: AugConfig, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, pin_memory: bool = False) -> Loaders:
    """The builder of ``data=wds|imagenet1k_wds|imagenet22k_wds`` (``focalnet.data.build_loaders``)."""
    if data_cfg.mode == "streaming":
        from focalnet.data.shards_streaming import build_streaming

        return build_streaming(data_cfg, aug_cfg, rank=rank, world_size=world_size, seed=seed, pin_memory=pin_memory)
    root = shard_root(data_cfg)
    cache_dir = cache_dir_for(data_cfg) if is_remote(root) else None
    limit = data_cfg.cache_limit_gb
    num_classes = data_cfg.num_classes
    splits = {}
    for split_key in ("train_split", "val_split"):
        index = ShardIndex.load(root, getattr(data_cfg, split_key), cache_dir)
        written = index.meta.get("num_classes")
        if written is not None and int(written) != num_classes:
            raise DataConfigError(f"data.{split_key}: {index.split}.json was written with {written} classes but "
                                  f"data.num_classes={num_classes} (model.num_classes defaults to it)")
        if len(index.samples) == 0:
            raise DataConfigError(f"data.{split_key}: {index.split}.json lists no samples")
        top = int(index.samples["label"].max())
        if top >= num_classes or int(index.samples["label"].min()) < 0:
            raise DataConfigError(f"data.{split_key}: label {top} outside [0, data.num_classes={num_classes})")
        splits[split_key] = index
    limit = int(float(limit) * 1e9) if limit else None
    train, val = (ShardSamples(ix, ShardReader(ix, cache_dir, limit)) for ix in splits.values())
    shuffle = resolve_shuffle(data_cfg, root)
    sampler = (functools.partial(ShardLocalSampler.for_dataset, window=data_cfg.shuffle_window)
               if shuffle == "shards" else ResumableDistributedSampler.for_dataset)
    log.info("data=%s: %s, %d + %d samples in %d + %d shards, shuffle=%s%s", data_cfg.name, redact(root),
             len(train), len(val), len(train.starts) - 1, len(val.starts) - 1, shuffle,
             f", cache {cache_dir}" if cache_dir else "")
    return make_loaders(train, val, num_classes, data_cfg, aug_cfg, rank=rank, world_size=world_size, seed=seed,
                        pin_memory=pin_memory, dataset=ShardDataset, sampler=sampler,
                        info={"skipped_at_write": int(splits["train_split"].meta.get("skipped", 0))})
