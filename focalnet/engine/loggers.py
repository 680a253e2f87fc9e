"""Run outputs on rank 0: metrics.jsonl, Weights & Biases, the console, and the provenance file.

``RunLogger.log(metrics, step)`` fans one event out to ``metrics.jsonl`` (one JSON object per line) and
W&B. Other ranks get a logger whose methods do nothing, so call sites need no rank checks.

W&B ``logger.wandb.mode``: ``auto`` is online when an API key is configured (``WANDB_API_KEY`` or a
``~/.netrc`` entry for the W&B host, as ``wandb login`` writes) and offline otherwise; ``online``,
``offline`` and ``disabled`` are passed through. Runs live under ``<run_dir>/wandb/``. The run id is chosen
here (or taken from the checkpoint on resume) and stored in every checkpoint, so a resumed run continues
the same W&B run.

Grouping (:func:`wandb_group`): ``logger.wandb.group`` when set; else ``WANDB_RUN_GROUP``; else, for a job of
a Hydra multirun sweep, the sweep's id (the name of its ``multirun/<id>`` directory), so every point of a sweep
shares one group; else the group of the run whose checkpoint this run starts from (a fine-tune; for an
evaluation this comes before the sweep's id); else the run's own id (its run directory's name, the same on
every node of a multi-node job, whose rank 0 alone logs). ``job_type`` is ``train``, ``finetune``
(``trainer.init_from`` set) or ``eval``. The project and entity are ``logger.wandb.project``/``.entity``, or
``WANDB_PROJECT``/``WANDB_ENTITY`` when those are null (project ``focalnet`` when neither says).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import platform
import secrets
import socket
import string
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

# Environment variables whose values must never be written: config.yaml, provenance.json, checkpoints, W&B.
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
REDACTED = "<redacted>"
_MIN_SECRET_LEN = 8  # shorter values are redacted only where they are a whole value, not inside other strings


def secret_values(environ=None) -> list[str]:
    """Values of the environment variables whose names contain KEY, TOKEN, SECRET or PASSWORD."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if v and any(p in k.upper() for p in SECRET_NAME_PARTS)},
                  key=len, reverse=True)


def redact_secrets(obj, secrets_: list[str] | None = None):
    """A copy of ``obj`` (dicts, lists, strings) in which every value resolved from a secret-looking environment
    variable (``${oc.env:WANDB_API_KEY}``, a token in a URL...) reads ``<redacted>``."""
    secrets_ = secret_values() if secrets_ is None else secrets_
    if isinstance(obj, dict):
        return {k: redact_secrets(v, secrets_) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_secrets(v, secrets_) for v in obj)
    if isinstance(obj, str):
        for secret in secrets_:
            if obj == secret:
                return REDACTED
            if len(secret) >= _MIN_SECRET_LEN and secret in obj:
                obj = obj.replace(secret, REDACTED)
    return obj


_PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy", "pillow", "ffcv",
             "ultralytics")


def new_wandb_id() -> str:
    """8 random lowercase letters/digits, the form W&B uses for run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


def _sweep_id() -> str | None:
    """The id of the Hydra multirun sweep this process runs a job of (None outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def checkpoint_wandb_group(path: str | os.PathLike | None) -> str | None:
    """The W&B group of the run that wrote checkpoint ``path``, if it is one of our run checkpoints.

    Read through a memory map, so only the few small entries looked at are read from a large file.
    """
    import torch

    if not path or not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file (e.g. safetensors): not one of our run checkpoints
        return None
    group = obj.get("wandb_group") if isinstance(obj, dict) else None
    return group if isinstance(group, str) and group else None


def wandb_group(cfg: dict, parent_checkpoint: str | None = None, *, parent_first: bool = False) -> str:
    """The run's W&B group (see the module docstring). ``parent_first``: the group of the run that wrote
    ``parent_checkpoint`` wins over a sweep's id (an evaluation belongs with the run it evaluates)."""
    explicit = cfg["logger"]["wandb"].get("group") or os.environ.get("WANDB_RUN_GROUP")
    sources = [_sweep_id, lambda: checkpoint_wandb_group(parent_checkpoint)]
    if parent_first:
        sources.reverse()
    return explicit or sources[0]() or sources[1]() or Path(cfg["paths"]["output_dir"]).name


def provenance(cfg: dict, world_size: int, device: str) -> dict:
    """What produced this run: resolved config, code version, package versions, hardware (secrets redacted)."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import torch

    return redact_secrets({
        "git_sha": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "packages": versions,
        "world_size": world_size,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg,
    })


class RunLogger:
    """metrics.jsonl + W&B for rank 0; a no-op everywhere else."""

    def __init__(self, run_dir: Path, cfg: dict, *, enabled: bool, wandb_id: str | None, derived: dict,
                 prov: dict | None = None, group: str | None = None, job_type: str = "train"):
        self.enabled, self.run_dir, self.wandb = enabled, Path(run_dir), None
        self.wandb_id, self.group, self.job_type = wandb_id, group, job_type
        self.mode = "disabled"
        if not enabled:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: survives a kill
        wcfg = cfg["logger"]["wandb"]
        self.mode = resolve_wandb_mode(wcfg["mode"])
        if self.mode != "disabled":
            import wandb

            self.wandb_id = wandb_id or new_wandb_id()
            self.group = group or wandb_group(cfg)
            self.wandb = wandb.init(
                project=wcfg["project"] or os.environ.get("WANDB_PROJECT") or "focalnet",
                entity=wcfg["entity"] or os.environ.get("WANDB_ENTITY"), name=wcfg["name"],
                tags=list(wcfg["tags"]), group=self.group, job_type=job_type,
                config={**cfg, "derived": derived, "provenance": {k: v for k, v in (prov or {}).items()
                                                                   if k != "config"}},
                dir=str(self.run_dir), id=self.wandb_id, resume="allow", mode=self.mode,
                settings=wandb.Settings(console="off", quiet=True, silent=True))

    def describe(self) -> str:
        """One line for the console: mode, run id, project/group/job type, where the files are."""
        if self.wandb is None:
            return "disabled (logger.wandb.mode)" if self.mode == "disabled" else "-"
        return (f"{self.mode} run {self.wandb_id} (project {self.wandb.project}, group {self.group}, "
                f"job_type {self.job_type}) in {self.run_dir / 'wandb'}")

    def log_images(self, images: dict[str, os.PathLike], step: int, captions: dict[str, str] | None = None) -> None:
        """PNG files already written to the run directory, as W&B images under the given keys."""
        if self.wandb is None:
            return
        import wandb

        captions = captions or {}
        self.wandb.log({k: wandb.Image(str(p), caption=captions.get(k)) for k, p in images.items()}, step=step)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
        self.enabled = False


def write_run_files(run_dir: Path, prov: dict) -> None:
    """``provenance.json`` and the resolved ``config.yaml`` in the run directory (rank 0)."""
    from omegaconf import OmegaConf

    (run_dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(prov["config"])))


def record_launch(run_dir: Path, prov: dict) -> Path:
    """Keep this launch's config and provenance in ``launches/<n>/``; the run directory's own ``config.yaml`` and
    ``provenance.json`` are the first launch's and are never overwritten. Returns the launch directory."""
    launches = run_dir / "launches"
    launches.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name) for p in launches.iterdir() if p.name.isdigit()), default=0)
    here = launches / f"{n:03d}"
    here.mkdir()
    write_run_files(here, prov)
    if not (run_dir / "config.yaml").exists():
        write_run_files(run_dir, prov)
    return here
