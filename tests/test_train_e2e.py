"""End-to-end proof through the real CLI (``python train.py ...``, ``torchrun``, ``-m``), CPU only.

* a focalnet_micro run on synthetic data learns, writes last/best checkpoints, metrics.jsonl, provenance and
  an offline W&B run whose records W&B's own reader (``wandb leet inspect``) shows;
* a run killed with SIGKILL mid-epoch, or stopped with SIGTERM, and relaunched with ``trainer.resume=auto``
  ends bitwise identical (weights, EMA, optimizer) to an uninterrupted run;
* ``torchrun --nproc_per_node=2`` (gloo): one run dir, identical weights on both ranks, exact val counts;
* ``-m optimizer.lr=a,b``: two complete runs, two W&B runs;
* invalid configs exit non-zero naming the key.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, run_train, start_paused_at, train_env, wandb_run_record

from focalnet.engine.checkpointing import load_file
from focalnet.engine.trainer import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

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


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


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


def start_and_wait_for_step(run_dir: Path, step: int, *extra: str) -> subprocess.Popen:
    return start_paused_at(step, [*RESUME, f"hydra.run.dir={run_dir}", *extra], run_dir.parent / "paused")


def test_resume_after_sigkill_mid_epoch_is_bitwise_exact(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_step(run_dir, 23)  # epoch 1 (steps 17-32); last.pt from step 20
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(m["step"] for m in read_metrics(run_dir))
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert killed_at == 23 and saved["step"] == 20 and saved["batch_in_epoch"] == 4  # inside epoch 1
    check(run_train([*RESUME, f"hydra.run.dir={run_dir}"]))  # trainer.resume=auto is the default
    resumed = [m for m in read_metrics(run_dir) if "resumed_from_step" in m]
    assert resumed and resumed[0]["resumed_from_step"] == saved["step"] <= killed_at
    assert_same_training_state(load_file(run_dir / "checkpoints" / "last.pt"), reference_run)


def test_resume_after_sigterm_is_bitwise_exact(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    wandb_on = "logger.wandb.mode=offline"  # also: the resumed run continues the same W&B run
    proc = start_and_wait_for_step(run_dir, 7, wandb_on)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == 7 and saved["wandb_id"]
    check(run_train([*RESUME, f"hydra.run.dir={run_dir}", wandb_on]))
    final = load_file(run_dir / "checkpoints" / "last.pt")
    assert_same_training_state(final, reference_run)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {wandb_summary(r)["run_id"] for r in runs} == {saved["wandb_id"]} == {final["wandb_id"]}


# -- multi-process, sweeps, CLI errors --------------------------------------------------------------------


def test_torchrun_two_ranks_gloo(tmp_path):
    out_root = tmp_path / "outputs"
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    check(run_train(["data.val_size=63", "data.train_size=128", "trainer.epochs=2", "logger.wandb.mode=offline",
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
    # 128 samples / (2 ranks x 16) = 4 updates per epoch, total batch 32 in the LR scaling
    assert ckpt["step"] == 8 and metrics[0]["derived/total_batch"] == 32


def test_multirun_sweep_gives_two_runs_and_two_wandb_runs(tmp_path):
    out_root = tmp_path / "outputs"
    check(run_train(["optimizer.lr=1e-3,2e-3", "logger.wandb.mode=offline"], flags=["-m"],
                    env=train_env(FOCALNET_OUTPUT_ROOT=str(out_root))))
    (sweep,) = (out_root / "multirun").iterdir()
    ids, lrs = set(), set()
    for job in ("0", "1"):
        ckpt = load_file(sweep / job / "checkpoints" / "last.pt")
        assert ckpt["step"] == 8
        (wandb_run,) = (sweep / job / "wandb").glob("offline-run-*")
        summary = wandb_summary(wandb_run)
        assert summary["state"] == "finished" and "val/top1" in summary["summary"]
        ids.add(summary["run_id"])
        lrs.add(summary["config"]["optimizer"]["lr"])
    assert len(ids) == 2 and lrs == {1e-3, 2e-3}


@pytest.mark.parametrize("override, expected, code", [
    ("trainer.epochz=3", "epochz", 1),                                 # misspelled key: Hydra's struct check
    ("trainer.amp=fp8", "trainer.amp='fp8' is not allowed; it must be one of: bf16, fp16, none", 2),
    ("trainer.epochs=-1", "trainer.epochs=-1 is not allowed", 2),      # our validation, before any work
])
def test_invalid_configs_exit_nonzero_naming_the_key(tmp_path, override, expected, code):
    proc = run_train([override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == code
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
