"""webdataset shards: scripts/write_shards.py writes them, data=wds reads them (data/shards.py)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from focalnet.data import build_loaders
from focalnet.data.folder import DataConfigError, ImageFileDataset, folder_samples
from focalnet.data.imagegen import write_bad_images, write_image_folder
from focalnet.data.shards import ShardDataset, ShardLocalSampler, redact
from focalnet.data.transforms import EvalSampleTransform, TrainSampleTransform
from focalnet.schema import AugConfig, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT = AugConfig()  # aug=deit: conf/aug/deit.yaml takes every value from AugConfig
UNREADABLE = {"bad_corrupt.JPEG", "bad_truncated.JPEG", "bad_zero_byte.JPEG"}


def _load_writer():
    spec = importlib.util.spec_from_file_location("write_shards", os.path.join(ROOT, "scripts/write_shards.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["write_shards"] = module  # its worker processes (forked) find write_shard by this name
    spec.loader.exec_module(module)
    return module


WRITER = _load_writer()


def write_shards(*args: str, out) -> tuple[int, str]:
    """Run scripts/write_shards.py's main in this process (its writer processes are real); (exit code, log)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("write_shards", "focalnet.data")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = WRITER.main([*args, "--out", str(out)])
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    return code, "\n".join(lines) + err.getvalue()


def wds_cfg(root, **kw):
    base = dict(name="wds", root=str(root), num_classes=4, img_size=32, batch_size=4, num_workers=0,
                persistent_workers=False, train_split="train", val_split="val", mode="indexed", shuffle="global",
                shuffle_window=2)
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_image_folder(str(root / "train"), 4, 5, size=(72, 56))
    write_image_folder(str(root / "val"), 4, 2, size=(72, 56), seed=1)
    write_bad_images(str(root / "train" / "n00000001"))  # 3 unreadable, 4 readable oddities (CMYK, PNG, ...)
    return root


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    code, log = write_shards("data=folder", f"data.root={source}", "--shard-size", "30KB", "--num-workers", "2", out=out)
    assert code == 0, log[-3000:]
    return out, log


def tar_members(out, split) -> dict[str, bytes]:
    """Every member of the split's shards, read with Python's tarfile (not our reader)."""
    members = {}
    for name in sorted(os.listdir(out)):
        if name.startswith(f"{split}-") and name.endswith(".tar"):
            with tarfile.open(out / name) as t:
                members.update({m.name: t.extractfile(m).read() for m in t})
    return members


def test_shards_hold_every_readable_image_once_with_its_bytes_and_label(source, shards):
    out, log = shards
    train, val, _ = folder_samples(OmegaConf.create(dict(name="folder", root=str(source), num_classes=4)))
    for split, samples in (("train", train), ("val", val)):
        members = tar_members(out, split)
        images = {k: v for k, v in members.items() if not k.endswith(".cls")}
        readable = [(p, lab) for p, lab in samples if os.path.basename(p) not in UNREADABLE]
        assert len(images) == len(readable)
        for path, label in readable:
            key = os.path.relpath(path, source).rsplit(".", 1)[0]
            (name,) = [n for n in images if n.rsplit(".", 1)[0] == key]
            assert images[name] == open(path, "rb").read()  # the original bytes, not re-encoded
            assert members[key + ".cls"] == str(label).encode()
        spec = json.loads((out / f"{split}.json").read_text())
        assert spec["__kind__"] == "wids-shard-index-v1" and spec["focalnet"]["num_samples"] == len(readable)
        assert sum(s["nsamples"] for s in spec["shardlist"]) == len(readable)
        assert all(os.path.getsize(out / s["url"]) == s["filesize"] for s in spec["shardlist"])
    assert len(json.loads((out / "train.json").read_text())["shardlist"]) > 1
    skipped = (out / "train.skipped.tsv").read_text().splitlines()
    assert {os.path.basename(line.split("\t")[0]) for line in skipped} == UNREADABLE
    assert all(f"skipping unreadable image {source / 'train' / 'n00000001' / n}" in log for n in UNREADABLE)
    assert "3 unreadable images skipped" in log
    assert "png" in {n.rsplit(".", 1)[1] for n in tar_members(out, "train")}  # a PNG named .JPEG stays a PNG


def test_same_pixels_as_the_folder_path_for_the_same_bytes(source, shards):
    out, _ = shards
    loaders = build_loaders(wds_cfg(out), DEIT, seed=5)
    train, val, _ = folder_samples(OmegaConf.create(dict(name="folder", root=str(source), num_classes=4)))
    for shard_ds, samples, transform in (
            (loaders.train.dataset, train, TrainSampleTransform(DEIT, 32)),
            (loaders.val.dataset, val, EvalSampleTransform(32))):
        assert isinstance(shard_ds, ShardDataset)
        folder_ds = ImageFileDataset(samples, transform)
        by_bytes = {open(p, "rb").read(): j for j, (p, _) in enumerate(samples)}
        for i in range(len(shard_ds)):
            ref, _ = shard_ds.samples[i]
            j = by_bytes[shard_ds.samples.reader.read(ref.shard, ref.offset, ref.size)]
            a, b = shard_ds[(i, 1234 + i)], folder_ds[(j, 1234 + i)]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_timm_reads_our_shards_as_a_wds_dataset(source, shards):
    from timm.data.readers.reader_wds import ReaderWds

    out, _ = shards
    reader = ReaderWds(str(out), split="train", is_training=False)
    got = sorted((int(t), hashlib.sha1(np.asarray(img).tobytes()).hexdigest()) for img, t in reader)
    train, _, _ = folder_samples(OmegaConf.create(dict(name="folder", root=str(source), num_classes=4)))
    want = sorted((lab, hashlib.sha1(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest())
                  for p, lab in train if os.path.basename(p) not in UNREADABLE)
    assert got == want and reader.num_samples == len(want)


def test_loaders_cover_the_splits_and_resume_exactly_in_both_orders(shards):
    out, _ = shards
    for shuffle in ("global", "shards"):
        loaders = build_loaders(wds_cfg(out, shuffle=shuffle, batch_size=3), DEIT, seed=2)
        n = loaders.info["train_size"]
        loaders.train.set_epoch(1)
        full = [(x.clone(), y.clone()) for x, y in loaders.train]
        assert sum(len(y) for _, y in full) == (n // 3) * 3 and loaders.train.stats()["skipped_images"] == 0
        loaders.train.set_epoch(1, 2)
        rest = list(loaders.train)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], rest, strict=True))
        assert sum(len(y) for _, y in loaders.val) == loaders.info["val_size"] == 8


def test_shard_local_order_is_an_exact_permutation_that_reads_few_shards_at_a_time():
    starts = np.cumsum([0] + [10] * 19 + [7])  # 20 shards, the last one short
    n = int(starts[-1])
    seen, windows = [], []
    for rank in range(3):
        s = ShardLocalSampler(n, starts=starts, window=2, batch_size=5, rank=rank, world_size=3, seed=4)
        s.set_epoch(3)
        mine = [i for i, _ in s]
        seen += mine
        shard_of = np.searchsorted(starts, mine, side="right") - 1
        windows += [len(set(shard_of[i:i + 10])) for i in range(0, len(mine) - 10)]
    assert len(seen) == 3 * 13 * 5 and len(set(seen)) == len(seen)  # 13 full batches per rank, no sample twice
    assert max(windows) <= 4  # any 10 consecutive samples of a rank come from at most 2 windows of 2 shards
    evals = []
    for rank in range(3):
        s = ShardLocalSampler(n, starts=starts, window=2, batch_size=5, rank=rank, world_size=3, seed=4,
                              shuffle=False, train=False)
        evals += [i for i, _ in s]
    assert evals == list(range(n))  # evaluation: every sample exactly once, each rank a contiguous run


def test_a_corrupt_sample_in_a_shard_is_skipped_and_counted(shards, tmp_path):
    out, _ = shards
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in os.listdir(out):
        if not name.startswith("."):
            (copy / name).write_bytes((out / name).read_bytes())
    records = np.load(copy / "train.idx.npy")
    spec = json.loads((copy / "train.json").read_text())
    first = spec["shardlist"][0]["url"]
    with open(copy / first, "r+b") as f:  # sample 0 lives in the first shard: overwrite its bytes
        f.seek(int(records[0]["offset"]))
        f.write(b"\0" * int(records[0]["size"]))
    loaders = build_loaders(wds_cfg(copy, batch_size=len(records)), DEIT, seed=0)
    loaders.train.set_epoch(0)
    (x, y), = list(loaders.train)
    assert x.shape[0] == len(records) and torch.isfinite(x).all()
    assert loaders.train.stats()["skipped_images"] == 1


def test_bad_roots_and_indexes_name_the_key(tmp_path, shards):
    out, _ = shards
    with pytest.raises(DataConfigError, match=r"data.root=.*no such directory"):
        build_loaders(wds_cfg(tmp_path / "missing"), DEIT)
    with pytest.raises(DataConfigError, match=r"no train.json .*write_shards.py"):
        build_loaders(wds_cfg(tmp_path), DEIT)
    with pytest.raises(DataConfigError, match=r"written with 4 classes but data.num_classes=10"):
        build_loaders(wds_cfg(out, num_classes=10), DEIT)
    with pytest.raises(ConfigError, match=r"^data.shuffle='random' is not allowed; it must be one of: auto, global, shards$"):
        build_loaders(wds_cfg(out, shuffle="random"), DEIT)


def test_urls_are_logged_without_credentials():
    text = "fetch https://alice:s3cret@host.example:8443/in22k/train-000001.tar?X-Amz-Signature=abc&token=xyz failed"
    assert redact(text) == "fetch https://host.example:8443/in22k/train-000001.tar failed"
    assert redact("s3://bucket/x.tar") == "s3://bucket/x.tar"


@pytest.mark.slow
def test_writer_is_resumable_after_sigkill_and_refuses_other_inputs(source, tmp_path, shards):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "scripts/write_shards.py"), "data=folder", f"data.root={source}",
           "--shard-size", "1KB", "--num-workers", "1", "--splits", "train", "--out", str(out)]  # one image per shard
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.is_dir() and any(n.endswith(".tar") for n in os.listdir(out))):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the writer and its worker processes, mid-write
    proc.wait()
    names = os.listdir(out)
    done = [n for n in names if n.endswith(".tar")]
    assert done and "train.json" not in names  # no index: readers refuse the unfinished split
    with pytest.raises(DataConfigError, match="no train.json"):
        build_loaders(wds_cfg(out), DEIT)
    for name in done:  # every visible shard is complete: Python's tarfile reads it to the end
        with tarfile.open(out / name) as t:
            t.getmembers()
    code, log = write_shards("data=folder", f"data.root={source}", "--shard-size", "1KB", "--num-workers", "1",
                             "--splits", "train", out=out)
    assert code == 0, log[-3000:]
    total = int(re.search(r"-> (\d+) shards", log)[1])
    assert "resuming" in log and f"({total - len(done)} to write)" in log
    fresh = tmp_path / "fresh"
    assert write_shards("data=folder", f"data.root={source}", "--shard-size", "1KB", "--num-workers", "1",
                        "--splits", "train", out=fresh)[0] == 0
    for name in os.listdir(fresh):  # byte-identical to an uninterrupted write
        if name.endswith((".tar", ".idx.npy")):
            assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not [n for n in os.listdir(out) if ".tmp" in n or n.startswith(".train.p")]
    code, log = write_shards("data=folder", f"data.root={source}", "--shard-size", "2KB", "--splits", "train", out=out)
    assert code == 2 and "already holds a different train split" in log


def test_max_resolution_reencodes_only_larger_images(source, tmp_path):
    out = tmp_path / "small"
    code, log = write_shards("data=folder", f"data.root={source}", "--max-resolution", "64", "--splits", "val",
                             "--num-workers", "1", out=out)
    assert code == 0, log[-3000:]
    images = {k: v for k, v in tar_members(out, "val").items() if not k.endswith(".cls")}
    for name, data in images.items():
        src = source / (name.rsplit(".", 1)[0] + ".JPEG")
        w, h = Image.open(io.BytesIO(data)).size
        sw, sh = Image.open(src).size
        assert max(w, h) == min(64, max(sw, sh))
        assert (data == src.read_bytes()) == (max(sw, sh) <= 64)


def test_writer_skips_hostile_files_unread_and_the_reader_applies_the_same_limits(tmp_path):
    """A 12 GB sparse .jpg, a 144 Mpx PNG and a symlink loop (as in the folder path's reliability test): the writer
    leaves them out without reading them whole; a shard sample over data.max_image_pixels is skipped and counted."""
    from focalnet.data.imagegen import write_hostile_files

    src = tmp_path / "src"
    write_image_folder(str(src / "train"), 2, 2, size=(72, 56))
    write_image_folder(str(src / "val"), 2, 1, size=(72, 56), seed=1)
    write_hostile_files(str(src / "train" / "n00000000"))
    code, log = write_shards("data=folder", f"data.root={src}", "--num-workers", "1", out=tmp_path / "out")
    assert code == 0, log[-3000:]
    skipped = dict(line.split("\t") for line in (tmp_path / "out" / "train.skipped.tsv").read_text().splitlines())
    assert {os.path.basename(p) for p in skipped} == {"huge_sparse.jpg", "bomb.png"}
    assert "12288 MiB is over data.max_file_mb=256 (not read)" in skipped[str(src / "train/n00000000/huge_sparse.jpg")]
    assert "over data.max_image_pixels" in skipped[str(src / "train/n00000000/bomb.png")]
    assert json.loads((tmp_path / "out" / "train.json").read_text())["focalnet"]["num_samples"] == 4
    small = build_loaders(wds_cfg(tmp_path / "out", num_classes=2, max_image_pixels=72 * 56 - 1), DEIT)
    with pytest.raises(RuntimeError, match="unreadable images in a row"):
        next(iter(small.val))  # every sample is over the limit
    assert small.val.stats()["skipped_images"] == 64


def test_log_lines_never_carry_credentials(caplog, tmp_path):
    from focalnet.data.shards import ShardFetchError, fetch

    caplog.set_level(logging.DEBUG)
    with pytest.raises(ShardFetchError) as e:
        fetch("http://bob:pa55word@127.0.0.1:9/x/train-000000.tar?sig=zzz", str(tmp_path / "x.tar"))
    assert "pa55word" not in str(e.value) and "sig=zzz" not in str(e.value) and "127.0.0.1:9/x" in str(e.value)


@pytest.fixture
def http_server(shards):
    """``python -m http.server`` on 127.0.0.1 (a free port) serving the shards directory."""
    out, _ = shards
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"port (\d+)", proc.stdout.readline())[1])
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def test_an_http_source_gives_the_local_batches_and_logs_no_credentials(shards, http_server, tmp_path, caplog):
    out, _ = shards
    caplog.set_level(logging.DEBUG)
    url = f"http://alice:s3cret@{http_server}"  # the server ignores the user; the logs must not show it
    cfg = wds_cfg(url, num_workers=1, shuffle="auto", cache_dir=str(tmp_path / "cache"), cache_limit_gb=None)
    remote = build_loaders(cfg, DEIT, seed=3)
    local = build_loaders(wds_cfg(out, shuffle="shards"), DEIT, seed=3)  # auto = shards for a URL
    for loaders in (remote, local):
        loaders.train.set_epoch(2)
    got = [(x.clone(), y.clone()) for x, y in remote.train]
    want = list(local.train)
    assert len(got) == len(want) > 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    assert [y.tolist() for _, y in remote.val] == [y.tolist() for _, y in local.val]
    cached = sorted(n for n in os.listdir(tmp_path / "cache") if n.endswith(".tar"))
    assert cached == sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert all((tmp_path / "cache" / n).read_bytes() == (out / n).read_bytes() for n in cached)
    assert "s3cret" not in caplog.text and f"http://{http_server}" in caplog.text
    # A bounded cache: shards are fetched again when needed, batches stay the same.
    small = build_loaders(OmegaConf.merge(cfg, {"cache_dir": str(tmp_path / "small"), "cache_limit_gb": 1e-9,
                                                "num_workers": 0}), DEIT, seed=3)
    small.train.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for (a, b) in zip([x for x, _ in small.train], [x for x, _ in got]))
    assert len([n for n in os.listdir(tmp_path / "small") if n.endswith(".tar")]) == 1
    # Streaming reads the shards straight from the URL (webdataset's pipeline, curl): the local stream's batches.
    stream_cfg = {"mode": "streaming", "shuffle_buffer": 5, "num_workers": 1}
    remote = build_loaders(OmegaConf.merge(cfg, stream_cfg), DEIT, seed=3)
    local = build_loaders(OmegaConf.merge(wds_cfg(out), stream_cfg), DEIT, seed=3)
    assert all(torch.equal(a[0], b[0]) for (a, _), (b, _) in zip(streamed(remote.train, 1), streamed(local.train, 1),
                                                                  strict=True))


def streamed(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_streaming_mode_resumes_exactly_and_validates_every_sample_once(shards, tmp_path):
    out, _ = shards
    cfg = wds_cfg(out, mode="streaming", batch_size=3, num_workers=2, shuffle_buffer=6)
    loaders = build_loaders(cfg, DEIT, seed=7)
    full = streamed(loaders.train, 1)
    assert len(full) == len(loaders.train) == loaders.info["train_size"] // 3
    assert all(len(y) == 3 for _, y in full)
    rest = streamed(loaders.train, 1, 3)  # resume at batch 3: the rest of the epoch, bit for bit
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], rest))
    assert [y.tolist() for _, y in full] != [y.tolist() for _, y in streamed(loaders.train, 2)]  # reshuffled
    val_labels = sorted(lab for _, y in loaders.val for lab in y.tolist())
    assert val_labels == sorted(lab for _, lab in build_loaders(wds_cfg(out), DEIT).val.dataset.samples)
    # Shards named by a brace pattern (no index): the sample count must be given.
    spec = json.loads((out / "train.json").read_text())
    pattern = f"train-{{000000..{len(spec['shardlist']) - 1:06d}}}.tar"
    with pytest.raises(DataConfigError, match="data.train_size"):
        build_loaders(OmegaConf.merge(cfg, {"train_split": pattern}), DEIT)
    by_pattern = build_loaders(OmegaConf.merge(cfg, {"train_split": pattern, "train_size": spec["focalnet"]["num_samples"]}),
                               DEIT, seed=7)
    assert all(torch.equal(a[0], b[0]) for (a, _), (b, _) in zip(streamed(by_pattern.train, 1), full))


def test_streaming_mode_skips_and_counts_a_corrupt_sample(shards, tmp_path):
    out, _ = shards
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in os.listdir(out):
        if not name.startswith("."):
            (copy / name).write_bytes((out / name).read_bytes())
    records = np.load(copy / "train.idx.npy")
    first = json.loads((copy / "train.json").read_text())["shardlist"][0]["url"]
    with open(copy / first, "r+b") as f:
        f.seek(int(records[0]["offset"]))
        f.write(b"\0" * int(records[0]["size"]))
    loaders = build_loaders(wds_cfg(copy, mode="streaming", batch_size=4, shuffle_buffer=4), DEIT, seed=0)
    batches = streamed(loaders.train, 0)
    assert len(batches) == len(loaders.train) and all(x.shape[0] == 4 for x, _ in batches)
    assert loaders.train.stats()["skipped_images"] == 1


def test_s3_urls_go_through_the_aws_cli_with_credentials_from_the_environment(shards, tmp_path, monkeypatch, caplog):
    """``s3://`` is webdataset's pipe mechanism running ``aws s3 cp URL -``. There is no S3 here, so an ``aws`` on
    PATH serves the bucket from the local directory, and only when the credentials reach it via the environment."""
    out, _ = shards
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text('#!/bin/sh\n[ "$1 $2 $3" = "s3 cp --only-show-errors" ] && [ "$5" = "-" ] || exit 2\n'
                                 '[ "$AWS_SECRET_ACCESS_KEY" = "very-secret" ] || exit 3\n'
                                 'exec cat "$FAKE_BUCKET/${4#s3://bucket/in1k/}"\n')
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BUCKET", str(out))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    caplog.set_level(logging.DEBUG)
    cfg = wds_cfg("s3://bucket/in1k", cache_dir=str(tmp_path / "cache"), shuffle="global")
    remote, local = build_loaders(cfg, DEIT, seed=1), build_loaders(wds_cfg(out), DEIT, seed=1)
    got, want = streamed(remote.train, 0), streamed(local.train, 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
    assert "very-secret" not in caplog.text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(DataConfigError, match=r"data.root=s3://bucket/in1k: cannot read train.json .*exit 3"):
        build_loaders(OmegaConf.merge(cfg, {"cache_dir": str(tmp_path / "other")}), DEIT)


def test_a_resume_may_move_the_shard_cache_but_not_change_the_order():
    """A requeued job may land on a node with another local disk: data.cache_dir / cache_limit_gb are harmless
    for resume; data.shuffle (the epoch order) is not."""
    from focalnet.engine.rundir import config_changes

    def cfg(**data):
        return {"data": {"batch_size": 4, "cache_dir": "/nvme/a", "cache_limit_gb": None, "shuffle": "shards",
                         **data}, "trainer": {"accum_steps": 1}}

    assert config_changes(cfg(), 2, cfg(cache_dir="/scratch/b", cache_limit_gb=50), 2) == {}
    assert config_changes(cfg(), 2, cfg(shuffle="global"), 2) == {"data.shuffle": ("shards", "global")}
