"""Load FocalNet weights from any of their formats, safely, with actionable errors.

Accepted inputs (a path or an already-loaded object):
- official microsoft/FocalNet ``.pth``: ``{"model": state_dict, ...}`` or a bare state dict;
- our run checkpoints: ``{"model": ..., "ema": ..., "optimizer": ...}`` (``key="model"`` or ``key="ema"``);
- timm FocalNet state dicts (``stem.*``, ``layers.{i+1}.downsample``, ``ls1.gamma``, 1x1-conv weights):
  detected and converted to the official names/shapes (``convert_timm_to_official``);
- the released isotropic checkpoint whose ``modulation.ln`` keys carry the OLD meaning (LayerNorm inside the
  modulation, blocks pre-LN; microsoft/FocalNet issue #23): detected, and the model's blocks are switched to
  that architecture before loading.

Files are always read with ``torch.load(..., weights_only=True)``: a pickle that would run code is refused.
The classifier head can be kept strict, re-initialized, or sliced from the 21842-way ImageNet-22K layout
(``timm.data.ImageNetInfo("imagenet22k_ms")``: indices 0..999 are ImageNet-1K in 1K order) to 1000 classes.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_checkpoint",
    "read_state_dict",
    "convert_official_to_timm",
    "convert_timm_to_official",
    "infer_focalnet_config",
]

HEAD_MODES = ("strict", "reinit", "slice_22k_to_1k", "auto")
IN22K_CLASSES, IN1K_CLASSES = 21842, 1000
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# Official Linear weights that timm stores as 1x1 convs (the head stays a Linear in both).
_LINEAR_AS_CONV = re.compile(r"\.(modulation\.(f|proj)|mlp\.fc[12])\.weight$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded; the message says why and what to do."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did. ``str(report)`` is a one-paragraph summary for logs."""

    source: str = "state_dict"
    key: str | None = None
    format: str = "official"  # official | timm
    head: str = "loaded"  # loaded | reinit | sliced 21842->1000 | absent
    notes: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.source}" + (f"[{self.key!r}]" if self.key else ""), f"format={self.format}",
                 f"head={self.head}"]  # fmt: skip
        parts += self.notes
        if self.missing_keys:
            parts.append(f"missing={len(self.missing_keys)}: {_preview(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"unexpected={len(self.unexpected_keys)}: {_preview(self.unexpected_keys)}")
        return "; ".join(parts)


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---- reading ------------------------------------------------------------------------------------------------


def read_state_dict(path_or_obj, key: str = "model") -> tuple[dict[str, torch.Tensor], str | None, str]:
    """Return ``(state_dict, key_used, source)`` from a path or a loaded object (weights_only=True)."""
    source = "state_dict"
    obj = path_or_obj
    if isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint file not found: {source}")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refusing to load {source}: it is not a plain tensor checkpoint (torch.load with "
                f"weights_only=True rejected it, so none of its code ran). Only load files you trust; "
                f"re-save trusted ones as a state dict. Detail: {str(e).splitlines()[0]}"
            ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")

    used = None
    if key in obj and isinstance(obj[key], Mapping):
        obj, used = obj[key], key
    elif not _is_state_dict(obj):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping) and _is_state_dict(v)]
        raise CheckpointError(
            f"{source}: no {key!r} entry and not a bare state dict; entries holding weights: {nested} "
            f"(pass key=... to choose one)"
        )
    if used == "ema" and "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]  # a saved EMA wrapper's own state dict
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd, used, source


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


# ---- format conversion ----------------------------------------------------------------------------------------


def is_timm_format(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("stem.") or k.startswith("head.fc.") or ".ls1.gamma" in k for k in sd)


def convert_official_to_timm(sd: Mapping[str, torch.Tensor], *, use_postln: bool | None = None) -> dict:
    """Official microsoft/FocalNet names/shapes -> timm ``FocalNet`` names/shapes.

    Official post-LN blocks reuse the names ``norm1``/``norm2``; timm calls them ``norm1_post``/``norm2_post``.
    The state dict alone does not say which, so pass ``use_postln`` (``model.arch["use_postln"]``). When
    omitted it is inferred: every official post-LN model uses conv-embed (L/XL/H); an isotropic model with
    layerscale is post-LN only in the later reading of base_iso (no ``modulation.ln``; the released one is pre-LN).
    """
    if use_postln is None:
        stem = sd.get("patch_embed.proj.weight")
        conv_embed = stem is not None and stem.shape[-1] == 7
        iso_ls = not any(".downsample." in k for k in sd) and any(k.endswith("gamma_1") for k in sd)
        use_postln = conv_embed or (iso_ls and not any(".modulation.ln." in k for k in sd))
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
        k = re.sub(r"^patch_embed\.", "stem.", k)
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        if use_postln:
            k = re.sub(r"\.norm([12])\.", r".norm\1_post.", k)
        k = k.replace(".modulation.ln.", ".modulation.norm.")
        k = re.sub(r"^head\.", "head.fc.", k)
        if _LINEAR_AS_CONV.search(k) and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    return out


def convert_timm_to_official(sd: Mapping[str, torch.Tensor]) -> dict:
    """timm ``FocalNet`` names/shapes -> official microsoft/FocalNet names/shapes (exact inverse)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k)
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"\.norm([12])_post\.", r".norm\1.", k)
        k = k.replace(".modulation.norm.", ".modulation.ln.")
        k = re.sub(r"^head\.fc\.", "head.", k)
        if _LINEAR_AS_CONV.search(k) and v.ndim == 4:
            v = v.flatten(1)
        out[k] = v
    return out


def infer_focalnet_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """Guess FocalNet constructor arguments from an official-format state dict (for error messages)."""
    stem = sd["patch_embed.proj.weight"]  # (C, 3, k, k)
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.") for k in sd):
        i = len(depths)
        depths.append(len({m.group(1) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))}))
    levels, windows = [], []
    for i in range(len(depths)):
        f = sd[f"layers.{i}.blocks.0.modulation.f.weight"]
        levels.append(f.shape[0] - 2 * f.shape[1] - 1)
        windows.append(sd[f"layers.{i}.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1])
    conv_embed = stem.shape[-1] == 7
    cfg = dict(
        embed_dim=stem.shape[0], depths=tuple(depths), focal_levels=tuple(levels), focal_windows=tuple(windows),
        patch_size=stem.shape[-1] if not conv_embed else 4, use_conv_embed=conv_embed,
        use_layerscale=any(k.endswith("gamma_1") for k in sd),
        use_postln_in_modulation=any(".modulation.ln." in k for k in sd),
    )  # fmt: skip
    if "head.weight" in sd:
        cfg["num_classes"] = sd["head.weight"].shape[0]
    return cfg


# ---- loading --------------------------------------------------------------------------------------------------


def _head_param_names(model: nn.Module) -> list[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _adopt_legacy_modulation_ln(model: nn.Module) -> int:
    """Switch blocks to the architecture the old ``modulation.ln`` checkpoints were trained with:
    pre-LN blocks with a LayerNorm inside the modulation (issue #23). Returns the number of blocks changed."""
    from focalnet.models.focalnet import FocalNetBlock

    n = 0
    for blk in model.modules():
        if isinstance(blk, FocalNetBlock) and not blk.modulation.use_postln_in_modulation:
            w = blk.norm1.weight
            blk.use_postln = False
            blk.modulation.use_postln_in_modulation = True
            blk.modulation.ln = nn.LayerNorm(blk.dim, device=w.device, dtype=w.dtype)
            n += 1
    if hasattr(model, "arch"):
        model.arch.update(use_postln=False, use_postln_in_modulation=True)
    return n


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict,
    *,
    key: str = "model",
    head: str = "strict",
    strict: bool = True,
) -> LoadReport:
    """Load weights into ``model`` (in place) and return a :class:`LoadReport`.

    Args:
        path_or_state_dict: a file path, a checkpoint dict, or a state dict.
        key: entry of a checkpoint dict to use (``"model"``, ``"ema"``); ignored for bare state dicts.
        head: ``"strict"`` (class counts must match), ``"reinit"`` (drop the checkpoint's head, fresh init),
            ``"slice_22k_to_1k"`` (take rows 0..999 of a 21842-way head), ``"auto"`` (match -> load,
            21842->1000 -> slice, otherwise reinit).
        strict: raise on missing/unexpected keys (after conversions); otherwise only report them.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    sd, used_key, source = read_state_dict(path_or_state_dict, key)
    report = LoadReport(source=source, key=used_key)
    own = model.state_dict()

    # 1. timm names/shapes -> official ones (our model uses the official layout).
    if is_timm_format(sd) and not is_timm_format(own):
        sd = convert_timm_to_official(sd)
        report.format = "timm"

    # 2. Old isotropic checkpoints: `modulation.ln` meant the LayerNorm inside the modulation while the model
    #    built with today's flags expects block post-LN and no modulation LayerNorm.
    ckpt_has_mod_ln = any(".modulation.ln." in k for k in sd)
    model_has_mod_ln = any(".modulation.ln." in k for k in own)
    if ckpt_has_mod_ln and not model_has_mod_ln and getattr(model, "arch", {}).get("use_postln"):
        n = _adopt_legacy_modulation_ln(model)
        report.notes.append(
            f"legacy isotropic checkpoint: modulation.ln = LayerNorm inside the modulation (microsoft/FocalNet "
            f"#23); switched {n} blocks to pre-LN + modulation LN"
        )
        own = model.state_dict()

    # 3. Models whose tables depend on the input size (DAT's position tables) fit them to this model, so a
    #    224 checkpoint loads into a 384 model.
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd)

    # 4. Classifier head.
    head_names = _head_param_names(model)
    ckpt_head = {k: v for k, v in sd.items() if k in ("head.weight", "head.bias") or k in head_names}
    model_w = own.get(head_names[0]) if head_names else None
    model_n = model_w.shape[0] if model_w is not None else 0
    ckpt_w = next((v for k, v in ckpt_head.items() if k.endswith("weight")), None)
    ckpt_n = ckpt_w.shape[0] if ckpt_w is not None else 0
    mode = head
    if not ckpt_head and model_n and mode != "reinit":
        # A headless file (e.g. timm's focalnet_huge_fl4.ms_in22k, published with num_classes=0): `auto` starts a
        # fresh head; asking to keep or slice one is an error that says so.
        if mode != "auto":
            raise CheckpointError(
                f"{source} has no classifier head (timm publishes focalnet_huge_fl4.ms_in22k without one), so "
                f"head={mode!r} has nothing to {'slice' if mode == 'slice_22k_to_1k' else 'keep'}: use "
                f"head='reinit' (trainer.init_head=reinit) for a fresh {model_n}-way head")
        mode = "reinit"
        report.notes.append("the checkpoint has no classifier head: a fresh one")
    if mode == "auto":
        if ckpt_n == model_n:
            mode = "strict"
        elif ckpt_n == IN22K_CLASSES and model_n == IN1K_CLASSES:
            mode = "slice_22k_to_1k"
        else:
            mode = "reinit"
    head_problem = None
    if not ckpt_head and mode != "reinit":
        report.head = "absent"
    elif mode == "strict":
        if ckpt_n != model_n:
            head_problem = (
                f"the checkpoint's head has {ckpt_n} classes, the model's {model_n}: pass head='reinit' to start "
                f"a fresh {model_n}-way head"
                + (", head='slice_22k_to_1k' to keep the ImageNet-1K rows" if ckpt_n == IN22K_CLASSES else "")
                + f", or build the model with num_classes={ckpt_n}"
            )
    elif mode == "slice_22k_to_1k":
        if ckpt_n != IN22K_CLASSES or model_n != IN1K_CLASSES:
            raise CheckpointError(
                f"head='slice_22k_to_1k' needs a {IN22K_CLASSES}-way checkpoint head and a {IN1K_CLASSES}-way "
                f"model head; got {ckpt_n} -> {model_n}"
            )
        # imagenet22k_ms layout: rows 0..999 are the ImageNet-1K classes in 1K order.
        for k in ckpt_head:
            sd[k] = sd[k][:IN1K_CLASSES]
        report.head = f"sliced {IN22K_CLASSES}->{IN1K_CLASSES}"
    elif mode == "reinit":
        for k in ckpt_head:
            del sd[k]
        head_mod = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head_mod, nn.Linear):
            nn.init.trunc_normal_(head_mod.weight, std=0.02)
            nn.init.zeros_(head_mod.bias)
        report.head = "reinit" if model_n else "absent"

    # 5. Compare keys and shapes before touching the model, so errors say everything at once.
    skip = set(head_names) if mode == "reinit" else set()
    report.missing_keys = [k for k in own if k not in sd and k not in skip]
    report.unexpected_keys = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape and k not in ckpt_head
    ]
    if head_problem or mismatched or (strict and (report.missing_keys or report.unexpected_keys)):
        raise CheckpointError(_mismatch_message(model, sd, report, mismatched, source, head_problem))

    model.load_state_dict(sd, strict=False)
    return report


def _mismatch_message(model, sd, report: LoadReport, mismatched: list[str], source: str, head_problem) -> str:
    lines = [f"cannot load {source} into {type(model).__name__} ({report.format} format):"]
    if head_problem:
        lines.append(f"  {head_problem}")
    if report.missing_keys:
        lines.append(f"  missing keys ({len(report.missing_keys)}): {_preview(report.missing_keys)}")
    if report.unexpected_keys:
        lines.append(f"  unexpected keys ({len(report.unexpected_keys)}): {_preview(report.unexpected_keys)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_preview(mismatched, 5)}")
    if "patch_embed.proj.weight" in sd and hasattr(model, "arch"):
        try:
            cfg = infer_focalnet_config(sd)
        except KeyError:
            cfg = None
        if cfg:
            diff = {k: v for k, v in cfg.items() if k in model.arch and model.arch[k] != v}
            if diff:
                lines.append(f"  the checkpoint looks like a FocalNet with {diff}; the model has "
                             f"{ {k: model.arch[k] for k in diff} }. Build it with matching create_model "
                             f"overrides (or the matching variant).")  # fmt: skip
    if not mismatched and not head_problem:
        lines.append("  (strict=False loads what matches and reports the rest.)")
    return "\n".join(lines)
