"""Checkpoint files: atomic writes, RNG capture/restore for every rank, and resume-path lookup.

A training checkpoint is a plain dict, loadable with ``torch.load(..., weights_only=True)`` (no pickled
objects: RNG states are stored as tensors and lists)::

    model        state dict with official FocalNet names (unwrapped from DDP / torch.compile)
    optimizer    optimizer.state_dict()
    scaler       GradScaler state ({} unless fp16)
    ema          EMA weights (official names) or None
    scheduler    timm scheduler state
    step         optimizer updates done
    epoch        the epoch to continue in
    batch_in_epoch  micro-batches of ``epoch`` already consumed (0 at an epoch boundary)
    rng          one entry per rank: python/numpy/torch(/cuda) generator states
    config       the resolved config (plain dict)
    best_metric  best validation top-1 so far (or None)
    wandb_id     the W&B run id, so a resumed run continues the same W&B run
    world_size   number of ranks that wrote ``rng``

Integrity: ``torch.save`` writes a zip archive that stores a CRC-32 of every entry (the pickle and each tensor
storage). ``torch.load`` does not check them, so :func:`verify_file` does: a truncated file, random bytes or a
flipped byte anywhere (also in ``best.pt``, which is a hard link of a ``last.pt``) is reported with the path
before anything is loaded. The same CRCs identify a file's contents cheaply (:func:`checkpoint_digest`): ranks
resuming on several nodes compare them.

Writing: :class:`CheckpointWriter` copies the state to host memory and writes it in a background thread (for
the large models a save is 10+ GB), via :func:`save_atomic`'s temporary file and rename, so a job that ends
mid-write leaves the previous checkpoint in place.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import random
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from focalnet.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# What a checkpoint needs to continue a run (best.pt / epoch_N.pt hold it too: they are copies of a last.pt).
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "rng",
                       "config")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous file is intact."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under ``torch.compile`` and DDP wrappers (its state dict has the official names)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write via a temporary file + fsync + rename: a crash leaves either the old or the new file, never half.

    A full disk (or quota) raises :class:`CheckpointWriteError` naming the path, the size needed and the space
    left; the previous file at ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save re-raises a failed write as RuntimeError (context: OSError)
        if not _disk_full(e):
            raise
        need, free = _tensor_bytes(obj), shutil.disk_usage(path.parent).free
        raise CheckpointWriteError(
            errno.ENOSPC, f"no space left on device writing {path}: the checkpoint needs about {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free on that file system; the previous {path.name} is intact. Free space "
            f"(or move the run directory) and relaunch to resume") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    # Persist the rename itself (the directory entry), so the new file survives a power loss.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def remove_orphan_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp.<pid>`` files left by saves that were killed mid-write (call after a successful save,
    by the run directory's owner, so no live writer's file is touched)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp.*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d unfinished checkpoint file(s) of killed saves: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def link_or_copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold the bytes of ``src`` atomically: a hard link (instant, no extra disk) when the file
    system allows it, else a copy. ``src`` is later replaced by rename, never rewritten, so the link stays valid."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def verify_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it is a complete torch zip file whose every entry
    matches the CRC-32 stored for it (see the module docstring)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: not a complete checkpoint file (truncated, or not written by "
                              f"torch.save; {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the stored checksum of its entry {bad!r} does not match "
                              f"(damaged on disk)") from None


# torch.serialization.MAGIC_NUMBER as pickled at the start of a legacy file (without the protocol header and STOP)
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]


def load_file(path: str | os.PathLike, map_location="cpu", verify: bool = True) -> dict:
    """``torch.load(path, weights_only=True)`` after :func:`verify_file` (for zip files; the legacy format of
    some released ``.pth`` files has no checksums); errors name the path."""
    with open(path, "rb") as f:
        head = f.read(32)
    magic = head[:2]
    # torch's zip format starts "PK"; its legacy format is a pickle whose first object is torch's magic number.
    legacy = head[:1] == b"\x80" and _LEGACY_MAGIC in head
    if magic != b"PK" and not legacy:
        raise CheckpointError(f"{path} is corrupt: not a torch.save file (empty, truncated or overwritten)")
    if verify and magic == b"PK":
        verify_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a plain tensor checkpoint (torch.load with "
                              f"weights_only=True rejected it, so none of its code ran). Only load files you trust; "
                              f"detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def first_non_finite(state_dict) -> str | None:
    """The name of the first floating-point tensor holding NaN/inf, or None (one device-to-host read)."""
    floats = [(name, v) for name, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
    return next((name for (name, _), ok in zip(floats, finite) if not ok), None)


def checkpoint_digest(path: str | os.PathLike) -> str:
    """The identity of a checkpoint file's bytes, read from its zip directory alone: a digest of the CRC-32 and
    size of every entry (which :func:`verify_file` checks against the data). A file in torch's legacy (non-zip)
    format is hashed whole."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                h.update(f"{info.filename}\0{info.CRC:08x}\0{info.file_size}\n".encode())
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def host_copy(obj):
    """``obj`` with every tensor copied to host memory (device tensors moved, CPU tensors cloned): a snapshot that
    training may keep changing the originals of."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints one at a time in a background thread: :meth:`submit` returns once the state is copied
    to host memory; :func:`save_atomic` (temporary file, fsync, rename), the hard links (``best.pt``,
    ``epoch_N.pt``) and the cleanup of killed saves' temporaries follow in the thread. A write's error is raised
    by the next :meth:`submit` or :meth:`wait`; :meth:`failed` tells without waiting. The thread is not a daemon:
    the interpreter lets a write in flight finish before the process exits. ``background=False`` writes in the
    caller's thread."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj: dict, path: str | os.PathLike, links: tuple[str, ...] = (), then=None) -> None:
        """``then(path, snapshot)``, if given, runs in the writer thread once the file is complete (e.g. an upload)."""
        self.wait()
        snapshot, path = host_copy(obj), Path(path)
        if not self.background:
            self._write(snapshot, path, links, then)
            self.wait()
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot, path, links, then),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, obj: dict, path: Path, links: tuple[str, ...], then=None) -> None:
        try:
            start = time.perf_counter()
            save_atomic(obj, path)
            for name in links:  # the same bytes, linked instead of written again
                link_or_copy_atomic(path, path.with_name(name))
            remove_orphan_temporaries(path.parent)  # of saves killed mid-write (the writer owns the directory)
            log.info("wrote %s (%.0f MiB in %.1f s%s)", path, path.stat().st_size / 2**20, time.perf_counter() - start,
                     f"; also {', '.join(links)}" if links else "")
            if then is not None:
                then(path, obj)
        except BaseException as e:  # noqa: BLE001  (raised in the training thread by wait)
            self._error = e

    def failed(self) -> bool:
        return self._error is not None

    def join(self) -> None:
        """Block until the write in flight has finished, leaving any error of it for :meth:`submit`/:meth:`wait`."""
        if self._thread is not None:
            self._thread.join()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is complete; raise its error (or log it, ``raise_error=False``)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if raise_error:
                raise error
            log.error("a checkpoint write failed: %s", error)


def load_training_state(path: str | os.PathLike) -> dict:
    """A checkpoint that can continue a run (every key of :data:`TRAINING_STATE_KEYS`), or CheckpointError."""
    ckpt = load_file(path)
    missing = [k for k in TRAINING_STATE_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this framework (no {', '.join(missing)}): "
                              f"use trainer.init_from={path} to start from its weights")
    return ckpt


def capture_rng() -> dict:
    """This process's generator states, as tensors/lists only (safe for ``weights_only`` loading)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def find_resume_checkpoint(resume: str | None, run_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from, loaded: ``(path, checkpoint)``, or ``(None, None)`` to start fresh.

    ``trainer.resume=PATH``: that file (a CheckpointError names it when it is unusable). ``auto``: the newest
    file of ``<run_dir>/checkpoints/*.pt`` that is intact and holds a full training state (``last.pt`` first
    among files written at the same time), saying which one and why when it is not ``last.pt``. When the
    directory holds checkpoints and none is usable, CheckpointError lists each with its problem: starting over
    would overwrite them. ``null``: start fresh.
    """
    if resume is None:
        return None, None
    if resume != "auto":
        return Path(resume), load_training_state(resume)
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = sorted(ckpt_dir.glob("*.pt"), key=lambda p: (-p.stat().st_mtime_ns, p.name != "last.pt"))
    problems = [] if (ckpt_dir / "last.pt").exists() or not candidates else [f"{ckpt_dir / 'last.pt'}: missing"]
    for path in candidates:
        try:
            ckpt = load_training_state(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("resuming from %s (step %d), the newest usable checkpoint, because %s", path, ckpt["step"],
                        "; ".join(problems))
        return path, ckpt
    if candidates:
        raise CheckpointError(
            f"trainer.resume=auto: {ckpt_dir} holds checkpoints but none can continue the run ({'; '.join(problems)})."
            f" Nothing was overwritten. Resume from a copy with trainer.resume=PATH, or move {ckpt_dir} away to "
            f"start over in this directory, or start a new run directory")
    return None, None
