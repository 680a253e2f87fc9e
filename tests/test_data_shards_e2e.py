"""webdataset shards end to end: write them from a generated folder with bad images, then train through
``data=wds`` with the real CLI: two torchrun ranks training and validating, and a SIGKILL mid-epoch followed by a
bitwise-identical resume. Two ranks covering every sample once per epoch and resuming: test_data_distributed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, run_train, train_env

from focalnet.data.imagegen import write_bad_images, write_image_folder
from focalnet.engine.checkpointing import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def write(source: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run([PYTHON, str(ROOT / "scripts/write_shards.py"), "data=folder", f"data.root={source}",
                           "--out", str(out), "--num-workers", "2", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 readable training images in 4 classes (+3 unreadable, left out by the writer), 8 val images."""
    source = tmp_path_factory.mktemp("src")
    write_image_folder(str(source / "train"), 4, 6, size=(48, 40))
    write_image_folder(str(source / "val"), 4, 2, size=(48, 40), seed=1)
    write_bad_images(str(source / "train" / "n00000002"), ("corrupt", "truncated", "zero_byte"))
    out = tmp_path_factory.mktemp("wds")
    write(source, out, "--shard-size", "20KB")  # several shards per split
    assert json.loads((out / "train.json").read_text())["focalnet"]["skipped"] == 3
    return out


COMMON = ["model=focalnet_micro", "data=wds", "data.img_size=32", "data.batch_size=4", "data.num_workers=1",
          "aug=deit", "schedule.warmup_epochs=0", "trainer.amp=none", "trainer.log_every=1",
          "logger.wandb.mode=disabled"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_torchrun_two_ranks_train_and_validate_on_shards(shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_train([*COMMON, f"data.root={shards}", "data.shuffle=shards", "trainer.epochs=2",
                      f"hydra.run.dir={run_dir}"], launcher=launcher, tiny=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(run_dir)
    assert metrics[0]["derived/updates_per_epoch"] == 3  # 24 images / (2 ranks x 4)
    vals = [m for m in metrics if "val/count" in m]
    assert len(vals) == 2 and all(v["val/count"] == 8 for v in vals)  # every val image once, no padding
    final = next(m for m in metrics if "final/params_in_sync" in m)
    assert final["final/params_in_sync"] and final["final/step"] == 6
    assert [m["train/skipped_images"] for m in metrics if "train/skipped_images" in m] == [0, 0]


RESUME = [*COMMON, "trainer.epochs=2", "trainer.ckpt_every_steps=2", "trainer.ema_decay=0.9", "optimizer.lr=0.01"]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(shards, tmp_path):
    reference = tmp_path / "reference"
    proc = run_train([*RESUME, f"data.root={shards}", f"hydra.run.dir={reference}"], tiny=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    cmd = [PYTHON, str(ROOT / "train.py"), *RESUME, f"data.root={shards}", f"hydra.run.dir={run_dir}"]
    env = train_env(FOCALNET_PAUSE_AT_STEP="9", FOCALNET_PAUSE_FILE=str(marker))
    killed = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not Path(f"{marker}.rank0").exists():
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()[-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # parked after update 9: epoch 1 (updates 7-12), last.pt from update 8
    assert killed.wait() == -signal.SIGKILL
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == 8 and saved["epoch"] == 1 and saved["batch_in_epoch"] == 2
    proc = run_train([*RESUME, f"data.root={shards}", f"hydra.run.dir={run_dir}"], tiny=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_file(run_dir / "checkpoints" / "last.pt"), load_file(reference / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in b[key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
