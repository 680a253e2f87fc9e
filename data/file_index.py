"""The image files of a folder split, listed once and cached, so that start-up does not scan millions of files.

ImageNet-22K as folders is 14.2M files in 21,841 class directories. Listing them costs one ``scandir`` entry
per file, on every rank of every node at every launch: minutes to hours on a parallel file system, and a
load on its metadata servers that other jobs feel. Here the list is built once and cached:

* **Where.** ``<split dir>/.focalnet_filelist`` (under ``data.root``) when that directory is writable, else
  ``${FOCALNET_CACHE:-~/.cache/focalnet}/filelists/<hash of the split path>.filelist``. Names are stored
  relative to the split directory, so a copied or moved tree keeps its cache.
* **Identity.** Adding, removing or renaming a file changes its directory's mtime, so a launch compares the
  class folders' ``(mtime, inode)`` with the cached ones (21,841 ``stat`` calls instead of 14.2M entries) and
  rescans only the folders that differ (and new ones). File timestamps are coarse (a jiffy, a second on some
  network file systems): a folder modified less than ``RACY_SECONDS`` before it was listed is rescanned at the
  next launch, so a file added in the same tick as the listing is not missed.
* **Who.** Under ``torch.distributed`` rank 0 checks or builds the list and the other ranks read the file it
  names (a node that cannot see it, e.g. a node-local cache directory, builds its own). Between processes
  that share no process group (several jobs, later launches) an exclusive file lock makes the first one
  build while the others wait and then read.
* **Format.** One file: a JSON header (classes, folder identities) and flat arrays (names as one UTF-8
  blob with offsets), memory-mapped on load: no pickle, and every rank and loader worker of a node shares
  the same page-cache pages instead of holding 14.2M Python strings each.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"FNFLIST1"
RACY_SECONDS = 2.0
IN_TREE_NAME = ".focalnet_filelist"
# Rank 0's first listing of 14.2M files on a busy parallel file system can take longer than the process
# group's default timeout; the other ranks wait for it on a group of their own.
LISTING_TIMEOUT = datetime.timedelta(hours=int(os.environ.get("FOCALNET_LISTING_TIMEOUT_H", "6")))
_ALIGN = 64


class FileList:
    """The image files of one split: ``classes`` (sorted folder names) and, per class, its sorted files.

    File ``i`` is ``names[name_offsets[i]:name_offsets[i + 1]]`` (UTF-8) inside folder ``classes[c]``, with
    ``class_starts[c] <= i < class_starts[c + 1]``.
    """

    def __init__(self, split_dir: str, classes: list[str], class_starts: np.ndarray, names: np.ndarray,
                 name_offsets: np.ndarray, identities: list[list[int]], extensions: Sequence[str],
                 source: str | None = None):
        self.split_dir, self.classes = split_dir, classes
        self.class_starts, self.names, self.name_offsets = class_starts, names, name_offsets
        self.identities, self.extensions, self.source = identities, tuple(extensions), source

    def __len__(self) -> int:
        return int(self.class_starts[-1])

    def class_of(self, i: int) -> int:
        return int(np.searchsorted(self.class_starts, i, side="right")) - 1

    def name(self, i: int) -> str:
        return self.names[self.name_offsets[i]:self.name_offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> str:
        return os.path.join(self.split_dir, self.classes[self.class_of(i)], self.name(i))

    def class_files(self, c: int) -> list[str]:
        lo, hi = self.class_starts[c], self.class_starts[c + 1]
        blob = self.names[self.name_offsets[lo]:self.name_offsets[hi]].tobytes()
        cuts = (self.name_offsets[lo:hi + 1] - self.name_offsets[lo]).tolist()
        return [blob[a:b].decode() for a, b in zip(cuts[:-1], cuts[1:])]

    def samples(self, class_labels: Sequence[int]) -> FileSamples:
        return FileSamples(self, np.asarray(class_labels, dtype=np.int64))

    # -- the file format ------------------------------------------------------------------------------
    def write(self, path: str) -> None:
        """Write atomically (a temporary file renamed over ``path``): readers see the old or the new list."""
        arrays = {"class_starts": self.class_starts, "names": self.names, "name_offsets": self.name_offsets}
        layout, offset = {}, 0
        for key, a in arrays.items():
            layout[key] = [offset, a.dtype.str, len(a)]
            offset += -(-a.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"version": 1, "split_dir": self.split_dir, "classes": self.classes,
                             "identities": self.identities, "extensions": list(self.extensions),
                             "arrays": layout}).encode()
        start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
        tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                for key, a in arrays.items():
                    f.seek(start + layout[key][0])
                    f.write(np.ascontiguousarray(a).tobytes())
                f.truncate(start + offset)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @classmethod
    def read(cls, path: str, split_dir: str) -> FileList:
        """Memory-map a list written by :meth:`write`; ``split_dir`` is where its relative names live now."""
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise ValueError(f"{path}: not a file list")
            size = int.from_bytes(head[len(MAGIC):], "little")
            header = json.loads(f.read(size))
        start = -(-(len(MAGIC) + 8 + size) // _ALIGN) * _ALIGN
        arrays = {}
        for key, (offset, dtype, n) in header["arrays"].items():
            arrays[key] = (np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=start + offset, shape=(n,))
                           if n else np.zeros(0, np.dtype(dtype)))
        return cls(split_dir, header["classes"], arrays["class_starts"], arrays["names"], arrays["name_offsets"],
                   header["identities"], header["extensions"], source=path)


class FileSamples(Sequence):
    """``(path, label)`` samples of a :class:`FileList` (optionally a subset), without a Python object per
    file: indexing builds the one path asked for."""

    def __init__(self, files: FileList, class_labels: np.ndarray, indices: np.ndarray | None = None):
        self.files, self.class_labels, self.indices = files, class_labels, indices

    def __len__(self) -> int:
        return len(self.files) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = int(i if self.indices is None else self.indices[i])
        c = self.files.class_of(j)
        return (os.path.join(self.files.split_dir, self.files.classes[c], self.files.name(j)),
                int(self.class_labels[c]))

    def labels(self) -> np.ndarray:
        """Every sample's label, in order."""
        counts = np.diff(np.asarray(self.files.class_starts))
        per_file = np.repeat(self.class_labels, counts)
        return per_file if self.indices is None else per_file[self.indices]

    def subset(self, positions: np.ndarray) -> FileSamples:
        """The samples at ``positions`` (indices into this sequence), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        indices = positions if self.indices is None else np.asarray(self.indices)[positions]
        return FileSamples(self.files, self.class_labels, indices.astype(np.int64))


# ---------------------------------------------------------------------------------------- listing and cache
def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_ino]


def list_entries(directory: str, want_dir: bool) -> list[str]:
    """Sorted names of the sub-directories (or files) of ``directory``; entries that cannot be resolved (a
    symlink loop, a dangling link) are skipped with a warning instead of stopping the scan."""
    names, broken = [], []
    for e in os.scandir(directory):
        try:
            if (e.is_dir() if want_dir else e.is_file()) and not e.name.startswith("."):
                names.append(e.name)
        except OSError as err:  # ELOOP: a symlink loop
            broken.append(f"{e.name} ({err.strerror})")
    if broken:
        log.warning("%s: skipped %d unresolvable entries: %s", directory, len(broken), ", ".join(broken[:5]))
    return sorted(names)


def _scan_class(class_dir: str, extensions: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Sorted image file names of one class folder and the folder's identity (mtime -1: rescan next time)."""
    started = time.time_ns()
    names = [n for n in list_entries(class_dir, want_dir=False) if n.lower().endswith(extensions)]
    identity = _identity(class_dir)
    if identity[0] >= started - int(RACY_SECONDS * 1e9):
        identity[0] = -1  # modified around the time we listed it: a same-tick change could be missing
    return names, identity


def _unchanged(cached: FileList | None, classes: list[str], extensions: tuple[str, ...]) -> set[str]:
    """The classes whose cached file names are still current (their folder's identity is the same)."""
    if cached is None or tuple(cached.extensions) != extensions:
        return set()
    known = {c: k for k, c in enumerate(cached.classes)}
    return {c for c in classes if c in known and cached.identities[known[c]][0] >= 0
            and _identity(os.path.join(cached.split_dir, c)) == cached.identities[known[c]]}


def _build(split_dir: str, classes: list[str], extensions: tuple[str, ...], old: FileList | None,
           keep: set[str]) -> FileList:
    """A list for ``classes``: the folders in ``keep`` copied from ``old``, the others listed now."""
    known = {c: k for k, c in enumerate(old.classes)} if old is not None else {}
    blob, lengths, counts, identities = bytearray(), [], [], []
    for c in classes:
        if c in keep:
            k = known[c]
            lo, hi = int(old.class_starts[k]), int(old.class_starts[k + 1])
            blob += old.names[old.name_offsets[lo]:old.name_offsets[hi]].tobytes()
            lengths.append(np.diff(old.name_offsets[lo:hi + 1]))
            identities.append(list(old.identities[k]))
        else:  # per class only Python work: 21,841 small numpy calls would cost seconds
            names, identity = _scan_class(os.path.join(split_dir, c), extensions)
            encoded = [n.encode() for n in names]
            blob += b"".join(encoded)
            lengths.append(np.array([len(e) for e in encoded], np.int64))
            identities.append(identity)
        counts.append(len(lengths[-1]))
    class_starts = np.zeros(len(classes) + 1, np.int64)
    np.cumsum(counts, out=class_starts[1:])
    name_offsets = np.zeros(int(class_starts[-1]) + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=name_offsets[1:])
    return FileList(split_dir, list(classes), class_starts, np.frombuffer(bytes(blob), np.uint8), name_offsets,
                    identities, extensions)


def cache_locations(split_dir: str) -> list[str]:
    """Where the list of ``split_dir`` may live: in the tree first, then the user's cache directory."""
    real = os.path.realpath(split_dir)
    digest = hashlib.sha256(real.encode()).hexdigest()[:24]
    cache_root = os.path.expanduser(os.environ.get("FOCALNET_CACHE") or "~/.cache/focalnet")
    return [os.path.join(split_dir, IN_TREE_NAME),
            os.path.join(cache_root, "filelists", f"{digest}-{os.path.basename(real)}.filelist")]


def _writable_location(locations: list[str]) -> str | None:
    for path in locations:
        d = os.path.dirname(path)
        with contextlib.suppress(OSError):
            os.makedirs(d, exist_ok=True)
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return path
    return None


@contextlib.contextmanager
def exclusive_lock(lock_path: str | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``; without one (no writable place, a file system without
    locks) the protocol stays correct, since lists are replaced atomically: two processes may just both build."""
    import fcntl

    fd = None
    if lock_path is not None:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("no lock on %s (%s): file lists may be built twice", lock_path, e)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _newest_readable(locations: list[str], split_dir: str) -> FileList | None:
    found = []
    for path in locations:
        try:
            found.append((os.stat(path).st_mtime_ns, FileList.read(path, split_dir)))
        except (OSError, ValueError, KeyError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring unreadable file list %s (%s)", path, e)
    return max(found, key=lambda f: f[0])[1] if found else None


def checked_or_built(split_dir: str, classes: list[str], extensions: tuple[str, ...]) -> FileList:
    """The current list of ``split_dir``: a cached one whose folders are unchanged, or (re)built and cached."""
    locations = cache_locations(split_dir)
    target = _writable_location(locations)
    with exclusive_lock(None if target is None else target + ".lock"):
        started = time.perf_counter()
        cached = _newest_readable(locations, split_dir)
        keep = _unchanged(cached, classes, extensions)
        if cached is not None and len(keep) == len(classes) and cached.classes == list(classes):
            log.info("file list of %s: %d files in %d folders from %s (%.2f s)", split_dir, len(cached),
                     len(classes), cached.source, time.perf_counter() - started)
            return cached
        files = _build(split_dir, classes, extensions, cached, keep)
        if target is None:
            log.warning("file list of %s: nowhere writable to cache it (%s); set FOCALNET_CACHE", split_dir,
                        " or ".join(os.path.dirname(p) for p in locations))
            return files
        files.write(target)
        log.info("file list of %s: %d files, %d of %d folders listed (%s), cached in %s (%.1f s)", split_dir,
                 len(files), len(classes) - len(keep), len(classes), "changed or new" if cached is not None else "first time",
                 target, time.perf_counter() - started)
        return FileList.read(target, split_dir)


_GROUP = None


def _listing_group():
    import torch.distributed as dist

    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo", timeout=LISTING_TIMEOUT)
    return _GROUP


def list_image_files(split_dir: str, classes: list[str], extensions: Sequence[str]) -> FileList:
    """The image files of ``split_dir/<class>/`` for ``classes``, from the cache when it is current.

    Collective under ``torch.distributed``: every rank calls it; rank 0 checks or builds the list.
    """
    import torch.distributed as dist

    extensions = tuple(e.lower() for e in extensions)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return checked_or_built(split_dir, classes, extensions)
    group = _listing_group()
    message: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            files = checked_or_built(split_dir, classes, extensions)
            message[0] = ("ok", files.source)
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            error, message[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(message, src=0, group=group)
    if error is not None:
        raise error
    status, value = message[0]
    if status == "error":
        raise RuntimeError(f"rank 0 could not list {split_dir}: {value}")
    if dist.get_rank() == 0:
        return files
    if value is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            files = FileList.read(value, split_dir)
            if files.classes == list(classes):
                return files
    return checked_or_built(split_dir, classes, extensions)  # rank 0's list is not visible from this node
