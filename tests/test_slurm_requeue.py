"""Requeue on preemption through hydra-submitit-launcher, with exact resume (the SLURM code path, run locally).

``hydra/launcher=submitit_local`` runs the same launcher and the same submitit job machinery as
``hydra/launcher=slurm``: ``tasks_per_node`` processes whose ranks come from ``submitit.JobEnvironment()``,
and on SIGUSR2 submitit's checkpoint-and-requeue. A 2-task job is preempted mid-training (SIGUSR2 to both
tasks, as SLURM sends it); it saves ``last.pt``, submitit requeues it, the requeued job composes the same config
in the same run directory and resumes from ``last.pt``: the final weights equal an uninterrupted run bitwise.
SIGUSR2 goes to every process of the tasks, their DataLoader workers included, as SLURM signals a job step.
The signal lands at an exact update: both tasks park after update 5 (the ``FOCALNET_PAUSE_AT_STEP`` test
hook), each writing its pid, before the test signals them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_parked

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=30",
        "model=focalnet_micro", "data=synthetic", "data.num_workers=1", "data.train_size=1024", "data.val_size=32", "data.batch_size=8",
        "trainer.max_steps=20", "trainer.ckpt_every_steps=1000", "trainer.log_every=1", "trainer.device=cpu", "logger.wandb.mode=disabled"]


def env_for(out: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FOCALNET_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("FOCALNET_PAUSE")}
    # PYTHONPATH: submitit's job processes import this checkout, whatever their working directory.
    return {**env, "OMP_NUM_THREADS": "1", "FOCALNET_OUTPUT_ROOT": str(out), "PYTHONPATH": str(ROOT), **extra}


def rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def task_pids(sweep_dir: Path) -> list[int]:
    """The training task processes submitit started for this sweep and their forked data workers (/proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(sweep_dir) in cmd and b"SUBMITIT_LOCAL_GLOBALID=" in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_and_resumes_exactly(tmp_path):
    # Reference: the same job, never interrupted.
    ref = subprocess.run([sys.executable, str(ROOT / "train.py"), *ARGS], cwd=tmp_path, env=env_for(tmp_path / "a"),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-5000:]
    (ref_metrics,) = (tmp_path / "a" / "multirun").glob("*/0/metrics.jsonl")
    ref_final = rows(ref_metrics)[-1]
    assert ref_final["final/step"] == 20 and len(ref_final["final/weights_sha256_per_rank"]) == 2

    # Preempted after update 5 by SIGUSR2 to every task, like SLURM does before preempting or timing out.
    out, marker = tmp_path / "b", tmp_path / "paused"
    launcher_log = tmp_path / "launcher.log"  # a file, not a pipe nobody reads while the job runs
    with open(launcher_log, "w") as log_file:
        job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *ARGS], cwd=tmp_path,
                               env=env_for(out, FOCALNET_PAUSE_AT_STEP="5", FOCALNET_PAUSE_FILE=str(marker)),
                               stdout=log_file, stderr=subprocess.STDOUT)
        parked = wait_parked(job, marker, ranks=2, log=launcher_log)
        (sweep_dir,) = out.joinpath("multirun").iterdir()  # one sweep dir
        pids = task_pids(sweep_dir)  # the 2 tasks and their DataLoader workers (forked: the same command line)
        assert set(parked) <= set(pids) and len(pids) >= 4
        for pid in pids:  # SLURM signals every process of the job step, data workers included
            os.kill(pid, signal.SIGUSR2)
        job.wait(timeout=600)
    assert job.returncode == 0, launcher_log.read_text()[-5000:]
    assert [p.name for p in out.joinpath("multirun").iterdir()] == [sweep_dir.name]   # still one sweep dir
    run_dir = sweep_dir / "0"
    train_log = (run_dir / "train.log").read_text()
    # One epoch is 64 updates > max_steps and ckpt_every_steps=1000: the only last.pt before the end is the
    # one written on the signal, so resuming from step 5 proves the preemption save and the requeue.
    resumed = re.search(r"resumed from \S+/0/checkpoints/last\.pt at step (\d+)", train_log)
    assert resumed and int(resumed.group(1)) == 5, train_log[-3000:]
    final = rows(run_dir / "metrics.jsonl")[-1]
    assert final["final/step"] == 20
    assert final["final/weights_sha256_per_rank"] == ref_final["final/weights_sha256_per_rank"]
