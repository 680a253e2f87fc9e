"""The run directory's two guards: one owner at a time, and resume only of the same run.

* :class:`RunDirLock`: a POSIX record lock (``fcntl.lockf``) on ``<run dir>/run.lock``, taken by rank 0 before
  anything is written and held until the process ends. The kernel drops it when its holder dies, whatever
  the cause (exit, SIGKILL, OOM kill), so a relaunch after a crash needs no cleanup; forked data workers do not
  inherit it (record locks belong to a process). The file records the holder (host, pid, since when, command)
  for the message a second launch gets. On NFS the lock goes through the NFS lock protocol: NFSv4 servers free
  the lock of a crashed client when its lease expires (90 s by default), NFSv3 (NLM) when the crashed node
  comes back; a file system without locks (Lustre mounted ``noflock``, some FUSE) gives a warning and no guard.
* :func:`config_changes` / :func:`check_resume_config`: which config keys may change between the launch that
  wrote a checkpoint and the one resuming it. :data:`HARMLESS_KEYS` is the one list of keys that do not change
  what the saved state means; every other key does, and a change to it is refused unless
  ``trainer.resume_allow_changes`` names it. The data-parallel layout is compared through the total batch
  (``data.batch_size x world size x trainer.accum_steps``), so a different world size with the same total
  batch resumes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from focalnet.engine.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

# Keys (or groups) whose value does not change what a saved training state means: how the run is watched and
# logged, where it writes, how fast and on what it runs, how often it evaluates and checkpoints.
HARMLESS_KEYS = (
    "logger", "paths",
    "trainer.resume", "trainer.resume_allow_changes", "trainer.init_from", "trainer.init_head", "model.pretrained",
    "trainer.ckpt_every_steps", "trainer.save_epoch_ckpts", "trainer.eval_every", "trainer.log_every",
    "trainer.device", "trainer.compile", "trainer.channels_last", "trainer.grad_checkpointing",
    "trainer.max_nonfinite_updates", "trainer.check_every_s", "trainer.async_save", "trainer.ddp_static_graph",
    "data.num_workers", "data.persistent_workers", "data.decode_threads", "data.os_cache", "data.batches_ahead",
    "data.max_file_mb", "data.max_image_pixels", "data.cache_dir", "data.cache_limit_gb",
)
# Compared as one derived value instead (a different world size with the same product resumes).
TOTAL_BATCH = "total_batch"
_BATCH_KEYS = ("data.batch_size", "trainer.accum_steps")


class RunDirLocked(ConfigError):
    """Another live process owns the run directory."""


class ResumeRefused(ConfigError):
    """The checkpoint was written by a run whose config differs in a key that changes what it means."""


class RunDirLock:
    """Exclusive ownership of a run directory by this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = self._holder(fd)
                os.close(fd)
                raise RunDirLocked(
                    f"run directory {self.path.parent} is in use by {holder}: two runs in one directory would "
                    f"interleave metrics.jsonl and overwrite each other's checkpoints. Wait for it or stop it, "
                    f"or choose another directory (hydra.run.dir=... or FOCALNET_RUN_ID=...)") from None
            os.close(fd)
            log.warning("cannot lock %s (%s): this file system has no locks, so nothing stops a second launch "
                        "into the same run directory", self.path, e.strerror)
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process (no holder recorded yet)"
        return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} ({info.get('command')})"

    def release(self) -> None:
        # The file stays: removing it would let a process that opened the old file and one that creates a new
        # one both hold "the" lock.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def total_batch(cfg: Mapping, world_size: int) -> int:
    return int(cfg["data"]["batch_size"]) * int(world_size) * int(cfg["trainer"]["accum_steps"])


def config_changes(old: Mapping, old_world: int, new: Mapping, new_world: int) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every key that changes what the saved state means (``HARMLESS_KEYS`` left
    out; the batch layout compared as ``total_batch``)."""
    a, b = flatten(old), flatten(new)
    missing = "<absent>"
    changes = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
               if a.get(k, missing) != b.get(k, missing) and not _matches(k, HARMLESS_KEYS + _BATCH_KEYS)}
    tb_old, tb_new = total_batch(old, old_world), total_batch(new, new_world)
    if tb_old != tb_new:
        changes[TOTAL_BATCH] = (f"{tb_old} ({old['data']['batch_size']} x {old_world} x "
                                f"{old['trainer']['accum_steps']})",
                                f"{tb_new} ({new['data']['batch_size']} x {new_world} x "
                                f"{new['trainer']['accum_steps']})")
    return changes


def check_resume_config(path: str | os.PathLike, old: Mapping, old_world: int, new: Mapping,
                        new_world: int) -> dict[str, tuple]:
    """The changes ``trainer.resume_allow_changes`` accepts; raises :class:`ResumeRefused` for any other."""
    changes = config_changes(old, old_world, new, new_world)
    allowed = list(new["trainer"].get("resume_allow_changes") or [])
    refused = {k: v for k, v in changes.items() if not _matches(k, allowed)}
    if refused:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in refused.items())
        raise ResumeRefused(
            f"refusing to resume {path}: this launch changes what its saved state means: {listed}. Relaunch with "
            f"the old values, or accept the change with trainer.resume_allow_changes=[{','.join(refused)}], or "
            f"start a new run directory (hydra.run.dir=... or FOCALNET_RUN_ID=...)")
    for k, (o, n) in changes.items():
        log.warning("resuming with a changed config (trainer.resume_allow_changes): %s: %r -> %r", k, o, n)
    return changes
