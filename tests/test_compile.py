"""``trainer.compile=true`` end to end on the CPU (TorchInductor; its C++ kernels are built with gcc).

For focalnet_micro (32 px; every FocalNet operator: focal levels, gating, modulation, post-norm off/on is a
flag of the same block) and dat_micro (64 px; all three DAT block kinds: local, shifted and deformable
attention), each trained 20 updates through ``python train.py`` eagerly and compiled, from the same seed.
The full-size variants add depth, not operators; one Inductor compile costs minutes on 2 CPU cores, so CI
compiles the micro models and traces the full-size ones with Dynamo:

* the compiled run's loss stays within ``LOSS_RTOL`` of the eager run's at every update (Inductor fuses and
  reorders float sums, so the runs are not bitwise equal; drop path is off in both, because Inductor draws
  its own random numbers);
* its checkpoint has the official state-dict names (no ``_orig_mod.`` prefix), weights and EMA weights
  within tolerance of eager's, and validation (run on the uncompiled module, which shares the parameters)
  agrees with eager's;
* ``torch._dynamo.explain`` finds 0 graph breaks in focalnet_tiny_srf and dat_tiny, in training mode with
  drop path on;
* focalnet_micro: a compiled run stopped by SIGTERM at update 10 and relaunched ends bitwise equal to the
  uninterrupted compiled run.

Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``) is a fresh directory for this module, so each model's first
compile pays the full price; a relaunch of the same graph reuses it, as on a cluster with a shared cache.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_train, start_paused_at, train_env

import focalnet
from focalnet.engine.checkpointing import load_file
from focalnet.engine.trainer import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-3   # |loss_compiled - loss_eager| <= LOSS_RTOL * loss_eager at each of the 20 updates
WEIGHT_ATOL = 1e-4
COMPILE_TIMEOUT = 3600  # s per training process; a compile takes minutes on a busy 2-core machine

MODELS = {
    "focalnet_micro": ["model=focalnet_micro", "data.img_size=32", "data.batch_size=8"],
    "dat_micro": ["model=dat_tiny", "model.name=dat_micro", "data.img_size=64", "data.batch_size=4"],
}


def args_for(name: str) -> list[str]:
    batch = int(next(a for a in MODELS[name] if a.startswith("data.batch_size=")).split("=")[1])
    return [*MODELS[name], f"data.train_size={10 * batch}", "data.val_size=16", "model.drop_path_rate=0.0",
            "trainer.max_steps=20", "trainer.ema_decay=0.9", "trainer.ckpt_every_steps=null"]  # 2 epochs of 10


@pytest.fixture(scope="module")
def inductor_env(tmp_path_factory):
    return train_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path_factory.mktemp("inductor_cache")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inductor_env):
    """name -> {"eager": run dir, "compiled": run dir}, trained lazily (one compile per model)."""
    root = tmp_path_factory.mktemp("compile")
    done: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in done:
            done[name] = {}
            for mode in ("eager", "compiled"):
                run_dir = root / name / mode
                proc = run_train([*args_for(name), f"trainer.compile={mode == 'compiled'}", f"hydra.run.dir={run_dir}"],
                                 env=inductor_env, timeout=COMPILE_TIMEOUT)
                assert proc.returncode == 0, proc.stderr[-6000:]
                done[name][mode] = run_dir
        return done[name]

    return get


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_matches_eager(runs, name):
    dirs = runs(name)
    eager, compiled = (records(dirs[m], "train/loss") for m in ("eager", "compiled"))
    assert [s for s, _ in compiled] == [s for s, _ in eager] == list(range(1, 21))
    for (step, a), (_, b) in zip(eager, compiled):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"update {step}: eager loss {a}, compiled {b}"
    for key in ("val/loss", "val_ema/loss"):
        for (_, a), (_, b) in zip(records(dirs["eager"], key), records(dirs["compiled"], key)):
            assert abs(a - b) <= LOSS_RTOL * abs(a), (key, a, b)

    ce, cc = (load_file(dirs[m] / "checkpoints" / "last.pt") for m in ("eager", "compiled"))
    reference = focalnet.create_model(name, num_classes=10, **({"img_size": 64} if name.startswith("dat") else {}))
    assert list(cc["model"]) == list(reference.state_dict()) == list(ce["model"])  # official names, no _orig_mod.
    assert list(cc["ema"]) == list(cc["model"]) and cc["step"] == 20
    moved = False
    for key in cc["model"]:
        torch.testing.assert_close(cc["model"][key], ce["model"][key], atol=WEIGHT_ATOL, rtol=1e-3, msg=key)
        torch.testing.assert_close(cc["ema"][key], ce["ema"][key], atol=WEIGHT_ATOL, rtol=1e-3, msg=key)
        moved |= not torch.equal(cc["ema"][key], cc["model"][key])
    assert moved  # the EMA follows the compiled model's updates at its own pace


@pytest.mark.parametrize("name, size", [("focalnet_tiny_srf", 32), ("dat_tiny", 64)])
def test_no_graph_breaks_in_training_mode(name, size):
    kwargs = {"img_size": 64, "window_sizes": [2] * 4} if name.startswith("dat") else {}
    model = focalnet.create_model(name, num_classes=10, drop_path_rate=0.2, **kwargs).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, size, size))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_resume_is_exact(runs, tmp_path, inductor_env):
    reference = load_file(runs("focalnet_micro")["compiled"] / "checkpoints" / "last.pt")
    run_dir = tmp_path / "run"
    args = [*args_for("focalnet_micro"), "trainer.compile=true", f"hydra.run.dir={run_dir}"]
    proc = start_paused_at(10, args, tmp_path / "paused", env=inductor_env, timeout=COMPILE_TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == 10
    proc = run_train(args, env=inductor_env, timeout=COMPILE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    resumed = load_file(run_dir / "checkpoints" / "last.pt")
    assert resumed["step"] == reference["step"] == 20
    for part in ("model", "ema"):
        for key in reference[part]:
            assert torch.equal(resumed[part][key], reference[part][key]), f"{part}.{key}"
    for a, b in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
