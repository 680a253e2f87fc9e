"""Checkpoints as W&B artifacts, opt-in: ``logger.wandb.log_checkpoints: false | best | last | all``.

* ``best``: every time validation improves ``best.pt``; ``last``: the final ``last.pt`` when training ends;
  ``all``: every checkpoint the run writes (periodic, epoch ends, best, final), except the one written on a
  preemption signal (the job then has seconds to exit; the relaunched run uploads its later checkpoints).
* One artifact per run, ``model-<W&B run id>`` of type ``model``; each upload is a version holding the file
  as ``checkpoint.pt``, with aliases ``latest``, ``step-<N>`` and, when it is the best so far, ``best``;
  metadata: step, epoch, the checkpoint's file name, val top-1 and the best top-1.
* An upload starts only after the local save returned (written, fsynced, renamed into place), and never
  for a state with a non-finite weight. The file is first hard-linked (copied where links are impossible)
  into ``<run dir>/wandb/artifact-files/``: ``last.pt`` is replaced at every save, and the link keeps this
  version's bytes until W&B has them (online: removed once uploaded; offline: kept for ``wandb sync``; a
  link costs no space while its checkpoint is the current one). Hashing and handing the file to W&B run
  in one background thread, so training does not wait; the run waits for pending uploads at its end.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from focalnet.engine.checkpointing import first_non_finite, link_or_copy_atomic

log = logging.getLogger(__name__)

POLICIES = (False, "best", "last", "all")


class CheckpointUploader:
    """Decides which saved checkpoints become artifact versions and uploads them off the training thread."""

    def __init__(self, wandb_run, run_dir: Path, policy: str | bool):
        self.run, self.policy = wandb_run, policy
        self.staging = Path(run_dir) / "wandb" / "artifact-files"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-artifact") if self.active else None
        self._pending: list[Future] = []

    @property
    def active(self) -> bool:
        return self.run is not None and self.policy not in (False, None, "false")

    def wants(self, *, best: bool, final: bool, preempting: bool) -> bool:
        if not self.active or preempting:
            return False
        return self.policy == "all" or (self.policy == "best" and best) or (self.policy == "last" and final)

    def saved(self, path: Path, state_dict: dict[str, torch.Tensor], *, step: int, epoch: int, best: bool,
              final: bool, preempting: bool, metadata: dict) -> bool:
        """Called after checkpoint ``path`` (model weights ``state_dict``) was saved; returns whether an upload
        was started."""
        if not self.wants(best=best, final=final, preempting=preempting):
            return False
        if first_non_finite(state_dict) is not None:  # the trainer never saves one; refused here too
            log.warning("not uploading %s (step %d) as a W&B artifact: its weights are not finite", path, step)
            return False
        frozen = self.staging / f"step{step:09d}-{path.name}"
        self.staging.mkdir(parents=True, exist_ok=True)
        link_or_copy_atomic(path, frozen)  # this version's bytes, whatever later saves do to `path`
        aliases = ["latest", f"step-{step}"] + (["best"] if best else [])
        meta = {"step": step, "epoch": epoch, "file": path.name, **metadata}
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(self._upload, frozen, aliases, meta))
        return True

    def _upload(self, frozen: Path, aliases: list[str], metadata: dict) -> None:
        import wandb

        try:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            # "immutable": no second copy into W&B's staging area; `frozen` is never written again.
            artifact.add_file(str(frozen), name="checkpoint.pt", policy="immutable")
            self.run.log_artifact(artifact, aliases=aliases)
            if not self.run.offline:
                artifact.wait()
                frozen.unlink(missing_ok=True)
        except Exception as e:  # an upload problem must never stop training: say it once per upload
            log.warning("W&B artifact upload of %s failed: %s: %s", frozen, type(e).__name__, e)

    def close(self) -> None:
        """Wait for pending uploads (before the W&B run is finished)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

