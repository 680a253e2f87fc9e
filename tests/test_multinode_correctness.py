"""Multi-node correctness with real processes (README "GPU notes" and "Multi-node training"):

* ``srun python train.py`` without torchrun: tasks started with SLURM's environment (as srun sets it) form one job
  (ranks, world size, rendezvous on the first node); an srun environment that does not tell the ranks is refused
  in one line (in process: it is the first thing train.py does); submitit tasks get ``LOCAL_WORLD_SIZE``.
* resume agreement: rank 0 picks the checkpoint and every rank checks that it reads the same one (step and
  checksum); a rank that reads another file, or none, stops the whole job with one line naming its host. Each
  task runs in its own working directory and ``checkpoints/last.pt`` is a symbolic link to
  ``/proc/self/cwd/last.pt``: every process resolves it to a file of its own, as nodes with different views of
  shared storage would.
* preemption save vs exit: torchrun, SIGTERM to its process group: no rank exits before rank 0's ``last.pt`` is
  on disk (with a checkpoint big enough to take a while to write).
* a checkpoint write killed midway (SIGKILL during the background write, before its rename) leaves the
  previous file intact.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, TINY, train_env

from focalnet.engine.checkpointing import CheckpointWriter, load_file, save_atomic

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port_for_job_id() -> tuple[int, int]:
    """A free port in 20000-39999 and the SLURM job id whose derived rendezvous port it is (20000 + id % 20000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 40000:
            return port, 40000 + port - 20000  # a job id of 5 digits, as on a real cluster
    raise RuntimeError("no free port in 20000-39999")


def srun_env(rank: int, tasks: int, job_id: int, **extra) -> dict:
    """What srun exports to task ``rank`` of a one-node step of ``tasks`` tasks (no torchrun variables)."""
    env = {k: v for k, v in train_env().items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks),
               SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE=str(tasks),
               SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0")
    env.update(extra)
    return env


def srun(run_dir: Path, args: list[str], tasks: int, cwds: list[Path]) -> list[tuple[int, str]]:
    """``srun --ntasks=TASKS python train.py ARGS``, emulated: one process per task with srun's environment."""
    _, job_id = free_port_for_job_id()
    procs = []
    for rank in range(tasks):
        cwds[rank].mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([PYTHON, str(ROOT / "train.py"), *TINY, *args, f"hydra.run.dir={run_dir}"],
                                      cwd=cwds[rank], env=srun_env(rank, tasks, job_id), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


@pytest.fixture
def restored_environ():
    """os.environ as it was, after the test: ``adopt_launch_env`` writes RANK, MASTER_ADDR, ... itself, which
    monkeypatch would not undo (a leaked RANK makes later in-process tests join a process group that never forms)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[ERROR]" in line]


@pytest.mark.slow
def test_srun_tasks_form_one_job_and_refuse_a_checkpoint_the_ranks_do_not_share(tmp_path):
    run_dir, cwds = tmp_path / "run", [tmp_path / f"node{r}" for r in range(3)]
    args = ["data.train_size=96", "data.batch_size=8", "trainer.max_steps=2", "trainer.eval_every=0"]
    results = srun(run_dir, args, 3, cwds)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    assert (run_dir / "train_rank1.log").exists() and (run_dir / "train_rank2.log").exists()  # ranks 1 and 2
    assert "8 per process x 3 x 1 accumulation = 24 per update" in (run_dir / "train.log").read_text()  # one job
    last = load_file(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 2 and last["world_size"] == 3

    # Rank 1 reads an older last.pt, rank 2 none at all: the whole job refuses (exit 2), naming both.
    ckpt = run_dir / "checkpoints" / "last.pt"
    os.replace(ckpt, cwds[0] / "last.pt")
    torch.save({**last, "step": 1}, cwds[1] / "last.pt")
    ckpt.symlink_to("/proc/self/cwd/last.pt")
    relaunch = [*args[:-2], "trainer.max_steps=4", "trainer.resume_allow_changes=[trainer.max_steps]",
                "trainer.eval_every=0"]
    results = srun(run_dir, relaunch, 3, cwds)
    assert [code for code, _ in results] == [2, 2, 2], results[0][1][-3000:]
    host = socket.gethostname()
    for _, out in results:
        (line,) = error_lines(out)
        assert f"rank 0 on host {host} chose {ckpt} (step 2, checksum " in line
        assert f"rank 1 on host {host} reads step 1 with checksum " in line
        assert f"rank 2 on host {host} cannot read it (" in line and "trainer.resume=PATH" in line
    assert not (run_dir / "launches" / "002").exists()  # refused before any work: nothing written
    # (Ranks that agree resume: tests/test_multinode.py and tests/test_slurm_requeue.py relaunch 2-rank jobs.)


def test_an_srun_environment_without_ranks_is_refused_in_one_line(restored_environ, monkeypatch, capsys):
    """What train.py and eval.py run first (``adopt_launch_env(exit_on_error=True)``, before Hydra): exit 2, one
    line, no traceback."""
    from focalnet.engine import distributed as D

    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + list(LAUNCH_VARS):
        monkeypatch.delenv(k, raising=False)
    env = srun_env(0, 2, free_port_for_job_id()[1])
    del env["SLURM_PROCID"]
    for k, v in env.items():
        if k.startswith("SLURM_"):
            monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        D.adopt_launch_env(exit_on_error=True)
    assert e.value.code == 2 and "RANK" not in os.environ
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "srun started 2 tasks but SLURM_PROCID is not set" in line and "srun --ntasks-per-node=GPUS" in line


def test_launch_variables_from_srun_and_submitit(restored_environ, monkeypatch):
    from focalnet.engine import distributed as D

    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    # Task 5 of a 2-node step (4 + 3 tasks), on the second node: srun's own variables.
    for k, v in dict(SLURM_JOB_ID="123456", SLURM_STEP_NUM_TASKS="7", SLURM_STEP_NODELIST="gpu[07-08]",
                     SLURM_STEP_TASKS_PER_NODE="4,3", SLURM_NODEID="1", SLURM_PROCID="5", SLURM_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    D.adopt_launch_env()
    assert {k: os.environ[k] for k in LAUNCH_VARS} == dict(
        RANK="5", WORLD_SIZE="7", LOCAL_RANK="1", LOCAL_WORLD_SIZE="3", MASTER_ADDR="gpu07", MASTER_PORT="23456")
    assert D.first_host("node[001-004,010],login1") == "node001" and D.tasks_on_node("8(x2),4", 2) == 4
    monkeypatch.setenv("SLURM_LOCALID", "3")  # 3 tasks on this node: local ranks 0-2
    monkeypatch.delenv("RANK")
    with pytest.raises(D.LaunchError, match="SLURM_LOCALID=3 do not fit"):
        D.adopt_launch_env()

    # submitit (hydra/launcher=slurm): its JobEnvironment, here the local executor's variables; 4 tasks, 2 nodes.
    for k in [k for k in os.environ if k.startswith("SLURM_")] + list(LAUNCH_VARS):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="4",
                     SUBMITIT_LOCAL_JOB_NUM_NODES="2", SUBMITIT_LOCAL_NODEID="1", SUBMITIT_LOCAL_GLOBALID="3",
                     SUBMITIT_LOCAL_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    D.adopt_launch_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"]) == ("3", "4", "2")


def log_time(line: str) -> datetime:
    return datetime.strptime(re.match(r"\[([^\]]+)\]", line).group(1), "%Y-%m-%d %H:%M:%S,%f")


@pytest.mark.slow
def test_torchrun_group_sigterm_no_rank_exits_before_rank_0s_save_is_on_disk(tmp_path):
    """FocalNet-T at 32 px: a 450 MB checkpoint (weights, AdamW moments, EMA) that takes a while to write."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    port = free_port_for_job_id()[0]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           "--nproc_per_node=2", str(ROOT / "train.py"), *TINY, "model=focalnet_tiny_srf", "data.batch_size=4",
           "data.train_size=64", "trainer.ema_decay=0.9", "trainer.epochs=1", "trainer.ckpt_every_steps=null",
           f"hydra.run.dir={run_dir}"]
    env = train_env(FOCALNET_PAUSE_AT_STEP="2", FOCALNET_PAUSE_FILE=str(marker))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not all(Path(f"{marker}.rank{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent and both ranks' sessions (it forwards the signal)
    out = proc.communicate(timeout=300)[0]
    rank0, rank1 = ((run_dir / name).read_text().splitlines() for name in ("train.log", "train_rank1.log"))
    (written,) = [line for line in rank0 if re.search(r"wrote \S+/last\.pt \(\d+ MiB in", line)]
    exits = [next(line for line in lines if "preempted at step 2" in line) for lines in (rank0, rank1)]
    assert all(log_time(line) >= log_time(written) for line in exits), (written, exits)  # the exit barrier
    assert "exitcode  : -9" not in out and "Signals.SIGKILL" not in out, out[-3000:]
    ckpt = load_file(run_dir / "checkpoints" / "last.pt")  # CRC-checked: complete
    assert ckpt["step"] == 2 and ckpt["ema"] is not None
    assert not list((run_dir / "checkpoints").glob(".*.tmp.*"))


KILLED_WRITER = """
import os, sys, time, torch
from focalnet.engine.checkpointing import CheckpointWriter
def hold(fd):  # the writer thread has written every byte; the kill lands before fsync and the rename
    print("written", flush=True)
    time.sleep(600)
os.fsync = hold
writer = CheckpointWriter()
writer.submit({"step": 2, "model": {"w": torch.ones(16 << 20)}}, sys.argv[1])  # 64 MiB, in the background
print("submitted", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_checkpoint_write_killed_midway_leaves_the_previous_file(tmp_path):
    """The kill lands at a known point of the background save (the child holds its writer thread at the fsync,
    after the last byte): not a time after which the write may already have finished on a fast disk."""
    ck = tmp_path / "checkpoints"
    save_atomic({"step": 1, "model": {"w": torch.zeros(4)}}, ck / "last.pt")
    proc = subprocess.Popen([PYTHON, "-c", KILLED_WRITER, str(ck / "last.pt")], cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, text=True)
    lines = {proc.stdout.readline().strip() for _ in range(2)}  # the two threads print in either order
    assert lines == {"submitted", "written"}  # submit returned (the training thread goes on); every byte written
    (tmp,) = ck.glob(".last.pt.tmp.*")
    assert tmp.stat().st_size > 64 << 20
    proc.kill()  # before the rename, as a job killed at its time limit
    proc.wait()
    assert load_file(ck / "last.pt")["step"] == 1  # the previous checkpoint, intact
    orphan = list(ck.glob(".last.pt.tmp.*"))
    assert orphan
    writer = CheckpointWriter()
    writer.submit({"step": 3, "model": {"w": torch.zeros(4)}}, ck / "last.pt", ("best.pt",))
    writer.wait()  # the next successful save removes the killed one's temporary file
    assert load_file(ck / "best.pt")["step"] == 3 and sorted(p.name for p in ck.iterdir()) == ["best.pt", "last.pt"]


def test_a_background_write_holds_the_state_of_its_submit_and_reports_its_error(tmp_path):
    weights = torch.zeros(1 << 16)
    writer = CheckpointWriter()
    writer.submit({"step": 5, "model": {"w": weights}}, tmp_path / "last.pt")
    weights.fill_(7.0)  # training goes on changing the tensors while the file is written
    writer.wait()
    assert torch.equal(load_file(tmp_path / "last.pt")["model"]["w"], torch.zeros(1 << 16))
    (tmp_path / "ro").mkdir(mode=0o500)
    writer.submit({"step": 6}, tmp_path / "ro" / "last.pt")
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PermissionError):
            writer.wait()
    writer.wait(raise_error=False)


def test_no_process_trains_alone_in_a_sbatch_script_silently(restored_environ, monkeypatch, capsys):
    from focalnet.engine import distributed as D

    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + list(LAUNCH_VARS):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(SLURM_JOB_ID="9", SLURM_NTASKS="8", SLURM_PROCID="0").items():  # a batch script, no srun
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(D, "_WARNED_NOT_SRUN", False)
    assert D.env_dist_info().world_size == 1
    err = capsys.readouterr().err
    assert "SLURM_NTASKS=8" in err and "srun python train.py" in err
