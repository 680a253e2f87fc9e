"""Process-group setup and the few collectives the engine needs (torchrun-native, env://).

One code path for every launch: a plain ``python train.py`` is world size 1 without a process group;
``torchrun`` (single node, or multi-node through its rendezvous) exports ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and we join with ``init_method="env://"``.
Processes started by SLURM itself (``srun python train.py``, one task per GPU) or by submitit
(``hydra/launcher=slurm``) get the same variables from SLURM's environment (:func:`adopt_launch_env`). The
backend is gloo for CPU tensors and NCCL for CUDA tensors when a GPU exists (one group serves both).

This module also decides the run id that names the run directory, identically on every rank
(Hydra composes the config on every rank, so ``${now:...}`` would give one directory per rank).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from focalnet.engine.config import ConfigError

RUN_ID_ENV = "FOCALNET_RUN_ID"
_RUN_ID: str | None = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class LaunchError(ConfigError):
    """SLURM's environment does not tell this process its place in the job."""


_WARNED_NOT_SRUN = False


def adopt_launch_env(exit_on_error: bool = False) -> None:
    """Export torchrun's variables when SLURM (``srun``) or submitit started the processes instead of torchrun.

    ``srun python train.py`` (one task per GPU): rank ``SLURM_PROCID``, world size ``SLURM_STEP_NUM_TASKS``, local
    rank ``SLURM_LOCALID``, local world size from ``SLURM_STEP_TASKS_PER_NODE``, rendezvous on the first host of
    ``SLURM_STEP_NODELIST`` at a port derived from ``SLURM_JOB_ID`` (``MASTER_ADDR``/``MASTER_PORT`` set by the
    user win). Under submitit the same from ``submitit.JobEnvironment()``. Without them, N tasks would be N
    independent runs on one GPU. Raises :class:`LaunchError` (``exit_on_error``: prints it as one line and exits
    with code 2) when srun started several tasks but their ranks cannot be told. Idempotent.
    """
    global _WARNED_NOT_SRUN
    env = os.environ
    try:
        if "RANK" in env:  # torchrun, or adopted already
            return
        if "SUBMITIT_EXECUTOR" in env:
            _adopt_submitit_env()
        elif "SLURM_STEP_NUM_TASKS" in env:
            _adopt_srun_env()
        elif int(env.get("SLURM_NTASKS") or 1) > 1 and not _WARNED_NOT_SRUN:
            _WARNED_NOT_SRUN = True
            print(f"warning: this SLURM job has SLURM_NTASKS={env['SLURM_NTASKS']} tasks but this process was not "
                  "started by srun, so it trains alone (world size 1): launch with `srun python train.py ...`",
                  file=sys.stderr)
    except LaunchError as e:
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _job_port(job_id: str) -> int:
    # A port derived from the job id, so concurrent jobs on shared nodes do not clash.
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def _adopt_submitit_env() -> None:
    """Under hydra's submitit launcher (srun tasks, no torchrun): ranks from ``submitit.JobEnvironment()``
    (facebookresearch/hydra PR #2633); the first node of the job hosts the rendezvous."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.num_tasks // max(env.num_nodes, 1)))
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(_job_port(env.job_id)))


def _adopt_srun_env() -> None:
    env = os.environ
    tasks = int(env["SLURM_STEP_NUM_TASKS"])
    if tasks <= 1:
        return
    how = ("launch one task per GPU, `srun --ntasks-per-node=GPUS python train.py ...`, or one torchrun per node, "
           "`srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=GPUS --rdzv_backend=c10d "
           "--rdzv_endpoint=HOST:PORT --rdzv_id=$SLURM_JOB_ID train.py ...`")
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID") if not env.get(k)]
    if missing:
        raise LaunchError(f"srun started {tasks} tasks but {', '.join(missing)} is not set, so this process cannot "
                          f"tell its rank: {how}")
    try:
        master = first_host(env["SLURM_STEP_NODELIST"])
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or f"{tasks}"
        local = tasks_on_node(spec, int(env.get("SLURM_NODEID") or 0))
    except (ValueError, IndexError):
        raise LaunchError(f"cannot read SLURM_STEP_NODELIST={env['SLURM_STEP_NODELIST']!r} / SLURM_STEP_TASKS_PER_NODE="
                          f"{env.get('SLURM_STEP_TASKS_PER_NODE')!r} / SLURM_NODEID={env.get('SLURM_NODEID')!r}: set "
                          f"MASTER_ADDR and LOCAL_WORLD_SIZE yourself, or {how}") from None
    rank, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
    if not (0 <= rank < tasks and 0 <= local_rank < local):
        raise LaunchError(f"SLURM_PROCID={rank} / SLURM_LOCALID={local_rank} do not fit SLURM_STEP_NUM_TASKS={tasks} "
                          f"/ {local} tasks on this node: {how}")
    env.update(RANK=str(rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local))
    env.setdefault("MASTER_ADDR", master)
    env.setdefault("MASTER_PORT", str(_job_port(env["SLURM_JOB_ID"])))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, without ``scontrol``: ``node[07-09,11],gpu1`` -> ``node07``."""
    m = re.match(r"\s*([^,\[\]\s]+)(?:\[([^\]]+)\]([^,\[\s]*))?", nodelist)
    if not m:
        raise ValueError(nodelist)
    prefix, ranges, suffix = m.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0] + suffix


def tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's per-node task list: ``2(x3),1`` is 2, 2, 2 then 1."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(spec)
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node]


def env_dist_info() -> DistInfo:
    """Ranks as exported by torchrun (or derived from SLURM/submitit when launched that way)."""
    adopt_launch_env()
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> DistInfo:
    """Join the process group when launched with several processes; idempotent, no-op for one process."""
    info = env_dist_info()
    if info.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            # Each rank owns one GPU; must be set before NCCL creates its communicator.
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=_dt.timedelta(minutes=int(os.environ.get("FOCALNET_DIST_TIMEOUT_MIN", 30))))
    return info


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj):
    """Every rank's ``obj`` as a list indexed by rank (a one-element list without a process group)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (exact for integer-valued float64 counts)."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _new_run_id() -> str:
    # Timestamp for humans + 6 random hex digits: two jobs started in the same second never collide.
    return _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


def run_id() -> str:
    """The run id, identical on every rank; Hydra's ``${run_id:}`` resolver (registered by train.py).

    1. ``FOCALNET_RUN_ID`` when set: a fixed directory, e.g. ``FOCALNET_RUN_ID=$SLURM_JOB_ID`` so that a
       requeued or restarted job lands in the same run dir and ``trainer.resume=auto`` picks up ``last.pt``.
    2. Several processes (torchrun): rank 0 proposes ``<timestamp>_<random>`` and broadcasts it over the
       process group, which is created here (env://) and reused by the training loop.
    3. One process: ``<timestamp>_<random>``.
    The value is cached: every resolution in this process (run dir, sweep dir, log file) agrees.
    """
    global _RUN_ID
    if _RUN_ID is None:
        if os.environ.get(RUN_ID_ENV):
            _RUN_ID = os.environ[RUN_ID_ENV]
        elif env_dist_info().distributed:
            init_distributed()
            _RUN_ID = broadcast_object(_new_run_id() if dist.get_rank() == 0 else None)
        else:
            _RUN_ID = _new_run_id()
    return _RUN_ID


def rank_suffix() -> str:
    """``""`` on rank 0, ``"_rank<N>"`` elsewhere: per-rank log file names (several ranks, one file = garbage)."""
    adopt_launch_env()  # srun/submitit tasks learn their rank here: Hydra opens the log file before train() runs
    rank = int(os.environ.get("RANK", 0))
    return "" if rank == 0 else f"_rank{rank}"


def register_resolvers() -> None:
    """Register ``${run_id:}``, ``${rank_suffix:}`` and data's ``${folder_num_classes:}`` (idempotent)."""
    from omegaconf import OmegaConf

    import focalnet.data  # noqa: F401  (importing the package registers ${folder_num_classes:} for data=folder)

    # use_cache: the value resolved by the submitting process travels with the pickled config (and Hydra's
    # copy_cache) into every submitit job and requeue, so they all land in the same sweep/run directory.
    OmegaConf.register_new_resolver("run_id", run_id, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)
