"""eval.py / ``focalnet.engine.evaluate``: the real eval config (conf/eval.yaml), tiny models, CPU.

* evaluating a just-trained checkpoint reproduces, to the last bit, the validation numbers the training run
  logged in metrics.jsonl — model and EMA weights, model taken from the checkpoint's stored config;
* the same weights as an official-format ``.pth`` and as a timm state dict give identical results (the
  model detected from the weights);
* a 22K-layout head (21842 rows) on a 1000-class set: logits[:, :1000], class 850 counted as is and excluded;
* ImageNet-A/-R (200-class subsets), ImageNetV2 (numbered folders) and ReaL (label sets) against an
  independent computation; per-class accuracy;
* ``mode=throughput`` prints its table; (slow) torchrun gives the same counts. The command (exit 0 with
  eval.json, exit 2 on a bad config) is run installed, by tests/test_packaging.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PYTHON, ROOT, TINY, compose_config, train_env
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import focalnet
from focalnet.data.eval_sets import imagenet1k_wnids, subset_classes
from focalnet.engine import ConfigError, evaluate, train
from focalnet.engine.distributed import register_resolvers
from focalnet.models.checkpoint import CheckpointError, convert_official_to_timm

# A hard enough synthetic task that the tiny model ends between chance and 100% (top-1 equality means something).
DATA = ["data=synthetic", "data.img_size=32", "data.train_size=256", "data.val_size=64", "data.batch_size=32",
        "data.signal=0.15", "aug=none", "trainer.amp=none"]


def compose_eval(overrides, run_dir) -> object:
    """conf/eval.yaml composed like eval.py does, with the run directory set (no Hydra run)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short training run (10 classes, 32 px, EMA on); returns its run directory."""
    run = tmp_path_factory.mktemp("trained")
    train(compose_config([*TINY, *DATA, "optimizer.lr=0.03", "trainer.ema_decay=0.9"], run))
    return run


def test_eval_reproduces_the_validation_logged_in_training(trained, tmp_path):
    logged = [m for m in read_metrics(trained) if "val/top1" in m][-1]  # last.pt holds the weights it scored
    assert 10.0 < logged["val/top1"] < 100.0, logged  # neither chance nor saturated
    ckpt = trained / "checkpoints" / "last.pt"
    for weights, prefix in (("model", "val"), ("ema", "val_ema")):
        r = evaluate(compose_eval([f"checkpoint={ckpt}", f"weights={weights}", *DATA], tmp_path / weights))
        assert r["model_source"] == "checkpoint config" and r["weights"] == weights
        for k in ("top1", "top5", "loss", "count"):
            assert r[k] == logged[f"{prefix}/{k}"], (weights, k, r[k], logged)
        written = json.loads((tmp_path / weights / "eval.json").read_text())
        assert written["top1"] == r["top1"] and written["count"] == 64
        assert read_metrics(tmp_path / weights)[0]["eval/top1"] == r["top1"]
    assert logged["val/top1"] != logged["val_ema/top1"] or logged["val/loss"] != logged["val_ema/loss"]


def test_official_and_timm_files_of_the_same_weights_give_identical_results(trained, tmp_path):
    sd = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.save({"model": sd}, tmp_path / "official.pth")                          # microsoft/FocalNet layout
    torch.save(convert_official_to_timm(sd), tmp_path / "timm.pth")                # timm FocalNet state dict
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "other.pth")             # another trainer's layout
    ours = evaluate(compose_eval([f"checkpoint={trained / 'checkpoints' / 'last.pt'}", *DATA], tmp_path / "ours"))
    results = {}
    for fmt in ("official", "timm", "other"):
        r = evaluate(compose_eval([f"checkpoint={tmp_path / f'{fmt}.pth'}", *DATA], tmp_path / fmt))
        assert r["format"] == ("timm" if fmt == "timm" else "official") and r["model"] == "focalnet_micro"
        assert r["model_source"] == "detected from the weights"
        results[fmt] = r
    assert results["other"]["weights"] == "state_dict"
    # model=NAME explicitly, too.
    results["named"] = evaluate(compose_eval([f"checkpoint={tmp_path / 'timm.pth'}", "model=focalnet_micro", *DATA],
                                             tmp_path / "named"))
    for r in results.values():
        assert (r["top1"], r["top5"], r["loss"], r["count"]) == (ours["top1"], ours["top5"], ours["loss"], 64)


def _logits(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def test_22k_head_on_1k_slices_logits_and_reports_class_850(tmp_path):
    torch.manual_seed(0)
    m22 = focalnet.create_model("focalnet_micro", num_classes=21842)
    with torch.no_grad():
        m22.head.bias[850] += 50.0     # the untrained teddy-bear row wins every image: top1 counts it as is
        m22.head.bias[5000] += 500.0   # a 22K-only class that would win if logits were not sliced to 1000
    torch.save({"model": m22.state_dict()}, tmp_path / "in22k.pth")
    data = ["data=synthetic", "data.num_classes=1000", "data.img_size=32", "data.train_size=32",
            "data.val_size=2000", "data.batch_size=250", "aug=none", "trainer.amp=none"]  # every class twice
    r = evaluate(compose_eval([f"checkpoint={tmp_path / 'in22k.pth'}", *data], tmp_path / "eval"))
    assert r["head"] == "sliced 21842->1000" and r["checkpoint_classes"] == 21842 and r["num_classes"] == 1000

    # Independent computation: the same network with rows 0..999 of the head.
    m1k = focalnet.create_model("focalnet_micro", num_classes=1000)
    sd = m22.state_dict()
    m1k.load_state_dict({k: (v[:1000] if k.startswith("head.") else v) for k, v in sd.items()})
    from focalnet.data import build_loaders
    loaders = build_loaders(compose_eval(data, tmp_path / "x").data, None)
    logits, y = _logits(m1k, loaders.val)
    assert r["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).double().mean().item())
    assert r["top1"] == pytest.approx(100.0 * 2 / 2000)  # only the two teddy bears are right
    assert r["loss"] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-5)
    masked = logits.clone()
    masked[:, 850] = -float("inf")
    keep = y != 850
    top1 = (masked.argmax(1) == y)[keep].double().mean().item() * 100
    top5 = (masked.topk(5, 1).indices == y[:, None]).any(1)[keep].double().mean().item() * 100
    assert r["count_class_850"] == 2 and r["count_excl_850"] == 1998
    assert r["top1_excl_850"] == pytest.approx(top1) and r["top5_excl_850"] == pytest.approx(top5)
    assert r["top5_excl_850"] > 0
    assert any("Class 850 (n04399382, teddy bear)" in n for n in r["notes"])


# ---- ImageNet-A / -R / V2 / ReaL on generated folders ------------------------------------------------------

def _write_images(folder: Path, names: list[str], per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / name / f"img_{c}_{i}.JPEG", quality=95)


def _reference_logits(model, files: list[Path], size: int = 32) -> torch.Tensor:
    """What the eval transform does with aug.test_crop=false, written out: PIL bicubic resize, normalize."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    xs = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
        xs.append((torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std)
    model.eval()
    with torch.no_grad():
        return model(torch.stack(xs))


IMG = ["data.img_size=32", "data.batch_size=4", "data.num_workers=0", "aug=none", "aug.test_crop=false",
       "trainer.amp=none"]


@pytest.fixture(scope="module")
def in1k_model(tmp_path_factory):
    torch.manual_seed(1)
    model = focalnet.create_model("focalnet_micro", num_classes=1000)
    path = tmp_path_factory.mktemp("in1k") / "micro_in1k.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, path


@pytest.mark.parametrize("which", ["a", "r"])
def test_imagenet_a_and_r_restrict_logits_to_their_200_classes(which, in1k_model, tmp_path):
    model, ckpt = in1k_model
    wnids, indices = subset_classes(which)
    assert len(wnids) == len(indices) == 200
    chosen = [wnids[0], wnids[57], wnids[199]]
    _write_images(tmp_path / "set", chosen, per_class=3)
    r = evaluate(compose_eval([f"checkpoint={ckpt}", f"eval_set={which}", f"eval_root={tmp_path / 'set'}",
                               "data=imagenet1k", *IMG], tmp_path / "eval"))
    files = sorted((tmp_path / "set").glob("*/*.JPEG"))
    targets = torch.tensor([wnids.index(f.parent.name) for f in files])
    logits = _reference_logits(model, files)[:, indices]  # (N, 200)
    assert r["count"] == 9 and r["num_classes"] == 200
    assert r["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert r["top5"] == pytest.approx(100 * (logits.topk(5, 1).indices == targets[:, None]).any(1).float().mean().item())
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-4)


def test_imagenet_v2_numbered_folders_are_class_indices(in1k_model, tmp_path):
    model, ckpt = in1k_model
    _write_images(tmp_path / "v2", ["2", "10", "850"], per_class=2)  # sorted names would give 10 < 2
    # A head biased to predict exactly the folder's class makes the mapping visible in the score.
    biased = focalnet.create_model("focalnet_micro", num_classes=1000)
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.head.bias[10] += 100.0
    torch.save({"model": biased.state_dict()}, tmp_path / "biased.pth")
    r = evaluate(compose_eval([f"checkpoint={tmp_path / 'biased.pth'}", "eval_set=v2", f"eval_root={tmp_path / 'v2'}",
                               "per_class=true", *IMG], tmp_path / "eval"))
    assert r["count"] == 6 and r["top1"] == pytest.approx(100 * 2 / 6)  # the two images in folder "10"
    rows = {row["class"]: row for row in r["per_class"] if row["count"]}
    assert set(rows) == {2, 10, 850} and rows[10]["top1"] == 100.0 and rows[2]["top1"] == 0.0
    assert rows[10]["name"] == imagenet1k_wnids()[10]


def test_imagenet_real_scores_with_label_sets(in1k_model, tmp_path):
    model, ckpt = in1k_model
    wnids = imagenet1k_wnids()
    val = tmp_path / "imagenet" / "val"
    files = []
    for n, cls in enumerate([3, 3, 500, 999], start=1):  # ILSVRC2012_val_00000001..4 in their wnid folders
        (val / wnids[cls]).mkdir(parents=True, exist_ok=True)
        f = val / wnids[cls] / f"ILSVRC2012_val_{n:08d}.JPEG"
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(f)
        files.append(f)
    ranked = _reference_logits(model, files).topk(10, 1).indices.tolist()
    miss = [c for c in range(1000) if all(c not in r[:5] for r in ranked)][0]
    real = [[ranked[0][0]],            # top-1 hit
            [ranked[1][3], miss],      # top-5 hit only
            [],                        # no ReaL label: left out
            [miss]]                    # miss
    (tmp_path / "real.json").write_text(json.dumps(real))
    r = evaluate(compose_eval([f"checkpoint={ckpt}", "eval_set=real", "data=imagenet1k", f"data.root={tmp_path / 'imagenet'}",
                               f"real_labels={tmp_path / 'real.json'}", *IMG], tmp_path / "eval"))
    assert r["count"] == 4 and r["real_count"] == 3
    assert r["real_top1"] == pytest.approx(100 / 3) and r["real_top5"] == pytest.approx(200 / 3)
    targets = torch.tensor([3, 3, 500, 999])
    assert r["top1"] == pytest.approx(100 * sum(rk[0] == t for rk, t in zip(ranked, targets.tolist(), strict=True)) / 4)


def test_timm_ships_the_real_labels(in1k_model):
    from focalnet.data.eval_sets import load_real_labels

    labels = load_real_labels()
    assert len(labels) == 50000 and sum(1 for x in labels if not x) == 3163


def test_per_class_accuracy_adds_up(trained, tmp_path):
    r = evaluate(compose_eval([f"checkpoint={trained / 'checkpoints' / 'last.pt'}", "per_class=true", *DATA],
                              tmp_path / "e"))
    rows = r["per_class"]
    assert len(rows) == 10 and sum(x["count"] for x in rows) == r["count"] == 64
    assert sum(x["top1"] * x["count"] for x in rows) / 64 == pytest.approx(r["top1"])
    assert r["per_class_mean_top1"] == pytest.approx(sum(x["top1"] for x in rows) / 10)
    assert "per_class" in json.loads((tmp_path / "e" / "eval.json").read_text())


def test_bad_eval_configs_fail_early_naming_the_key(trained, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        evaluate(compose_eval(DATA, tmp_path / "a"))
    with pytest.raises(ConfigError, match="eval_set='imagenet-z'"):
        evaluate(compose_eval(["checkpoint=/nope.pt", "eval_set=imagenet-z", *DATA], tmp_path / "b"))
    no_ema = tmp_path / "no_ema.pt"
    torch.save({"model": torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["model"], "ema": None},
               no_ema)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        evaluate(compose_eval([f"checkpoint={no_ema}", "weights=ema", *DATA], tmp_path / "c"))
    with pytest.raises(CheckpointError, match="head has 10 classes but the eval set has 5"):
        evaluate(compose_eval([f"checkpoint={no_ema}", *DATA, "data.num_classes=5"], tmp_path / "d"))


# ---- the CLI ------------------------------------------------------------------------------------------------

def run_eval(args, *, launcher=(PYTHON,), timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "eval.py"), *args], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_throughput_mode_prints_its_table(tmp_path, capsys):
    r = evaluate(compose_eval(["mode=throughput", "model=focalnet_micro", "data=synthetic", "data.img_size=32",
                               "throughput.batch_size=4", "throughput.warmup_iters=1", "throughput.iters=2",
                               "throughput.precisions=[fp32,bf16]", "throughput.compile=[false]"], tmp_path))
    printed = capsys.readouterr().out
    assert "| precision | compile | img/s | vs first row |" in printed
    for row in r["rows"]:
        assert f"| {row['precision']} | no | {row['img_per_s']:.1f} | {row['ratio']:.2f}x |" in printed
    params = sum(p.numel() for p in focalnet.create_model("focalnet_micro", num_classes=10).parameters())
    assert f"{params / 1e6:.2f}M params, {r['gmacs']:.3f} GMACs" in printed and r["gmacs"] > 0
    assert json.loads((tmp_path / "throughput.json").read_text())["rows"] == r["rows"]


@pytest.mark.slow
def test_cli_throughput_table_with_fp16(tmp_path):
    out = run_eval(["mode=throughput", "model=focalnet_micro", "data=synthetic", "data.img_size=32",
                    "throughput.batch_size=4", "throughput.warmup_iters=1", "throughput.iters=2",
                    "throughput.precisions=[fp32,bf16,fp16]", "throughput.compile=[false]", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert [(r["precision"], r["compile"]) for r in result["rows"]] == [("fp32", False), ("bf16", False),
                                                                        ("fp16", False)]
    assert result["rows"][0]["img_per_s"] > 0 and result["rows"][0]["ratio"] == 1.0
    params = sum(p.numel() for p in focalnet.create_model("focalnet_micro", num_classes=10).parameters())
    assert result["params_m"] == pytest.approx(params / 1e6) and result["gmacs"] > 0
    assert "| precision | compile | img/s | vs first row |" in out.stdout
    assert "| fp32 | no | " in out.stdout and "| bf16 | no | " in out.stdout
    assert f"{params / 1e6:.2f}M params" in out.stdout


@pytest.mark.slow
def test_throughput_under_torch_compile(tmp_path):
    out = run_eval(["mode=throughput", "model=focalnet_micro", "data=synthetic", "data.img_size=32",
                    "throughput.batch_size=2", "throughput.warmup_iters=1", "throughput.iters=2",
                    "throughput.precisions=[fp32]", "throughput.compile=[false,true]", "throughput.flops=false",
                    f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert rows[1]["compile"] and rows[1]["error"] is None and rows[1]["img_per_s"] > 0, rows
    assert "| fp32 | yes | " in out.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_counts(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.pt"
    single = evaluate(compose_eval([f"checkpoint={ckpt}", *DATA, "data.batch_size=7"], tmp_path / "single"))
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    out = run_eval([f"checkpoint={ckpt}", *DATA, "data.batch_size=7", "per_class=true", f"hydra.run.dir={tmp_path / 'tr'}"],
                   launcher=(torchrun, "--nproc_per_node=2", "--master_port=29617"))
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads((tmp_path / "tr" / "eval.json").read_text())
    assert r["world_size"] == 2 and r["count"] == 64 and sum(x["count"] for x in r["per_class"]) == 64
    assert (r["top1"], r["top5"]) == (single["top1"], single["top5"])
    assert r["loss"] == pytest.approx(single["loss"], rel=1e-6)


@pytest.mark.parametrize("which", ["a", "r"])
def test_22k_checkpoint_on_imagenet_a_and_r(which, tmp_path):
    torch.manual_seed(2)
    m22 = focalnet.create_model("focalnet_micro", num_classes=21842)
    torch.save({"model": m22.state_dict()}, tmp_path / "in22k.pth")
    wnids, indices = subset_classes(which)
    teddy = imagenet1k_wnids()[850]
    chosen = [wnids[0], teddy] if teddy in wnids else [wnids[0], wnids[1]]  # ImageNet-A has teddy bears, -R not
    _write_images(tmp_path / "set", chosen, per_class=2)
    r = evaluate(compose_eval([f"checkpoint={tmp_path / 'in22k.pth'}", f"eval_set={which}",
                               f"eval_root={tmp_path / 'set'}", *IMG], tmp_path / "eval"))
    assert r["head"] == "sliced 21842->1000" and r["count"] == 4 and r["num_classes"] == 200
    if which == "a":
        assert (r["count_class_850"], r["count_excl_850"]) == (2, 2)
    else:
        assert "count_class_850" not in r
