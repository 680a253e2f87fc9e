"""Shared fixtures: compose the REAL Hydra config (conf/) and shrink it for CPU tests.

``compose_cfg(*overrides)`` returns the composed training config with a tiny model and synthetic data, its
run directory set to a fresh tmp dir and W&B disabled, so a test can hand it to ``focalnet.engine.train``.
``run_train([...])`` runs ``train.py`` in a subprocess (the real CLI) with the same tiny defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Tiny, fast and deterministic: focalnet_micro on 32x32 synthetic images, fp32, no warmup, no W&B.
TINY = [
    "model=focalnet_micro", "data=synthetic", "data.img_size=32", "data.train_size=128", "data.val_size=64",
    "data.batch_size=16", "aug=none", "schedule.warmup_epochs=0", "trainer.amp=none", "trainer.epochs=1",
    "trainer.log_every=1", "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _grad_mode_enabled():
    """Each test starts with autograd on: a test that switches it off globally must not break the next one."""
    import torch

    torch.set_grad_enabled(True)
    yield


def compose_config(overrides=(), run_dir: str | Path | None = None):
    from focalnet.engine.distributed import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real config with the TINY overrides (+ yours); run dir in tmp_path."""
    counter = iter(range(1000))

    def _compose(*overrides, tiny: bool = True):
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path / f"run{next(counter)}")

    return _compose


def train_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "FOCALNET_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               HYDRA_FULL_ERROR="1", **extra)
    return env


def run_train(args, *, env=None, timeout=600, tiny=True, launcher=(PYTHON,), flags=(), **popen):
    """Run ``train.py`` (or a launcher in front of it) to completion; returns CompletedProcess (text).

    ``flags`` (e.g. ``["-m"]``) go before the overrides, where Hydra's argument parser expects them.
    """
    cmd = [*launcher, str(ROOT / "train.py"), *flags, *(TINY if tiny else []), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or train_env(), capture_output=True, text=True,
                          timeout=timeout, **popen)


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run directory's offline W&B run, as W&B's own reader (``wandb leet inspect``) prints
    them: ``{"type": "run" | "history" | "summary" | "artifact" | ..., ...}``."""
    import json

    (offline,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    out = subprocess.run([str(Path(PYTHON).with_name("wandb")), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120, env=train_env())
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wandb_run_record(run_dir: Path) -> dict:
    """The run's settings as W&B stored them: run_id, project, entity, run_group, job_type, config..."""
    return next(r["run"] for r in wandb_records(run_dir) if r["type"] == "run")


def start_paused_at(step: int, args: list[str], marker: Path, *, env: dict | None = None, tiny: bool = True,
                    timeout: float = 600) -> subprocess.Popen:
    """Start ``train.py`` so that it parks after update ``step`` (the FOCALNET_PAUSE_AT_STEP test hook) and return
    once it is parked: a kill or signal then lands at exactly that step, however loaded the machine is."""
    import time

    cmd = [PYTHON, str(ROOT / "train.py"), *(TINY if tiny else []), *args]
    env = {**(env or train_env()), "FOCALNET_PAUSE_AT_STEP": str(step), "FOCALNET_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if Path(f"{marker}.rank0").exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"run never reached step {step}: {proc.stderr.read()[-3000:]}")
