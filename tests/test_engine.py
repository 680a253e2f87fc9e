"""Engine pieces, in process: config validation, param groups, LR scaling/schedules, the AMP step,
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

import focalnet
from focalnet.engine import distributed as D
from focalnet.engine.amp import AmpStep, NonFiniteLossError
from focalnet.engine.build import (
    build_model,
    build_optimizer,
    build_scheduler,
    init_weights_from,
    param_groups,
)
from focalnet.engine.checkpointing import capture_rng, load_file, restore_rng, save_atomic
from focalnet.engine.config import ConfigError, scaled_lrs, validate_config
from focalnet.engine.trainer import train

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
])
def test_invalid_values_name_the_key_and_what_is_allowed(compose_cfg, override, key, allowed):
    extra = ["aug=deit"] if key == "data.batch_size" else []
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(*extra, override))
    assert key in str(e.value) and allowed in str(e.value)


def test_unknown_override_is_rejected_by_hydra(compose_cfg):
    with pytest.raises(Exception, match="epochz"):
        compose_cfg("trainer.epochz=3")


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


def _lrs(name, steps=100, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = {"name": name, "warmup_epochs": 1, "decay_epochs": 2, "decay_rate": 0.5, **kw}
    sched = build_scheduler(opt, cfg, total_steps=steps, steps_per_epoch=10, warmup_lr=0.01, min_lr=0.001)
    out = []
    for s in range(steps + 1):
        sched.step_update(num_updates=s)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_schedules_per_step_with_warmup():
    cos = _lrs("cosine")
    assert cos[0] == pytest.approx(0.01) and cos[10] == pytest.approx(1.0)  # linear warmup over 1 epoch
    assert all(a < b for a, b in zip(cos[:10], cos[1:11]))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:])) and cos[100] == pytest.approx(0.001)
    step = _lrs("step")
    assert step[10] == 1.0 and step[29] == 1.0 and step[30] == 0.5 and step[50] == 0.25
    const = _lrs("constant")
    assert const[0] == pytest.approx(0.01) and set(const[10:]) == {1.0}


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
    build_optimizer(model, plain["optimizer"], lr=1e-3)


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
    """batch B with accum 2 == batch 2B (same samples per update, same scaled LR) within float tolerance."""
    common = ["optimizer=sgd", "optimizer.lr=0.5", "model.drop_path_rate=0.0", "trainer.max_steps=3",
              "trainer.clip_grad=1.0", "trainer.eval_every=0"]
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


@pytest.mark.parametrize("switches", [
    ["trainer.amp=bf16", "trainer.channels_last=true", "trainer.grad_checkpointing=true"],
    ["trainer.amp=fp16", "trainer.ema_decay=0.9", "aug=deit", "schedule=step"],
])
def test_amp_and_memory_switches_train(compose_cfg, switches):
    cfg = compose_cfg(*switches, "trainer.max_steps=2", "trainer.eval_every=0")
    result = train(cfg)
    ckpt = load_file(f"{cfg.paths.output_dir}/checkpoints/last.pt")
    assert result["final/step"] == ckpt["step"] == 2 and result["val/count"] == 64
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    if "trainer.amp=fp16" in switches:
        assert ckpt["scaler"]["scale"] > 0 and "val_ema/top1" in result  # GradScaler state is checkpointed


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
    from data.imagegen import write_bad_image, write_image_folder

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
