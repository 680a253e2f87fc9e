"""Checkpoint files: atomic writes, RNG capture/restore for every rank, and resume-path lookup.

A training checkpoint is a plain dict, loadable with ``torch.load(..., weights_only=True)`` (no pickled
objects: RNG states are stored as tensors and lists)::

    model        state dict with official FocalNet names (unwrapped from DDP / torch.compile)
    optimizer    optimizer.state_dict()
    scaler       GradScaler state ({} unless fp16)
    ema          EMA weights (official names) or None
    scheduler    timm scheduler state
    step         optimizer updates done
    epoch        the epoch to continue in
    batch_in_epoch  micro-batches of ``epoch`` already consumed (0 at an epoch boundary)
    rng          one entry per rank: python/numpy/torch(/cuda) generator states
    config       the resolved config (plain dict)
    best_metric  best validation top-1 so far (or None)
    wandb_id     the W&B run id, so a resumed run continues the same W&B run
    world_size   number of ranks that wrote ``rng``
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under ``torch.compile`` and DDP wrappers (its state dict has the official names)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write via a temporary file + fsync + rename: a crash leaves either the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Persist the rename itself (the directory entry), so the new file survives a power loss.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold the bytes of ``src`` atomically: a hard link (instant, no extra disk) when the file
    system allows it, else a copy. ``src`` is later replaced by rename, never rewritten, so the link stays valid."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_file(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng() -> dict:
    """This process's generator states, as tensors/lists only (safe for ``weights_only`` loading)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def resume_path(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``auto`` -> ``<run_dir>/checkpoints/last.pt`` if it exists; a path -> that file; null -> None."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such checkpoint file")
    return path
