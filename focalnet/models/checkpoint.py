"""Load FocalNet weights from any of their formats, safely, with actionable errors.

Accepted inputs: a SOURCE (``focalnet.models.sources``: a file, a directory in transformers/timm hub layout,
``hf-hub:ORG/REPO[@REV]``, a URL, ``true``/a tag), or an already-loaded object. What it holds:
- official microsoft/FocalNet ``.pth``: ``{"model": state_dict, ...}`` or a bare state dict;
- our run checkpoints: ``{"model": ..., "ema": ..., "optimizer": ...}`` (``key="model"`` or ``key="ema"``);
- timm FocalNet state dicts (``stem.*``, ``layers.{i+1}.downsample``, ``ls1.gamma``, 1x1-conv weights):
  detected and converted to the official names/shapes (``convert_timm_to_official``);
- transformers ``FocalNetForImageClassification`` state dicts (``focalnet.embeddings.*``,
  ``focalnet.encoder.stages.i.layers.j.modulation.projection_in``, ``classifier``): converted
  (``convert_transformers_to_official``); their ``config.json`` must describe the model being loaded;
- the released isotropic checkpoint whose ``modulation.ln`` keys carry the OLD meaning (LayerNorm inside the
  modulation, blocks pre-LN; microsoft/FocalNet issue #23): detected, and the model's blocks are switched to
  that architecture before loading.

Files are read with safetensors or ``torch.load(..., weights_only=True)``: a pickle that would run code is refused.
The classifier head can be kept strict, re-initialized, or sliced from the 21842-way ImageNet-22K layout
(``timm.data.ImageNetInfo("imagenet22k_ms")``: indices 0..999 are ImageNet-1K in 1K order) to 1000 classes.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from focalnet.models.focalnet import FocalNetBlock
from focalnet.models.sources import CheckpointError, resolve

__all__ = [
    "CheckpointError",
    "LoadReport",
    "Weights",
    "load_checkpoint",
    "read_weights",
    "convert_official_to_timm",
    "convert_timm_to_official",
    "convert_official_to_transformers",
    "convert_transformers_to_official",
    "detect_focalnet_variant",
    "infer_focalnet_config",
    "transformers_config_arch",
]

HEAD_MODES = ("strict", "reinit", "slice_22k_to_1k", "auto")
IN22K_CLASSES, IN1K_CLASSES = 21842, 1000
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# Official Linear weights that timm stores as 1x1 convs (the head stays a Linear in both).
_LINEAR_AS_CONV = re.compile(r"\.(modulation\.(f|proj)|mlp\.fc[12])\.weight$")


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did. ``str(report)`` is a one-paragraph summary for logs."""

    source: str = "state_dict"
    key: str | None = None
    format: str = "official"  # official | timm | transformers
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


@dataclass
class Weights:
    """A state dict as a SOURCE holds it (names of its ``format``), with what came along with it."""

    state_dict: dict[str, torch.Tensor]
    format: str = "official"  # official | timm | transformers
    source: str = "state_dict"
    key: str | None = None  # the entry of a checkpoint dict that was used ("model", "ema", ...)
    has_ema: bool = False
    train_config: dict | None = None  # the resolved config our run checkpoints store
    hub_config: dict | None = None  # config.json beside hub-layout weights (transformers or timm)

    def official(self) -> dict[str, torch.Tensor]:
        """The state dict under the official microsoft/FocalNet names and shapes."""
        if self.format == "timm":
            return convert_timm_to_official(self.state_dict)
        if self.format == "transformers":
            return convert_transformers_to_official(self.state_dict)
        return self.state_dict

    @property
    def arch(self) -> dict | None:
        """FocalNet constructor flags a transformers ``config.json`` states (None without one)."""
        if self.hub_config is not None and self.hub_config.get("model_type"):
            return transformers_config_arch(self.hub_config, self.source)
        return None


def _load_file(path: Path, torch_load=None):
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if torch_load is not None:
        return torch_load(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (torch.load with "
            f"weights_only=True rejected it, so none of its code ran). Only load files you trust; "
            f"re-save trusted ones as a state dict. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).strip().splitlines()[0]})") from None


def read_weights(source, key: str = "model", *, variant: str | None = None, torch_load=None) -> Weights:
    """Read a SOURCE (or an already-loaded dict) into :class:`Weights`; nothing is converted yet.

    ``key``: the entry of a checkpoint dict to use: ``"model"``, ``"ema"`` (our EMA weights; an error if absent),
    or ``"auto"`` (``model``, else the one entry holding weights, else a bare state dict). Bare state dicts
    (official, timm, transformers files) are used as they are. ``variant`` gives meaning to ``true``/tags.
    ``torch_load(path)`` reads torch files instead of ``torch.load(weights_only=True)`` (the engine passes its
    checksum-verifying ``load_file``).
    """
    hub_config = None
    if isinstance(source, Mapping):
        obj, label = source, "state_dict"
    else:
        found = resolve(source, variant=variant)
        obj, label, hub_config = _load_file(found.weights, torch_load), found.source, found.config
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: expected a dict, got {type(obj).__name__}")

    top = obj
    has_ema = isinstance(obj.get("ema"), Mapping)
    if key == "ema" and not has_ema:
        raise CheckpointError(f"weights=ema but {label} has no EMA weights (trained with trainer.ema_decay=null, or "
                              f"not one of our checkpoints); use weights=model")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and _is_state_dict(v)]
    if key == "auto":
        key = "model" if "model" in obj else (nested[0] if len(nested) == 1 else "model")
    used = None
    if isinstance(obj.get(key), Mapping):
        obj, used = obj[key], key
        if used == "ema" and isinstance(obj.get("module"), Mapping):
            obj = obj["module"]  # a saved EMA wrapper's own state dict
    elif key in obj:
        raise CheckpointError(f"{label}: its {key!r} entry holds no weights")
    elif not _is_state_dict(obj):
        raise CheckpointError(f"{label}: no {key!r} entry and not a bare state dict; entries holding weights: "
                              f"{nested} (pass key=... to choose one)")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{label}: holds no tensors")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    train_config = top.get("config") if isinstance(top.get("config"), Mapping) else None
    return Weights(sd, detect_format(sd), label, used, has_ema, train_config, hub_config)


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


# transformers' FocalNetForImageClassification names (transformers models/focalnet/modeling_focalnet.py; the same
# mapping as its convert_focalnet_to_hf_format.py): the official tensors under other names, same shapes.
# The inner names, official <-> transformers, as plain text ("^": at the start, "{i}": a stage index); the model's
# own prefix is `focalnet.`.
_TRANSFORMERS_PAIRS = [
    ("^patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("^patch_embed.norm.", "embeddings.norm."),
    ("^layers.{i}.blocks.", "encoder.stages.{i}.layers."),
    ("^layers.{i}.downsample.proj.", "encoder.stages.{i}.downsample.projection."),
    ("^layers.{i}.downsample.norm.", "encoder.stages.{i}.downsample.norm."),
    (".modulation.f.", ".modulation.projection_in."),
    (".modulation.h.", ".modulation.projection_context."),
    (".modulation.proj.", ".modulation.projection_out."),
    (".modulation.ln.", ".modulation.layernorm."),
    ("^norm.", "layernorm."),
]


def _rename_rules(pairs, backward: bool = False) -> list[tuple[str, str]]:
    """(regex, replacement) pairs that rename the left names of ``pairs`` to the right ones (or back)."""
    rules = []
    for official, transformers in pairs:
        anchor = "^" if official.startswith("^") else ""
        src, dst = (transformers, official[len(anchor):]) if backward else (official[len(anchor):], transformers)
        rules.append((anchor + re.escape(src).replace(re.escape("{i}"), r"(\d+)"), dst.replace("{i}", r"\1")))
    return rules


_TRANSFORMERS_NAMES = _rename_rules(_TRANSFORMERS_PAIRS)
_TRANSFORMERS_BACK = _rename_rules(_TRANSFORMERS_PAIRS, backward=True)


def is_transformers_format(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("focalnet.embeddings.", "classifier.", "embeddings.patch_embeddings.")) for k in sd)


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """``transformers``, ``timm`` or ``official`` (our run checkpoints use the official names)."""
    if is_transformers_format(sd):
        return "transformers"
    return "timm" if is_timm_format(sd) else "official"


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert_official_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict:
    """Official names -> ``FocalNetForImageClassification`` names (``head`` -> ``classifier``)."""
    return {(f"classifier.{k[5:]}" if k.startswith("head.") else "focalnet." + _rename(k, _TRANSFORMERS_NAMES)): v
            for k, v in sd.items()}


def convert_transformers_to_official(sd: Mapping[str, torch.Tensor]) -> dict:
    """``FocalNetForImageClassification`` (or bare ``FocalNetModel``) names -> official names (exact inverse)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k[len("classifier."):]] = v
        else:
            out[_rename(k.removeprefix("focalnet."), _TRANSFORMERS_BACK)] = v
    return out


# FocalNetConfig's defaults (transformers models/focalnet/configuration_focalnet.py): save_pretrained writes only
# the values that differ from them.
_HF_DEFAULTS = dict(embed_dim=96, depths=[2, 2, 6, 2], focal_levels=[2, 2, 2, 2], focal_windows=[3, 3, 3, 3],
                    patch_size=4, use_conv_embed=False, use_layerscale=False, use_post_layernorm=False,
                    use_post_layernorm_in_modulation=False, normalize_modulator=False, mlp_ratio=4.0,
                    hidden_act="gelu", layer_norm_eps=1e-5, num_channels=3)  # fmt: skip
# Our FocalNet constructor flags <- FocalNetConfig fields.
_ARCH_FROM_HF = dict(patch_size="patch_size", embed_dim="embed_dim", depths="depths", focal_levels="focal_levels",
                     focal_windows="focal_windows", use_conv_embed="use_conv_embed", use_layerscale="use_layerscale",
                     use_postln="use_post_layernorm", use_postln_in_modulation="use_post_layernorm_in_modulation",
                     normalize_modulator="normalize_modulator")  # fmt: skip


def transformers_config_arch(config: Mapping, source: str = "config.json") -> dict:
    """Our FocalNet constructor flags from a transformers FocalNet ``config.json`` (an error if it is none)."""
    if config.get("model_type") != "focalnet":
        raise CheckpointError(f"{source}: config.json has model_type={config.get('model_type')!r}, not a FocalNet")
    c = {**_HF_DEFAULTS, **config}
    fixed = {k: c[k] for k in ("mlp_ratio", "hidden_act", "layer_norm_eps", "num_channels")}
    if fixed != {k: _HF_DEFAULTS[k] for k in fixed}:
        raise CheckpointError(f"{source}: config.json sets {fixed}; FocalNets here use mlp_ratio 4, exact GELU, "
                              f"LayerNorm eps 1e-5 and 3 input channels")
    arch = {ours: c[theirs] for ours, theirs in _ARCH_FROM_HF.items()}
    for k in ("depths", "focal_levels", "focal_windows"):
        arch[k] = tuple(arch[k])
    if isinstance(arch["patch_size"], list | tuple):
        arch["patch_size"] = arch["patch_size"][0]
    return arch


def transformers_config(arch: Mapping, num_classes: int) -> dict:
    """A transformers ``FocalNetConfig`` (as the JSON ``save_pretrained`` writes) for one of our FocalNets."""
    n = len(arch["depths"])
    config = {"architectures": ["FocalNetForImageClassification"], "model_type": "focalnet",
              **{theirs: arch[ours] for ours, theirs in _ARCH_FROM_HF.items()},
              "layerscale_value": 1e-4, "mlp_ratio": 4.0, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
              "num_channels": 3, "image_size": 224, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
              "hidden_sizes": [arch["embed_dim"] * 2 ** min(i + 1, n - 1) for i in range(n)]}  # fmt: skip
    for k in ("depths", "focal_levels", "focal_windows"):
        config[k] = list(config[k])
    labels = _label_names(num_classes)
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    return config


def _label_names(num_classes: int) -> list[str]:
    """ImageNet-1K / FocalNet's ImageNet-22K class names (timm ships both) or LABEL_i, unique as label2id needs."""
    layout = {IN1K_CLASSES: "imagenet-1k", IN22K_CLASSES: "imagenet22k_ms"}.get(num_classes)
    if layout is None:
        return [f"LABEL_{i}" for i in range(num_classes)]
    from timm.data import ImageNetInfo

    info = ImageNetInfo(layout)
    names = [info.index_to_description(i) for i in range(num_classes)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # a few ImageNet descriptions repeat (e.g. "crane"): add the synset id
        if n in seen:
            names[i] = f"{n} ({info.index_to_label_name(i)})"
        seen[names[i]] = i
    return names


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


@functools.lru_cache(maxsize=1)
def _variant_signatures() -> dict[str, tuple[dict[str, tuple], str]]:
    """name -> (parameter shapes without the head, arch as JSON) of every registered FocalNet (meta device)."""
    from focalnet.models.registry import create_model, list_models

    out = {}
    with torch.device("meta"):
        for name in list_models("focalnet_*"):
            m = create_model(name)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith("head.")}
            out[name] = (shapes, json.dumps(m.arch, sort_keys=True, default=str))
    return out


def detect_focalnet_variant(sd: Mapping[str, torch.Tensor], arch: Mapping | None = None) -> str:
    """The registered FocalNet whose parameter names and shapes (head aside) equal an official-layout state dict.

    With ``arch`` (flags a transformers config.json states), a variant with exactly those flags is preferred.
    The released isotropic checkpoints with the old ``modulation.ln`` meaning are matched with those keys
    ignored (``load_checkpoint`` adapts the blocks). Variants are built once per process, on the meta device.
    """
    def strip(shapes: Mapping[str, tuple], drop_mod_ln: bool) -> dict:
        return {k: v for k, v in shapes.items() if not (drop_mod_ln and ".modulation.ln." in k)}

    signatures = _variant_signatures()
    mine = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("head.")}
    for drop in (False, True):
        want = strip(mine, drop)
        found = [n for n, (shapes, _) in signatures.items() if strip(shapes, drop) == want]
        if arch is not None:
            exact = [n for n in found if json.loads(signatures[n][1]) == json.loads(json.dumps(dict(arch), default=str))]
            found = exact or found
        if found:
            if len({signatures[n][1] for n in found}) > 1:
                raise CheckpointError(f"the weights fit several FocalNet variants with different behaviour ({found});"
                                      f" pass model=NAME")
            return min(found, key=len)  # aliases (focalnet_tiny = focalnet_tiny_lrf): the shortest name
    raise CheckpointError("the weights match no registered FocalNet variant; pass model=NAME (and model.kwargs for "
                          "non-default architecture options)")


@functools.cache
def variant_arch(name: str) -> dict:
    """The architecture flags of a registered FocalNet variant (built on the meta device)."""
    from focalnet.models.registry import create_model

    with torch.device("meta"):
        return dict(create_model(name).arch)


def model_config_for(weights: Weights, model_cfg: Mapping | None = None) -> tuple[dict, str]:
    """The ``model`` config group that fits ``weights``, and how it was chosen: ``model_cfg`` when given, else
    the config our run checkpoints store, else the registered FocalNet with these parameter names and shapes
    (flags a transformers config.json states become ``kwargs``; the class count is the head's rows)."""
    if model_cfg is not None:
        return dict(model_cfg), "model=" + model_cfg["name"]
    stored = weights.train_config
    if stored is not None and isinstance(stored.get("model"), Mapping):
        return dict(stored["model"]), "checkpoint config"
    sd, arch = weights.official(), weights.arch
    name = detect_focalnet_variant(sd, arch)
    kwargs = {k: v for k, v in (arch or {}).items() if v != variant_arch(name)[k]}
    head = sd.get("head.weight")
    cfg = {"name": name, "library": "focalnet", "drop_path_rate": 0.0, "kwargs": kwargs,
           "num_classes": head.shape[0] if head is not None else 0}
    return cfg, "detected from the weights" + (" and config.json" if arch else "")


# ---- loading --------------------------------------------------------------------------------------------------


def auto_head(ckpt_classes: int, model_classes: int) -> str:
    """What ``head="auto"`` does with a ``ckpt_classes``-way head in a ``model_classes``-way model: ``strict`` when
    the counts match, ``slice_22k_to_1k`` for 21842 -> 1000 (imagenet22k_ms layout), ``reinit`` otherwise."""
    if ckpt_classes == model_classes:
        return "strict"
    if ckpt_classes == IN22K_CLASSES and model_classes == IN1K_CLASSES:
        return "slice_22k_to_1k"
    return "reinit"


def _head_param_names(model: nn.Module) -> list[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _adopt_legacy_modulation_ln(model: nn.Module) -> int:
    """Switch blocks to the architecture the old ``modulation.ln`` checkpoints were trained with:
    pre-LN blocks with a LayerNorm inside the modulation (issue #23). Returns the number of blocks changed."""
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
    source,
    *,
    key: str = "model",
    head: str = "strict",
    strict: bool = True,
) -> LoadReport:
    """Load weights into ``model`` (in place) and return a :class:`LoadReport`.

    Args:
        source: a SOURCE (``focalnet.models.sources``: file, directory, ``hf-hub:...``, URL, ``true``/tag for
            the model's published weights), a checkpoint dict, a state dict, or :class:`Weights`.
        key: entry of a checkpoint dict to use (``"model"``, ``"ema"``, ``"auto"``); ignored for bare state dicts.
        head: ``"strict"`` (class counts must match), ``"reinit"`` (drop the checkpoint's head, fresh init),
            ``"slice_22k_to_1k"`` (take rows 0..999 of a 21842-way head), ``"auto"`` (match -> load,
            21842->1000 -> slice, otherwise reinit).
        strict: raise on missing/unexpected keys (after conversions); otherwise only report them.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    weights = source if isinstance(source, Weights) else read_weights(source, key, variant=model_name(model))
    sd = weights.state_dict
    report = LoadReport(source=weights.source, key=weights.key)
    own = model.state_dict()

    # 1. timm / transformers names and shapes -> the official ones our models use; a transformers config.json
    #    must describe this model (post-LN and normalize_modulator leave no trace in the names).
    if weights.format == "transformers" or (weights.format == "timm" and not is_timm_format(own)):
        check_arch(model, weights)
        sd = weights.official()
        report.format = weights.format

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
        mode = auto_head(ckpt_n, model_n)
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


def model_name(model: nn.Module) -> str | None:
    """The registered name a model was built under (``create_model`` records it), for ``true``/tag sources."""
    return (getattr(model, "default_cfg", None) or {}).get("architecture")


def check_arch(model: nn.Module, weights: Weights) -> None:
    """A transformers ``config.json`` that describes another FocalNet than ``model``: one error naming both."""
    arch = weights.arch
    if arch is None:
        return
    own = getattr(model, "arch", None)
    if own is None:
        raise CheckpointError(f"{weights.source}: transformers FocalNet weights cannot load into "
                              f"{type(model).__name__}")
    diff = {k: v for k, v in arch.items() if k in own and own[k] != v}
    if diff:
        want = json.loads(json.dumps(arch, default=str))
        hint = max((n for n, (_, a) in _variant_signatures().items() if json.loads(a) == want), key=len,
                   default=None)  # focalnet_tiny_lrf rather than its alias focalnet_tiny
        raise CheckpointError(
            f"{weights.source}: its config.json describes a FocalNet with {_fmt(diff)}, but the model "
            f"({model_name(model) or type(model).__name__}) has {_fmt({k: own[k] for k in diff})}; "
            + (f"those weights are {hint}: build that model" if hint else "build a model with those settings")
        )


def _fmt(d: Mapping) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in d.items())


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
