"""Never lose a run: stop signals to whole process groups, one owner per run directory, resume that refuses a
changed run, divergence, hostile files, one-line errors (README "Reliability").

Everything here is real: ``train.py`` / ``torchrun`` / ``eval.py`` processes started in their own session and
stopped with ``os.killpg`` (as SLURM, systemd and Ctrl-C stop every process of a job, data workers included),
concurrent launches into one directory, corrupt and hostile files on disk, a full tmpfs. Runs park at an
exact update through the ``FOCALNET_PAUSE_AT_STEP`` hook before they are signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, TINY, train_env, wait_parked

import focalnet
from focalnet.engine.checkpointing import (
    CheckpointWriteError,
    find_resume_checkpoint,
    link_or_copy_atomic,
    load_file,
    save_atomic,
    verify_file,
)
from focalnet.engine.config import ConfigError, validate_config
from focalnet.engine.loggers import REDACTED, redact_secrets
from focalnet.engine.rundir import ResumeRefused, check_resume_config, config_changes
from focalnet.engine.trainer import EXIT_DIVERGED, EXIT_PREEMPTED
from focalnet.models.checkpoint import CheckpointError

WANDB = str(Path(sys.executable).with_name("wandb"))


# -- helpers -----------------------------------------------------------------------------------------------


def launch(run_dir: Path, args, *, pause_at: int | None = None, launcher=(PYTHON,), env_extra=None,
           tiny: bool = True) -> tuple[subprocess.Popen, Path]:
    """Start ``train.py`` in a new session (its own process group, like a job); output to ``<run_dir>.log``."""
    env = train_env(**(env_extra or {}))
    marker = run_dir.parent / f"{run_dir.name}.paused"
    if pause_at is not None:
        env.update(FOCALNET_PAUSE_AT_STEP=str(pause_at), FOCALNET_PAUSE_FILE=str(marker))
    log = run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log"
    script = [str(ROOT / "train.py")] if launcher[-1] != "launch_torchrun.sh" else []
    cmd = [*launcher, *script, *(TINY if tiny else []), *args, f"hydra.run.dir={run_dir}"]
    if launcher[-1] == "launch_torchrun.sh":
        cmd = ["bash", str(ROOT / "scripts" / "launch_torchrun.sh"), *cmd[1:]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def stop_with_signal_storm(proc: subprocess.Popen, first: signal.Signals, log: Path, timeout: float = 300) -> int:
    """``first`` to the whole process group, then, once the run has taken it (its "<SIG> received" line), SIGINT
    and SIGTERM every 20 ms until the job exits: the save must survive a user hammering Ctrl-C and a cluster
    repeating its stop signal.

    The storm waits for that line: signals pending together are handled in signal-number order, not arrival
    order (``_PreemptFlag``), so an early SIGINT could be the one the run rightly reports (seen in CI)."""
    os.killpg(proc.pid, first)
    deadline = time.time() + timeout
    while f"{first.name} received" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
    return proc.wait(timeout=5)


def finish(run_dir: Path, args, **kw) -> tuple[int, str]:
    proc, log = launch(run_dir, args, **kw)
    proc.wait(timeout=900)
    return proc.returncode, log.read_text()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema", "optimizer"):
        if key == "optimizer":
            for sa, sb in zip(a[key]["state"].values(), b[key]["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa)
            continue
        if a[key] is None:
            continue
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[ERROR]" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- item 1: process-group signals on every data path -----------------------------------------------------


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A 3-class ImageFolder (32 px training) whose train split also holds a 12 GB sparse .jpg, a 144 Mpx PNG
    and a symlink loop; and the same folder as FFCV files (the writer skips the hostile files too)."""
    from focalnet.data.imagegen import write_hostile_files, write_image_folder

    root = tmp_path_factory.mktemp("images")
    write_image_folder(str(root / "train"), 3, 8, size=(48, 40))
    write_image_folder(str(root / "val"), 3, 2, size=(48, 40), seed=1)
    write_hostile_files(str(root / "train" / "n00000001"))
    out = tmp_path_factory.mktemp("ffcv")
    proc = subprocess.run([PYTHON, str(ROOT / "scripts" / "write_ffcv.py"), "data=folder", f"data.root={root}",
                           "--out-dir", str(out), "--num-workers", "1", "--max-resolution", "48"],
                          capture_output=True, text=True, timeout=300, env=train_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out


COMMON = ["model=focalnet_micro", "data.img_size=32", "data.batch_size=8", "data.num_workers=1", "aug=deit",
          "aug.color_jitter=null", "schedule.warmup_epochs=0", "trainer.amp=none", "trainer.epochs=3",
          "trainer.ema_decay=0.9", "trainer.log_every=1", "trainer.ckpt_every_steps=null", "logger.wandb.mode=disabled"]
PATHS = {  # data path -> (overrides, the signal that stops it); synthetic data: the torchrun test below
    "folder": (["data=folder", "data.root={root}"], signal.SIGINT),
    "ffcv": (["data=imagenet1k_ffcv", "data.root={ffcv}", "data.num_classes=3"], signal.SIGUSR2),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_process_group_signal_saves_exits_75_and_resumes_bitwise(tmp_path, image_data, path):
    """``kill -SIG -- -PGID`` (data workers included), then a storm of SIGINT/SIGTERM during the save: exit 75,
    ``last.pt`` at the parked step, and the relaunch ends bitwise equal to an uninterrupted run."""
    root, ffcv = image_data
    overrides, sig = PATHS[path]
    args = [*COMMON, *(o.format(root=root, ffcv=ffcv) for o in overrides)]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    code, out = finish(ref_dir, args, tiny=False)
    assert code == 0, out[-4000:]
    reference = load_file(ref_dir / "checkpoints" / "last.pt")
    assert reference["step"] == 9  # 3 epochs x 3 updates (24 good images + 2 hostile ones: 3 batches of 8)

    proc, log = launch(run_dir, args, pause_at=4, tiny=False)
    wait_parked(proc, tmp_path / "run.paused", log=log)
    code = stop_with_signal_storm(proc, sig, log)
    text = log.read_text()
    assert code == EXIT_PREEMPTED, text[-4000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    assert f"{sig.name}: saved" in text
    saved = load_file(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == 4 and saved["epoch"] == 1 and saved["batch_in_epoch"] == 1  # mid-epoch

    code, out = finish(run_dir, args, tiny=False)
    assert code == 0, out[-4000:]
    assert_same_weights(load_file(run_dir / "checkpoints" / "last.pt"), reference)
    # The 12 GB file and the 144 Mpx PNG were skipped and counted, never read: by the loader (a count per epoch
    # of the hostile samples drawn) or, for FFCV, by the writer.
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [m["train/skipped_images"] for m in metrics if "train/skipped_images" in m]
    if path == "folder":
        assert sum(skipped) > 0 and "over data.max_file_mb=256 (not read)" in out + text
    else:
        assert json.loads((ffcv / "train.beton.json").read_text())["skipped_images"] == 2 and skipped == [0, 0, 0]
    assert not list((run_dir / "checkpoints").glob(".*.tmp.*"))


@pytest.mark.slow
def test_torchrun_group_signal_one_save_every_rank_exits_75_and_resumes_bitwise(tmp_path):
    """``scripts/launch_torchrun.sh`` with 2 gloo ranks and a data worker each; SIGUSR1 to the launcher's process
    group (torchrun's agent forwards it to each rank's group; plain torchrun would die on it). Rank 0 holds
    the run-dir lock; every rank finishes the update, one save, both exit 75; the relaunch is bitwise exact."""
    args = ["data.train_size=64", "data.val_size=16", "data.num_workers=1", "trainer.epochs=2",
            "trainer.ckpt_every_steps=null", "trainer.ema_decay=0.9"]  # 2 updates/epoch per rank
    launcher = ("launch_torchrun.sh",)
    env = {"NPROC_PER_NODE": "2", "PYTHON": PYTHON}
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    code, out = finish(ref_dir, args, launcher=launcher, env_extra=env)
    assert code == 0, out[-4000:]
    reference = load_file(ref_dir / "checkpoints" / "last.pt")

    proc, log = launch(run_dir, args, pause_at=3, launcher=launcher, env_extra=env)
    rank0_pid, _ = wait_parked(proc, tmp_path / "run.paused", ranks=2, log=log)
    holder = json.loads((run_dir / "run.lock").read_text())
    assert holder["pid"] == rank0_pid  # rank 0 holds the lock
    os.killpg(proc.pid, signal.SIGUSR1)
    proc.wait(timeout=300)
    rank_logs = [(run_dir / "train.log").read_text(), (run_dir / "train_rank1.log").read_text()]
    assert all("preempted at step 3" in t for t in rank_logs), log.read_text()[-4000:]  # both ranks exit 75
    assert sum(t.count("SIGUSR1: saved") for t in rank_logs) == 1  # one save, by rank 0
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == 3

    code, out = finish(run_dir, args, launcher=launcher, env_extra=env)
    assert code == 0, out[-4000:]
    assert_same_weights(load_file(run_dir / "checkpoints" / "last.pt"), reference)


# -- item 3: one owner per run directory ---------------------------------------------------------------------


@pytest.mark.slow
def test_second_launch_is_refused_the_lock_dies_with_its_holder_and_damaged_runs_are_not_restarted(tmp_path):
    run_dir = tmp_path / "run"
    first, log = launch(run_dir, ["trainer.epochs=2"], pause_at=2)
    wait_parked(first, tmp_path / "run.paused", log=log)
    before = (run_dir / "metrics.jsonl").read_text()
    code, out = finish(run_dir, ["trainer.epochs=2"])
    assert code == 2, out[-3000:]
    (line,) = error_lines(out)
    assert f"pid {first.pid} on host {socket.gethostname()} since " in line and str(run_dir) in line
    assert "Traceback" not in out and (run_dir / "metrics.jsonl").read_text() == before
    assert not (run_dir / "launches" / "002").exists()  # the refused launch wrote nothing of its own
    os.killpg(first.pid, signal.SIGKILL)  # the holder dies without any cleanup
    first.wait()
    code, out = finish(run_dir, ["trainer.epochs=2"])  # no manual cleanup needed
    assert code == 0, out[-3000:]
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == 16

    # Every checkpoint of the run damaged: resume=auto refuses to start over on top of them (exit 2, one line).
    ck = run_dir / "checkpoints"
    for name in ("last.pt", "best.pt"):
        data = (ck / name).read_bytes()
        (ck / name).unlink()  # a new inode each: best.pt stays its own damaged file
        (ck / name).write_bytes(data[: len(data) // 2] if name == "last.pt" else os.urandom(len(data)))
    damaged = {name: (ck / name).read_bytes() for name in ("last.pt", "best.pt")}
    code, out = finish(run_dir, ["trainer.epochs=3"])
    assert code == 2 and "Traceback" not in out, out[-3000:]
    (line,) = error_lines(out)
    assert f"{ck / 'last.pt'} is corrupt" in line and f"{ck / 'best.pt'} is corrupt" in line
    assert "Nothing was overwritten" in line
    assert {name: (ck / name).read_bytes() for name in damaged} == damaged


# -- items 2, 4, 8: resume picks an intact checkpoint, refuses a changed run; secrets ------------------------


@pytest.mark.slow
def test_resume_refuses_a_changed_run_accepts_harmless_keys_and_redacts_secrets(compose_cfg, tmp_path, monkeypatch):
    """Three launches into one run directory (in this process, real files): a run, a relaunch that changes what
    its state means (refused, nothing touched), a relaunch with harmless changes (resumes)."""
    from focalnet.engine import train

    secret = "s3cr3t-t0ken-value"
    monkeypatch.setenv("FOCALNET_TEST_API_TOKEN", secret)
    run_dir = tmp_path / "run"
    first = ["trainer.max_steps=4", "logger.wandb.mode=offline", "logger.wandb.name=${oc.env:FOCALNET_TEST_API_TOKEN}"]

    def launch_here(*overrides):
        from conftest import TINY, compose_config

        return train(compose_config([*TINY, *first, *overrides], run_dir))

    launch_here()
    ckpt_mtime = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    config_yaml = (run_dir / "config.yaml").read_text()

    with pytest.raises(ResumeRefused) as e:  # train.py: exit 2 with this one line
        launch_here("optimizer=sgd", "data.img_size=64", "trainer.seed=1", "data.batch_size=8", "trainer.max_steps=6")
    for part in ("optimizer.name: 'adamw' -> 'sgd'", "data.img_size: 32 -> 64", "trainer.seed: 0 -> 1",
                 "total_batch: '16 (16 x 1 x 1)' -> '8 (8 x 1 x 1)'", "trainer.max_steps: 4 -> 6",
                 "trainer.resume_allow_changes=["):
        assert part in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == ckpt_mtime

    launch_here("trainer.log_every=3", "trainer.eval_every=2", "data.num_workers=1", "trainer.device=cpu",
                "trainer.ckpt_every_steps=2", "trainer.max_steps=6", "trainer.resume_allow_changes=[trainer.max_steps]")
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == 6
    assert any("resumed_from_step" in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())

    # Every launch keeps its config; the first one's is never overwritten.
    assert (run_dir / "config.yaml").read_text() == config_yaml
    assert sorted(p.name for p in (run_dir / "launches").iterdir()) == ["001", "002"]  # refused: wrote nothing
    assert "max_steps: 6" in (run_dir / "launches" / "002" / "config.yaml").read_text()
    # The secret reached the run through ${oc.env:...} but is in none of the files nor in W&B.
    written = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".pt", ".jsonl")]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]
    assert load_file(run_dir / "checkpoints" / "last.pt")["config"]["logger"]["wandb"]["name"] == REDACTED
    run = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    inspect = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(run)], capture_output=True,
                             text=True, timeout=120, env=train_env())
    assert inspect.returncode == 0 and secret not in inspect.stdout
    assert json.loads(inspect.stdout)["config"]["logger"]["wandb"]["name"] == REDACTED


@pytest.mark.slow
def test_changed_world_size_with_the_same_total_batch_resumes_at_the_same_sample(tmp_path):
    """1 process x batch 8 x accum 2, stopped after 3 updates; relaunched as 2 torchrun ranks x batch 8 x accum 1:
    accepted (same total batch 16), and it continues at micro-batch 3 of 8 per rank (= micro-batch 6 of 8)."""
    run_dir = tmp_path / "run"
    args = ["data.train_size=128", "data.batch_size=8", "trainer.epochs=1", "trainer.ckpt_every_steps=null"]
    proc, log = launch(run_dir, [*args, "trainer.accum_steps=2"], pause_at=3)
    wait_parked(proc, tmp_path / "run.paused", log=log)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-3000:]
    assert load_file(run_dir / "checkpoints" / "last.pt")["batch_in_epoch"] == 6
    launcher = (PYTHON, "-m", "torch.distributed.run", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nproc_per_node=2")
    code, out = finish(run_dir, [*args, "trainer.accum_steps=1"], launcher=launcher)
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "at step 3 (epoch 0, batch 3)" in (run_dir / "train.log").read_text()
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == 8


def test_config_changes_one_list_of_harmless_keys(compose_cfg):
    old = validate_config(compose_cfg())
    new = validate_config(compose_cfg("trainer.log_every=7", "data.num_workers=3", "trainer.device=cpu",
                                      "logger.wandb.mode=offline", "trainer.eval_every=3",
                                      "trainer.ckpt_every_steps=5", "data.batch_size=8", "trainer.accum_steps=2"))
    assert config_changes(old, 1, new, 1) == {}  # harmless keys; the same total batch (16 = 8 x 1 x 2)
    assert config_changes(old, 2, new, 1) == {"total_batch": ("32 (16 x 2 x 1)", "16 (8 x 1 x 2)")}
    moved = validate_config(compose_cfg("model.drop_path_rate=0.3", "optimizer.lr=0.5", "aug.mixup=0.5"))
    with pytest.raises(ResumeRefused, match=r"aug.mixup: 0.0 -> 0.5; model.drop_path_rate: 0.1 -> 0.3; "
                                            r"optimizer.lr: 0.0005 -> 0.5\."):
        check_resume_config("last.pt", old, 1, moved, 1)
    allowed = validate_config(compose_cfg("optimizer.lr=0.5", "trainer.resume_allow_changes=[optimizer]"))
    assert check_resume_config("last.pt", old, 1, allowed, 1) == {"optimizer.lr": (0.0005, 0.5)}


# -- item 2: corrupt, missing, hard-linked checkpoints -----------------------------------------------------------


def _training_ckpt(step: int) -> dict:
    return {"model": {"w": torch.full((256,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": {},
            "step": step, "epoch": 0, "batch_in_epoch": step, "rng": [{}], "config": {}, "best_metric": None}


def test_legacy_torch_files_load_and_pickle_like_garbage_is_corrupt(tmp_path):
    """torch's legacy (non-zip) format still loads; bytes that merely start like a pickle are a damaged file, not
    a refused pickle (torch's magic number must follow the pickle header)."""
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(legacy)["w"], torch.arange(3.0))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=f"{garbage} is corrupt: not a torch.save file"):
        load_file(garbage)


def test_resume_auto_takes_the_newest_intact_checkpoint_and_names_every_bad_file(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    save_atomic(_training_ckpt(8), ck / "last.pt")
    link_or_copy_atomic(ck / "last.pt", ck / "epoch_1.pt")  # a hard link: in-place damage hits both
    time.sleep(0.01)
    save_atomic(_training_ckpt(12), ck / "last.pt")
    link_or_copy_atomic(ck / "last.pt", ck / "best.pt")
    assert find_resume_checkpoint("auto", tmp_path)[1]["step"] == 12

    data = bytearray((ck / "last.pt").read_bytes())
    data[data.find(torch.full((4,), 12.0).numpy().tobytes()) + 2] ^= 0x40  # one flipped bit inside a tensor
    with open(ck / "last.pt", "r+b") as f:  # in place, as a disk error would
        f.write(data)
    with pytest.raises(CheckpointError, match="best.pt is corrupt: the stored checksum"):
        verify_file(ck / "best.pt")  # the same inode
    path, ckpt = find_resume_checkpoint("auto", tmp_path)
    assert path.name == "epoch_1.pt" and ckpt["step"] == 8 and "last.pt is corrupt" in caplog.text

    (ck / "epoch_1.pt").write_bytes(b"\x80" + os.urandom(4095))  # random bytes, first a pickle's opcode
    (ck / "best.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        find_resume_checkpoint("auto", tmp_path)
    msg = str(e.value)
    assert f"{ck / 'last.pt'} is corrupt" in msg and f"{ck / 'epoch_1.pt'} is corrupt" in msg
    assert "Nothing was overwritten" in msg and "\n" not in msg

    (ck / "last.pt").unlink()
    save_atomic(_training_ckpt(16), ck / "best.pt")
    truncated = (ck / "best.pt").read_bytes()
    (ck / "last.pt").write_bytes(truncated[: len(truncated) // 2])
    path, ckpt = find_resume_checkpoint("auto", tmp_path)  # last.pt truncated: best.pt (a full state) it is
    assert path.name == "best.pt" and ckpt["step"] == 16
    save_atomic({"model": {}}, ck / "weights_only.pt")
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        find_resume_checkpoint(str(ck / "weights_only.pt"), tmp_path)


# -- item 5: divergence and NaN config -----------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["trainer.clip_grad=nan", "optimizer.lr=inf", "data.signal=-inf",
                                      "aug.cutmix_minmax=[0.1,nan]"])
def test_non_finite_config_values_are_rejected_naming_the_key(compose_cfg, override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0].replace('.', '[.]')}.*=.*(nan|inf).* finite"):
        validate_config(compose_cfg(override))


@pytest.mark.slow
def test_fp16_divergence_stops_with_exit_3_and_non_finite_weights_are_never_saved_or_evaluated(tmp_path):
    run_dir = tmp_path / "run"
    code, out = finish(run_dir, ["trainer.amp=fp16", "optimizer.lr=1e6", "trainer.max_nonfinite_updates=3",
                                 "trainer.ckpt_every_steps=1"])
    assert code == EXIT_DIVERGED, out[-3000:]
    (line,) = error_lines(out)
    assert "3 updates in a row had NaN/inf gradients with trainer.amp=fp16" in line
    for path in (run_dir / "checkpoints").glob("*.pt"):  # whatever was saved before is finite
        assert all(torch.isfinite(v).all() for v in load_file(path)["model"].values())
    assert not (run_dir / "checkpoints" / "best.pt").exists()

    weights = focalnet.create_model("focalnet_micro", num_classes=10).state_dict()
    save_atomic({"model": {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()}},
                tmp_path / "nan.pt")
    from conftest import compose_config
    from hydra import compose, initialize_config_dir

    from focalnet.engine import evaluate

    compose_config()  # registers the resolvers
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"checkpoint={tmp_path / 'nan.pt'}", "model=focalnet_micro", "data=synthetic", "data.img_size=32",
            "data.val_size=16", "trainer.amp=none", "logger.wandb.mode=disabled", f"paths.output_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"nan.pt: weight .* is NaN/inf"):  # eval.py: exit 2, one line
        evaluate(cfg)


# -- items 6, 7: hostile files, data-root errors, a full disk, orphans -------------------------------------------


def test_hostile_files_are_skipped_unread_and_scans_survive_symlink_loops(tmp_path):
    from focalnet.data.folder import scan_folder
    from focalnet.data.imagegen import write_hostile_files, write_image_folder
    from focalnet.data.transforms import BadImage, open_image

    write_image_folder(str(tmp_path / "train"), 2, 2, size=(40, 30))
    hostile = write_hostile_files(str(tmp_path / "train" / "n00000000"))
    with pytest.raises(BadImage, match=r"file of 12288 MiB is over data.max_file_mb=256 \(not read\)"):
        open_image(hostile["huge"])
    with pytest.raises(BadImage, match=r"12000x12000 = 144 Mpx is over data.max_image_pixels=89478485"):
        open_image(hostile["bomb"])
    classes, samples = scan_folder(str(tmp_path / "train"), "data.root/data.train_split")
    names = {Path(p).name for p, _ in samples}
    assert "huge_sparse.jpg" in names and "bomb.png" in names and not any("loop" in n for n in names)
    os.symlink(tmp_path / "train" / "loop_x", tmp_path / "train" / "loop_y")
    os.symlink(tmp_path / "train" / "loop_y", tmp_path / "train" / "loop_x")  # a class-level loop
    assert scan_folder(str(tmp_path / "train"), "k")[0] == classes


@pytest.mark.parametrize("case", ["missing", "file", "empty", "empty_class", "val_class_not_in_train"])
def test_data_root_problems_are_one_line_naming_the_path(tmp_path, case):
    from omegaconf import OmegaConf

    from focalnet.data.folder import DataConfigError, folder_samples
    from focalnet.data.imagegen import write_image_folder

    root = tmp_path / "data"
    if case == "file":
        root.write_bytes(b"")
    elif case != "missing":
        (root / "train").mkdir(parents=True)
    if case in ("empty_class", "val_class_not_in_train"):
        write_image_folder(str(root / "train"), 2, 1, size=(40, 30))
        write_image_folder(str(root / "val"), 3 if case == "val_class_not_in_train" else 2, 1, size=(40, 30))
        if case == "empty_class":
            (root / "train" / "zz_empty").mkdir()
    expected = {"missing": "no such directory", "file": "is a file, not a directory", "empty": "no class folders",
                "empty_class": "1 class folders of .* hold no images .* \\['zz_empty'\\]",
                "val_class_not_in_train": "are not in the label layout \\(the training classes"}[case]
    with pytest.raises(DataConfigError, match=expected) as e:
        folder_samples(OmegaConf.create({"name": "folder", "root": str(root)}))
    assert "\n" not in str(e.value) and str(root) in str(e.value)


@pytest.mark.slow
def test_train_py_exits_2_with_one_line_for_a_bad_data_root(tmp_path):
    (tmp_path / "not_a_dir").write_text("")
    code, out = finish(tmp_path / "run", ["data=folder", f"data.root={tmp_path / 'not_a_dir'}"], tiny=False)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    (line,) = error_lines(out)
    assert "is a file, not a directory" in line


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (a real full disk); skipped where mounting is not permitted."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_names_path_and_size_and_keeps_the_previous_checkpoint(small_fs):
    ck = small_fs / "checkpoints"
    save_atomic(_training_ckpt(4), ck / "last.pt")
    (ck / ".last.pt.tmp.999999").write_bytes(b"x" * 1000)  # left by a save that was SIGKILLed mid-write
    big = _training_ckpt(8)
    big["model"]["w"] = torch.zeros(1 << 20)  # 4 MiB > the file system
    with pytest.raises(CheckpointWriteError, match=rf"no space left on device writing {ck / 'last.pt'}: the "
                                                   r"checkpoint needs about 4 MiB, \d+ MiB are free .*intact"):
        save_atomic(big, ck / "last.pt")
    assert load_file(ck / "last.pt")["step"] == 4 and not list(ck.glob(".last.pt.tmp.[0-8]*"))

    from focalnet.engine.checkpointing import remove_orphan_temporaries

    save_atomic(_training_ckpt(5), ck / "last.pt")
    assert remove_orphan_temporaries(ck) == [ck / ".last.pt.tmp.999999"]
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt"]


# -- item 8: other paths --------------------------------------------------------------------------------------------


def test_secrets_from_the_environment_are_redacted(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SHORT_KEY", "abc")
    cfg = {"a": "https://user:hunter2hunter2@host/x", "b": ["abc", "abcdef"], "c": 3, "d": "hunter2hunter2"}
    assert redact_secrets(cfg) == {"a": f"https://user:{REDACTED}@host/x", "b": [REDACTED, "abcdef"], "c": 3,
                                   "d": REDACTED}


def test_visualize_val_never_writes_into_a_data_root_from_a_checkpoint(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    from visualize_modulation import val_images

    monkeypatch.setenv("FOCALNET_CACHE", str(tmp_path / "cache"))
    named = tmp_path / "somewhere" / "digits"  # a path a checkpoint from elsewhere names
    run_cfg = {"data": {"name": "digits", "root": str(named), "store_size": 16, "val_fraction": 0.2,
                        "jpeg_quality": 95, "train_split": "train", "val_split": "val", "val_count": 0}}
    picked = val_images(run_cfg, 3)
    assert len(picked) == 3 and all(p.startswith(str(tmp_path / "cache" / "digits")) for p, _ in picked)
    assert not (tmp_path / "somewhere").exists()
