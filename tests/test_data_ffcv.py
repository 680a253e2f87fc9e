"""FFCV: write -> read round trip, every shipped pipeline under a timeout, determinism and exact resume.

The first test is a small round trip for the fast suite (one raw-pixel .beton, read back equal to the folder
pipeline's batches); the rest compile several FFCV pipelines with numba and are ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from focalnet.data import build_loaders
from focalnet.data.folder import DataConfigError, folder_samples
from focalnet.data.imagegen import write_bad_image, write_image_folder
from focalnet.schema import AugConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT = AugConfig()  # aug=deit: conf/aug/deit.yaml takes every value from AugConfig
# FFCV issue #396: a bad op order hangs the Loader constructor, hence the timeout. Numba compiles each
# pipeline (~5-10 s on 2 cores).
pytestmark = pytest.mark.timeout(300)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import write_ffcv  # noqa: E402


def test_fast_round_trip_gives_the_folder_pipelines_val_batches(tmp_path):
    """Write a raw-pixel .beton in process, read it back: every val image once, its label, and the folder
    pipeline's exact pixels (the official resize + center crop of the same source images)."""
    src = tmp_path / "src"
    write_image_folder(str(src / "train"), 2, 2, size=(40, 30))
    write_image_folder(str(src / "val"), 2, 3, size=(40, 30), seed=1)
    assert write_ffcv.main(["data=folder", f"data.root={src}", "--out-dir", str(tmp_path / "ffcv"), "--num-workers",
                            "1", "--max-resolution", "64", "--compress-probability", "0", "--splits", "val"]) == 0
    meta = json.loads((tmp_path / "ffcv" / "val.beton.json").read_text())
    assert (meta["num_samples"], meta["num_classes"], meta["skipped_images"]) == (6, 2, 0)
    aug = OmegaConf.create({"test_crop": True, "interpolation": "bicubic"})
    folder = build_loaders(OmegaConf.create(dict(name="folder", root=str(src), num_classes=2, img_size=32,
                                                 batch_size=4, num_workers=0, val_count=0)), aug)
    ffcv = build_loaders(ffcv_cfg(tmp_path / "ffcv", num_classes=2, train_path="val.beton"), aug)
    ffcv.val.set_epoch(0)
    folder.val.set_epoch(0)
    ours, ref = [(x.clone(), y.clone()) for x, y in ffcv.val], list(folder.val)
    assert [len(y) for _, y in ours] == [4, 2] and torch.cat([y for _, y in ours]).tolist() == [0, 0, 0, 1, 1, 1]
    for (a, ya), (b, yb) in zip(ours, ref, strict=True):
        assert torch.equal(ya, yb) and torch.equal(a, b)


def write_betons(src, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "scripts/write_ffcv.py"), "data=folder", f"data.root={src}",
           "--out-dir", str(out), "--num-workers", "2", "--max-resolution", "64", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ffcv_cfg(root, **kw):
    base = dict(name="imagenet1k_ffcv", root=str(root), num_classes=3, img_size=32, batch_size=4,
                num_workers=0, train_path="train.beton", val_path="val.beton", os_cache=True, batches_ahead=2)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_image_folder(str(src / "train"), 3, 4, size=(80, 60))
    write_image_folder(str(src / "val"), 3, 2, size=(80, 60), seed=1)
    write_bad_image(str(src / "train" / "n00000001" / "bad_truncated.JPEG"), "truncated")
    out = tmp_path_factory.mktemp("ffcv")
    write_betons(src, out)
    return src, out


@pytest.mark.slow
def test_write_read_round_trip_keeps_exact_labels(betons):
    src, out = betons
    meta = json.loads((out / "train.beton.json").read_text())
    assert (meta["num_samples"], meta["skipped_images"], meta["num_classes"]) == (13, 1, 3)
    assert meta["max_resolution"] == 64 and meta["jpeg_quality"] == 90
    cfg = OmegaConf.create(dict(name="folder", root=str(src), num_classes=3, val_count=0))
    train_samples, val_samples, _ = folder_samples(cfg)
    loaders = build_loaders(ffcv_cfg(out), DEIT)
    # val: sequential, unpadded -> labels in written order; every readable sample exactly once
    loaders.val.set_epoch(0)
    assert torch.cat([y for _, y in loaders.val]).tolist() == [lab for _, lab in val_samples]
    # train: the readable samples' labels, in the written order (the truncated file is label -1, dropped)
    readable = [lab for p, lab in train_samples if "bad_" not in p]
    assert loaders.train.labels[loaders.train.valid.astype(np.int64)].tolist() == readable
    assert loaders.train.stats() == {"skipped_images": 0, "skipped_at_write": 1}
    loaders.train.set_epoch(0)
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train) == 3
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(readable)
    x = batches[0][0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    loaders.train.close()


@pytest.mark.slow
@pytest.mark.parametrize("test_crop", [True, False])
def test_every_shipped_pipeline_constructs_and_runs(betons, test_crop):
    _, out = betons
    aug = dataclasses.replace(DEIT, test_crop=test_crop)
    loaders = build_loaders(ffcv_cfg(out, num_workers=1), aug, seed=1)  # val: resize + crop, or squash
    for loader in (loaders.train, loaders.val):
        loader.set_epoch(0)
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
    loaders.train.close()


@pytest.mark.slow
def test_ffcv_batches_depend_only_on_seed_epoch_and_resume_exactly(betons):
    _, out = betons
    runs = {}
    for workers in (0, 2):  # 1 vs 2 decode threads, inline vs pool RandAugment: same batches
        loaders = build_loaders(ffcv_cfg(out, num_workers=workers), DEIT, seed=7)
        loaders.train.set_epoch(1)
        runs[workers] = [(x.clone(), y.clone()) for x, y in loaders.train]
        if workers == 2:
            loaders.train.set_epoch(1, 1)  # resume at batch 1 of epoch 1
            tail = [(x.clone(), y.clone()) for x, y in loaders.train]
            loaders.train.set_epoch(2)
            other = next(iter(loaders.train))[0]
        loaders.train.close()
    for (a, ya), (b, yb) in zip(runs[0], runs[2]):
        assert torch.equal(ya, yb) and torch.equal(a, b)
    # A caller that keeps every batch (no clone) still sees each one intact: held batch buffers are never
    # reused, and an epoch abandoned halfway leaves no buffer marked busy.
    loaders = build_loaders(ffcv_cfg(out, num_workers=2), DEIT, seed=7)
    for _ in range(3):
        loaders.train.set_epoch(1)
        next(iter(loaders.train))
    assert not loaders.train.outputs.busy
    loaders.train.set_epoch(1)
    kept = list(loaders.train)
    loaders.train.close()
    assert len(kept) == len(runs[2])
    for (a, ya), (b, yb) in zip(runs[2], kept):
        assert torch.equal(ya, yb) and torch.equal(a, b)
    assert len(tail) == len(runs[2]) - 1
    for (a, ya), (b, yb) in zip(runs[2][1:], tail):
        assert torch.equal(ya, yb) and torch.equal(a, b)
    assert not torch.equal(other, runs[2][0][0])


@pytest.mark.slow
def test_raw_beton_gives_the_folder_paths_batches_bit_for_bit(tmp_path):
    """Same seed, same images (stored raw, so no decoder difference): the FFCV path's train batches (crop,
    flip, RandAugment, erasing) and val batches (resize + center crop) are the folder path's, exactly; and
    finished on the device from uint8 handovers they equal the batches the loader workers used to finish
    (``tests/test_gpu_path.py``'s reference), with a quarter of the bytes handed to ``.to(device)``.
    With the augmentation pool (2 workers); inline augmentation (0 workers) gives the pool's batches bit for
    bit (test_ffcv_batches_depend_only_on_seed_epoch_and_resume_exactly), so it equals the folder path too."""
    from test_gpu_path import check_epoch, todays_batches

    src = tmp_path / "src"
    write_image_folder(str(src / "train"), 3, 4, size=(62, 50))  # < 2x32: the folder path never drafts
    write_image_folder(str(src / "val"), 3, 2, size=(50, 62), seed=1)
    # In process (the CLI's subprocess run is the ``betons`` fixture's): one interpreter start fewer.
    assert write_ffcv.main(["data=folder", f"data.root={src}", "--out-dir", str(tmp_path / "ffcv"), "--num-workers",
                            "1", "--max-resolution", "128", "--compress-probability", "0"]) == 0
    folder = build_loaders(OmegaConf.create(dict(name="folder", root=str(src), num_classes=3, img_size=32,
                                                 batch_size=4, num_workers=0, val_count=0)), DEIT, seed=3)
    ffcv = build_loaders(ffcv_cfg(tmp_path / "ffcv", num_workers=2), DEIT, seed=3)
    for split in ("train", "val"):
        for epoch in (0, 1):
            loader, twin = getattr(ffcv, split), getattr(folder, split)
            loader.set_epoch(epoch)
            twin.set_epoch(epoch)
            check_epoch(loader, todays_batches(twin, twin.dataset, twin.finisher))
    ffcv.train.close()
    ffcv.val.close()


@pytest.mark.slow
def test_ffcv_config_errors_name_the_key(betons, tmp_path):
    _, out = betons
    with pytest.raises(DataConfigError, match=r"data\.train_path=missing\.beton: no such file"):
        build_loaders(ffcv_cfg(out, train_path="missing.beton"), DEIT)
    with pytest.raises(DataConfigError, match=r"written with 3 classes but data\.num_classes=1000"):
        build_loaders(ffcv_cfg(out, num_classes=1000), DEIT)


@pytest.mark.slow
def test_too_little_shared_memory_fails_before_work_starts(betons, tmp_path, monkeypatch):
    from focalnet.data import ffcv_loader

    _, out = betons
    paths = [(str(out / "train.beton"), "train_path"), (str(out / "val.beton"), "val_path")]
    need = sum(ffcv_loader.pool_shared_bytes(p, 4, 32) for p, _ in paths)
    assert need > 4 * 6 * 3 * 32 * 32 * 4  # output batches + the packed input ring
    ffcv_loader.check_shared_memory(paths, 4, 32)  # /dev/shm here has room
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10**9))  # as if a billion ranks shared this node
    with pytest.raises(DataConfigError, match=r"shared memory.*--shm-size.*data\.batch_size"):
        build_loaders(ffcv_cfg(out, num_workers=2), DEIT)
    build_loaders(ffcv_cfg(out, num_workers=0), DEIT)  # no pool, no shared memory: fine


def pools_mid_epoch(out):
    """FFCV loaders with 2 augmentation processes each (batches of 1, 12 per epoch), the 4 processes they forked,
    and the train loader's epoch-0 iterator after its first batch."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    loaders = build_loaders(ffcv_cfg(out, num_workers=2, batch_size=1), DEIT)
    pool = set(multiprocessing.active_children()) - before  # the augmentation processes the loaders forked
    assert len(pool) == 4  # train and val: 2 each
    loaders.train.set_epoch(0)
    it = iter(loaders.train)
    next(it)
    return loaders, pool, it


@pytest.mark.slow
def test_close_returns_once_the_pool_is_gone_so_the_exit_hook_cannot_race_it(betons):
    """The exit race of ``FFCVEpochLoader.close`` (Python 3.11's exit hook and the pool's manager thread; it
    showed as a traceback after "exiting with code 75" in test_reliability's FFCV signal-storm test on a loaded
    machine): ``close()`` returns once the pool's manager thread and processes are gone."""
    import threading
    from concurrent.futures import process as futures_process

    loaders, pool, it = pools_mid_epoch(betons[1])
    it.close()  # an epoch abandoned mid-way, as when a stop signal ends training
    loaders.train.close()
    loaders.val.close()
    managers = [t for t in threading.enumerate() if isinstance(t, futures_process._ExecutorManagerThread)]
    assert managers == [] and not any(p.is_alive() for p in pool)
    assert all(w._closed for w in futures_process._threads_wakeups.values())  # nothing left for the hook to write to


@pytest.mark.slow
def test_a_killed_augmentation_process_raises_instead_of_hanging(betons):
    import signal

    from focalnet.data.ffcv_loader import AHEAD, QUEUED

    loaders, pool, it = pools_mid_epoch(betons[1])
    # The feeder thread is at most QUEUED + 1 finished batches and AHEAD batches in the pool ahead of us: the
    # rest of the epoch is handed to the pool after this.
    assert len(loaders.train) > 1 + QUEUED + 1 + AHEAD
    for proc in pool:  # as the OOM killer would; all of them, so no live process can pick up a later batch
        os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"augmentation process died .* Resume from the last checkpoint"):
        for _ in it:
            pass
    with pytest.raises(RuntimeError, match="died"):  # and the next epoch does not start on a broken pool
        loaders.train.set_epoch(1)
        next(iter(loaders.train))
    loaders.train.close()  # returns: no lock left held by the dead process to wait for
    loaders.val.close()
