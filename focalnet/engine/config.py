"""Config validation (before any work) and the one place that derives values from the config.

Hydra rejects command-line overrides of keys that do not exist (the composed config is in struct mode). The
schema (:mod:`focalnet.schema`) catches the rest: unknown keys that came in through a yaml file (e.g. a preset
with a typo), wrong types, out-of-range values, NaN/inf; the cross-checks below catch values that cannot work
together or point nowhere. Every error names the full key and what is allowed, one line each, e.g.
``trainer.amp='fp8' is not allowed; it must be one of: bf16, fp16, none``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from focalnet.models.sources import check_source
from focalnet.schema import ConfigError, EvalConfig, TrainConfig, check

__all__ = ["ConfigError", "validate_config", "validate_eval_config", "scaled_lrs"]


def _resolved(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _raise(errors: list[str], what: str) -> None:
    if errors:
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(errors))


def validate_config(cfg: DictConfig | Mapping) -> dict:
    """Check the composed training config; return it as a resolved plain dict or raise ConfigError."""
    plain = _resolved(cfg)
    _raise(check(TrainConfig, plain), "config")
    _raise(_cross_checks(plain), "config")
    return plain


def validate_eval_config(cfg: DictConfig | Mapping) -> dict:
    """Check eval.py's composed config; return it as a resolved plain dict or raise ConfigError."""
    plain = _resolved(cfg)
    _raise(check(EvalConfig, plain), "eval config")
    _raise(_device_checks(plain["trainer"]) + _eval_cross_checks(plain), "eval config")
    return plain


def _device_checks(t: Mapping) -> list[str]:
    if t["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            return ["trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu"]
    return []


def _cross_checks(c: dict) -> list[str]:
    errors = []
    t, aug = c["trainer"], c["aug"]
    if c["model"]["num_classes"] != c["data"]["num_classes"]:
        errors.append(f"model.num_classes={c['model']['num_classes']} differs from "
                      f"data.num_classes={c['data']['num_classes']}")
    if (aug["mixup"] > 0 or aug["cutmix"] > 0) and aug["mixup_prob"] > 0 and c["data"]["batch_size"] % 2:
        errors.append(f"data.batch_size={c['data']['batch_size']} must be even when aug.mixup/aug.cutmix > 0")
    if t["epochs"] == 0 and t["max_steps"] is None:
        errors.append("trainer.epochs=0 trains nothing; set trainer.epochs >= 1 or trainer.max_steps")
    if t["ddp_static_graph"] is True and t["accum_steps"] > 1:
        errors.append("trainer.ddp_static_graph=true with trainer.accum_steps > 1: DDP fails with static_graph under "
                      "gradient accumulation in torch <= 2.14 (pytorch/pytorch PR #187732); set ddp_static_graph=auto")
    errors += _device_checks(t)
    if t["resume"] not in (None, "auto") and not os.path.isfile(t["resume"]):
        errors.append(f"trainer.resume={t['resume']!r}: no such file (use auto, null or a checkpoint path)")
    model, library = c["model"], c["model"]["library"]
    pretrained = model.get("pretrained")
    for key, source in (("trainer.init_from", t["init_from"]), ("model.pretrained", pretrained)):
        if key == "model.pretrained" and library == "timm":
            continue  # timm resolves its own weights (tags, hf-hub ids, files)
        problem = check_source(source, model["name"])
        if problem:
            errors.append(f"{key}={source!r}: {problem}")
    if t["init_from"] is not None and pretrained not in (None, False):
        errors.append(f"trainer.init_from={t['init_from']!r} and model.pretrained={pretrained!r}: set one of them "
                      f"(both start the run from pretrained weights)")
    m = c["model"]
    if c["logger"]["pictures"]["modulation_every"] and (m["library"] != "focalnet" or m["name"].startswith("dat")):
        errors.append(f"logger.pictures.modulation_every={c['logger']['pictures']['modulation_every']}: "
                      f"model {m['name']} has no focal modulation to draw; set it to 0")
    return errors


def _eval_cross_checks(c: dict) -> list[str]:
    errors = []
    ckpt = c["checkpoint"]
    problem = check_source(ckpt, c["model"]["name"] if c.get("model") else None) if ckpt is not None else None
    if problem:
        errors.append(f"checkpoint={ckpt!r}: {problem}")
    if c["mode"] == "accuracy" and ckpt is None:
        errors.append("checkpoint is not set: pass checkpoint=SOURCE (our .pt, an official .pth, a timm or "
                      "transformers file or directory, hf-hub:ORG/REPO, a URL, or true with model=NAME)")
    if c["real_labels"] is not None and not Path(c["real_labels"]).is_file():
        errors.append(f"real_labels={c['real_labels']!r}: no such file")
    if c["mode"] == "throughput" and ckpt is None and c.get("model") is None:
        errors.append("mode=throughput needs model=NAME (or checkpoint=PATH to take the model from)")
    return errors


def scaled_lrs(cfg: Mapping, world_size: int) -> dict[str, float]:
    """The linear scaling rule: every LR in the config is per 512 images; scale by the total batch.

    ``total_batch = data.batch_size * world_size * trainer.accum_steps`` (as the official main.py does).
    """
    total_batch = cfg["data"]["batch_size"] * world_size * cfg["trainer"]["accum_steps"]
    factor = total_batch / 512.0
    return {
        "total_batch": total_batch,
        "lr": cfg["optimizer"]["lr"] * factor,
        "warmup_lr": cfg["schedule"]["warmup_lr"] * factor,
        "min_lr": cfg["schedule"]["min_lr"] * factor,
    }
