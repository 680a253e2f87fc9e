"""End-to-end proof through the real CLI (``python train.py ...``, ``torchrun``, ``-m``), CPU only.

* a focalnet_micro run on synthetic data learns, writes last/best checkpoints, metrics.jsonl, provenance and
  an offline W&B run whose records W&B's own reader (``wandb leet inspect``) shows;
* a run stopped with SIGTERM, relaunched with ``trainer.resume=auto``, killed with SIGKILL mid-epoch and
  relaunched again ends bitwise identical (weights, EMA, optimizer) to an uninterrupted run;
* ``torchrun --nproc_per_node=2`` (gloo): one run dir, identical weights on both ranks, exact val counts;
* ``-m schedule=cosine,step``: two complete runs, two W&B runs;
* the logged ``train/lr`` equals timm's scheduler built with the official arguments and stepped as the official
  ``main.py`` steps it (``tests/test_lr_schedule.py``), with and without gradient accumulation;
* exit codes: 1 for an override Hydra rejects, 2 for an invalid value (before any work), 75 after a SIGTERM
  once ``last.pt`` is saved.

The exit-code and two-rank tests are small enough for the fast suite; the others are ``slow``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import PYTHON, compose_eval, run_train, start_paused_at, train_env, wandb_run_record
from test_lr_schedule import official_loop_lrs, official_scheduler

from focalnet.engine.checkpointing import load_file
from focalnet.engine.trainer import EXIT_PREEMPTED

WANDB = str(Path(sys.executable).with_name("wandb"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_summary(run_path: Path) -> dict:
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(run_path)], capture_output=True,
                         text=True, timeout=120, env=train_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_lr_is_the_official_curve(run_dir: Path, *, epochs: int, batches_per_epoch: int) -> None:
    """Every logged ``train/lr`` (after update s) equals the LR the official loop's optimizer holds after update s."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    sched = cfg["schedule"]
    records = read_metrics(run_dir)
    derived = next(r for r in records if "derived/lr" in r)
    logged = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    ref = official_loop_lrs(
        official_scheduler(sched["name"], torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=derived["derived/lr"]),
                           epochs=epochs, n_iter=batches_per_epoch, warmup_epochs=sched["warmup_epochs"],
                           warmup_lr=derived["derived/warmup_lr"], min_lr=derived["derived/min_lr"],
                           decay_epochs=sched["decay_epochs"], decay_rate=sched["decay_rate"],
                           warmup_prefix=sched["warmup_prefix"]),
        epochs=epochs, n_iter=batches_per_epoch, accum=cfg["trainer"]["accum_steps"])
    assert logged and max(logged) == len(ref), (sorted(logged), len(ref))
    assert {s: logged[s] for s in sorted(logged)} == {s: ref[s - 1] for s in sorted(logged)}, (run_dir, sched)


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_learns_and_writes_checkpoints_metrics_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    check(run_train([f"hydra.run.dir={run_dir}", "data.train_size=256", "data.batch_size=32", "trainer.epochs=2",
                     "optimizer.lr=0.03", "trainer.ema_decay=0.9", "trainer.log_every=2",
                     "logger.wandb.mode=offline"]))
    metrics = read_metrics(run_dir)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    vals = [m for m in metrics if "val/top1" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(vals) == 2 and vals[-1]["val/top1"] >= 50.0 and vals[-1]["val/count"] == 64  # chance: 10%
    assert "val_ema/top1" in vals[-1] and metrics[0]["derived/lr"] == pytest.approx(0.03 * 32 / 512)
    assert {"train/grad_norm", "train/lr", "train/img_per_s"} <= set(metrics[1])
    assert_lr_is_the_official_curve(run_dir, epochs=2, batches_per_epoch=256 // 32)

    last = load_file(run_dir / "checkpoints" / "last.pt")
    best = load_file(run_dir / "checkpoints" / "best.pt")
    assert last["step"] == 16 and last["epoch"] == 2 and last["batch_in_epoch"] == 0
    assert best["best_metric"] == max(v["val/top1"] for v in vals)
    assert "layers.0.blocks.0.modulation.f.weight" in last["model"] and last["ema"] is not None
    assert last["config"]["optimizer"]["lr"] == 0.03 and len(last["rng"]) == 1

    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["world_size"] == 1 and prov["device"] == "cpu" and "torch" in prov["packages"]
    assert prov["config"]["model"]["name"] == "focalnet_micro" and (run_dir / "config.yaml").exists()

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    summary = wandb_summary(wandb_run)
    assert summary["run_id"] == last["wandb_id"] and summary["state"] == "finished"
    assert summary["summary"]["val/top1"] == vals[-1]["val/top1"] and "train/loss" in summary["summary"]
    assert summary["config"]["optimizer"]["lr"] == 0.03  # the resolved config, as a plain dict


# -- exact resume ----------------------------------------------------------------------------------------

RESUME = ["aug=deit", "trainer.ema_decay=0.9", "data.train_size=256", "trainer.epochs=3", "trainer.ckpt_every_steps=5",
          "optimizer.lr=0.01"]  # mixup/cutmix (numpy RNG), drop path (torch RNG), EMA, 16 updates per epoch


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    check(run_train([*RESUME, f"hydra.run.dir={run_dir}"]))
    return load_file(run_dir / "checkpoints" / "last.pt")


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == 48
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def start_and_wait_for_step(run_dir: Path, step: int, *extra: str, args=RESUME) -> tuple[subprocess.Popen, Path]:
    """A run parked after update ``step`` (conftest's start_paused_at) and its output file."""
    log = run_dir.parent / "train.out"
    proc = start_paused_at(step, [*args, f"hydra.run.dir={run_dir}", *extra], run_dir.parent / "paused", log=log)
    return proc, log


@pytest.mark.slow
def test_resume_after_sigterm_then_sigkill_mid_epoch_is_bitwise_exact(tmp_path, reference_run):
    """One run, interrupted twice and relaunched with ``trainer.resume=auto`` (the default) each time, ends
    bitwise identical to the uninterrupted reference: a SIGTERM after update 7 (exit 75, last.pt of update 7),
    then a SIGKILL mid-epoch after update 23 (nothing saved on the kill: last.pt of update 20). Either resume
    being inexact makes the final state differ. The resumed runs continue the same W&B run."""
    run_dir = tmp_path / "run"
    wandb_on = "logger.wandb.mode=offline"
    proc, log = start_and_wait_for_step(run_dir, 7, wandb_on)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, log.read_text()[-3000:]
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == 7 and saved["wandb_id"]

    proc, _ = start_and_wait_for_step(run_dir, 23, wandb_on)  # epoch 1 (steps 17-32); last.pt from step 20
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed = [m["resumed_from_step"] for m in read_metrics(run_dir) if "resumed_from_step" in m]
    killed_at = max(m["step"] for m in read_metrics(run_dir))
    saved_before_kill = load_file(run_dir / "checkpoints" / "last.pt")
    # parked after update 23 (the pause hook); metrics reach the file at host checks, so the last logged step
    # may trail it, but it is past the save at update 20: the kill lands mid-epoch after a save
    assert resumed == [7] and 20 < killed_at <= 23
    assert saved_before_kill["step"] == 20 and saved_before_kill["batch_in_epoch"] == 4  # inside epoch 1

    check(run_train([*RESUME, f"hydra.run.dir={run_dir}", wandb_on]))
    resumed = [m["resumed_from_step"] for m in read_metrics(run_dir) if "resumed_from_step" in m]
    assert resumed == [7, 20]
    final = load_file(run_dir / "checkpoints" / "last.pt")
    assert_same_training_state(final, reference_run)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {wandb_summary(r)["run_id"] for r in runs} - {""}  # the SIGKILLed launch may not have flushed its run record
    assert len(runs) == 3 and ids == {saved["wandb_id"]} == {final["wandb_id"]}


# -- multi-process, sweeps, CLI errors --------------------------------------------------------------------


def test_torchrun_two_ranks_gloo(tmp_path):
    out_root = tmp_path / "outputs"
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    check(run_train(["data.val_size=63", "data.train_size=64", "trainer.epochs=2", "logger.wandb.mode=offline",
                     "trainer.ema_decay=0.9"],
                    launcher=launcher, env=train_env(FOCALNET_OUTPUT_ROOT=str(out_root))))
    (run_dir,) = out_root.iterdir()  # one run directory for both ranks
    assert (run_dir / "train.log").exists() and (run_dir / "train_rank1.log").exists()
    assert "AdamW with the fused kernel; DDP static_graph=True" in (run_dir / "train.log").read_text()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # W&B on rank 0 only
    assert wandb_run_record(run_dir)["run_group"] == run_dir.name  # the job's run id, once for all ranks
    metrics = read_metrics(run_dir)
    final = next(m for m in metrics if "final/weights_sha256_per_rank" in m)
    hashes = final["final/weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and final["final/params_in_sync"]
    vals = [m for m in metrics if "val/count" in m]
    assert vals and all(v["val/count"] == 63 and v["val_ema/count"] == 63 for v in vals)  # no padding, no drops
    ckpt = load_file(run_dir / "checkpoints" / "last.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    # 64 samples / (2 ranks x 16) = 2 updates per epoch, total batch 32 in the LR scaling
    assert ckpt["step"] == 4 and metrics[0]["derived/total_batch"] == 32


@pytest.mark.slow
def test_multirun_sweep_gives_two_runs_and_two_wandb_runs(tmp_path):
    """Also the LR curve through train.py under accumulation: 10 micro-batches per epoch and accum 3 leave one
    batch over, which the official loop never steps on; warmup and step decays end mid-epoch."""
    out_root = tmp_path / "outputs"
    check(run_train(["schedule=cosine,step", "trainer.accum_steps=3", "schedule.warmup_epochs=0.55",
                     "schedule.decay_epochs=0.75", "schedule.decay_rate=0.5", "schedule.min_lr=1e-4",
                     "optimizer.lr=0.05", "trainer.epochs=2", "data.train_size=40", "data.batch_size=4",
                     "data.val_size=16", "logger.wandb.mode=offline"], flags=["-m"],
                    env=train_env(FOCALNET_OUTPUT_ROOT=str(out_root))))
    (sweep,) = (out_root / "multirun").iterdir()
    ids, schedules = set(), set()
    for job in ("0", "1"):
        ckpt = load_file(sweep / job / "checkpoints" / "last.pt")
        assert ckpt["step"] == 6  # 2 epochs x 3 updates
        (wandb_run,) = (sweep / job / "wandb").glob("offline-run-*")
        summary = wandb_summary(wandb_run)
        assert summary["state"] == "finished" and "val/top1" in summary["summary"]
        ids.add(summary["run_id"])
        schedules.add(summary["config"]["schedule"]["name"])
        assert_lr_is_the_official_curve(sweep / job, epochs=2, batches_per_epoch=40 // 4)
    assert len(ids) == 2 and schedules == {"cosine", "step"}


@pytest.mark.slow
def test_model_timm_trains_through_train_py_and_evaluates(tmp_path):
    """README: `model=timm model.name=swin_tiny_patch4_window7_224` trains any timm model (here a Swin shrunk
    through model.kwargs to fit 32 px): timm's own state dict in the checkpoint, eval.py reproduces its scores."""
    from focalnet.engine import evaluate

    run_dir = tmp_path / "run"
    swin = ["model=timm", "model.name=swin_tiny_patch4_window7_224", "model.drop_path_rate=0.1",
            "++model.kwargs={img_size: 32, window_size: 4, embed_dim: 24, depths: [1, 1], num_heads: [1, 2]}"]
    check(run_train([*swin, f"hydra.run.dir={run_dir}", "trainer.epochs=2", "optimizer.lr=0.01"]))
    last = load_file(run_dir / "checkpoints" / "last.pt")
    reference = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32, window_size=4,
                                  embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    assert {k: tuple(v.shape) for k, v in last["model"].items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert last["config"]["model"]["library"] == "timm" and last["step"] == 16
    logged = [m for m in read_metrics(run_dir) if "val/top1" in m][-1]
    r = evaluate(compose_eval([f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "data=synthetic", "data.img_size=32",
                               "data.val_size=64", "data.batch_size=16", "trainer.amp=none", "aug=none"],
                              tmp_path / "eval"))
    assert r["model_source"] == "checkpoint config" and r["count"] == logged["val/count"] == 64
    assert (r["top1"], r["top5"], r["loss"]) == (logged["val/top1"], logged["val/top5"], logged["val/loss"])


@pytest.mark.parametrize("override, expected, code", [
    ("trainer.epochz=3", "Could not override 'trainer.epochz'", 1),     # misspelled key: Hydra's struct check
    ("trainer.amp=fp8", "trainer.amp='fp8' is not allowed; it must be one of: bf16, fp16, none", 2),  # ours
])
def test_invalid_configs_exit_nonzero_naming_the_key(tmp_path, override, expected, code):
    proc = run_train([override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == code, proc.stderr[-3000:]
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
    if code == 2:  # one line naming the key, no traceback (README "Exit codes")
        assert "Traceback" not in proc.stderr


def test_sigterm_saves_last_pt_and_exits_75(tmp_path):
    """Exit code 75 (EX_TEMPFAIL): the signal lands at a known update (the pause hook), the run saves that
    update's state to last.pt and exits 75, without a traceback."""
    run_dir = tmp_path / "run"
    proc, log = start_and_wait_for_step(run_dir, 3, args=["data.train_size=64", "trainer.epochs=2"])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (3, 0, 3)
    assert max(m["step"] for m in read_metrics(run_dir)) == 3 and "Traceback" not in err
