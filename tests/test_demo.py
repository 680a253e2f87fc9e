"""The demo: the embedded digits dataset, the plots, the modulation maps and ``scripts/demo.py`` end to end.

Fast tests build the digits folder (small ``store_size``) and check its split, its atomic creation and the
folder-pipeline geometry (no flip); the plot and visualization scripts run on a real metrics file and a
real checkpoint. Slow tests run the demo (shortened) through ``train.py`` and the FFCV variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, compose_config, train_env
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from focalnet.data.digits import DataConfigError, materialize, read_meta, split_indices

sys.path.insert(0, str(ROOT / "scripts"))
import plot_metrics  # noqa: E402
import visualize_modulation  # noqa: E402


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return Path(materialize(tmp_path_factory.mktemp("cache") / "digits", store_size=16))


def files(root: Path, split: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / split).rglob("*.jpg"))


def test_digits_folder_layout_split_and_images(digits_root, tmp_path):
    train, val = files(digits_root, "train"), files(digits_root, "val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert not {f.split("/")[-1] for f in train} & {f.split("/")[-1] for f in val}  # disjoint by sample index
    assert sorted(os.listdir(digits_root / "val")) == [str(c) for c in range(10)]
    per_class = [len(os.listdir(digits_root / "val" / str(c))) for c in range(10)]
    meta = read_meta(str(digits_root))
    assert meta["counts"] == {"train": 1438, "val": 359} and meta["store_size"] == 16

    img = Image.open(digits_root / val[0])
    assert img.mode == "RGB" and img.size == (16, 16)
    arr = np.asarray(img, dtype=np.float64)
    assert arr.mean() > 128 and arr.min() < 64  # black ink on white paper

    # The split is fixed: the same files on another machine / another cache directory.
    other = Path(materialize(tmp_path / "again", store_size=16))
    assert files(other, "val") == val and files(other, "train") == train
    # ... and it is this split: 20% of every class of scikit-learn's digits (rounded), each file in the folder
    # of its sklearn label, named by its sklearn index; the first and last val indices pinned.
    target = load_digits().target
    val_index = sorted(int(f.split("/")[-1][:-4]) for f in val)
    assert per_class == [round(0.2 * n) for n in np.bincount(target)] == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert all(f == f"val/{target[int(f.split('/')[-1][:-4])]}/{f.split('/')[-1]}" for f in val)
    assert val_index[:6] == [3, 8, 10, 12, 16, 30] and val_index[-3:] == [1790, 1791, 1795]
    labels = np.repeat(np.arange(10), 5)  # one of every five per class, at fixed positions
    assert np.flatnonzero(split_indices(labels, 0.2)).tolist() == [0, 6, 14, 15, 20, 25, 34, 36, 42, 46]


def test_digits_cache_mismatch_and_foreign_directory_fail_clearly(digits_root, tmp_path):
    with pytest.raises(DataConfigError, match="data.root=.*store_size"):
        materialize(digits_root, store_size=32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something.txt").write_text("x")
    with pytest.raises(DataConfigError, match="not a digits folder"):
        materialize(tmp_path / "busy", store_size=16)


@pytest.mark.slow
def test_concurrent_creation_is_atomic(tmp_path):
    """Four processes race to create the same cache: one copy lands, all succeed, no temporary left."""
    code = ("import sys; from focalnet.data.digits import materialize; "
            "print(materialize(sys.argv[1], store_size=16))")
    root = tmp_path / "digits"
    procs = [subprocess.Popen([PYTHON, "-c", code, str(root)], cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(root)}
    assert sorted(os.listdir(tmp_path)) == ["digits"]  # no .digits.tmp-* leftovers
    assert len(files(root, "train")) == 1438 and len(files(root, "val")) == 359


def test_digits_through_the_folder_pipeline_without_flip(digits_root):
    from focalnet import data

    cfg = compose_config(["experiment=demo", f"data.root={digits_root}", "data.store_size=16", "data.num_workers=0",
                          "data.batch_size=32"])
    loaders = data.build_loaders(cfg.data, cfg.aug)
    tf = loaders.train.dataset.transform
    assert tf.flips == [] and tuple(tf.rrc.scale) == (0.5, 1.0)
    assert loaders.num_classes == 10 and loaders.info["train_size"] == 1438 and loaders.info["val_size"] == 359
    loaders.train.set_epoch(0)
    images, targets = next(iter(loaders.train))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32 and targets.max() <= 9

    flipped = compose_config(["data=digits", f"data.root={digits_root}", "data.store_size=16", "aug.hflip=0.3",
                              "data.num_workers=0", "aug=none"])
    tf = data.build_loaders(flipped.data, flipped.aug).train.dataset.transform
    (flip,) = tf.flips
    assert flip.p == 0.3 and tf.rrc is None  # aug=none: eval resize + center crop for training


def write_metrics(path: Path) -> None:
    records = [{"step": 0, "derived/lr": 1e-3}]
    records += [{"step": s, "epoch": 0, "train/loss": 2.0 - 0.1 * s, "train/lr": 1e-4 * s} for s in range(1, 9)]
    records += [{"step": 8, "epoch": 1, "val/top1": 40.0, "val/top5": 90.0, "val/loss": 1.5}]
    # A resumed run re-logs the steps after its checkpoint (step 6): the later records win.
    records += [{"step": s, "epoch": 0, "train/loss": 1.0, "train/lr": 5e-4} for s in range(7, 11)]
    records += [{"step": 10, "epoch": 1, "val/top1": 60.0, "val/top5": 95.0, "val/loss": 1.0}]
    path.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 11, "train/lo')  # killed mid-line


def capture_saved_figures(monkeypatch) -> list:
    """Keep every matplotlib figure a script saves, so a test reads back what was drawn."""
    from matplotlib.figure import Figure

    saved, real_savefig = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_plot_metrics_png_from_metrics_jsonl(tmp_path, monkeypatch):
    write_metrics(tmp_path / "metrics.jsonl")
    records = plot_metrics.read_metrics(tmp_path / "metrics.jsonl")
    steps, losses = plot_metrics.series(records, "train/loss")
    assert steps == list(range(1, 11)) and losses[6:] == [1.0] * 4 and losses[0] == pytest.approx(1.9)
    assert plot_metrics.series(records, "val/top1") == ([8, 10], [40.0, 60.0])

    figures = capture_saved_figures(monkeypatch)
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert Image.open(tmp_path / "metrics.png").format == "PNG"
    # What is drawn, read back from the figure: every panel's series, the resumed steps counted once.
    (fig,) = figures
    drawn = {ax.get_ylabel(): {line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist())
                               for line in ax.lines} for ax in fig.axes}
    train_loss = [1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.0, 1.0, 1.0, 1.0]
    assert drawn["loss"]["train"][0] == list(range(1, 11))
    assert drawn["loss"]["train"][1] == pytest.approx(train_loss)
    assert drawn["loss"]["val"] == ([8, 10], [1.5, 1.0]) and "val (EMA)" not in drawn["loss"]
    assert drawn["learning rate"]["lr"][1] == pytest.approx([1e-4 * s for s in range(1, 7)] + [5e-4] * 4)
    assert drawn["accuracy (%)"] == {"val top-1": ([8, 10], [40.0, 60.0]), "val top-5": ([8, 10], [90.0, 95.0])}
    (tmp_path / "empty.jsonl").write_text('{"step": 0, "derived/lr": 1}\n')
    with pytest.raises(SystemExit):
        plot_metrics.main([str(tmp_path / "empty.jsonl")])


def test_visualize_modulation_maps_and_png(digits_root, tmp_path, monkeypatch):
    import focalnet

    torch.manual_seed(0)
    model = focalnet.create_model("focalnet_micro", num_classes=10)
    cfg = {"model": {"name": "focalnet_micro", "library": "focalnet", "num_classes": 10, "kwargs": {}},
           "data": {"name": "digits", "root": str(digits_root), "store_size": 16, "img_size": 32, "num_classes": 10,
                    "train_split": "train", "val_split": "val", "val_count": 0},
           "aug": {"test_crop": False, "interpolation": "bicubic"}}
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "ema": None, "config": cfg}, ckpt)

    loaded, run_cfg = visualize_modulation.build_model(str(ckpt), None, None, "model")
    x = torch.randn(2, 3, 32, 32)
    probs, maps = visualize_modulation.record_maps(loaded, x, -1)
    assert probs.shape == (2, 10) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert [tuple(g.shape) for g, _ in maps] == [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 1, 1)]
    assert [tuple(m.shape) for _, m in maps] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 256, 1, 1)]
    # The maps equal what FocalModulation returns when asked, and recording is switched off afterwards.
    stem = loaded.patch_embed(x)  # (2, 8, 8, 32); stage 1 of focalnet_micro has one block
    block = loaded.layers[0].blocks[-1]
    _, ref = block.modulation(block.norm1(stem), channels_first=False, return_maps=True)
    assert torch.allclose(ref["gates"], maps[0][0], atol=1e-5) and torch.allclose(ref["modulator"], maps[0][1], atol=1e-5)
    assert all(not m.store_maps and m.gates is None for m in (layer.blocks[-1].modulation for layer in loaded.layers))
    assert visualize_modulation.val_images(run_cfg, 12)[:3] == [
        (str(digits_root / "val" / str(c) / sorted(os.listdir(digits_root / "val" / str(c)))[0]), c) for c in range(3)]

    extra = tmp_path / "seven.png"
    Image.open(next((digits_root / "val" / "7").iterdir())).save(extra)
    figures = capture_saved_figures(monkeypatch)
    assert visualize_modulation.main([str(ckpt), str(extra), "--val", "3", "-o", str(tmp_path / "mod.png")]) == 0
    assert Image.open(tmp_path / "mod.png").format == "PNG"
    # What is drawn, read back: one row per image (the extra one, then a val image of classes 0, 1, 2); the
    # input panel is the official eval transform of the file (PIL bicubic resize to 32, aug.test_crop=false);
    # stages 1-3 (stage 4 is 1x1 at 32 px) each show mean_c |m| and the 3 gates of the last block.
    (fig,) = figures
    paths = [extra] + [p for p, _ in visualize_modulation.val_images(run_cfg, 3)]
    official = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in paths]
    x = (torch.from_numpy(np.stack(official)).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)
         .view(3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    _, maps = visualize_modulation.record_maps(loaded, x, -1)
    axes = np.array(fig.axes).reshape(4, 1 + 3 * 4)  # input + 3 stages x (|m|, g0, g1, g_glob)
    for r in range(4):
        np.testing.assert_array_equal(axes[r, 0].images[0].get_array(), official[r])
        for s in range(3):
            gates, modulator = maps[s]
            shown = [np.asarray(ax.images[0].get_array()) for ax in axes[r, 1 + 4 * s:1 + 4 * (s + 1)]]
            np.testing.assert_allclose(shown[0], modulator[r].abs().mean(0).numpy(), atol=1e-5)
            for level in range(3):
                np.testing.assert_allclose(shown[1 + level], gates[r, level].numpy(), atol=1e-5)


def test_make_demo_runs_the_demo_script():
    """`make demo` must do everything (train, plots, maps, closing message): that is scripts/demo.py."""
    proc = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "scripts/demo.py" in proc.stdout, proc.stdout + proc.stderr


def run_demo_script(args, cache: Path, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "scripts/demo.py", *args], cwd=ROOT, env=train_env(FOCALNET_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_learns_and_writes_both_pngs(tmp_path):
    """`make demo`, shortened to 4 of its 12 epochs: far above chance (10%), both PNGs, the closing message."""
    run_dir = tmp_path / "demo"
    proc = run_demo_script(["--run-dir", str(run_dir), "--num-images", "3", "trainer.epochs=4"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val/top1" in line]
    assert len(vals) == 4 and vals[-1]["val/count"] == 359 and vals[-1]["val/top1"] >= 80.0, vals
    for png in ("metrics.png", "modulation.png"):
        assert Image.open(run_dir / png).format == "PNG"
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert f"sync {offline}" in proc.stdout and str(run_dir / "modulation.png") in proc.stdout
    cfg = json.loads((run_dir / "provenance.json").read_text())["config"]
    assert cfg["data"]["name"] == "digits" and cfg["model"]["name"] == "focalnet_micro"


@pytest.mark.slow
def test_digits_ffcv_variant_is_written_once_and_learns(tmp_path):
    pytest.importorskip("ffcv")
    cache = tmp_path / "cache"
    cmd = [PYTHON, "train.py", "experiment=demo", "data=digits_ffcv", "data.store_size=32", "trainer.epochs=2",
           "logger.wandb.mode=disabled"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=train_env(FOCALNET_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    meta = json.loads((cache / "digits_ffcv" / "train.beton.json").read_text())
    assert meta["num_samples"] == 1438 and meta["num_classes"] == 10 and meta["max_resolution"] == 32
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "val/top1" in line]
    assert vals[-1]["val/count"] == 359 and vals[-1]["val/top1"] >= 50.0, vals
    stamp = (cache / "digits_ffcv" / "train.beton").stat().st_mtime_ns
    proc = subprocess.run([*cmd, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT,
                          env=train_env(FOCALNET_CACHE=str(cache)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (cache / "digits_ffcv" / "train.beton").stat().st_mtime_ns == stamp  # cached, not rewritten
    assert "converting the digits folder" not in proc.stderr + proc.stdout
