"""Two real processes (rank 0 and 1) load one epoch: every sample is seen exactly once across ranks.

Labels identify samples: 10 classes, training holds one image of classes 0-7 and two of classes 8 and 9
(every training class must hold images), validation one image per class. 12 training images, batch 2,
2 ranks: the training sampler needs no padding, so the union over ranks must be every image exactly once;
validation (10 images) must be covered exactly once without padding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from data.imagegen import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK_SCRIPT = r"""
import json, sys
from omegaconf import OmegaConf
from data import build_loaders
cfg, rank, epoch, start = OmegaConf.create(json.loads(sys.argv[1])), int(sys.argv[2]), 1, int(sys.argv[3])
aug = OmegaConf.load("conf/aug/deit.yaml")
loaders = build_loaders(cfg, aug, rank=rank, world_size=2, seed=123)
loaders.train.set_epoch(epoch, start)
train = [y.tolist() for _, y in loaders.train]
val = [y.tolist() for _, y in loaders.val]
print("RESULT" + json.dumps({"train": train, "val": val, "len": len(loaders.train)}))
if hasattr(loaders.train, "close"):
    loaders.train.close()
"""


def run_ranks(cfg: dict, start: int = 0) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(cfg), str(rank), str(start)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]  # both ranks run at once, as under torchrun
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:]))
    return results


@pytest.fixture(scope="module")
def unique_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniq")
    write_image_folder(str(root / "train"), 10, 1, size=(48, 40))
    write_image_folder(str(root / "extra"), 10, 1, size=(48, 40), seed=2)
    for c in (8, 9):  # a second, different image in the last two classes: 12 training images
        os.replace(root / "extra" / f"n{c:08d}" / f"n{c:08d}_0.JPEG", root / "train" / f"n{c:08d}" / f"n{c:08d}_1.JPEG")
    shutil.rmtree(root / "extra")
    write_image_folder(str(root / "val"), 10, 1, size=(48, 40), seed=1)
    return root


TRAIN_LABELS = Counter({**{c: 1 for c in range(8)}, 8: 2, 9: 2})


def check_exact_cover(results, n_val=10):
    assert results[0]["len"] == results[1]["len"] == 3  # same number of batches on every rank
    train = Counter(lab for r in results for batch in r["train"] for lab in batch)
    assert train == TRAIN_LABELS
    assert [len(b) for r in results for b in r["train"]] == [2] * 6
    val = Counter(lab for r in results for batch in r["val"] for lab in batch)
    assert val == Counter(range(n_val))


@pytest.mark.slow
def test_folder_two_ranks_cover_each_sample_once_and_resume(unique_folder):
    cfg = dict(name="folder", root=str(unique_folder), num_classes=10, img_size=32, batch_size=2,
               num_workers=1, val_count=0, persistent_workers=False)
    full = run_ranks(cfg)
    check_exact_cover(full)
    resumed = run_ranks(cfg, start=1)  # both ranks resume at batch 1: exactly the rest of each rank's epoch
    assert [r["train"] for r in resumed] == [r["train"][1:] for r in full]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ffcv_two_ranks_cover_each_sample_once(unique_folder, tmp_path):
    out = tmp_path / "ffcv"
    cmd = [sys.executable, os.path.join(ROOT, "scripts/write_ffcv.py"), "data=folder",
           f"data.root={unique_folder}", "--out-dir", str(out), "--num-workers", "1", "--max-resolution", "48"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = dict(name="imagenet1k_ffcv", root=str(out), num_classes=10, img_size=32, batch_size=2, num_workers=1,
               train_path="train.beton", val_path="val.beton")
    check_exact_cover(run_ranks(cfg))
