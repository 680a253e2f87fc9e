"""``train(cfg)``: set up a run from the config, train with periodic validation and checkpoints, resume exactly.

Order of work: validate the config -> join the process group -> lock the run directory and choose (and check)
the checkpoint to resume -> data -> model (seeded identically on every rank; + model.pretrained / init_from /
resume state) -> EMA -> DDP -> torch.compile -> loggers -> per-rank seeds (seed + rank), or the checkpoint's RNG
states on resume -> epochs.

Host checks: a training update never waits for the device. The loop reads values back (loss, gradient norm,
the skipped-update counters) and the ranks agree on stop signals only at host checks: every log and checkpoint
step, the last update of an epoch, and otherwise about every ``trainer.check_every_s`` seconds (the number of
updates between checks follows from the slowest rank's measured update time, which every rank learns in the
check's all-reduce, so all ranks check at the same updates).

Exit protocol (used by train.py):
* normal end: returns a summary dict (final validation metrics, step, run_dir).
* SIGTERM/SIGINT/SIGUSR1/SIGUSR2 (SLURM preemption or time limit, Ctrl-C), to the training process alone or to
  the whole job (data workers leave the shutdown to it: :func:`focalnet.data.loaders.leave_shutdown_to_parent`): every
  rank stops at the next host check (within about ``trainer.check_every_s``), rank 0 writes ``last.pt``, every
  rank waits until it is on disk (so a launcher that ends the job when one rank exits, like torchrun, cannot
  kill rank 0 mid-write), and :class:`TrainingPreempted` is raised; ``train.py`` exits with ``EXIT_PREEMPTED``
  (75, ``EX_TEMPFAIL``: "try again"). Relaunching with ``trainer.resume=auto`` in the same run dir continues
  exactly.
* divergence (``trainer.max_nonfinite_updates`` skipped fp16 updates in a row, a skipped fp32/bf16 update,
  non-finite weights at a save), found at a host check: :class:`NonFiniteLossError`, ``train.py`` exits with
  ``EXIT_DIVERGED`` (3); non-finite updates are never applied and non-finite weights never written, so the
  last checkpoint is the last good state.

Checkpoints are written by rank 0 in a background thread (:class:`CheckpointWriter`): training continues once
the state is copied to host memory; the file appears by atomic rename when complete.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from timm.utils import ModelEmaV3

from focalnet import data as data_lib
from focalnet.data.loaders import JOB_SIGNALS, DeviceLoader
from focalnet.engine import distributed as D
from focalnet.engine.amp import AmpStep, NonFiniteLossError
from focalnet.engine.artifacts import CheckpointUploader
from focalnet.engine.build import (
    build_mixup_and_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    init_weights_from,
    pretrained_source,
)
from focalnet.engine.checkpointing import (
    CheckpointWriteError,
    CheckpointWriter,
    capture_rng,
    checkpoint_digest,
    find_resume_checkpoint,
    first_non_finite,
    load_training_state,
    restore_rng,
)
from focalnet.engine.config import ConfigError, scaled_lrs, validate_config
from focalnet.engine.console import Progress, end_block, start_block
from focalnet.engine.loggers import RunLogger, provenance, record_launch, redact_secrets, wandb_group
from focalnet.engine.loop import TrainState, train_one_epoch, validate
from focalnet.engine.pictures import RunPictures
from focalnet.engine.rundir import TOTAL_BATCH, RunDirLock, check_resume_config
from focalnet.models.checkpoint import CheckpointError
from focalnet.models.sources import resolve

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_DIVERGED = 3  # NaN/inf gradients (fp32/bf16: one skipped update; fp16: trainer.max_nonfinite_updates in a row)
# SLURM/systemd stops (TERM), submitit's requeue signal (USR2, hydra/launcher=slurm), USR1, a terminal's Ctrl-C.
PREEMPT_SIGNALS = JOB_SIGNALS


# Test hook: see TrainRun._pause_for_test. Unset in real runs.
_PAUSE_AT_STEP = int(os.environ.get("FOCALNET_PAUSE_AT_STEP", "-1"))


class TrainingPreempted(Exception):
    """Stopped by a preemption signal after saving ``last.pt``; relaunch with trainer.resume=auto."""


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def static_graph(cfg: dict) -> bool:
    """DDP's ``static_graph``: the same parameters take part in every update, so DDP skips its per-update search
    for unused parameters and can reorder its gradient buckets after the first update. ``auto``: on for this
    package's models (their graph is static: drop path masks samples, it never skips a block) when updates have
    one micro-batch each; DDP fails with ``static_graph`` under ``no_sync()`` accumulation in torch <= 2.14
    (an internal assert, pytorch/pytorch PR #187732)."""
    value = cfg["trainer"]["ddp_static_graph"]
    if value == "auto":
        return cfg["model"]["library"] == "focalnet" and cfg["trainer"]["accum_steps"] == 1
    return bool(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict: bitwise equality of weights across ranks or runs."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _PreemptFlag:
    """Sets a flag on SIGTERM/SIGINT/SIGUSR1/SIGUSR2; the loop acts on it between updates (never inside a
    handler). Later signals only set it again: a second Ctrl-C or SIGTERM cannot interrupt the save.

    The first signal handled decides: the log names it and :meth:`chain` passes it on. CPython runs the handlers
    of signals pending together in signal-number order (SIGINT 2, SIGUSR1 10, SIGUSR2 12, SIGTERM 15 on Linux),
    so when two arrive while the main thread waits for the GIL, the lower-numbered one decides, whatever their
    arrival order. For a SLURM job that gets SIGUSR2 and SIGTERM together, that is SIGUSR2: submitit's
    requeue handler is the one chained."""

    def __init__(self):
        self.signum: int | None = None
        self.stopping = False  # set when the ranks agreed to stop (possibly on another rank's signal)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:  # the first handled decides; os.write: the logging lock may be held by the loop
            self.signum = signum
            os.write(2, f"\n{signal.Signals(signum).name} received: finishing the current update, then saving "
                        f"checkpoints/last.pt and exiting with code {EXIT_PREEMPTED}\n".encode())

    def chain(self) -> None:
        """Pass the signal on to the handler installed before ours, once ``last.pt`` is saved: under
        hydra-submitit-launcher that is submitit's checkpoint-and-requeue (rank 0 requeues the job and exits)."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:  # (that one raises KeyboardInterrupt)
            previous(self.signum, None)

    def __exit__(self, *exc):
        # Once stopping, later stop signals (a second Ctrl-C, SLURM's repeats) are ignored until the process has
        # exited with its code; otherwise the handlers that were there before come back.
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.signum is not None or self.stopping else h)


def train(cfg: DictConfig | dict) -> dict:
    """Train as configured; see the module docstring for the exit protocol."""
    plain = validate_config(cfg)  # before any work: config errors surface in seconds, not after data loading
    info = D.init_distributed()
    try:
        with _PreemptFlag() as preempt:
            result = TrainRun(plain, info, preempt).fit()
    except (TrainingPreempted, NonFiniteLossError, ConfigError, CheckpointError, CheckpointWriteError):
        D.cleanup_distributed()  # every rank stops here together: no collective is left pending
        raise
    D.cleanup_distributed()
    return result


class TrainRun:
    """One training run, set up from a validated plain-dict config (``train`` is the entry point; scripts such
    as the loop benchmark build one directly and drive ``train_epoch``)."""

    def __init__(self, cfg: dict, info: D.DistInfo, preempt: _PreemptFlag | None = None):
        self.lock = RunDirLock(Path(cfg["paths"]["output_dir"]).resolve())
        try:
            self._setup(cfg, info, preempt)
        except BaseException:
            self.lock.release()  # a refused or failed setup leaves the directory free at once
            raise

    def _setup(self, cfg: dict, info: D.DistInfo, preempt: _PreemptFlag | None) -> None:
        self.cfg, self.info = cfg, info
        self.resume_changes: dict = {}
        self.preempt = preempt or _PreemptFlag()  # not installed: signals keep their handlers
        self.progress = Progress(total=0, initial=0, log_every=1, enabled=False)  # fit() makes the real one
        t = self.t = cfg["trainer"]
        self.run_dir = Path(cfg["paths"]["output_dir"]).resolve()
        dirs = D.all_gather_object(str(self.run_dir))
        if len(set(dirs)) != 1:
            raise RuntimeError(f"ranks disagree on the run directory: {dirs}; set FOCALNET_RUN_ID or hydra.run.dir")
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Written files carry this copy: values of secret-looking environment variables are masked.
        self.public_cfg = redact_secrets(cfg)
        # One owner per run directory (rank 0 holds the lock for the job), then the checkpoint to continue from,
        # both before any work: a refusal comes in seconds and touches nothing.
        ckpt_path, ckpt = self._claim_run_dir()
        self.device = resolve_device(t["device"], info.local_rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest conv kernels once
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts (amp=none, the loss)

        # Data: uint8 batches, in pinned memory for a CUDA device (copied there asynchronously and finished there).
        self.loaders = data_lib.build_loaders(cfg["data"], cfg["aug"], rank=info.rank, world_size=info.world_size,
                                              seed=t["seed"], pin_memory=self.device.type == "cuda")
        self.updates_per_epoch = len(self.loaders.train) // t["accum_steps"]
        if self.updates_per_epoch == 0:
            raise ConfigError(f"the train loader has {len(self.loaders.train)} batches per rank, fewer than "
                              f"trainer.accum_steps={t['accum_steps']}: lower accum_steps or data.batch_size")
        self.total_steps = t["max_steps"] or t["epochs"] * self.updates_per_epoch
        self.epochs = math.ceil(self.total_steps / self.updates_per_epoch)

        # Model, optimizer, schedule, loss. The derived LRs are computed and logged in exactly one place.
        seed_everything(t["seed"])  # same initial weights on every rank (DDP's broadcast is then a no-op)
        model = build_model(cfg["model"], timm_pretrained=True)
        source = t["init_from"] or (pretrained_source(cfg["model"]) if cfg["model"]["library"] == "focalnet" else None)
        if source is not None:
            if info.distributed:  # rank 0 downloads into the shared caches first; the others then read them
                problem = None
                if info.rank == 0:
                    try:
                        resolve(source, variant=cfg["model"]["name"])
                    except CheckpointError as e:
                        problem = str(e)
                problem = D.broadcast_object(problem)  # every rank stops with the message, none waits forever
                if problem:
                    raise CheckpointError(problem)
            init_weights_from(model, source, t["init_head"], seed=t["seed"])
        model.to(self.device)
        if t["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.derived = scaled_lrs(cfg, info.world_size)
        self.derived.update(updates_per_epoch=self.updates_per_epoch, total_steps=self.total_steps,
                            world_size=info.world_size)
        self.optimizer = build_optimizer(model, cfg["optimizer"], self.derived["lr"])
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], total_steps=self.total_steps,
                                         batches_per_epoch=len(self.loaders.train), accum_steps=t["accum_steps"],
                                         warmup_lr=self.derived["warmup_lr"], min_lr=self.derived["min_lr"])
        self.amp = AmpStep(t["amp"], self.device, t["clip_grad"], t["max_nonfinite_updates"])
        self.mixup, self.criterion = build_mixup_and_loss(cfg["aug"], cfg["model"]["num_classes"])
        self.params = [p for p in model.parameters() if p.requires_grad]

        # Resume state (weights before DDP so every rank starts from the file, RNG restored last).
        self.state = TrainState()
        self.wandb_id = None
        if ckpt is not None:
            self._load_training_state(ckpt_path, ckpt)

        self.ema = None  # a copy of the bare model, made before DDP attaches its hooks
        if t["ema_decay"] is not None:
            self.ema = ModelEmaV3(model, decay=t["ema_decay"])
            if ckpt is not None and ckpt.get("ema") is not None:
                self.ema.module.load_state_dict(ckpt["ema"])
        self.ddp = None
        if info.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True, static_graph=static_graph(cfg))
        self.train_model = self.ddp if self.ddp is not None else model
        if t["compile"]:
            self.train_model = torch.compile(self.train_model)

        # Side effects on rank 0 only.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        prov = provenance(self.public_cfg, info.world_size, str(self.device)) if info.is_main else None
        if info.is_main:
            record_launch(self.run_dir, prov)
        self.logger = RunLogger(self.run_dir, self.public_cfg, enabled=info.is_main, wandb_id=self.wandb_id,
                                derived=self.derived, prov=prov, job_type="finetune" if t["init_from"] else "train",
                                group=wandb_group(self.public_cfg, t["init_from"]) if info.is_main else None)
        self.wandb_id = self.logger.wandb_id
        self.uploader = CheckpointUploader(self.logger.wandb, self.run_dir, cfg["logger"]["wandb"]["log_checkpoints"])
        self.pictures = RunPictures(self.run_dir, cfg, self.logger, model, self.loaders.val, enabled=info.is_main)
        if info.is_main:
            log.info("%s", start_block(self))
        if info.is_main:
            log.info("%s with the %s kernel%s", type(self.optimizer).__name__,
                     "fused" if self.optimizer.defaults.get("fused") else "foreach",
                     f"; DDP static_graph={self.ddp.static_graph}" if self.ddp is not None else "")
        # Per-rank RNG streams (drop path, mixup) start here, after every setup step that might draw from the
        # global generators (W&B, compile...), so they do not depend on the setup; a resume then overwrites them.
        seed_everything(t["seed"] + info.rank)
        if ckpt is None:
            self.logger.log({f"derived/{k}": v for k, v in self.derived.items()}, step=0)
        else:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, self.state.step,
                     self.state.epoch, self.state.batch_in_epoch)
            self.logger.log({"resumed_from_step": self.state.step}, step=self.state.step)
            rngs = ckpt["rng"]
            if len(rngs) == info.world_size:
                restore_rng(rngs[info.rank])
            else:
                log.warning("checkpoint has RNG states for %d ranks, this run has %d: RNG streams restart "
                            "(resume is not bitwise exact)", len(rngs), info.world_size)
        self.scheduler.step_update(num_updates=self.state.step)
        self._window = (time.perf_counter(), self.state.step)
        # Host checks (module docstring): the first update of this launch is one, then every ~check_every_s.
        self._next_check, self._last_check = self.state.step + 1, (time.perf_counter(), self.state.step)
        self.writer = CheckpointWriter(background=t["async_save"]) if info.is_main else None

    # -- run directory and checkpoints -------------------------------------------------------------------

    def _claim_run_dir(self) -> tuple[Path | None, dict | None]:
        """Rank 0 locks the run directory and picks the checkpoint to resume; every rank gets the outcome (so
        all stop together on a refusal) and loads the chosen file. Returns ``(path, checkpoint)`` or Nones."""
        t, error, chosen, ckpt = self.t, None, None, None
        if self.info.is_main:
            try:
                self.lock.acquire()
                path, ckpt = find_resume_checkpoint(t["resume"], self.run_dir)
                chosen = str(path) if path is not None else None
            except (ConfigError, CheckpointError) as e:
                error = (type(e).__name__, str(e))
        error, chosen = D.broadcast_object((error, chosen))
        if error is not None:
            raise (CheckpointError if error[0] == "CheckpointError" else ConfigError)(error[1])
        if chosen is None:
            if t["resume"] is None and any(self.ckpt_dir.glob("*.pt")):
                log.warning("trainer.resume=null: starting over; the checkpoints in %s will be overwritten",
                            self.ckpt_dir)
            return None, None
        problem = None
        if ckpt is None:  # the other ranks read the file rank 0 chose, through their own view of the storage
            try:
                ckpt = load_training_state(chosen)
            except (CheckpointError, OSError) as e:
                problem = str(e)
        self._agree_on_checkpoint(chosen, ckpt, problem)
        old_world = int(ckpt.get("world_size", len(ckpt["rng"])))
        self.resume_changes = check_resume_config(chosen, ckpt["config"], old_world, self.public_cfg,
                                                  self.info.world_size)
        return Path(chosen), ckpt

    def _agree_on_checkpoint(self, path: str, ckpt: dict | None, problem: str | None) -> None:
        """Refuse to resume (CheckpointError on every rank) unless every rank holds the file rank 0 chose: the same
        step and the same bytes (a digest of the CRC-32s of its zip entries, which loading verified against the
        data). DDP broadcasts only the weights: a node reading a stale or different copy from shared storage would
        otherwise train on with another optimizer state, schedule and epoch."""
        seen = None
        if problem is None:
            try:
                seen = (int(ckpt["step"]), checkpoint_digest(path))
            except OSError as e:
                problem = str(e)
        views = D.all_gather_object((socket.gethostname(), seen, problem))
        host0, chosen, _ = views[0]
        odd = [f"rank {r} on host {host} " + (f"cannot read it ({why})" if why else
                                             f"reads step {saw[0]} with checksum {saw[1]}")
               for r, (host, saw, why) in enumerate(views) if r and (why or saw != chosen)]
        if odd:
            raise CheckpointError(
                f"refusing to resume: rank 0 on host {host0} chose {path} (step {chosen[0]}, checksum {chosen[1]}) "
                f"but {'; '.join(odd)}. Every node must see the same run directory on shared storage (a stale "
                f"network file system cache, or a node-local path?): relaunch once the file is the same everywhere, "
                f"or pass trainer.resume=PATH with a copy every node can read")

    def _load_training_state(self, path: Path, ckpt: dict) -> None:
        """Weights, optimizer, scaler, schedule and position from ``ckpt``; keys accepted by
        ``trainer.resume_allow_changes`` take their new values (see ``focalnet.engine.rundir``)."""
        changed = set(self.resume_changes)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: its weights do not fit model={self.cfg['model']['name']}: "
                                  f"{str(e).splitlines()[0]} ...") from None
        # Accepted changes of the LR, the schedule or the batch: the new hyperparameters and the new schedule
        # (a function of the config and the step) with the saved moments.
        new_hyper = any(k.startswith(("optimizer.", "schedule.")) or k in (TOTAL_BATCH, "trainer.epochs",
                                                                          "trainer.max_steps") for k in changed)
        if "optimizer.name" in changed:
            log.warning("optimizer changed: its state (moments) restarts from zero")
        else:
            fresh = [dict(g) for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for group, new in zip(self.optimizer.param_groups, fresh if new_hyper else ()):
                group.update({k: v for k, v in new.items() if k != "params"})
        self.amp.load_state_dict(ckpt["scaler"])
        if not new_hyper:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        old_cfg, t = ckpt["config"], self.t
        old_world = int(ckpt.get("world_size", len(ckpt["rng"])))
        # The position in the epoch as samples seen, re-expressed in this launch's micro-batches (a different
        # world size with the same total batch lands on the same update).
        samples = ckpt["batch_in_epoch"] * old_cfg["data"]["batch_size"] * old_world
        micro = samples // (self.cfg["data"]["batch_size"] * self.info.world_size)
        self.state = TrainState(step=ckpt["step"], epoch=ckpt["epoch"],
                                batch_in_epoch=micro - micro % t["accum_steps"], best_metric=ckpt["best_metric"])
        self.wandb_id = ckpt.get("wandb_id")

    def save(self, name: str = "last.pt", also: tuple[str, ...] = ()) -> None:
        """Write ``name`` (+ hard links ``also``) on rank 0, in the background; every rank calls it. Non-finite
        weights are never written: every rank raises NonFiniteLossError instead (the weights are identical on
        every rank). A divergence not yet seen by a host check is found here first."""
        self.amp.check()
        for label, module in (("model", self.model), ("ema", self.ema.module if self.ema is not None else None)):
            bad = first_non_finite(module.state_dict()) if module is not None else None
            if bad is not None:
                raise NonFiniteLossError(
                    f"{label} weight {bad} is NaN/inf at step {self.state.step}: not saving it; "
                    f"{self.ckpt_dir / 'last.pt'} stays the last good state. Lower optimizer.lr or set "
                    f"trainer.clip_grad, then resume")
        rngs = D.all_gather_object(capture_rng())  # collective: every rank calls save()
        if not self.info.is_main:
            return
        obj = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.amp.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "step": self.state.step, "epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
            "rng": rngs, "world_size": self.info.world_size,
            "config": self.public_cfg, "best_metric": self.state.best_metric, "wandb_id": self.wandb_id,
            "wandb_group": self.logger.group,
        }
        upload = functools.partial(self.uploader.saved, step=self.state.step, epoch=self.state.epoch,
                                   best="best.pt" in also, final=self.state.step >= self.total_steps,
                                   preempting=self.preempt.signum is not None,
                                   metadata={"best_top1": self.state.best_metric})
        # best.pt / epoch_N.pt: hard links, not new writes; the W&B upload starts once the file is complete.
        self.writer.submit(obj, self.ckpt_dir / name, also, then=lambda path, snapshot: upload(path, snapshot["model"]))

    def finish_saves(self) -> None:
        """Every rank returns once rank 0's checkpoint writes are complete on disk, or every rank raises (rank 0
        the write's own error, the others CheckpointWriteError): the exit barrier of a stopped or finished run."""
        error = None
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as e:  # noqa: BLE001  (shared with the other ranks, then re-raised)
                error = e
        outcome = D.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if outcome is not None:
            raise CheckpointWriteError(errno.EIO, f"rank 0 could not write a checkpoint ({outcome})")

    # -- per-update hook ---------------------------------------------------------------------------------

    def after_step(self, state: TrainState, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
        """After every update: a host check when one is due (module docstring), then logging and checkpoints.
        Between checks this touches no device value."""
        t, step = self.t, state.step
        log_now = step % t["log_every"] == 0 or step == self.total_steps
        ckpt_now = bool(t["ckpt_every_steps"]) and step % t["ckpt_every_steps"] == 0
        epoch_end = state.batch_in_epoch >= self.updates_per_epoch * t["accum_steps"]
        paused = step == _PAUSE_AT_STEP
        if paused:
            self._pause_for_test(step)  # then a check at this very update, where the test's signal is acted on
        if not (log_now or ckpt_now or epoch_end or paused or step >= self.total_steps or step >= self._next_check):
            self.progress.update(step)
            return None
        preempted, values = self.host_check(step, loss, grad_norm)
        self.progress.update(step, self._log_train(state, values) if log_now else None)
        if step >= self.total_steps:
            return "done"
        if preempted:
            return "preempted"
        if ckpt_now:
            self.save()
        return None

    def host_check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, dict]:
        """One all-reduce and one device-to-host read: the ranks agree whether any got a stop signal (or a failed
        checkpoint write) and on the slowest rank's time per update since the last check, which sets when the next
        check is (the same update on every rank); the divergence counters are checked (NonFiniteLossError).
        Returns ``(preempted, {loss, grad_norm, skipped})`` (this rank's values, for logging)."""
        t_last, s_last = self._last_check
        per_update = (time.perf_counter() - t_last) / max(step - s_last, 1)
        write_failed = self.writer is not None and self.writer.failed()
        agreed = torch.tensor([float(self.preempt.signum is not None), per_update, float(write_failed)],
                              dtype=torch.float64, device=self.device)
        D.all_reduce_max(agreed)
        local = torch.stack([loss.detach(), grad_norm.detach(), self.amp.skipped, self.amp.longest_run]).double()
        preempted, slowest, write_failed, loss_v, norm_v, skipped, longest = torch.cat([agreed, local]).tolist()
        self.amp.raise_if_diverged(int(longest))
        if write_failed:
            self.finish_saves()  # raises on every rank
        self._next_check = step + max(1, int(self.t["check_every_s"] / max(slowest, 1e-9)))
        self._last_check = (time.perf_counter(), step)
        return preempted > 0, {"loss": loss_v, "grad_norm": norm_v, "skipped": int(skipped)}

    def _log_train(self, state: TrainState, values: dict) -> dict:
        step = state.step
        now = time.perf_counter()
        t0, s0 = self._window
        per_step = (now - t0) / max(step - s0, 1)
        self._window = (now, step)
        metrics = {"epoch": state.epoch, "train/loss": values["loss"], "train/grad_norm": values["grad_norm"],
                   "train/lr": self.optimizer.param_groups[0]["lr"],
                   "train/img_per_s": self.derived["total_batch"] / per_step,
                   "train/eta_s": per_step * (self.total_steps - step)}
        if self.amp.scaler.is_enabled():
            metrics["train/loss_scale"] = self.amp.scaler.get_scale()
            metrics["train/skipped_steps"] = values["skipped"]
        self.logger.log(metrics, step=step)
        return metrics

    def _pause_for_test(self, step: int) -> None:
        """Test hook (``FOCALNET_PAUSE_AT_STEP``): park this rank after update ``step`` until a preemption signal
        arrives, so tests signal or kill a run at an exact step instead of polling for it. Each rank first
        writes ``$FOCALNET_PAUSE_FILE.rank<r>`` (its pid) to say it is parked; ``FOCALNET_PAUSE_TIMEOUT``
        (default 600 s) bounds the wait. A checkpoint write in flight finishes first, so what is on disk when a
        test kills the parked run is known (the last save before ``step``)."""
        if self.writer is not None:
            self.writer.join()
        if marker := os.environ.get("FOCALNET_PAUSE_FILE"):
            tmp = Path(f"{marker}.rank{self.info.rank}.tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(f"{marker}.rank{self.info.rank}")
        deadline = time.monotonic() + float(os.environ.get("FOCALNET_PAUSE_TIMEOUT", "600"))
        while self.preempt.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- validation --------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        val = DeviceLoader(self.loaders.val, self.device)
        m = validate(self.model, self.progress.validation(val), self.device, self.amp, self.t["channels_last"])
        metrics = {f"val/{k}": v for k, v in m.items()}
        if self.ema is not None:
            e = validate(self.ema.module, self.progress.validation(val, "val (EMA)"), self.device, self.amp,
                         self.t["channels_last"])
            metrics.update({f"val_ema/{k}": v for k, v in e.items()})
        metrics["epoch"] = self.state.epoch
        self.logger.log(metrics, step=self.state.step)
        log.info("step %d epoch %d: %s", self.state.step, self.state.epoch,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def log_loader_stats(self) -> None:
        stats = self.loaders.train.stats() if hasattr(self.loaders.train, "stats") else {}
        if "skipped_images" in stats:
            total = D.all_reduce_sum(torch.tensor([float(stats["skipped_images"])], dtype=torch.float64))
            self.logger.log({"train/skipped_images": int(total.item())}, step=self.state.step)

    # -- main loop ---------------------------------------------------------------------------------------

    def make_progress(self, **kw) -> Progress:
        return Progress(total=self.total_steps, initial=self.state.step, log_every=self.t["log_every"],
                        enabled=self.info.is_main, **kw)

    def train_epoch(self) -> str | None:
        """The rest of the current epoch from the saved position (what ``fit`` runs per epoch)."""
        t = self.t
        self.loaders.train.set_epoch(self.state.epoch, self.state.batch_in_epoch)
        return train_one_epoch(
            self.train_model, DeviceLoader(self.loaders.train, self.device), self.optimizer, self.amp,
            criterion=self.criterion,
            mixup=self.mixup, scheduler=self.scheduler, ema=self.ema, params=self.params, state=self.state,
            accum_steps=t["accum_steps"], device=self.device, channels_last=t["channels_last"],
            ddp=self.ddp, ema_source=self.model, after_step=self.after_step,
            peek=self.pictures.inputs if self.state.step == 0 else None)

    def fit(self) -> dict:
        t, state, failed = self.t, self.state, True
        started, first_step, train_s = time.perf_counter(), state.step, 0.0
        self.progress = self.make_progress().__enter__()
        metrics: dict = {}
        try:
            stop = "done" if state.step >= self.total_steps else None
            while stop is None and state.epoch < self.epochs:
                epoch_start = time.perf_counter()
                stop = self.train_epoch()
                train_s += time.perf_counter() - epoch_start
                if stop == "preempted":
                    break
                epoch_done = state.batch_in_epoch >= self.updates_per_epoch * t["accum_steps"]
                if epoch_done:
                    self.log_loader_stats()
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                final = stop == "done" or state.epoch >= self.epochs
                if final or (epoch_done and t["eval_every"] and state.epoch % t["eval_every"] == 0):
                    metrics = self.evaluate()
                    best = state.best_metric is None or metrics["val/top1"] > state.best_metric
                    if best:
                        state.best_metric = metrics["val/top1"]
                    also = ("best.pt",) if best else ()
                    if t["save_epoch_ckpts"] and epoch_done:
                        also += (f"epoch_{state.epoch}.pt",)
                    self.save("last.pt", also)
                    self.pictures.validated()
                elif epoch_done:
                    self.save("last.pt", (f"epoch_{state.epoch}.pt",) if t["save_epoch_ckpts"] else ())
                if epoch_done or final:
                    self.pictures.epoch_end(state.epoch, state.step, final)
                if final:
                    stop = "done"
            if stop == "preempted":
                self.preempt.stopping = True  # from here on, further stop signals are ignored
                self.save("last.pt")
                self.finish_saves()  # every rank leaves once last.pt is on disk
                if self.info.is_main:
                    why = signal.Signals(self.preempt.signum).name if self.preempt.signum else "another rank's signal"
                    log.warning("%s: saved %s at step %d; exiting with code %d (resume with trainer.resume=auto)",
                                why, self.ckpt_dir / "last.pt", state.step, EXIT_PREEMPTED)
                failed = False          # a clean stop: the next launch resumes this run (and its W&B run)
                self.preempt.chain()    # submitit: requeue this job with the same config, then exit
                raise TrainingPreempted(f"preempted at step {state.step}; checkpoint {self.ckpt_dir / 'last.pt'}")
            fingerprints = D.all_gather_object(weights_fingerprint(self.model))
            summary = {"final/step": state.step, "final/params_in_sync": len(set(fingerprints)) == 1,
                       "final/weights_sha256_per_rank": fingerprints, "best/val_top1": state.best_metric}
            self.logger.log(summary, step=state.step)
            self.logger.summary({k: v for k, v in summary.items() if not isinstance(v, list)})
            if len(set(fingerprints)) != 1:
                raise RuntimeError(f"weights differ across ranks at the end of training: {fingerprints}")
            self.finish_saves()
            self.progress.__exit__(None, None, None)
            if self.info.is_main:
                images = (state.step - first_step) * self.derived["total_batch"]
                log.info("%s", end_block(self, metrics, time.perf_counter() - started, train_s, images))
            failed = False
            return {**metrics, **summary, "run_dir": str(self.run_dir)}
        except TrainingPreempted:
            failed = False
            raise
        finally:
            if self.writer is not None:  # a write in flight completes (and starts its upload) before the uploads end
                self.writer.wait(raise_error=False)
            self.progress.__exit__(None, None, None)
            self.pictures.close()
            self.loaders.close()
            self.uploader.close()
            self.logger.close(failed=failed)
            self.lock.release()
