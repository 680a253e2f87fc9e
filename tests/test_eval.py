"""eval.py / ``focalnet.engine.evaluate``: the real eval config (conf/eval.yaml), tiny models, CPU.

Independent references: a plain hand-written top-1/top-5/loss loop (model loaded with torch.load, images
through the official code's eval transform, torchvision's, on JPEG folders); timm's own label files read
through timm's ``ImageDataset(class_map=...)`` and ``validate.py``'s ``--valid-labels`` slicing (ImageNet-A/-R);
timm's ``RealLabelsImagenet`` (ReaL); an independently built 1000-row model (22K head slicing).

* evaluating a just-trained checkpoint reproduces, to the last bit, the validation numbers the training run
  logged in metrics.jsonl, and both equal the plain loop — model and EMA weights (``weights=auto`` takes the
  model), model taken from the checkpoint's stored config;
* the same weights as an official-format ``.pth`` and as a timm state dict give identical results (the
  model detected from the weights);
* a 22K-layout head (21842 rows) on a 1000-class set: logits[:, :1000], class 850 counted as is and excluded;
* ImageNet-A/-R (200-class subsets), ImageNetV2 (numbered folders) and ReaL (label sets); per-class accuracy;
* ``mode=throughput`` prints its table with the GMACs of the official module; (slow) torchrun gives the same
  counts. The command (exit 0 with eval.json, exit 2 on a bad config) is run installed, by tests/test_packaging.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torch.nn.functional as F
from conftest import PYTHON, ROOT, TINY, compose_config, compose_eval, train_env
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RealLabelsImagenet
from torchvision import datasets, transforms

import focalnet
from focalnet.data.eval_sets import imagenet1k_wnids
from focalnet.data.imagegen import write_image_folder
from focalnet.data.synthetic import SyntheticImages
from focalnet.engine import ConfigError, evaluate, train
from focalnet.models.checkpoint import CheckpointError, convert_official_to_timm

OFFICIAL_MICRO_MACS = json.loads((Path(__file__).parent / "fixtures" / "focalnet_official" / "macs.json")
                                 .read_text())["micro_flop_counter_by_img_size"]
# A hard enough synthetic task that the tiny model ends between chance and 100% (top-1 equality means something).
DATA = ["data=synthetic", "data.img_size=32", "data.train_size=256", "data.val_size=64", "data.batch_size=32",
        "data.signal=0.15", "aug=none", "trainer.amp=none"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plain_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """top-1/top-5 (%) and mean cross-entropy written out by hand: the reference eval.py must equal."""
    ranked = logits.double().argsort(dim=1, descending=True)
    return {"top1": 100.0 * sum(r[0] == t for r, t in zip(ranked.tolist(), targets.tolist())) / len(targets),
            "top5": 100.0 * sum(t in r[:5] for r, t in zip(ranked.tolist(), targets.tolist())) / len(targets),
            "loss": F.cross_entropy(logits.double(), targets).item(), "count": len(targets)}


def load_plain(path: Path, key: str, num_classes: int, **kw) -> torch.nn.Module:
    """focalnet_micro with weights read by plain torch.load: no load_checkpoint, no eval config."""
    model = focalnet.create_model("focalnet_micro", num_classes=num_classes, **kw)
    model.load_state_dict(torch.load(path, weights_only=True)[key])
    return model.eval()


def official_eval_transform(img_size: int, test_crop: bool = True):
    """microsoft/FocalNet data/build.py build_transform(is_train=False) (@e8514bd, for IMG_SIZE > 32)."""
    resize = (transforms.Resize(int((256 / 224) * img_size), interpolation=transforms.InterpolationMode.BICUBIC)
              if test_crop else
              transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC))
    return transforms.Compose([resize, *([transforms.CenterCrop(img_size)] if test_crop else []), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def plain_logits(model: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """One image at a time, in dataset order: no loader, no sampler, no padding, no all-reduce."""
    with torch.no_grad():
        pairs = [(model(x[None])[0], y) for x, y in (dataset[i] for i in range(len(dataset)))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


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
    val_images = SyntheticImages(64, 10, 32, offset=10_000_000, signal=0.15)  # data=synthetic's val set
    for weights, key, prefix in (("auto", "model", "val"), ("model", "model", "val"), ("ema", "ema", "val_ema")):
        r = evaluate(compose_eval([f"checkpoint={ckpt}", f"weights={weights}", *DATA], tmp_path / weights))
        assert r["model_source"] == "checkpoint config" and r["weights"] == key and r["ema_available"]
        # The hand-written loop over the same 64 images with the same weights.
        plain = plain_scores(*plain_logits(load_plain(ckpt, key, 10), val_images))
        for k in ("top1", "top5", "count"):
            assert r[k] == logged[f"{prefix}/{k}"] == plain[k], (weights, k, r[k], logged, plain)
        assert r["loss"] == logged[f"{prefix}/loss"] and r["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        written = json.loads((tmp_path / weights / "eval.json").read_text())
        assert written["top1"] == r["top1"] and written["count"] == 64
        assert read_metrics(tmp_path / weights)[0]["eval/top1"] == r["top1"]
    assert logged["val/top1"] != logged["val_ema/top1"] or logged["val/loss"] != logged["val_ema/loss"]
    # weights=auto says the EMA weights are there too (README "Evaluation"); an explicit choice needs no note.
    notes = {w: json.loads((tmp_path / w / "eval.json").read_text())["notes"] for w in ("auto", "model", "ema")}
    assert any("also has EMA weights" in n and "weights=ema" in n for n in notes["auto"])
    assert not any("EMA weights" in n for n in notes["model"] + notes["ema"])


def test_eval_of_a_jpeg_folder_equals_the_official_transform_and_a_plain_loop(tmp_path):
    """Pixels: eval.py on JPEGs of several sizes (several times the eval size, where a DCT-domain decode
    shortcut would change pixels) equals the official eval transform + torchvision ImageFolder + a plain loop."""
    root = tmp_path / "images"
    write_image_folder(str(root / "train"), 4, 1, size=(60, 50))
    write_image_folder(str(root / "val"), 4, 3, size=(300, 220), seed=1)  # ~5x the 54 px resize: draft territory
    write_image_folder(str(root / "val"), 4, 2, size=(70, 90), seed=2, ext=".jpg")
    torch.manual_seed(3)
    model = focalnet.create_model("focalnet_micro", num_classes=4)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    for test_crop in (True, False):
        r = evaluate(compose_eval([f"checkpoint={tmp_path / 'w.pth'}", "model=focalnet_micro", "data=folder", f"data.root={root}",
                                   "data.img_size=48", "data.batch_size=4", "data.num_workers=0", "aug=none",
                                   f"aug.test_crop={str(test_crop).lower()}", "trainer.amp=none"],
                                  tmp_path / f"eval_{test_crop}"))
        official = datasets.ImageFolder(str(root / "val"), transform=official_eval_transform(48, test_crop))
        plain = plain_scores(*plain_logits(model.eval(), official))
        assert (r["top1"], r["top5"], r["count"]) == (plain["top1"], plain["top5"], 20), (r, plain)
        assert r["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=0)


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


TIMM_INFO = Path(timm.data.__file__).parent / "_info"


def timm_valid_labels(which: str) -> list[int]:
    """What timm's validate.py reads from ``--valid-labels`` (one int per line) and slices logits with."""
    with open(TIMM_INFO / f"imagenet_{which}_indices.txt") as f:
        return [int(line.rstrip()) for line in f]


IMG_SIZE = 48  # > 32: the official eval transform resizes (it leaves 32 px CIFAR-size images alone)
IMG = [f"data.img_size={IMG_SIZE}", "data.batch_size=4", "data.num_workers=0", "aug=none", "aug.test_crop=false",
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
    """The reference is timm's validate.py way: ImageDataset(class_map=timm's imagenet_{a,r}_synsets.txt),
    logits[:, valid_labels] with timm's imagenet_{a,r}_indices.txt, on the official eval transform."""
    model, ckpt = in1k_model
    wnids = (TIMM_INFO / f"imagenet_{which}_synsets.txt").read_text().split()
    chosen = [wnids[0], wnids[57], wnids[199]]
    _write_images(tmp_path / "set", chosen, per_class=3)
    r = evaluate(compose_eval([f"checkpoint={ckpt}", f"eval_set={which}", f"eval_root={tmp_path / 'set'}",
                               "data=imagenet1k", *IMG], tmp_path / "eval"))
    reference = timm.data.create_dataset("", root=str(tmp_path / "set"),
                                         class_map=str(TIMM_INFO / f"imagenet_{which}_synsets.txt"),
                                         transform=official_eval_transform(IMG_SIZE, test_crop=False))
    logits, targets = plain_logits(model.eval(), reference)
    plain = plain_scores(logits[:, timm_valid_labels(which)], targets)  # (N, 200)
    assert sorted(set(targets.tolist())) == [0, 57, 199]
    assert r["count"] == 9 and r["num_classes"] == 200
    assert (r["top1"], r["top5"]) == (plain["top1"], plain["top5"])
    assert r["loss"] == pytest.approx(plain["loss"], rel=1e-6)


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
    """ReaL scores equal timm's RealLabelsImagenet on the same predictions; the shipped labels are timm's."""
    model, ckpt = in1k_model
    wnids = imagenet1k_wnids()
    val = tmp_path / "imagenet" / "val"
    files = []
    for n, cls in enumerate([3, 3, 500, 999], start=1):  # ILSVRC2012_val_00000001..4 in their wnid folders
        (val / wnids[cls]).mkdir(parents=True, exist_ok=True)
        f = val / wnids[cls] / f"ILSVRC2012_val_{n:08d}.JPEG"
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(f)
        files.append(f)
    official = official_eval_transform(IMG_SIZE, test_crop=False)
    with torch.no_grad():
        logits = model.eval()(torch.stack([official(Image.open(f).convert("RGB")) for f in files]))
    ranked = logits.topk(10, 1).indices.tolist()
    miss = [c for c in range(1000) if all(c not in r[:5] for r in ranked)][0]
    real = [[ranked[0][0]],            # top-1 hit
            [ranked[1][3], miss],      # top-5 hit only
            [],                        # no ReaL label: left out
            [miss]]                    # miss
    (tmp_path / "real.json").write_text(json.dumps(real))
    r = evaluate(compose_eval([f"checkpoint={ckpt}", "eval_set=real", "data=imagenet1k", f"data.root={tmp_path / 'imagenet'}",
                               f"real_labels={tmp_path / 'real.json'}", *IMG], tmp_path / "eval"))
    timm_real = RealLabelsImagenet([f.name for f in files], real_json=str(tmp_path / "real.json"))
    timm_real.add_result(logits)
    assert r["count"] == 4 and r["real_count"] == 3 == len(timm_real.is_correct[1])
    assert r["real_top1"] == pytest.approx(timm_real.get_accuracy(1), rel=1e-12) == pytest.approx(100 / 3)
    assert r["real_top5"] == pytest.approx(timm_real.get_accuracy(5), rel=1e-12) == pytest.approx(200 / 3)
    assert (r["top1"], r["top5"]) == (plain_scores(logits, torch.tensor([3, 3, 500, 999]))["top1"],
                                      plain_scores(logits, torch.tensor([3, 3, 500, 999]))["top5"])


def test_the_default_real_labels_are_timms():
    from focalnet.data.eval_sets import load_real_labels

    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 50001)]
    theirs = RealLabelsImagenet(names).real_labels  # timm's shipped imagenet_real_labels.json
    ours = load_real_labels()
    assert [theirs[n] for n in names] == ours and sum(1 for x in ours if not x) == 3163


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
    assert f"{params / 1e6:.2f}M params, {r['gmacs']:.3f} GMACs" in printed
    assert r["gmacs"] * 1e9 == OFFICIAL_MICRO_MACS["32"]  # FlopCounterMode on the official module, same arch
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
    assert result["params_m"] == pytest.approx(params / 1e6) and result["gmacs"] * 1e9 == OFFICIAL_MICRO_MACS["32"]
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
                   launcher=(torchrun, "--standalone", "--nproc_per_node=2"))  # a free port, picked by torchrun
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
    wnids = (TIMM_INFO / f"imagenet_{which}_synsets.txt").read_text().split()
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
