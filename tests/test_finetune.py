"""Fine-tuning: ``trainer.init_from`` (weights only) with head keep / reinit / 22K->1K slice, resolution changes,
and the ``ft_in1k_*`` presets.

* a checkpoint trained with 10 classes initializes a 5-class run: trunk weights loaded, head re-initialized
  (the same whatever the global RNG), optimizer/schedule/step fresh;
* ``keep`` with a class-count mismatch fails with an actionable message; a toy 22K-layout head is sliced;
* resolution: a focalnet_micro trained at 32 px is evaluated and fine-tuned at 64 px (no position tables);
* every ``ft_in1k_*`` preset composes and validates with the recipe its comments cite, and a preset whose
  ``trainer.init_from`` was not given fails validation instead of training from scratch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_eval import DATA, compose_eval, read_metrics

import focalnet
from focalnet.engine import ConfigError, evaluate, train, validate_config
from focalnet.engine.build import build_model, init_weights_from
from focalnet.models.checkpoint import CheckpointError

CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 10-class focalnet_micro trained at 32 px: its checkpoints/last.pt (with optimizer state, step 8)."""
    run = tmp_path_factory.mktemp("source")
    train(compose_config([*TINY, *DATA, "optimizer.lr=0.03"], run))
    return run / "checkpoints" / "last.pt"


def _trunk(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def test_init_from_another_class_count_loads_the_trunk_and_starts_fresh(source, tmp_path):
    src = torch.load(source, weights_only=True)
    assert src["step"] == 8 and src["config"]["data"]["num_classes"] == 10
    # lr ~ 0: after one update the weights are still the initial ones, so the checkpoint shows what was loaded.
    cfg = compose_config([*TINY, *DATA, "data.num_classes=5", f"trainer.init_from={source}", "trainer.max_steps=1",
                          "optimizer.lr=1e-12", "optimizer.weight_decay=0"], tmp_path / "ft")
    out = train(cfg)
    assert out["final/step"] == 1  # the step starts at 0, not at the source's 8
    ft = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)
    for k, v in _trunk(src["model"]).items():
        torch.testing.assert_close(ft["model"][k], v, atol=1e-8, rtol=0)
    assert ft["model"]["head.weight"].shape == (5, src["model"]["head.weight"].shape[1])
    assert not torch.allclose(ft["model"]["head.weight"], src["model"]["head.weight"][:5])
    assert all(s["step"].item() == 1 for s in ft["optimizer"]["state"].values())  # a fresh AdamW
    logged = read_metrics(tmp_path / "ft")
    assert logged[0]["derived/lr"] == pytest.approx(1e-12 * 32 / 512)  # this run's LR, not the source's schedule


def test_reinitialized_head_does_not_depend_on_the_global_rng(source):
    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = focalnet.create_model("focalnet_micro", num_classes=5)
        state = torch.get_rng_state()
        init_weights_from(model, str(source), "reinit", seed=7)
        assert torch.equal(torch.get_rng_state(), state)  # the run's RNG stream is untouched
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])  # identical on every rank (ranks have different global RNG states)


def test_head_keep_with_another_class_count_says_what_to_do(source):
    model = focalnet.create_model("focalnet_micro", num_classes=5)
    with pytest.raises(CheckpointError, match="head='reinit'"):
        init_weights_from(model, str(source), "keep")
    with pytest.raises(ValueError, match="trainer.init_head='bogus'"):
        init_weights_from(model, str(source), "bogus")


@pytest.mark.parametrize("head", ["slice_22k_to_1k", "auto"])
def test_22k_head_is_sliced_to_its_first_1000_rows(head, tmp_path):
    in22k = focalnet.create_model("focalnet_micro", num_classes=21842)
    torch.save({"model": in22k.state_dict()}, tmp_path / "in22k.pth")
    model = focalnet.create_model("focalnet_micro", num_classes=1000)
    report = init_weights_from(model, str(tmp_path / "in22k.pth"), head)
    assert report.head == "sliced 21842->1000"
    assert torch.equal(model.head.weight, in22k.head.weight[:1000])
    assert torch.equal(model.head.bias, in22k.head.bias[:1000])
    for k, v in _trunk(in22k.state_dict()).items():
        assert torch.equal(model.state_dict()[k], v)


def test_finetune_run_from_a_22k_layout_checkpoint(tmp_path):
    in22k = focalnet.create_model("focalnet_micro", num_classes=21842)
    torch.save({"model": in22k.state_dict()}, tmp_path / "in22k.pth")
    cfg = compose_config([*TINY, "data.num_classes=1000", "data.train_size=64", "data.val_size=32",
                          f"trainer.init_from={tmp_path / 'in22k.pth'}", "trainer.init_head=slice_22k_to_1k",
                          "trainer.max_steps=1", "optimizer.lr=1e-12", "optimizer.weight_decay=0"], tmp_path / "ft")
    train(cfg)
    ft = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(ft["head.weight"], in22k.head.weight.detach()[:1000], atol=1e-8, rtol=0)


def test_resolution_change_32_to_64_just_works(source, tmp_path):
    # Evaluate the 32 px checkpoint at 64 px: same weights, 4x the tokens.
    r = evaluate(compose_eval([f"checkpoint={source}", *DATA, "data.img_size=64"], tmp_path / "eval64"))
    assert r["count"] == 64 and r["img_size"] == 64 and r["head"] == "loaded" and torch.isfinite(torch.tensor(r["loss"]))
    # Fine-tune it at 64 px, head kept.
    cfg = compose_config([*TINY, *DATA, "data.img_size=64", f"trainer.init_from={source}", "trainer.init_head=keep",
                          "trainer.max_steps=4", "optimizer.lr=0.01"], tmp_path / "ft64")
    out = train(cfg)
    assert out["final/step"] == 4 and out["val/count"] == 64
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "ft64") if "train/loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    stored = torch.load(tmp_path / "ft64" / "checkpoints" / "last.pt", weights_only=True)
    assert stored["config"]["data"]["img_size"] == 64
    # The fine-tuned checkpoint evaluates at 64 from its own stored config, reproducing the logged numbers.
    again = evaluate(compose_eval([f"checkpoint={tmp_path / 'ft64' / 'checkpoints' / 'last.pt'}", *DATA,
                                   "data.img_size=64"], tmp_path / "eval_ft"))
    assert (again["top1"], again["loss"]) == (out["val/top1"], out["val/loss"])


# ---- presets ---------------------------------------------------------------------------------------------------

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("ft_in1k_focalnet_*.yaml"))


def test_the_fine_tuning_presets_are_there():
    big = {f"ft_in1k_focalnet_{s}_{fl}_{r}" for s in ("large", "xlarge", "huge") for fl in ("fl3", "fl4")
           for r in (224, 384)}
    small = {f"ft_in1k_focalnet_{s}_{rf}_384" for s in ("tiny", "small", "base") for rf in ("srf", "lrf")}
    assert set(PRESETS) == big | small


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", "paths.output_dir=/tmp/unused",
                                                        *overrides])


CITED_SOURCE = re.compile(r"\.yaml|\.py\b|\.md\b|_C\.|\b[A-Z]+(?:_[A-Z]+)*\.[A-Z_]+\b|paper|Yang et al|Swin|"
                          r"official|codebase|assumed", re.IGNORECASE)
RUN_DEFINITION_KEYS = {"num_classes", "max_steps", "init_from", "init_head", "name", "tags"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_with_its_cited_recipe(name, tmp_path):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    # Every hyperparameter line names its source, in a comment on the line or in the comment lines just above
    # it: a file of the official or Swin code (yaml, config.py, main.py, get_started.md), one of their config keys
    # (_C.TRAIN.EPS, DATA.IMG_SIZE), the paper, a codebase, or the word "assumed" for a marked assumption.
    # Keys that define the run rather than tune it (dataset, fine-tuning source and head, names) are exempt.
    # Sources are public: nothing users cannot read (no internal notes).
    # The preset and the recipe it builds on (the values the preset does not restate) are both held to this.
    recipe = (CONF / "recipe" / "ft_in1k_focalnet.yaml").read_text()
    for where, source in ((name, text), ("recipe/ft_in1k_focalnet", recipe)):
        assert "shared/" not in source, f"{where} cites a file users do not have"
        lines = source.splitlines()
        for i, line in enumerate(lines):
            key = line.split(":")[0].strip()
            if not re.match(r"^\s+\w+: \S", line) or line.strip().startswith("-") or key in RUN_DEFINITION_KEYS:
                continue
            comment, j = line.split("#", 1)[1] if "#" in line else "", i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                comment, j = comment + lines[j], j - 1
            assert CITED_SOURCE.search(comment), f"{where}: no source for {line.strip()!r}"
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml").defaults)
    assert defaults[0] == "/recipe/ft_in1k_focalnet"  # one recipe, cited there; the preset says what differs
    model = defaults[1]["override /model"]
    assert model in focalnet.list_models() and name == f"ft_in1k_{model}_{name.rsplit('_', 1)[1]}"

    ckpt = tmp_path / "pretrained.pth"
    ckpt.write_bytes(b"")
    cfg = validate_config(_compose(name, f"trainer.init_from={ckpt}"))
    res = int(name.rsplit("_", 1)[1])
    is_22k = any(s in name for s in ("large", "xlarge", "huge"))
    assert cfg["data"]["name"] == "imagenet1k" and cfg["data"]["num_classes"] == cfg["model"]["num_classes"] == 1000
    assert cfg["data"]["img_size"] == res and cfg["aug"]["test_crop"] == (res == 224)
    assert cfg["trainer"]["init_head"] == ("slice_22k_to_1k" if is_22k else "keep")
    assert (cfg["trainer"]["epochs"], cfg["schedule"]["warmup_epochs"]) == (30, 5)
    assert (cfg["optimizer"]["lr"], cfg["schedule"]["warmup_lr"], cfg["schedule"]["min_lr"]) == (2e-5, 2e-8, 2e-7)
    assert cfg["optimizer"]["weight_decay"] == 1e-8 and cfg["aug"]["mixup"] == 0.8
    assert cfg["data"]["batch_size"] * 8 * cfg["trainer"]["accum_steps"] == 1024  # on 8 GPUs
    expected_dp = 0.2 if is_22k else {"tiny": 0.2, "small": 0.3, "base": 0.5}[name.split("_")[3]]
    assert cfg["model"]["drop_path_rate"] == expected_dp


def test_preset_without_init_from_fails_validation_instead_of_training_from_scratch():
    with pytest.raises(ConfigError, match="REQUIRED: pass trainer.init_from"):
        validate_config(_compose("ft_in1k_focalnet_tiny_lrf_384", "model=focalnet_micro"))


def test_init_from_loads_into_the_model_the_preset_builds(source):
    # The model the engine builds from a composed fine-tune config accepts a checkpoint of another resolution.
    cfg = validate_config(_compose("ft_in1k_focalnet_tiny_lrf_384", f"trainer.init_from={source}",
                                   "model=focalnet_micro", "data.num_classes=10"))
    model = build_model(cfg["model"])
    report = init_weights_from(model, cfg["trainer"]["init_from"], cfg["trainer"]["init_head"])
    assert report.head == "loaded" and not report.missing_keys
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 10)
    assert json.loads(json.dumps(cfg))["data"]["img_size"] == 384
