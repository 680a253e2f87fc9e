"""``data=imagenet1k_ffcv`` / ``data=imagenet22k_ffcv``: FFCV ``.beton`` files with the full FocalNet recipe.

FFCV reads the file (memory-mapped, OS page cache) and decodes each image, JPEG or raw, in compiled,
threaded code. It has no RandAugment or RandomErasing, and its crop decoders resize with OpenCV's
``INTER_AREA`` (not the recipe's bicubic; at ImageNet sizes ~0.5-0.9 ms per image, 5x torch's
antialiased bicubic). So FFCV's decoder here only decodes, into a flat max-size buffer, and everything
after runs per sample in a process pool (``data.num_workers`` processes) with the folder path's own
code: RandomResizedCrop (timm's draws, torch's antialiased bicubic), flip and RandAugment for training
(:class:`focalnet.data.transforms.TrainSampleTransform`); the official resize + center crop (PIL) for evaluation
(:class:`focalnet.data.transforms.EvalSampleTransform`). The pool writes uint8 batches; normalization and
RandomErasing run on the training device (:class:`focalnet.data.transforms.BatchFinisher`, as for every path).
For the same seed, a raw-pixel ``.beton`` of unresized images gives the folder path's batches bit for bit
(``tests/test_data_ffcv.py``); JPEG-stored images were re-encoded by the writer and are decoded by FFCV's
libjpeg-turbo call (1 grey level from PIL's decode of the same bytes on average), and images above
``--max-resolution`` were shrunk by the writer (``scripts/bench_pixels.py`` measures each).

The training thread only takes finished batches: a feeder thread receives FFCV's decoded batches, copies the
pixels into the pool's input ring, keeps :data:`AHEAD` batches in the pool and queues finished ones (copied
into pinned memory when a CUDA device trains).

Determinism and resume: the sample order is :class:`focalnet.data.loaders.ResumableDistributedSampler`'s (a
function of seed and epoch, sharded over ranks, resumable at any batch), installed as FFCV's traversal
order; every random draw is seeded per sample from (seed, epoch, index), so nothing depends on thread or
process scheduling or the resume point.

Pipelines are built only in :func:`image_pipeline` (FFCV issue #396: some orders of compiled and
uncompiled ops hang the Loader constructor); tests construct each one under a timeout.
FFCV is imported inside functions so the package imports without it.

Bad images were skipped when the ``.beton`` was written (``scripts/write_ffcv.py`` stores them with label
-1); they are filtered out here and reported by ``stats()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import queue
import threading
from collections import deque
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
import torch
from PIL import Image

from focalnet.data.folder import DataConfigError
from focalnet.data.loaders import DeviceLoader, Loaders, ResumableDistributedSampler, leave_shutdown_to_parent
from focalnet.data.transforms import (
    BatchFinisher,
    EvalSampleTransform,
    TrainSampleTransform,
    seeded,
)
from focalnet.schema import AugConfig, FFCVData

IMAGE_FIELD, LABEL_FIELD = "image", "label"


def require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError("FFCV data (data=*_ffcv, scripts/write_ffcv.py) needs the `ffcv` extra: "
                          "`make install` (or pip install --no-build-isolation -e '.[ffcv]' after "
                          "apt-get install pkg-config libturbojpeg0-dev libopencv-dev)") from e


_KEEP_ALIVE: list = []


@functools.cache
def _decoder_class():
    """An FFCV decoder subclass, defined on first use so that importing this module never needs FFCV."""
    require_ffcv()
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, memcpy
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    jpg_mode = IMAGE_MODES["jpg"]

    class PackedRGBDecoder(SimpleRGBImageDecoder):
        """Decode (JPEG) or copy (raw) every image, whatever its size, into a flat buffer as large as the
        largest image: the pixels are packed as (h, w, 3) at its start (h, w from the file's metadata).

        FFCV's ``SimpleRGBImageDecoder`` code does exactly this per sample; it only refuses datasets of
        mixed sizes because its output is (H, W, 3). Here the output is flat, so any size fits.
        """

        def declare_state_and_memory(self, previous_state):
            pixels = self.metadata["height"].astype(np.uint64) * self.metadata["width"].astype(np.uint64)
            shape, dtype = (int(pixels.max()) * 3,), np.dtype("<u1")
            return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

        def generate_code(self):
            # FFCV's loop, with helpers compiled per decoder (two loaders' threads compiling one shared
            # dispatcher at once race inside numba) and never freed (a dropped helper dispatcher trips a
            # KeyError in numba's finalizer): a few small objects per loader.
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c, memcpy_c = Compiler.compile(imdecode), Compiler.compile(memcpy)
            _KEEP_ALIVE.append((imdecode_c, memcpy_c))

            def decode(batch_indices, destination, metadata, storage_state):
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    if field["mode"] == jpg_mode:
                        height, width = field["height"], field["width"]
                        imdecode_c(image_data, destination[dst_ix], height, width, height, width, 0, 0, 1, 1,
                                   False, False)
                    else:
                        memcpy_c(image_data, destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return PackedRGBDecoder


def image_pipeline() -> list:
    """The image field's ops: the packed decoder (compiled), then ToTensor (plain); never the reverse."""
    from ffcv.transforms import ToTensor

    return [_decoder_class()(), ToTensor()]


def label_pipeline() -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    return [IntDecoder(), ToTensor()]


class SampleStage:
    """Decoded (H, W, 3) uint8 image + sample seed -> augmented (3, S, S) uint8, in ``out``.

    Training: RandomResizedCrop, flip, RandAugment (under the seed); evaluation: the official resize + center
    crop (or squash). The folder path's code.
    """

    def __init__(self, aug: AugConfig, img_size: int, train: bool):
        self.train = train
        if train:
            self.tf = TrainSampleTransform(aug, img_size)
        else:
            self.tf = EvalSampleTransform(img_size, aug.test_crop, aug.interpolation)

    def __call__(self, arr: np.ndarray, seed: int, out: torch.Tensor, preserve: bool) -> torch.Tensor:
        if self.train:
            with seeded(seed, preserve=preserve):
                aug = self.tf.augment_array(self.tf.crop_array(arr))  # new arrays: ``arr`` is only read
            x = torch.from_numpy(aug).permute(2, 0, 1)  # (3, S, S) uint8 view
        else:
            x = self.tf(Image.fromarray(arr))  # (3, S, S) uint8; no random draw
        return out.copy_(x)


# Process-pool side. The stage, a shared-memory ring of packed decoded images (in) and the shared output
# batches (:class:`BatchBuffers`) are inherited at fork: tasks carry only indices, seeds and sizes, because
# pushing images through the pool's pipes costs about as much as the augmentation itself.
_POOL: dict = {}
AHEAD = 2  # batches being augmented in the pool while the training thread trains
QUEUED = 2  # finished batches waiting for the training thread
_RING_SLOTS = AHEAD + 1  # input slots: the batches in the pool + the one being copied in
_DONE = object()


def _pool_init(stage: SampleStage, ring_in: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    leave_shutdown_to_parent()  # a job-wide SIGTERM/SIGINT/SIGUSR1/2 is the training process's to handle
    _POOL.update(stage=stage, ring_in=ring_in, outputs=outputs)
    torch.set_num_threads(1)


def _process_range(task: tuple[int, int, int, int, list[int], list[tuple[int, int]]]) -> None:
    slot, out, lo, hi, seeds, sizes = task  # a pool process: its global RNGs are its own, no need to restore them
    ring_in, batch = _POOL["ring_in"], _POOL["outputs"][out]
    for i, seed, (h, w) in zip(range(lo, hi), seeds, sizes):
        arr = ring_in[slot, i, :h * w * 3].numpy().reshape(h, w, 3)
        _POOL["stage"](arr, seed, batch[i], preserve=False)


def read_sidecar(path: str) -> dict:
    meta = path + ".json"
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f)
    return {}


class BatchBuffers:
    """Shared-memory uint8 output batches that the pool writes into and the caller receives without a copy.

    A batch buffer is reused once nobody holds it: its storage has no user left besides this object (the
    caller dropped the batch and every view of it; torch counts storage users). Copying each finished batch
    out of a fixed ring instead cost 0.05-0.25 ms per image in the training process (plus page faults and
    zeroing when the copy is a fresh tensor). A caller that keeps batches (e.g. ``list(loader)``) is served
    from ``spare`` buffers, copied out as before; nothing is ever overwritten while someone can see it.
    """

    # recycled: the caller's batch, the one before it (its loop variable is still bound during next()), the
    # queued ones, the one the feeder is queueing and those in the pool; spare: the ones in the pool when the
    # caller keeps every batch it got.
    RECYCLED, SPARE = 3 + QUEUED + AHEAD, AHEAD

    def __init__(self, shape: tuple[int, ...], recycled: int = RECYCLED, spare: int = SPARE):
        # Separate tensors, not slices of one: the use count is per storage.
        self.buffers = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(recycled + spare)]
        self.recycled = recycled if hasattr(torch._C, "_storage_Use_Count") else 0
        self.busy: set[int] = set()  # given to the pool, not yet handed out

    def _unused(self, k: int) -> bool:
        # Users: self.buffers[k] and the temporary storage object; anything more is a live batch or view.
        return torch._C._storage_Use_Count(self.buffers[k].untyped_storage()._cdata) <= 2

    def acquire(self) -> int:
        for k in range(len(self.buffers)):
            if k not in self.busy and (k >= self.recycled or self._unused(k)):
                self.busy.add(k)
                return k
        raise RuntimeError("no free output buffer: more batches in flight than spare buffers")

    def hand_out(self, k: int, n: int) -> torch.Tensor:
        self.busy.discard(k)
        batch = self.buffers[k][:n]  # (n, 3, S, S) uint8: a new view, so it counts while it lives
        return batch if k < self.recycled else batch.clone()


class FFCVEpochLoader:
    """The :mod:`focalnet.data.loaders` loader contract over an FFCV ``Loader`` (train or eval)."""

    def __init__(self, path: str, *, train: bool, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, img_size: int, aug: AugConfig, os_cache: bool = True, batches_ahead: int = 3,
                 decode_threads: int | None = None, pin_memory: bool = False):
        require_ffcv()
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.traversal_order.base import TraversalOrder

        self.path, self.train, self.batch_size, self.seed = path, train, batch_size, seed
        reader = Reader(path)
        image_meta = reader.metadata[f"f{self._field_index(reader, IMAGE_FIELD)}"]
        labels = reader.metadata[f"f{self._field_index(reader, LABEL_FIELD)}"]
        self.sizes = np.stack([image_meta["height"], image_meta["width"]], axis=1).astype(np.int64)  # (N, 2)
        self.valid = np.flatnonzero(labels >= 0).astype(np.uint64)  # label -1: skipped at write time
        if not len(self.valid):
            raise DataConfigError(f"{path} holds no readable images (data.train_path / data.val_path)")
        self.skipped_at_write = int(len(labels) - len(self.valid))
        self.labels = labels
        self.sampler = ResumableDistributedSampler(len(self.valid), batch_size=batch_size, rank=rank,
                                                   world_size=world_size, seed=seed, shuffle=train, train=train)
        self.stage = SampleStage(aug, int(img_size), train)
        self.finisher = BatchFinisher(aug, train=train)
        self.img_size, self.pin_memory = int(img_size), pin_memory
        self.num_workers = int(num_workers)
        # Decoding is about a quarter of the per-image work (the crop, RandAugment and erasing in the pool
        # are the rest): more decode threads than that only oversubscribe the cores.
        self.decode_threads = int(decode_threads) if decode_threads else max(1, -(-self.num_workers // 4))
        self.pool = None
        if self.num_workers > 0:
            # Fork the pool before FFCV starts any thread in this process.
            size, packed = int(img_size), int(self.sizes.prod(axis=1).max()) * 3
            self.ring_in = torch.empty((_RING_SLOTS, batch_size, packed), dtype=torch.uint8).share_memory_()
            self.outputs = BatchBuffers((batch_size, 3, size, size))
            # concurrent.futures, not multiprocessing.Pool: a worker that dies (OOM kill) breaks the executor,
            # so its lost task raises instead of never completing, and shutdown cannot deadlock on a queue
            # lock the dead worker held (Pool.terminate does).
            self.pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("fork"),
                                            initializer=_pool_init,
                                            initargs=(self.stage, self.ring_in, self.outputs.buffers))
            self.pool.submit(int).result()  # fork every worker now, before FFCV starts threads here

        class EpochOrder(TraversalOrder):
            order = np.arange(0, dtype=np.uint64)

            def sample_order(self, epoch):
                return EpochOrder.order

        self._order_cls = EpochOrder
        threads = torch.get_num_threads()
        self.loader = Loader(path, batch_size=batch_size, num_workers=self.decode_threads, os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, pipelines={IMAGE_FIELD: image_pipeline(),
                                                                       LABEL_FIELD: label_pipeline()},
                             drop_last=False, batches_ahead=batches_ahead)
        torch.set_num_threads(threads)  # FFCV's Compiler.set_num_threads also sets torch's; undo that
        self.loader.traversal_order = EpochOrder(self.loader)

    @staticmethod
    def _field_index(reader, name: str) -> int:
        names = list(reader.handlers)
        if IMAGE_FIELD not in names or LABEL_FIELD not in names:
            raise DataConfigError(f"{reader.file_name}: expected fields {IMAGE_FIELD!r}, {LABEL_FIELD!r} "
                                  f"(scripts/write_ffcv.py), found {names}")
        return names.index(name)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def stats(self) -> dict[str, int]:
        # Nothing is skipped while reading: unreadable files were dropped by the writer (counted apart, so
        # that summing skipped_images over ranks and epochs stays a count of read-time skips).
        return {"skipped_images": 0, "skipped_at_write": self.skipped_at_write}

    def _start(self, b: int, images: torch.Tensor, seeds: list[int], sizes: np.ndarray):
        """Copy batch ``b``'s decoded, packed images into the pool's input ring and start their augmentation;
        returns what :meth:`_finish` needs."""
        slot = b % _RING_SLOTS  # free: the batch that used it before is done (at most AHEAD are in the pool)
        for i, (h, w) in enumerate(sizes.tolist()):  # FFCV reuses its buffers: copy the pixels out now
            self.ring_in[slot, i, :h * w * 3].copy_(images[i, :h * w * 3])
        n = images.shape[0]
        out = self.outputs.acquire()
        step = -(-n // self.num_workers)
        tasks = [(slot, out, lo, min(lo + step, n), seeds[lo:lo + step], sizes[lo:lo + step].tolist())
                 for lo in range(0, n, step)]
        try:
            return [self.pool.submit(_process_range, t) for t in tasks], out, n
        except BrokenExecutor as e:
            self.outputs.busy.discard(out)
            raise self._died() from e

    def _finish(self, result, out, n) -> torch.Tensor:
        """Wait for a started batch; returns it (uint8 (n, 3, S, S)), in pinned memory when asked."""
        try:
            for future in result:
                future.result()  # re-raises a worker's error here
        except BrokenExecutor as e:
            self.outputs.busy.discard(out)
            raise self._died() from e
        except BaseException:
            futures_wait(result)  # the batch's other tasks may still be writing into the buffer
            self.outputs.busy.discard(out)
            raise
        batch = self.outputs.hand_out(out, n)
        if self.pin_memory:  # the shared buffer is free again as soon as this copy is made
            batch = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True).copy_(batch)
        return batch

    def _new_batch(self, n: int) -> torch.Tensor:
        return torch.empty((n, 3, self.img_size, self.img_size), dtype=torch.uint8, pin_memory=self.pin_memory)

    @staticmethod
    def _died() -> RuntimeError:
        return RuntimeError("an FFCV augmentation process died (killed: out of memory?) and its batch is lost. "
                            "Resume from the last checkpoint, perhaps with fewer data.num_workers or a smaller "
                            "data.batch_size.")

    def handover(self):
        """This epoch's batches from the set position: ``(images uint8 (B, 3, S, S), labels, seeds)``."""
        pairs = list(self.sampler)  # [(position in self.valid, sample seed)] for this rank, from start_batch
        if not pairs:
            return iter(())
        order = self.valid[np.array([p for p, _ in pairs], dtype=np.int64)]
        self._order_cls.order = order
        seeds = [s for _, s in pairs]
        threads = torch.get_num_threads()  # FFCV's compiler sets torch's thread count: each batch restores it
        return self._inline(order, seeds, threads) if self.pool is None else self._fed(order, seeds, threads)

    def __iter__(self):
        return iter(DeviceLoader(self, "cpu"))

    def _decoded(self, order: np.ndarray, seeds: list[int], threads: int):
        """FFCV's decoded batches: ``(packed images, labels int64, seeds, sizes)``."""
        bs = self.batch_size
        it = iter(self.loader)
        try:
            for b, (images, labels) in enumerate(_batches(it)):
                torch.set_num_threads(threads)
                labels = labels.view(-1).long().clone()  # FFCV reuses its buffers: copy out
                yield images, labels, seeds[b * bs:(b + 1) * bs], self.sizes[order[b * bs:(b + 1) * bs].astype(np.int64)]
        finally:
            it.close()

    def _inline(self, order: np.ndarray, seeds: list[int], threads: int):
        """No pool (``data.num_workers=0``): every sample is augmented here, in the caller's thread."""
        for images, labels, batch_seeds, sizes in self._decoded(order, seeds, threads):
            batch = self._new_batch(images.shape[0])
            for i, (h, w) in enumerate(sizes.tolist()):
                self.stage(images[i, :h * w * 3].numpy().reshape(h, w, 3), batch_seeds[i], batch[i], preserve=True)
            yield batch, labels, batch_seeds

    def _fed(self, order: np.ndarray, seeds: list[int], threads: int):
        """The pool's batches, taken from a queue that :meth:`_feed` fills in its own thread."""
        ready: queue.Queue = queue.Queue(maxsize=QUEUED)
        stop = threading.Event()
        feeder = threading.Thread(target=self._feed, args=(order, seeds, threads, ready, stop),
                                  name="ffcv-feeder", daemon=True)
        feeder.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                torch.set_num_threads(threads)  # in this thread too (the feeder's FFCV calls may change it)
                yield item
        finally:  # also when the caller abandons the epoch: stop the feeder, let the pool finish its buffers
            stop.set()
            while feeder.is_alive():
                try:
                    ready.get(timeout=0.05)  # unblock a feeder waiting to queue a batch
                except queue.Empty:
                    pass
            feeder.join()

    def _feed(self, order: np.ndarray, seeds: list[int], threads: int, ready: queue.Queue,
              stop: threading.Event) -> None:
        """Feeder thread: copy-in, keep :data:`AHEAD` batches in the pool, queue finished ones (or the error)."""
        pending: deque = deque()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        def put_oldest() -> bool:
            started, labels, batch_seeds = pending.popleft()
            return put((self._finish(*started), labels, batch_seeds))

        try:
            with contextlib.closing(self._decoded(order, seeds, threads)) as decoded:
                for b, (images, labels, batch_seeds, sizes) in enumerate(decoded):
                    if stop.is_set():
                        return
                    pending.append((self._start(b, images, batch_seeds, sizes), labels, batch_seeds))
                    while len(pending) > AHEAD:
                        if not put_oldest():
                            return
            while pending:
                if not put_oldest():
                    return
            put(_DONE)
        except BaseException as e:  # raised in the training thread by _fed
            put(e)
        finally:
            for (result, out, _), *_ in pending:  # an abandoned epoch: let the pool finish with its buffers
                futures_wait(result)
                self.outputs.busy.discard(out)

    def close(self) -> None:
        """Stop the pool: queued tasks are cancelled, busy workers finish their task (a slice of one batch), and
        this returns once the pool's processes and manager thread are gone. Not returning earlier matters at exit:
        Python 3.11's exit hook writes to a live executor's wake-up pipe without a lock while the manager thread
        may be closing it, which prints "OSError: [Errno 9] Bad file descriptor" after a clean stop (3.11's
        ``_ThreadWakeup.wakeup``; python/cpython PR #125492 later put a lock around it). The exit hook would wait
        for the same processes anyway."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
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


def pool_shared_bytes(path: str, batch_size: int, img_size: int) -> int:
    """Shared memory one loader's pool maps: the input ring of packed decoded images and the output batches."""
    from ffcv.reader import Reader

    reader = Reader(path)
    meta = reader.metadata[f"f{FFCVEpochLoader._field_index(reader, IMAGE_FIELD)}"]
    packed = int((meta["height"].astype(np.int64) * meta["width"].astype(np.int64)).max()) * 3
    outputs = BatchBuffers.RECYCLED + BatchBuffers.SPARE
    return _RING_SLOTS * batch_size * packed + outputs * batch_size * 3 * img_size * img_size  # uint8


def check_shared_memory(paths: list[tuple[str, str]], batch_size: int, img_size: int,
                        shm_dir: str = "/dev/shm") -> None:
    """Fail before work starts when /dev/shm cannot hold every local rank's pools: a full tmpfs only shows
    up later, as a bus error (SIGBUS) in whichever process first touches a page that cannot be backed."""
    if not os.path.isdir(shm_dir):
        return
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = ranks * sum(pool_shared_bytes(path, batch_size, img_size) for path, _ in paths)
    if need > free:
        gib = 1 << 30
        raise DataConfigError(
            f"the FFCV loaders need {need / gib:.1f} GiB of shared memory ({ranks} local rank(s), train + val "
            f"pools: data.batch_size={batch_size}, images up to the largest in {paths[0][0]}), but {shm_dir} "
            f"has {free / gib:.1f} GiB free. Give the container more (docker run --shm-size=...), or lower "
            f"data.batch_size, or write the .beton with a smaller --max-resolution, or set data.num_workers=0.")


def _beton_path(data: FFCVData, key: str) -> str:
    value = getattr(data, key)
    path = os.path.expanduser(value)
    if not os.path.isabs(path) and data.root:
        path = os.path.join(os.path.expanduser(data.root), path)
    if not os.path.isfile(path):
        raise DataConfigError(f"data.{key}={value}: no such file {path} (write it with scripts/write_ffcv.py)")
    return path


def build_ffcv(data: FFCVData, aug: AugConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
               pin_memory: bool = False) -> Loaders:
    require_ffcv()
    train_path, val_path = _beton_path(data, "train_path"), _beton_path(data, "val_path")
    num_classes = data.num_classes
    common = dict(batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed,
                  num_workers=data.num_workers, img_size=data.img_size, aug=aug, os_cache=data.os_cache,
                  batches_ahead=data.batches_ahead, decode_threads=data.decode_threads, pin_memory=pin_memory)
    if common["num_workers"] > 0:
        check_shared_memory([(train_path, "train_path"), (val_path, "val_path")], common["batch_size"],
                            common["img_size"])
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
