"""Write one of our models' weights in each ecosystem's format, so a trained model can be published.

- ``official``: a microsoft/FocalNet ``.pth`` (``{"model": state_dict}``, the official names); DAT likewise.
- ``timm``: a directory in timm's hub layout (``config.json`` + ``model.safetensors``), written by timm's own
  ``save_for_hf`` from a ``timm.create_model(<variant>)`` that loaded the converted weights strictly; it loads
  with ``timm.create_model("local-dir:DIR", pretrained=True)`` (``hf-hub:ORG/REPO`` once uploaded).
- ``transformers``: a directory in transformers' layout (``config.json`` for ``FocalNetForImageClassification``
  + ``model.safetensors``); it loads with ``FocalNetForImageClassification.from_pretrained(DIR)``, no transformers
  needed to write it.

Every file is written into a temporary sibling and renamed into place; an existing output is never replaced
unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from focalnet.models.checkpoint import (
    CheckpointError,
    convert_official_to_timm,
    convert_official_to_transformers,
    model_name,
    transformers_config,
)

FORMATS = ("official", "timm", "transformers")


def export_weights(model: nn.Module, to: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model``'s weights in format ``to`` at ``out`` (a file for official, a directory otherwise)."""
    if to not in FORMATS:
        raise ValueError(f"to={to!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; choose another output or pass overwrite (--force)")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = getattr(model, "arch", None)
    if to != "official" and arch is None:
        raise CheckpointError(f"{type(model).__name__} exists in no other ecosystem: export it with --to official")
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        if to == "official":
            torch.save({"model": sd}, tmp)
        elif to == "timm":
            _write_timm(model, arch, sd, tmp)
        else:
            _write_transformers(arch, sd, model.num_classes, tmp)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    return out


def _write_timm(model: nn.Module, arch: dict, sd: dict, directory: Path) -> None:
    import timm
    from timm.models import save_for_hf

    name = model_name(model)
    if name is None or not name.startswith("focalnet_") or not timm.is_model(name):
        raise CheckpointError(f"timm registers no {name or 'such FocalNet'} (timm has the tiny/small/base srf/lrf and "
                              f"large/xlarge/huge fl3/fl4 FocalNets); export it with --to official or transformers")
    # timm's registration fixes everything else; normalize_modulator (the official large_fl4 setting) it omits.
    model_args = {"normalize_modulator": True} if arch["normalize_modulator"] else None
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, num_classes=model.num_classes, **(model_args or {}))
    try:
        theirs.load_state_dict(convert_official_to_timm(sd, use_postln=arch["use_postln"]), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"these weights do not fit timm's {name} (changed architecture flags?): "
                              f"{str(e).splitlines()[0]}") from None
    save_for_hf(theirs, str(directory), model_args=model_args, safe_serialization=True)


def _write_transformers(arch: dict, sd: dict, num_classes: int, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file(convert_official_to_transformers(sd), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(transformers_config(arch, num_classes), indent=2) + "\n")
