"""Training-config validation (before any work) and the one place that derives values from the config.

Hydra already rejects command-line overrides of keys that do not exist (the composed config is in struct
mode). This module also catches what Hydra cannot: unknown keys that came in through a yaml file (e.g. an
experiment preset with a typo), wrong types and out-of-range values. Every error names the full key and
what is allowed, e.g. ``trainer.amp='fp8' is not allowed; choose one of: bf16, fp16, none``.

The ``data`` group is validated for its common keys only: each data pipeline (folder, FFCV, synthetic...)
owns and checks its format-specific keys.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from focalnet.models.sources import check_source

Check = Callable[[Any], str | None]  # returns a description of what is allowed when the value is wrong


class ConfigError(ValueError):
    """A configuration problem, detected before any work starts."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(lo: int | None = None) -> Check:
    def check(v):
        if not _is_int(v) or (lo is not None and v < lo):
            return f"an integer >= {lo}" if lo is not None else "an integer"
        return None
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    def check(v):
        bad = not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
        if bad:
            rng = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
            return "a number " + " and ".join(r for r in rng if r)
        return None
    return check


def choice(*values) -> Check:
    def check(v):
        return None if v in values else "one of: " + ", ".join(str(x) for x in values)
    return check


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def string(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def weight_source(v):
    return None if (isinstance(v, str) and v) or isinstance(v, bool) else "a weight SOURCE (path, hf-hub:..., URL, true, tag)"


def optional(inner: Check) -> Check:
    def check(v):
        if v is None:
            return None
        msg = inner(v)
        return f"null or {msg}" if msg else None
    return check


def list_of(inner: Check, length: int | None = None) -> Check:
    def check(v):
        if not isinstance(v, list | tuple) or (length is not None and len(v) != length) or any(inner(x) for x in v):
            n = f"{length} " if length is not None else ""
            return f"a list of {n}values, each {inner(object())}"
        return None
    return check


def mapping(v):
    return None if isinstance(v, Mapping) else "a mapping"


_NONNEG = number(0)
_PROB = number(0, 1)

# Key -> check. A nested dict is a sub-group. Groups listed in OPEN_GROUPS may carry extra keys.
SCHEMA: dict[str, Any] = {
    "model": {
        "name": string, "library": choice("focalnet", "timm"), "num_classes": integer(1),
        "drop_path_rate": number(0, 1), "grad_checkpointing": boolean, "kwargs": mapping,
        "pretrained": optional(weight_source),
    },
    "data": {
        "name": string, "root": optional(string), "num_classes": integer(1), "img_size": integer(1),
        "batch_size": integer(1), "num_workers": integer(0),
    },
    "optimizer": {
        "name": choice("adamw", "sgd"), "lr": number(0, lo_open=True), "weight_decay": _NONNEG,
        "betas": list_of(number(0, 1), 2), "eps": number(0, lo_open=True), "momentum": number(0, 1),
        "nesterov": boolean, "official_no_weight_decay": boolean,
    },
    "schedule": {
        "name": choice("cosine", "step", "constant"), "warmup_epochs": _NONNEG, "warmup_lr": _NONNEG,
        "min_lr": _NONNEG, "decay_epochs": number(0, lo_open=True), "decay_rate": number(0, lo_open=True),
        "warmup_prefix": boolean,
    },
    "aug": {
        "auto_augment": optional(string), "color_jitter": optional(_NONNEG), "reprob": _PROB,
        "remode": choice("pixel", "const", "rand"), "recount": integer(1),
        "interpolation": choice("bicubic", "bilinear", "nearest", "random"), "hflip": _PROB,
        "scale": optional(list_of(number(0, 1, lo_open=True), 2)), "ratio": list_of(number(0, lo_open=True), 2),
        "mixup": _NONNEG, "cutmix": _NONNEG, "cutmix_minmax": optional(list_of(_PROB, 2)),
        "mixup_prob": _PROB, "mixup_switch_prob": _PROB, "mixup_mode": choice("batch", "pair", "elem"),
        "label_smoothing": number(0, 1), "test_crop": boolean,
    },
    "trainer": {
        "epochs": integer(0), "max_steps": optional(integer(1)), "amp": choice("bf16", "fp16", "none"),
        "accum_steps": integer(1), "clip_grad": optional(number(0, lo_open=True)),
        "ema_decay": optional(number(0, 1, lo_open=True)), "compile": boolean, "channels_last": boolean,
        "grad_checkpointing": boolean, "resume": optional(string), "init_from": optional(weight_source),
        "init_head": choice("auto", "keep", "reinit", "slice_22k_to_1k"), "ckpt_every_steps": optional(integer(1)),
        "save_epoch_ckpts": boolean, "eval_every": integer(0), "log_every": integer(1),
        "device": choice("auto", "cpu", "cuda"), "seed": integer(0),
        "resume_allow_changes": list_of(string), "max_nonfinite_updates": integer(1),
        "check_every_s": number(0), "async_save": boolean, "ddp_static_graph": choice("auto", True, False),
    },
    "logger": {
        "wandb": {
            "mode": choice("auto", "online", "offline", "disabled"), "project": optional(string),
            "entity": optional(string), "name": optional(string), "tags": list_of(string),
            "group": optional(string), "log_checkpoints": choice(False, "best", "last", "all"),
        },
        "pictures": {"inputs": boolean, "modulation_every": integer(0), "modulation_images": integer(1)},
    },
    "paths": {"output_root": string, "output_dir": string},
}
OPEN_GROUPS = {"data"}
OPTIONAL_KEYS = {"optimizer.nesterov", "model.pretrained"}


def _walk(schema: Mapping, cfg: Mapping, prefix: str, errors: list[str]) -> None:
    open_group = prefix.rstrip(".") in OPEN_GROUPS
    for key in cfg:
        if key not in schema and not open_group:
            known = ", ".join(sorted(schema))
            errors.append(f"unknown key {prefix}{key}; known keys in {prefix.rstrip('.') or 'the root'}: {known}")
    for key, check in schema.items():
        full = prefix + key
        if key not in cfg:
            if full not in OPTIONAL_KEYS:
                errors.append(f"missing key {full}")
            continue
        value = cfg[key]
        if isinstance(check, Mapping):
            if not isinstance(value, Mapping):
                errors.append(f"{full} must be a group (mapping), got {value!r}")
            else:
                _walk(check, value, full + ".", errors)
            continue
        allowed = check(value)
        if allowed:
            errors.append(f"{full}={value!r} is not allowed; it must be {allowed}")


def schema_errors(schema: Mapping, cfg: Mapping) -> list[str]:
    """Every unknown key, missing key and disallowed value of ``cfg`` against ``schema`` (key -> check)."""
    errors: list[str] = []
    _walk(schema, cfg, "", errors)
    return errors


def non_finite_numbers(cfg: Mapping, prefix: str = "") -> list[str]:
    """One error per NaN/inf number anywhere in the config (every group, open ones and lists included): no
    numeric setting means anything as NaN or infinity (``trainer.clip_grad=nan`` would write NaN weights)."""
    errors = []
    items = cfg.items() if isinstance(cfg, Mapping) else enumerate(cfg)
    for key, value in items:
        full = f"{prefix}{key}" if isinstance(cfg, Mapping) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, Mapping | list | tuple):
            errors += non_finite_numbers(value, full + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{full}={value} is not allowed; it must be a finite number")
    return errors


def validate_config(cfg: DictConfig | Mapping) -> dict:
    """Check the composed training config; return it as a resolved plain dict or raise ConfigError."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    errors: list[str] = non_finite_numbers(plain)
    if errors:  # reported alone: a NaN also fails every range check below
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    errors = schema_errors(SCHEMA, plain)
    if not errors:
        errors += _cross_checks(plain)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return plain


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
    if t["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
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
