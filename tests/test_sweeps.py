"""Hydra multirun sweeps launched from outside torchrun: one run directory and one W&B run per job.

* a 2-point local sweep (Hydra's basic launcher) end to end, W&B offline, checked with W&B's own reader
  (both runs in one W&B group, the sweep's id);
* the same 2 points through hydra-submitit-launcher's local executor (separate processes, the code path
  the SLURM launcher uses);
* an Optuna study (hydra-optuna-sweeper, conf/hydra/sweeper/optuna_focalnet.yaml) of 2 trials that
  maximizes the val/top1 train.py returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import wandb_run_record

ROOT = Path(__file__).resolve().parents[1]
WANDB = Path(sys.executable).with_name("wandb")
TINY = ["model=focalnet_micro", "data=synthetic", "data.train_size=64", "data.val_size=32", "data.batch_size=16",
        "trainer.max_steps=2", "trainer.device=cpu"]


def run_train(tmp_path: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOCALNET_OUTPUT_ROOT": str(tmp_path / "out"), **(env_extra or {})}
    for key in ("FOCALNET_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_MODE"):
        if key not in (env_extra or {}):
            env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def last(metrics: Path, key: str):
    return next(r[key] for r in reversed(rows(metrics)) if key in r)


def inspect_wandb(run_dir: Path) -> dict:
    """W&B's own reader of an offline run: state, config and summary (HYDRA.md, 'Checking what reached W&B')."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run([str(WANDB), "leet", "inspect", "--summary", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def check_two_point_sweep(sweep_dir: Path) -> None:
    """Two jobs, each with its own run dir, metrics file and finished offline W&B run holding its own LR."""
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in run_dirs] == ["0", "1"]
    wandb_ids = set()
    for run_dir, lr in zip(run_dirs, (1e-3, 2e-3)):
        metrics = run_dir / "metrics.jsonl"
        assert last(metrics, "final/step") == 2 and (run_dir / "checkpoints" / "last.pt").is_file()
        w = inspect_wandb(run_dir)
        assert w["state"] == "finished" and w["exit_code"] == 0
        assert w["config"]["optimizer"]["lr"] == pytest.approx(lr)
        assert w["config"]["paths"]["output_dir"] == str(run_dir)
        assert w["summary"]["val/top1"] == pytest.approx(last(metrics, "val/top1"))
        wandb_ids.add(w["run_id"])
        run = wandb_run_record(run_dir)  # every point of the sweep in one W&B group: the sweep's id
        assert run["run_group"] == sweep_dir.name and run["job_type"] == "train"
    assert len(wandb_ids) == 2


@pytest.mark.slow
def test_local_two_point_sweep(tmp_path):
    run_train(tmp_path, "-m", "optimizer.lr=1e-3,2e-3", *TINY, "logger.wandb.mode=offline")
    (sweep_dir,) = (tmp_path / "out" / "multirun").iterdir()
    assert (sweep_dir / "multirun.yaml").is_file()
    check_two_point_sweep(sweep_dir)


@pytest.mark.slow
def test_submitit_local_two_point_sweep(tmp_path):
    # Each job runs in its own process started by submitit, as on SLURM. FOCALNET_RUN_ID pins the sweep
    # directory for every job process (conf/hydra/launcher/slurm.yaml exports it the same way).
    run_train(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
              "optimizer.lr=1e-3,2e-3", *TINY, "logger.wandb.mode=offline",
              env_extra={"FOCALNET_RUN_ID": "sweep_submitit"})
    sweep_dir = tmp_path / "out" / "multirun" / "sweep_submitit"
    assert [p.name for p in (tmp_path / "out" / "multirun").iterdir()] == ["sweep_submitit"]
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2
    check_two_point_sweep(sweep_dir)


@pytest.mark.slow
def test_optuna_sweep_maximizes_val_top1(tmp_path):
    run_train(tmp_path, "-m", "hydra/sweeper=optuna_focalnet", "hydra.sweeper.n_trials=2", *TINY,
              "logger.wandb.mode=disabled")
    (sweep_dir,) = (tmp_path / "out" / "multirun").iterdir()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = {}
    for run_dir in (sweep_dir / "0", sweep_dir / "1"):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        params = (cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"], cfg["model"]["drop_path_rate"])
        trials[params] = last(run_dir / "metrics.jsonl", "val/top1")
    assert len(trials) == 2                                  # two distinct proposals, two runs
    best = max(trials.values())
    assert results["best_value"] == pytest.approx(best)
    bp = results["best_params"]
    assert trials[(bp["optimizer.lr"], bp["optimizer.weight_decay"], bp["model.drop_path_rate"])] == best
    for lr, wd, dp in trials:                                # inside the declared search space
        assert 1e-4 <= lr <= 2e-3 and 0.01 <= wd <= 0.1 and dp in (0.1, 0.2, 0.3, 0.4, 0.5)
