"""Short end-to-end ``train.py`` runs on a generated image folder: the folder path and the FFCV path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PYTHON, ROOT, run_train

from focalnet.data.imagegen import write_bad_image, write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMON = ["model=focalnet_micro", "data.img_size=32", "data.batch_size=8", "data.num_workers=1", "aug=deit",
          "schedule.warmup_epochs=0", "trainer.amp=none", "trainer.epochs=1", "trainer.log_every=1",
          "logger.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(str(root / "train"), 4, 6, size=(64, 48))
    write_image_folder(str(root / "val"), 4, 2, size=(64, 48), seed=1)
    write_bad_image(str(root / "train" / "n00000002" / "bad_truncated.JPEG"), "truncated")
    return root


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_dirs(output_root) -> list[str]:
    return [os.path.dirname(os.path.dirname(p)) for p in
            (os.path.join(d, f) for d, _, fs in os.walk(output_root) for f in fs) if p.endswith("checkpoints/last.pt")]


def test_train_py_on_a_folder(image_root, tmp_path):
    proc = run_train([*COMMON, "data=folder", f"data.root={image_root}", f"paths.output_root={tmp_path}"], tiny=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = run_dirs(tmp_path)
    events = metrics(run_dir)
    assert any("val/top1" in e for e in events)
    skipped = [e["train/skipped_images"] for e in events if "train/skipped_images" in e]
    assert skipped and skipped[-1] >= 1  # the truncated file was skipped, counted in a worker, logged


def test_train_py_on_ffcv(image_root, tmp_path):
    out = tmp_path / "ffcv"
    write = subprocess.run([PYTHON, str(ROOT / "scripts/write_ffcv.py"), "data=folder", f"data.root={image_root}",
                            "--out-dir", str(out), "--num-workers", "1", "--max-resolution", "64"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert write.returncode == 0, write.stderr[-3000:]
    runs = tmp_path / "runs"
    proc = run_train([*COMMON, "data=imagenet1k_ffcv", f"data.root={out}", "data.num_classes=4",
                      f"paths.output_root={runs}"], tiny=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = run_dirs(runs)
    assert any("val/top1" in e for e in metrics(run_dir))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
