"""The GPU hot path, proven on the CPU (README "GPU notes"): the same code runs there, with pinning skipped.

* uint8 handover: batches finished by :class:`focalnet.data.loaders.DeviceLoader` (normalize + random erasing after the
  copy to the device) equal, bit for bit, the batches the loader workers finished before (the reference below is
  that code), for the folder, webdataset shard (indexed and streaming) and synthetic paths over several seeds and
  epochs (the FFCV path:
  ``tests/test_data_ffcv.py::test_raw_beton_gives_the_folder_paths_batches_bit_for_bit``); the bytes handed to
  ``.to(device)`` per step are counted: a quarter of the float32 batches'.
* no host sync in a steady-state update: a real training run (1-rank gloo process group, so the collectives
  run) with every device->host read counted (``aten._local_scalar_dense`` through a TorchDispatchMode, plus
  ``Tensor.tolist``/``cpu``/``numpy`` and the ``torch.distributed`` collectives): 0 in every update that is not
  a host check, for fp32, bf16 and fp16 (fused AdamW, its ``found_inf`` skip), with accumulation, EMA, mixup and
  erasing.
* a stop signal is answered at the next host check (trainer.check_every_s); a non-finite update is never applied,
  and divergence still stops the run at the next check.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import TINY, compose_config
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from focalnet.data import build_loaders
from focalnet.data.imagegen import write_image_folder
from focalnet.data.loaders import DeviceLoader
from focalnet.data.transforms import BatchFinisher
from focalnet.schema import AugConfig

DEIT = AugConfig()  # aug=deit: conf/aug/deit.yaml takes every value from AugConfig


# -- 1. uint8 handover, finished on the device: today's batches bit for bit ------------------------------------


def todays_finished_sample(finisher: BatchFinisher, image: torch.Tensor, seed: int) -> torch.Tensor:
    """How a loader worker finished a sample before the uint8 handover (``BatchFinisher.finish_one`` at main
    9f74a97, ``data/transforms.py``): normalize into a float (3, H, W), then erase under the seed's global RNGs."""
    out = torch.empty(image.shape, dtype=torch.float32)
    torch.addcmul(finisher.shift, image.float(), finisher.scale, out=out)
    if finisher.erase is not None:
        state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        erase_seed = (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & ((1 << 63) - 1)
        random.seed(erase_seed)
        np.random.seed(erase_seed % (1 << 32))
        torch.default_generator.manual_seed(erase_seed)
        finisher.erase(out)
        random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    return out


def todays_batches(loader, dataset, finisher) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch as the loader workers used to hand it over: every sample of the sampler's order, finished alone."""
    keys = list(loader.sampler)
    batches = []
    size = loader.sampler.batch_size
    for lo in range(0, len(keys), size):
        samples = [dataset[key] for key in keys[lo:lo + size]]
        images = [s[0] if finisher is None else todays_finished_sample(finisher, s[0], s[2]) for s in samples]
        batches.append((torch.stack(images), torch.tensor([s[1] for s in samples])))
    return batches


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(str(root / "train"), 3, 4, size=(62, 50))  # < 2x32: no JPEG draft, as the FFCV path
    write_image_folder(str(root / "val"), 3, 2, size=(50, 62), seed=1)
    return root


def folder_cfg(root, workers: int = 0):
    return OmegaConf.create(dict(name="folder", root=str(root), num_classes=3, img_size=32, batch_size=4,
                                 num_workers=workers, val_count=0, persistent_workers=False))


def check_epoch(loader, reference, dtype=torch.uint8, length: int | None = None) -> None:
    device_loader = DeviceLoader(loader, "cpu")
    ours = [(x.clone(), y.clone()) for x, y in device_loader]
    assert len(ours) == len(reference) == (len(loader) if length is None else length) > 0
    for (a, ya), (b, yb) in zip(ours, reference):
        assert torch.equal(ya, yb)
        assert a.dtype == torch.float32 and torch.equal(a, b), f"max diff {(a - b).abs().max()}"
    # Bytes handed to .to(device): the handover batches (uint8 images, int64 labels), not float32 ones.
    expected = sum(x.numel() * dtype.itemsize + y.numel() * 8 for x, y in reference)
    assert device_loader.bytes_to_device == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_finished_on_the_device_are_todays_bit_for_bit(images, workers):
    for seed in (0, 5):
        loaders = build_loaders(folder_cfg(images, workers), DEIT, seed=seed)
        for split in ("train", "val"):
            loader = getattr(loaders, split)
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                check_epoch(loader, todays_batches(loader, loader.dataset, loader.finisher))
        assert loaders.train.finisher.erase is not None and loaders.val.finisher.erase is None


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory):
    """``images`` as webdataset shards (scripts/write_shards.py in this process; original bytes)."""
    from test_data_shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    code, log = write_shards("data=folder", f"data.root={images}", "--shard-size", "4KB", "--num-workers", "1", out=out)
    assert code == 0, log[-3000:]
    return out


def wds_cfg(root, **kw):
    return OmegaConf.create({**dict(name="wds", root=str(root), num_classes=3, img_size=32, batch_size=4, num_workers=0,
                                    persistent_workers=False, train_split="train", val_split="val", mode="indexed",
                                    shuffle="global", shuffle_window=2), **kw})


@pytest.mark.parametrize("shuffle, workers", [("global", 2), ("shards", 0)])
def test_indexed_shard_batches_finished_on_the_device_are_todays_bit_for_bit(shards, shuffle, workers):
    loaders = build_loaders(wds_cfg(shards, shuffle=shuffle, num_workers=workers), DEIT, seed=4)
    for split in ("train", "val"):
        loader = getattr(loaders, split)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            check_epoch(loader, todays_batches(loader, loader.dataset, loader.finisher))


def test_streaming_shard_batches_finished_on_the_device_are_todays_bit_for_bit(shards):
    """``data.mode=streaming`` with ``num_workers=0``: the reference reads the same stream in this process."""
    loaders = build_loaders(wds_cfg(shards, mode="streaming", shuffle_buffer=4), DEIT, seed=4)
    for split in ("train", "val"):
        loader = getattr(loaders, split)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            samples = list(loader.dataset)
            reference = [(torch.stack([todays_finished_sample(loader.finisher, x, seed) for x, _, seed in chunk]),
                          torch.tensor([label for _, label, _ in chunk]))
                         for chunk in (samples[lo:lo + 4] for lo in range(0, len(samples), 4))]
            check_epoch(loader, reference)  # validation: 6 samples, batch 4 -> 2 batches, the last one partial
    assert loaders.train.finisher.erase is not None and loaders.val.finisher.erase is None


def test_synthetic_batches_are_todays_bit_for_bit():
    cfg = OmegaConf.create(dict(name="synthetic", num_classes=10, img_size=16, batch_size=8, train_size=40,
                                val_size=16, num_workers=1))
    for seed in (0, 3):
        loaders = build_loaders(cfg, None, seed=seed)
        assert loaders.train.finisher is None  # float pixels: nothing to finish, handed over as float32
        for epoch in (0, 2):
            loaders.train.set_epoch(epoch)
            check_epoch(loaders.train, todays_batches(loaders.train, loaders.train.dataset, None), torch.float32)


def test_device_finishing_leaves_the_callers_random_streams_alone():
    finisher = BatchFinisher(DEIT, train=True)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(1), random.seed(1)
    expected = torch.rand(3), random.random()
    torch.manual_seed(1), random.seed(1)
    first = finisher(images, list(range(6)))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(finisher(images, list(range(6))), first)  # a function of the pixels and the seeds only


# -- 2. no host sync in a steady-state update ------------------------------------------------------------------


class SyncCounter(TorchDispatchMode):
    """Counts, in the training thread, every read of a tensor value by the host (``aten._local_scalar_dense``:
    ``.item()``, ``bool()``, ``int()``, ``float()``), every ``Tensor.tolist``, ``Tensor.cpu`` and ``Tensor.numpy``
    and every ``torch.distributed`` collective. Reads made while the loader produces its host-side batch (before ``.to(device)``) are the data
    pipeline's own host work, not device syncs: they are not counted."""

    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                   "reduce", "gather", "scatter", "all_to_all")

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.in_loader = False
        self.thread = threading.get_ident()

    def _counting(self) -> bool:
        return threading.get_ident() == self.thread and not self.in_loader

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self._counting():
            self.counts["item"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def patched(self, monkeypatch):
        # Device->host copies that a CPU run cannot tell from no-ops (no dispatch for a CPU tensor's .cpu()).
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)

            def counted_method(t, *a, _original=original, _name=method, **kw):
                if self._counting():
                    self.counts[_name] += 1
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, method, counted_method)
        for name in self.COLLECTIVES:
            fn = getattr(dist, name)

            def counted(*a, _fn=fn, _name=name, **kw):
                if self._counting():
                    self.counts[_name] += 1
                return _fn(*a, **kw)

            monkeypatch.setattr(dist, name, counted)
        with self:
            yield self

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts


def host_loader(counter: SyncCounter, loader) -> None:
    """Mark the loader's own (host-side) work, so that the counter leaves it out."""
    handover = loader.handover

    def marked():
        it = handover()
        while True:
            counter.in_loader = True
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                counter.in_loader = False
            yield batch

    loader.handover = marked


@pytest.fixture
def gloo_group(tmp_path):
    """A 1-rank gloo process group in this process: the engine's collectives run (and are counted)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def more_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("more_images")
    write_image_folder(str(root / "train"), 3, 14, size=(40, 30))  # 42 images: 10 updates of 4 per epoch
    write_image_folder(str(root / "val"), 3, 1, size=(40, 30), seed=1)
    return root


@pytest.mark.parametrize("amp, extra", [
    ("none", ["data.batch_size=2", "trainer.accum_steps=2", "trainer.ema_decay=0.9"]),
    ("bf16", ["data.batch_size=4", "trainer.channels_last=true"]),
    ("fp16", ["data.batch_size=4"]),
])
def test_steady_state_updates_never_sync(more_images, gloo_group, monkeypatch, tmp_path, amp, extra):
    from focalnet.engine.config import validate_config
    from focalnet.engine.distributed import DistInfo
    from focalnet.engine.trainer import TrainRun

    overrides = [o for o in TINY if not o.startswith("data")] + [
        "data=folder", f"data.root={more_images}", "data.img_size=32", "data.num_workers=0", "aug=deit",
        "aug.color_jitter=null", f"trainer.amp={amp}", "trainer.epochs=1", "trainer.log_every=5",
        "trainer.ckpt_every_steps=4", "trainer.check_every_s=1e9", "trainer.eval_every=0", *extra]
    run = TrainRun(validate_config(compose_config(overrides, tmp_path / "run")), DistInfo())
    counter = SyncCounter()
    host_loader(counter, run.loaders.train)
    per_update: dict[int, dict] = {}
    after_step = run.after_step

    def counted_after_step(state, loss, grad_norm):
        stop = after_step(state, loss, grad_norm)
        per_update[state.step] = counter.take()
        return stop

    run.after_step = counted_after_step
    with counter.patched(monkeypatch):
        run.fit()
    assert sorted(per_update) == list(range(1, 11))
    # Host checks: the first update, log steps (5, 10), checkpoint steps (4, 8) and the epoch's last update (10).
    checks = {1, 4, 5, 8, 10}
    steady = {s: c for s, c in per_update.items() if s not in checks}
    assert sorted(steady) == [2, 3, 6, 7, 9] and all(not c for c in steady.values()), steady
    # The counter sees the checks: one all-reduce and one read-back each (+ at a save: the finiteness checks,
    # the RNG gather; fp16 logging reads the loss scale).
    for s in checks:
        c = per_update[s]
        assert c.get("all_reduce") == 1 and c.get("tolist", 0) >= 1, (s, c)
    assert sum(c.get("tolist", 0) + c.get("item", 0) for c in per_update.values()) < 6 * len(checks)


@pytest.mark.parametrize("check_every_s, checks", [(0.0, [1, 2, 3, 4, 5]), (1e9, [1, 8])])
def test_a_stop_signal_is_answered_at_the_next_host_check(compose_cfg, check_every_s, checks):
    """A stop flag set after update 5 (as the signal handler sets it): ``trainer.check_every_s=0`` checks after every
    update, so the run stops at 5; with checks only where they are forced (the first update, the epoch's last,
    8), at 8. The default, 2 s, bounds the wait by about that much wall time."""
    import signal

    from focalnet.engine.checkpointing import load_file
    from focalnet.engine.config import validate_config
    from focalnet.engine.distributed import DistInfo
    from focalnet.engine.trainer import TrainingPreempted, TrainRun

    cfg = validate_config(compose_cfg("trainer.epochs=2", "trainer.log_every=1000", "trainer.ckpt_every_steps=null",
                                      f"trainer.check_every_s={check_every_s}", "trainer.eval_every=0"))
    run = TrainRun(cfg, DistInfo())  # 128 samples / 16 = 8 updates per epoch
    seen, host_check, after_step = [], run.host_check, run.after_step

    def recorded_host_check(step, *args):
        seen.append(step)
        return host_check(step, *args)

    def signalled_after_step(state, loss, grad_norm):
        if state.step == 5:
            run.preempt.signum = signal.SIGUSR1
        return after_step(state, loss, grad_norm)

    run.host_check, run.after_step = recorded_host_check, signalled_after_step
    with pytest.raises(TrainingPreempted, match=f"preempted at step {checks[-1]}"):
        run.fit()
    assert seen == checks
    assert load_file(os.path.join(cfg["paths"]["output_dir"], "checkpoints", "last.pt"))["step"] == checks[-1]


def test_a_non_finite_update_is_skipped_on_the_device_and_stops_the_run_at_the_next_check(compose_cfg):
    """Non-finite gradients from the first update on (data of 1e38): the fused AdamW skips every update on the
    device; the first host check stops the run (exit 3 in train.py) and nothing is saved."""
    from focalnet.engine import NonFiniteLossError, train

    cfg = compose_cfg("trainer.max_steps=6", "data.signal=1e38", "trainer.check_every_s=1e9",
                      "trainer.log_every=100", "trainer.ckpt_every_steps=3")
    with pytest.raises(NonFiniteLossError, match="an update had NaN/inf gradients .* not applied"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.paths.output_dir, "checkpoints", "last.pt"))
