"""Multi-node launching: torchrun c10d rendezvous across two "nodes" on loopback, and the SLURM launcher config.

* (slow) two ``scripts/launch_torchrun.sh`` invocations, each a 1-process "node", meet through a c10d
  rendezvous on 127.0.0.1 and train one model (gloo): one run directory, identical final weights on both ranks,
  validation over the whole val set; relaunching the same command continues in the same directory from
  ``last.pt`` (the run id derives from the rendezvous id, identical on every node).
* (slow) ``launch_torchrun.sh`` with ``MAX_RESTARTS=2``: a worker killed at an exact update (SIGKILL, the pause
  test hook) and then stopped by SIGTERM at the same update is restarted twice by torchrun, resumes from
  ``last.pt`` each time, and ends bitwise equal to an uninterrupted run;
* ``launch_torchrun.sh`` refuses ``-m`` (every rank would run the whole sweep) and an incomplete multi-node setup.
* ``hydra/launcher=slurm`` renders the sbatch script we expect (nodes, GPUs, tasks, time, partition, account,
  USR2 requeue signal, the exported run id) through the real hydra-submitit-launcher and submitit code; only
  the cluster binaries ``srun``/``sbatch`` are stand-ins, as there is no SLURM here: the stand-in ``sbatch``
  keeps the script it is given and refuses the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_parked

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_torchrun.sh"
TINY = ["model=focalnet_micro", "data=synthetic", "data.train_size=64", "data.val_size=30", "data.batch_size=8",
        "trainer.device=cpu", "logger.wandb.mode=disabled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FOCALNET_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_JOB_ID", "NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "FOCALNET_OUTPUT_ROOT": str(tmp_path / "out"),
            **extra}


def launch_two_nodes(tmp_path: Path, rdzv_id: str, *overrides: str) -> None:
    env = clean_env(tmp_path, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                    RDZV_ID=rdzv_id)
    nodes = [subprocess.Popen(["bash", str(LAUNCH), *TINY, *overrides], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-6000:]


def rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_nodes_c10d_one_run_dir_identical_weights_and_relaunch(tmp_path):
    launch_two_nodes(tmp_path, "two_nodes", "trainer.max_steps=2")
    out = tmp_path / "out"
    assert [p.name for p in out.iterdir()] == ["two_nodes"]      # one directory for both nodes' ranks
    run_dir = out / "two_nodes"
    assert sorted(p.name for p in run_dir.glob("train*.log")) == ["train.log", "train_rank1.log"]
    final = rows(run_dir / "metrics.jsonl")[-1]
    assert final["final/step"] == 2 and final["final/params_in_sync"] is True
    shas = final["final/weights_sha256_per_rank"]
    assert len(shas) == 2 and shas[0] == shas[1]                  # identical final weights on both ranks
    val = [r for r in rows(run_dir / "metrics.jsonl") if "val/count" in r]
    assert val[-1]["val/count"] == 30                             # each val image once across the nodes
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["world_size"] == 2

    # The same command again (a crashed or requeued job) continues the same run directory exactly.
    launch_two_nodes(tmp_path, "two_nodes", "trainer.max_steps=4", "trainer.resume_allow_changes=[trainer.max_steps]")
    assert [p.name for p in out.iterdir()] == ["two_nodes"]
    log = (run_dir / "train.log").read_text()
    assert re.search(r"resumed from .*two_nodes/checkpoints/last\.pt at step 2", log), log[-3000:]
    steps = [r["step"] for r in rows(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 4              # no step was trained twice
    final = rows(run_dir / "metrics.jsonl")[-1]
    assert final["final/step"] == 4 and len(set(final["final/weights_sha256_per_rank"])) == 1


RESTART = ["aug=deit", "trainer.epochs=2", "trainer.ckpt_every_steps=3", "trainer.log_every=1"]  # 8 updates/epoch


@pytest.mark.slow
def test_max_restarts_restarts_workers_that_resume_exactly(tmp_path):
    """README "Multi-node": MAX_RESTARTS is torchrun's --max-restarts, and restarted workers resume from last.pt.
    Attempt 1 is SIGKILLed parked after update 5 (last.pt holds update 3); attempt 2 resumes from 3 and is
    stopped by SIGTERM parked after update 5 (it saves 5, exits 75); attempt 3 resumes from 5 and finishes."""
    ref_env = clean_env(tmp_path, NPROC_PER_NODE="1", FOCALNET_RUN_ID="reference")
    ref = subprocess.run(["bash", str(LAUNCH), *TINY, *RESTART], cwd=tmp_path, env=ref_env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-5000:]
    ref_final = rows(tmp_path / "out" / "reference" / "metrics.jsonl")[-1]

    marker = tmp_path / "paused"
    env = clean_env(tmp_path, NPROC_PER_NODE="1", FOCALNET_RUN_ID="restarted", MAX_RESTARTS="2",
                    FOCALNET_PAUSE_AT_STEP="5", FOCALNET_PAUSE_FILE=str(marker))
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(LAUNCH), *TINY, *RESTART], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        (first,) = wait_parked(proc, marker, log=log)
        os.kill(first, signal.SIGKILL)             # a crash: torchrun restarts the worker
        (second,) = wait_parked(proc, marker, log=log)
        assert second != first
        os.kill(second, signal.SIGTERM)            # a preemption: saves update 5, exits 75, torchrun restarts
        proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-5000:]
    run_dir = tmp_path / "out" / "restarted"
    resumed = re.findall(r"resumed from \S+/restarted/checkpoints/last\.pt at step (\d+)", (run_dir / "train.log").read_text())
    assert resumed == ["3", "5"]
    final = rows(run_dir / "metrics.jsonl")[-1]
    assert final["final/step"] == ref_final["final/step"] == 16
    assert final["final/weights_sha256_per_rank"] == ref_final["final/weights_sha256_per_rank"]


def test_launch_script_refuses_multirun_and_incomplete_multinode(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH), "-m", "optimizer.lr=1e-3,2e-3"], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "multirun" in proc.stderr
    proc = subprocess.run(["bash", str(LAUNCH), *TINY], env=clean_env(tmp_path, NNODES="2", NPROC_PER_NODE="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_slurm_launcher_renders_the_expected_sbatch_script(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    # Keep the submitted script, then refuse the job like a cluster without this partition would.
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor a; do f="$a"; done\ncp "$f" "{tmp_path}/submitted.sh"\n'
                                    'echo "sbatch: error: stand-in sbatch" >&2\nexit 1\n')
    for exe in ("srun", "sbatch"):
        (bin_dir / exe).chmod(0o755)
    env = clean_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
         "hydra.launcher.partition=gpu", "hydra.launcher.account=proj", "hydra.launcher.timeout_min=600",
         *TINY, "optimizer.lr=5e-4,1e-3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "stand-in sbatch" in proc.stdout + proc.stderr
    script = (tmp_path / "submitted.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M))
    assert sbatch["nodes"] == "2"
    assert sbatch["gpus-per-node"] == "8" and sbatch["ntasks-per-node"] == "8"   # one process per GPU
    assert sbatch["cpus-per-task"] == "10"
    assert sbatch["partition"] == "gpu" and sbatch["account"] == "proj"
    assert sbatch["time"] == "600"
    assert sbatch["signal"] == "USR2@120"                  # submitit's checkpoint-and-requeue signal
    assert sbatch["array"] == "0-1%2"                      # the 2-point sweep: one array task per point
    # Every task of every requeue of the job uses the run id the submitting process resolved for the sweep.
    (sweep_dir,) = (tmp_path / "out" / "multirun").iterdir()
    assert f"export FOCALNET_RUN_ID={sweep_dir.name}\n" in script
    assert "export OMP_NUM_THREADS=10\n" in script
    assert re.search(r"^srun .*submitit\.core\._submit", script, flags=re.M)
