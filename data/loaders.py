"""The loader contract between ``data`` and ``focalnet.engine``.

``build_loaders(data_cfg, aug_cfg, rank=, world_size=, seed=, pin_memory=)`` returns :class:`Loaders`:

* ``train``: an :class:`EpochLoader`-like object. ``len(train)`` is the number of batches per epoch on
  this rank (identical on every rank). ``train.set_epoch(epoch, start_batch)`` fixes the epoch's sample
  order (a function of ``seed`` and ``epoch`` only) and makes the next iteration start at batch
  ``start_batch``: this is how a run resumes exactly in the middle of an epoch.
* ``val``: iterates over every validation sample exactly once across all ranks (no padding, no dropped
  samples), so counts summed over ranks equal the size of the validation set.
* ``loader.handover()`` yields the batches as the workers hand them over: ``(images, targets, seeds)`` with
  ``images`` uint8 (B, C, H, W) (the synthetic data's float pixels stay float), ``targets`` int64 class indices
  and ``seeds`` the samples' augmentation seeds (Python ints, or None); in pinned memory when the loaders were
  built with ``pin_memory=True`` (a CUDA device trains). ``loader.finisher`` (a
  :class:`focalnet.data.transforms.BatchFinisher`, or None) normalizes and erases them. :class:`DeviceLoader` moves
  batches to the training device (a side stream and one batch ahead on CUDA) and finishes them there; iterating
  a loader itself gives the same finished batches on the CPU: ``(images float (B, C, H, W), targets)``.
  Mixup/CutMix is *not* applied here: the engine applies it on batches, for every pipeline alike.
* ``stats()`` on a loader returns counters such as ``{"skipped_images": n}`` (may be empty).

``focalnet.data.build_loaders`` picks the builder by ``data.name``; builders use the pieces defined here.

Worker processes (DataLoader workers, the FFCV augmentation pool) call :func:`leave_shutdown_to_parent` first:
a cluster stops a job by signalling every process of it at once, and the training process owns the shutdown.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


@dataclass
class Loaders:
    train: Any
    val: Any
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Stop what the loaders run beside the training process (the FFCV augmentation pools), before the
        interpreter's exit hooks run; a torch ``DataLoader`` stops its workers itself."""
        for loader in (self.train, self.val):
            if callable(close := getattr(loader, "close", None)):
                close()


# What SLURM (scancel, time limit, preemption), systemd and a terminal's Ctrl-C send to every process of a job.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def leave_shutdown_to_parent(*_worker_id) -> None:
    """Make this worker process ignore the job's stop signals; its parent (the training process) owns shutdown.

    A cluster stops a job by signalling every process in it (SLURM signals the whole job step, systemd the
    cgroup, ``kill -- -PGID`` the process group). A worker that died on that signal would turn the training
    process's orderly stop (finish the update, save ``last.pt``, exit 75) into a crash ("DataLoader worker
    killed by signal"). So workers ignore SIGINT/SIGUSR1/SIGUSR2 and take SIGTERM only from their parent
    (``Process.terminate()``, the DataLoader's and the executor's last resort for a stuck worker): SIGTERM is
    blocked and read by a thread that checks the sender. The worker still exits when told to by its parent,
    and is killed (SIGKILL) if the parent dies first (Linux ``PR_SET_PDEATHSIG``), so none outlives the run.
    Usable as a DataLoader ``worker_init_fn`` or a pool initializer.
    """
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the DataLoader's own parent watchdog remains
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    for s in JOB_SIGNALS[1:]:
        signal.signal(s, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender check; SIGTERM keeps its default action
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit the mask

    def obey_parent_only():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=obey_parent_only, name="sigterm-from-parent-only", daemon=True).start()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch, independent of workers and resume point."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ResumableDistributedSampler(Sampler):
    """Shuffled (or sequential) distributed sampler whose order depends only on (seed, epoch).

    Yields ``(index, sample_seed)`` pairs so datasets can seed per-sample augmentation, which keeps
    augmentation identical whatever the number of workers or the batch a run resumed from.
    Training mode pads to a multiple of ``world_size * batch_size`` and drops the remainder so every rank
    sees the same number of full batches; evaluation mode shards ``rank::world_size`` without padding.
    """

    def __init__(self, size: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, train: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.train = seed, shuffle, train
        self.epoch, self.start_batch = 0, 0

    @classmethod
    def for_dataset(cls, dataset, **kwargs) -> ResumableDistributedSampler:
        return cls(len(dataset), **kwargs)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        if self.train:
            per_rank = -(-self.size // self.world_size)
            return max(per_rank // self.batch_size, 1)
        return -(-len(range(self.rank, self.size, self.world_size)) // self.batch_size)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if not self.train:
            return order[self.rank :: self.world_size]
        per_rank = -(-self.size // self.world_size)
        total = per_rank * self.world_size
        order = (order * (-(-total // self.size)))[:total]
        mine = order[self.rank :: self.world_size]
        return mine[: self.num_batches() * self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self._indices()[self.start_batch * self.batch_size :]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in idx])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.start_batch * self.batch_size, 0)


def handover_collate(samples) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """DataLoader ``collate_fn``: ``(image, label[, seed])`` samples -> ``(images, labels, seeds)``.

    Images keep their dtype (uint8 from the image pipelines) and are stacked into one contiguous (B, C, H, W)
    tensor, in shared memory when this runs in a worker process (as ``default_collate`` does), so the training
    process receives it without a copy. Finishing (normalize, erase) happens where the batch is trained on.
    """
    images = [s[0] for s in samples]
    shape = (len(images), *images[0].shape)
    out = None
    if get_worker_info() is not None:
        storage = images[0]._typed_storage()._new_shared(math.prod(shape))
        out = images[0].new(storage).view(shape)
    batch = torch.stack(images, out=out)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    seeds = [int(s[2]) for s in samples] if len(samples[0]) > 2 else None
    return batch, labels, seeds


class EpochLoader:
    """A ``torch.utils.data.DataLoader`` over a map-style dataset taking ``(index, seed)`` keys, in the order of
    ``sampler`` (a :class:`ResumableDistributedSampler`, by default over ``range(len(dataset))``); batches are
    handed over unfinished (:func:`handover_collate`) and finished by ``finisher`` (see the module docstring)."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableDistributedSampler | None = None,
                 batch_size: int | None = None, rank: int = 0, world_size: int = 1, seed: int, train: bool = True,
                 num_workers: int = 0, pin_memory: bool = False, finisher=None, persistent_workers: bool = False):
        self.dataset, self.finisher = dataset, finisher
        self.sampler = sampler if sampler is not None else ResumableDistributedSampler(
            len(dataset), batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
            shuffle=train, train=train)
        self.loader = DataLoader(
            dataset, batch_size=self.sampler.batch_size, sampler=self.sampler, num_workers=num_workers,
            drop_last=False, pin_memory=pin_memory, collate_fn=handover_collate,
            persistent_workers=persistent_workers and num_workers > 0, worker_init_fn=leave_shutdown_to_parent,
            # A private generator: starting an iterator draws a worker base seed, which must not consume
            # the global torch RNG (exact resume restores that RNG mid-epoch, before the iterator exists).
            generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def handover(self) -> Iterator:
        return iter(self.loader)

    def __iter__(self):
        return iter(DeviceLoader(self, "cpu"))

    def stats(self) -> dict[str, int]:
        fn = getattr(self.dataset, "stats", None)
        return fn() if fn else {}


class DeviceLoader:
    """A loader's batches on ``device``, finished there: ``(images float32 (B, C, H, W), targets (B,))``.

    On CUDA the copy of batch k+1 (pinned host memory -> device, ``non_blocking``) and its finishing run on a side
    stream while the caller computes on batch k (timm's ``PrefetchLoader`` scheme); the compute stream waits for
    the side stream only when it takes the batch, and ``record_stream`` keeps the caching allocator from reusing
    a batch's memory while the compute stream may still read it. Nothing here waits for the device. On the CPU
    the same code runs without streams, and the batches equal, bit for bit, those the loader workers used to
    finish (``tests/test_gpu_path.py``).

    ``bytes_to_device`` counts the bytes of every tensor handed to ``.to(device)``.
    """

    def __init__(self, loader, device: torch.device | str):
        self.loader, self.device = loader, torch.device(device)
        self.finisher = getattr(loader, "finisher", None)
        self.bytes_to_device = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def _move(self, images: torch.Tensor, targets: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        self.bytes_to_device += images.nbytes + targets.nbytes
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.finisher is not None:
            images = self.finisher(images, seeds)
        return images, targets

    def __iter__(self):
        batches = self.loader.handover()
        if self.device.type != "cuda":
            for images, targets, seeds in batches:
                yield self._move(images, targets, seeds)
            return
        side = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        ready = None
        for images, targets, seeds in batches:
            with torch.cuda.stream(side):
                upcoming = self._move(images, targets, seeds)
            if ready is not None:
                yield ready
            compute.wait_stream(side)
            for t in upcoming:
                t.record_stream(compute)
            ready = upcoming
        if ready is not None:
            yield ready
