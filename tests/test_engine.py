"""Engine pieces, in process: config validation, param groups, LR scaling, the AMP step,
checkpoint files and RNG capture, the run id, and gradient accumulation through the real ``train``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

import focalnet
from focalnet.engine import distributed as D
from focalnet.engine.amp import AmpStep, NonFiniteLossError
from focalnet.engine.build import (
    build_model,
    build_optimizer,
    init_weights_from,
    param_groups,
)
from focalnet.engine.checkpointing import capture_rng, load_file, restore_rng, save_atomic
from focalnet.engine.config import ConfigError, scaled_lrs, validate_config
from focalnet.engine.trainer import TrainRun, train

# -- config validation --------------------------------------------------------------------------------


def test_default_and_tiny_configs_validate(compose_cfg):
    validate_config(compose_cfg(tiny=False))
    plain = validate_config(compose_cfg())
    assert plain["model"]["num_classes"] == plain["data"]["num_classes"] == 10


@pytest.mark.parametrize("override, key, allowed", [
    ("trainer.amp=fp8", "trainer.amp", "bf16, fp16, none"),
    ("trainer.epochs=-1", "trainer.epochs", "integer >= 0"),
    ("optimizer.name=lamb", "optimizer.name", "adamw, sgd"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay", "<= 1"),
    ("logger.wandb.mode=sometimes", "logger.wandb.mode", "auto, online, offline, disabled"),
    ("+trainer.epochz=3", "trainer.epochz", "known keys in trainer"),  # an unknown key that got in
    ("data.batch_size=7", "data.batch_size", "even"),                  # mixup needs pairs
    ("aug.reprob=1.5", "aug.reprob", "<= 1"),                          # aug and data are typed too
    ("aug.interpolation=lanczos", "aug.interpolation", "bicubic, bilinear, nearest, random"),
    ("data.num_workers=-1", "data.num_workers", "integer >= 0"),
    ("+data.shuffle=false", "data.shuffle", "known keys in data"),
    ("optimizer.lr=nan", "optimizer.lr", "finite number > 0"),         # NaN and inf are never allowed
    ("schedule.min_lr=inf", "schedule.min_lr", "finite number >= 0"),
    ("+model.kwargs.layerscale_value=nan", "model.kwargs", "without NaN or inf"),
])
def test_invalid_values_name_the_key_and_what_is_allowed(compose_cfg, override, key, allowed):
    extra = ["aug=deit"] if key == "data.batch_size" else []
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(*extra, override))
    assert key in str(e.value) and allowed in str(e.value)


def test_unknown_override_is_rejected_by_hydra(compose_cfg):
    """Hydra's struct check, before our validation (train.py then exits 1: tests/test_train_e2e.py)."""
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'trainer\.epochz'") as e:
        compose_cfg("trainer.epochz=3")
    assert isinstance(e.value.__cause__, ConfigAttributeError) and "Key 'epochz' is not in struct" in str(e.value.__cause__)


# -- optimizer, LR scaling, schedules -------------------------------------------------------------------


def test_param_groups_no_decay_on_norms_biases_gammas():
    model = focalnet.create_model("focalnet_micro", num_classes=10, use_layerscale=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("gamma_1") for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert "norm.weight" in no_decay_names and "head.weight" in decay_names
    assert all(names[id(p)].endswith(".weight") and p.ndim > 1 for p in decay["params"])
    assert len(decay_names) + len(no_decay_names) == len(names)
    # The official code's bug, reproduced on request: nothing decays.
    (only,) = param_groups(model, 0.05, official_no_weight_decay=True)
    assert only["weight_decay"] == 0.0 and len(only["params"]) == len(names)


def test_linear_scaling_rule(compose_cfg):
    plain = validate_config(compose_cfg("data.batch_size=128", "trainer.accum_steps=2", "optimizer.lr=5e-4",
                                        "schedule.warmup_lr=5e-7", "schedule.min_lr=5e-6"))
    d = scaled_lrs(plain, world_size=4)  # 128 x 4 x 2 = 1024 = the paper's total batch
    assert d["total_batch"] == 1024
    assert d["lr"] == pytest.approx(1e-3) and d["warmup_lr"] == pytest.approx(1e-6)
    assert d["min_lr"] == pytest.approx(1e-5)


# -- the AMP step ----------------------------------------------------------------------------------------


def _tiny_problem(scale=1.0):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4) * scale, torch.randint(0, 3, (8,))
    return model, opt, x, y


def test_amp_step_clips_once_and_returns_the_norm():
    model, opt, x, y = _tiny_problem(scale=100.0)
    amp = AmpStep("none", torch.device("cpu"), clip_grad=0.5)
    amp.backward(nn.functional.cross_entropy(model(x), y))
    grads_before = [p.grad.clone() for p in model.parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    norm = amp.step(opt, list(model.parameters()))
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_before]))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5) and norm.item() > 0.5
    # the applied update equals lr * clipped grad (norm 0.5)
    applied = torch.cat([(a - p.detach()).flatten() for a, p in zip(w0, model.parameters())]) / 0.1
    assert applied.norm().item() == pytest.approx(0.5, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fused", [True, False])  # skipped on the device (found_inf) / checked on the host
def test_non_finite_update_is_never_applied_and_stops_fp32_at_the_check(fused):
    model, _, x, y = _tiny_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    amp = AmpStep("none", torch.device("cpu"))
    amp.backward(nn.functional.cross_entropy(model(x), y))
    amp.step(opt, list(model.parameters()))  # a good update: applied
    w0 = [p.detach().clone() for p in model.parameters()]
    steps0 = [s["step"].clone() for s in opt.state.values()]
    amp.backward(nn.functional.cross_entropy(model(x), y) * float("nan"))
    amp.step(opt, list(model.parameters()))  # returns: nothing was read back from the device
    assert all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps0, opt.state.values()))  # not even counted
    assert (amp.skipped.item(), amp.in_a_row.item(), amp.longest_run.item()) == (1, 1, 1)
    with pytest.raises(NonFiniteLossError, match="trainer.amp=none"):
        amp.check()


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model, opt, x, y = _tiny_problem()
    amp = AmpStep("fp16", torch.device("cpu"))
    w0 = [p.detach().clone() for p in model.parameters()]
    scale0 = amp.scaler.get_scale()
    with amp.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    amp.backward(loss * float("inf"))
    amp.step(opt, list(model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    assert amp.skipped.item() == 1 and amp.scaler.get_scale() < scale0
    # the scaler state round-trips (it is checkpointed)
    amp2 = AmpStep("fp16", torch.device("cpu"))
    amp2.load_state_dict(amp.state_dict())
    assert amp2.scaler.get_scale() == amp.scaler.get_scale()


# -- checkpoint files, RNG, run id ---------------------------------------------------------------------


def test_rng_capture_restore_and_atomic_weights_only_save(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng()
    draws = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    save_atomic({"rng": [state], "step": 7}, tmp_path / "c" / "last.pt")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.pt"]  # no temporary file left behind
    loaded = load_file(tmp_path / "c" / "last.pt")  # weights_only=True
    restore_rng(loaded["rng"][0])
    again = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])


def test_run_id_is_cached_unique_and_overridable(monkeypatch):
    monkeypatch.setattr(D, "_RUN_ID", None)
    monkeypatch.delenv(D.RUN_ID_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    first = D.run_id()
    assert D.run_id() == first  # every resolution in a process agrees
    monkeypatch.setattr(D, "_RUN_ID", None)
    assert D.run_id() != first  # same second, still a new directory (hydra #2925)
    monkeypatch.setattr(D, "_RUN_ID", None)
    monkeypatch.setenv(D.RUN_ID_ENV, "job-42")
    assert D.run_id() == "job-42"


def test_build_model_focalnet_and_timm(compose_cfg):
    plain = validate_config(compose_cfg("trainer.grad_checkpointing=true"))
    model = build_model(plain["model"])
    assert isinstance(model, focalnet.FocalNet) and model.head.out_features == 10
    assert all(layer.grad_checkpointing for layer in model.layers)
    timm_model = build_model({"name": "resnet10t", "library": "timm", "num_classes": 10, "drop_path_rate": 0.0,
                              "kwargs": {}})
    assert timm_model.get_classifier().out_features == 10


def test_build_optimizer_is_the_papers_adamw_and_sgd_as_configured(compose_cfg):
    """optimizer=adamw is the paper's: AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 on weights only."""
    model = focalnet.create_model("focalnet_micro", num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, validate_config(compose_cfg("optimizer=adamw"))["optimizer"], lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    for group, wd in ((decay, 0.05), (no_decay, 0.0)):
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, wd)
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    sgd = build_optimizer(model, validate_config(compose_cfg("optimizer=sgd", "optimizer.nesterov=true"))["optimizer"],
                          lr=0.2)
    assert type(sgd) is torch.optim.SGD
    assert [(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in sgd.param_groups] == [
        (0.2, 0.9, True, 1e-4), (0.2, 0.9, True, 0.0)]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizers_take_the_fused_kernel_where_torch_has_one(compose_cfg, name):
    """Fused on CUDA and the CPU (it also skips a non-finite update on the device), foreach elsewhere."""
    cfg = {**validate_config(compose_cfg())["optimizer"], "name": name, "momentum": 0.9}
    on_cpu = build_optimizer(nn.Linear(4, 2), cfg, lr=1e-3)
    assert on_cpu.defaults["fused"] and not on_cpu.defaults["foreach"]
    on_meta = build_optimizer(nn.Linear(4, 2, device="meta"), cfg, lr=1e-3)  # no fused kernel there
    assert on_meta.defaults["foreach"] and not on_meta.defaults["fused"]


def test_train_destroys_its_process_group_when_it_ends_or_stops(compose_cfg, monkeypatch, tmp_path):
    import torch.distributed as dist

    def init_group():
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"store{next(stores)}"), 1), rank=0,
                                world_size=1)
        return D.DistInfo()

    stores = iter(range(2))
    monkeypatch.setattr(D, "init_distributed", init_group)
    train(compose_cfg("trainer.max_steps=2"))
    assert not dist.is_initialized()
    with pytest.raises(NonFiniteLossError):  # diverged (non-finite gradients from the first update)
        train(compose_cfg("trainer.max_steps=2", "data.signal=1e38"))
    assert not dist.is_initialized()


# -- gradient accumulation through the real training loop ---------------------------------------------


def test_accumulation_matches_the_large_batch(compose_cfg):
    """batch B with accum 2 == batch 2B (same samples per update, same scaled LR) within float tolerance.
    A constant LR: under accumulation the official LR index counts micro-batches, which moves a cosine by
    less than one update against the large batch (tests/test_lr_schedule.py checks that index)."""
    common = ["optimizer=sgd", "optimizer.lr=0.5", "model.drop_path_rate=0.0", "trainer.max_steps=3",
              "trainer.clip_grad=1.0", "trainer.eval_every=0", "schedule=constant"]
    big = compose_cfg(*common, "data.batch_size=32", "trainer.accum_steps=1")
    small = compose_cfg(*common, "data.batch_size=16", "trainer.accum_steps=2")
    r_big, r_small = train(big), train(small)
    assert r_big["final/step"] == r_small["final/step"] == 3
    w_big = load_file(f"{big.paths.output_dir}/checkpoints/last.pt")["model"]
    w_small = load_file(f"{small.paths.output_dir}/checkpoints/last.pt")["model"]
    init = focalnet.create_model("focalnet_micro", num_classes=10)  # weights moved away from any init
    assert any(not torch.allclose(w_big[k], v) for k, v in init.state_dict().items())
    for k in w_big:
        torch.testing.assert_close(w_small[k], w_big[k], rtol=1e-4, atol=1e-5, msg=k)


# -- switches and failure paths through the real training loop -----------------------------------------


def _record_what_the_model_sees(monkeypatch) -> dict:
    """Wrap the trainer's build_model and build_mixup_and_loss (the real ones run) with hooks that record, per
    forward of the network in training mode, the autocast dtype and the input's memory format, how many times
    the first block runs (twice per update when checkpointed: forward, then recompute in backward), and the
    targets the loss gets."""
    import focalnet.engine.trainer as trainer_module

    seen = {"train_forwards": [], "block_calls": 0, "target_ndims": set()}
    real_build_model, real_mixup_and_loss = trainer_module.build_model, trainer_module.build_mixup_and_loss

    def build_model(model_cfg, **kwargs):
        model = real_build_model(model_cfg, **kwargs)

        def before(module, args):
            if module.training:
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
                seen["train_forwards"].append((dtype, args[0].is_contiguous(memory_format=torch.channels_last)))

        def count(module, args):
            seen["block_calls"] += module.training

        model.register_forward_pre_hook(before)
        model.layers[0].blocks[0].register_forward_pre_hook(count)
        return model

    def build_mixup_and_loss(aug_cfg, num_classes):
        mixup, criterion = real_mixup_and_loss(aug_cfg, num_classes)
        criterion.register_forward_pre_hook(lambda m, args: seen["target_ndims"].add(args[1].ndim))
        return mixup, criterion

    monkeypatch.setattr(trainer_module, "build_model", build_model)
    monkeypatch.setattr(trainer_module, "build_mixup_and_loss", build_mixup_and_loss)
    return seen


@pytest.mark.parametrize("switches, autocast, channels_last, block_runs_per_update, target_ndim", [
    (["trainer.amp=bf16", "trainer.channels_last=true", "trainer.grad_checkpointing=true"],
     torch.bfloat16, True, 2, 1),
    (["trainer.amp=fp16", "trainer.ema_decay=0.9", "aug=deit", "schedule=step"], torch.float16, False, 1, 2),
])
def test_amp_and_memory_switches_take_effect(compose_cfg, monkeypatch, switches, autocast, channels_last,
                                             block_runs_per_update, target_ndim):
    seen = _record_what_the_model_sees(monkeypatch)
    cfg = compose_cfg(*switches, "trainer.max_steps=2", "trainer.eval_every=0")
    result = train(cfg)
    ckpt = load_file(f"{cfg.paths.output_dir}/checkpoints/last.pt")
    assert result["final/step"] == ckpt["step"] == 2 and result["val/count"] == 64
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert seen["train_forwards"] == [(autocast, channels_last)] * 2  # every update, under the asked autocast
    assert seen["block_calls"] == block_runs_per_update * 2
    assert seen["target_ndims"] == {target_ndim}  # (B, classes) soft targets when mixup/cutmix is on
    if "trainer.amp=fp16" in switches:
        assert ckpt["scaler"]["scale"] > 0 and "val_ema/top1" in result  # GradScaler state is checkpointed
        assert ckpt["ema"].keys() == ckpt["model"].keys()
        assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(compose_cfg):
    good = compose_cfg("trainer.max_steps=2")
    train(good)
    good_ckpt = f"{good.paths.output_dir}/checkpoints/last.pt"
    # Continue from that file (resume=PATH) on data that overflows to inf/NaN: fp32 must stop, not save.
    bad = compose_cfg("trainer.max_steps=4", f"trainer.resume={good_ckpt}", "data.signal=1e38",
                      "trainer.resume_allow_changes=[data.signal,trainer.max_steps]")
    with pytest.raises(NonFiniteLossError, match="last checkpoint"):
        train(bad)
    assert not (Path(bad.paths.output_dir) / "checkpoints" / "last.pt").exists()
    kept = load_file(good_ckpt)
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_init_from_loads_weights_only(compose_cfg, tmp_path):
    source = focalnet.create_model("focalnet_micro", num_classes=10)
    save_atomic({"model": source.state_dict()}, tmp_path / "pretrained.pt")
    model = build_model(validate_config(compose_cfg())["model"])
    init_weights_from(model, str(tmp_path / "pretrained.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_skipped_images_from_the_loader_are_logged(compose_cfg, tmp_path):
    """The folder pipeline skips and counts undecodable files; the engine sums the count over ranks and logs it."""
    from focalnet.data.imagegen import write_bad_image, write_image_folder

    root = tmp_path / "images"
    write_image_folder(str(root / "train"), 2, 4, size=(48, 40))
    write_image_folder(str(root / "val"), 2, 1, size=(48, 40), seed=1)
    for kind in ("corrupt", "truncated", "zero_byte"):
        write_bad_image(str(root / "train" / "n00000000" / f"bad_{kind}.JPEG"), kind)
    tiny_without_synthetic_data = [o for o in TINY if not o.startswith("data")]
    cfg = compose_cfg(*tiny_without_synthetic_data, "data=folder", f"data.root={root}", "data.num_workers=0",
                      "data.batch_size=4", "data.img_size=32", "trainer.epochs=2", "trainer.eval_every=0", tiny=False)
    train(cfg)
    metrics = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "metrics.jsonl").read_text().splitlines()]
    skipped = [m["train/skipped_images"] for m in metrics if "train/skipped_images" in m]
    assert len(skipped) == 2 and skipped[-1] > 0  # one record per epoch, a running count


# -- checkpoints through the real training loop --------------------------------------------------------------

# 64 images / batch 16 = 4 updates per epoch; mixup/cutmix (numpy RNG), drop path (torch RNG), EMA, AdamW.
RESUME = ["aug=deit", "trainer.ema_decay=0.9", "data.train_size=64", "trainer.epochs=2", "trainer.ckpt_every_steps=3",
          "optimizer.lr=0.01", "model.drop_path_rate=0.1"]


class SimulatedCrash(Exception):
    pass


def test_resume_after_a_crash_is_bitwise_exact(compose_cfg, monkeypatch):
    """A run that dies right after writing last.pt mid-epoch (step 6 of 8, epoch 1) and is relaunched ends
    bitwise identical to a run that was never interrupted: weights, EMA, optimizer, scaler, schedule, metric."""
    reference = compose_cfg(*RESUME)
    train(reference)

    crashed = compose_cfg(*RESUME)
    real_save = TrainRun.save

    def save_then_crash(self, name="last.pt", also=()):
        real_save(self, name, also)
        if self.state.step == 6:
            raise SimulatedCrash(f"killed after saving step {self.state.step}")

    monkeypatch.setattr(TrainRun, "save", save_then_crash)
    with pytest.raises(SimulatedCrash):
        train(crashed)
    monkeypatch.undo()
    saved = load_file(f"{crashed.paths.output_dir}/checkpoints/last.pt")
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (6, 1, 2)
    train(crashed)  # the same config again: trainer.resume=auto continues from last.pt

    a = load_file(f"{reference.paths.output_dir}/checkpoints/last.pt")
    b = load_file(f"{crashed.paths.output_dir}/checkpoints/last.pt")
    assert a["step"] == b["step"] == 8 and a["best_metric"] == b["best_metric"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"] and a["scaler"] == b["scaler"]
    logged = [json.loads(line) for line in (Path(crashed.paths.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["resumed_from_step"] for m in logged if "resumed_from_step" in m] == [6]


def test_save_epoch_ckpts_keeps_one_checkpoint_per_epoch(compose_cfg):
    """trainer.save_epoch_ckpts=true (README "Run directory"): epoch_N.pt after every epoch, validated or not,
    each the state at that epoch's end; off by default."""
    common = ["data.train_size=64", "trainer.epochs=3", "trainer.eval_every=2", "trainer.ckpt_every_steps=null"]
    cfg = compose_cfg(*common, "trainer.save_epoch_ckpts=true")
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]
    states = [load_file(ckpts / f"epoch_{n}.pt") for n in (1, 2, 3)]
    assert [(c["epoch"], c["step"], c["batch_in_epoch"]) for c in states] == [(1, 4, 0), (2, 8, 0), (3, 12, 0)]
    assert (ckpts / "epoch_3.pt").read_bytes() == (ckpts / "last.pt").read_bytes()
    first, second = states[0]["model"], states[1]["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # each file is its epoch's state

    default = compose_cfg(*common)
    train(default)
    assert sorted(p.name for p in (Path(default.paths.output_dir) / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
