"""Where weights come from: one SOURCE string -> a local weights file (downloaded into the standard caches).

A SOURCE is any of

- a local file: ours (``.pt``), an official microsoft/FocalNet ``.pth``, a timm ``.pth``/``.bin``/``.safetensors``,
  a transformers ``model.safetensors``/``pytorch_model.bin``;
- a local directory in transformers layout (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) or in
  timm's hub layout (the same file names; timm's ``config.json`` names an ``architecture``);
- ``hf-hub:ORG/REPO[/FILE][@REVISION]``: a Hugging Face Hub repository (``FILE`` for repositories without the
  standard file names), downloaded with ``huggingface_hub`` into its cache, so ``HF_HOME``/``HF_HUB_CACHE``,
  ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the token from ``HF_TOKEN``/``hf auth login`` apply as for every
  Hugging Face library (we never read or print the token);
- an ``http(s)://`` URL, downloaded into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``);
- ``true`` or a tag (``in1k``, ``in22k``): the variant's published weights, from :data:`PUBLISHED`. The copies are
  tried in the order timm hub (safetensors), transformers hub, official file; one already in a cache wins.

``HF_HUB_OFFLINE=1`` keeps every source off the network (URLs too): only the caches are read. What is not cached
then fails with one line naming the source, the cache directory and ``scripts/fetch_weights.py``, the command
that fills the caches on a machine with internet.

Nothing here reads the weights: ``focalnet.models.checkpoint`` does, with ``weights_only=True`` or safetensors.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers/timm hub names, preferred first
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
TRUE_STRINGS = ("true", "True")
FETCH_COMMAND = "python scripts/fetch_weights.py"


class CheckpointError(RuntimeError):
    """Weights could not be found or loaded; the message says why and what to do."""


# ---- the published weights ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """Where one set of released weights lives, in each ecosystem that publishes it.

    ``official``: the URL of the authors' file (``official_file`` names it in torch.hub's cache when the URL has
    no usable file name); ``official_hub``: the authors' file on the Hugging Face Hub (``hf-hub:...``);
    ``timm`` / ``transformers``: hub repository ids. ``num_classes``: rows of the released head (0 = none).
    """

    num_classes: int
    official: str | None = None
    official_file: str | None = None
    official_hub: str | None = None
    timm: str | None = None
    transformers: str | None = None

    def candidates(self) -> list[str]:
        """SOURCE strings in the order they are tried: safetensors first, then pickles."""
        out = [HF_PREFIX + self.timm] if self.timm else []
        out += [HF_PREFIX + self.transformers] if self.transformers else []
        out += [self.official_hub] if self.official_hub else []
        out += [self.official] if self.official else []
        return out


_GH = "https://github.com/microsoft/FocalNet/releases/download/v1.0.0/"
_BLOB = "https://projects4jw.blob.core.windows.net/focalnet/release/classification/"
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"  # Seafile share link; ?dl=1 serves the file itself


def _in1k(size: str, rf: str, hf_name: str) -> dict[str, Published]:
    name = f"focalnet_{size}_{rf}"
    return {"in1k": Published(1000, official=f"{_GH}{name}.pth", timm=f"timm/{name}.ms_in1k",
                              transformers=f"microsoft/{hf_name}")}


def _in22k(name: str, official: str, num_classes: int = 21842, **kw) -> dict[str, Published]:
    return {"in22k": Published(num_classes, official=official, timm=f"timm/{name}.ms_in22k", **kw)}


# Variant -> tag -> copies; the first tag is the default (`true`). Sources, each checked by hand:
# - official: microsoft/FocalNet README at e8514bd (ImageNet-1K, isotropic and ImageNet-22K tables);
# - timm: timm 1.0.31 `timm/models/focalnet.py` default_cfgs (hf_hub_id='timm/'; huge_fl4 is headless there);
# - transformers: transformers' `models/focalnet/convert_focalnet_to_hf_format.py` (model_name_to_url) and the
#   hub repositories it produced (microsoft/focalnet-{tiny,small,base}[-lrf]: FocalNetForImageClassification);
# - microsoft/focalnet-large-lrf-fl4 on the hub holds the official .pth (hub commit 026e2af);
# - DAT: LeapLabTHU/DAT README at 566a593 (the DAT v1 weights this package implements; TsinghuaCloud links).
PUBLISHED: dict[str, dict[str, Published]] = {
    **{f"focalnet_{s}_{rf}": _in1k(s, rf, f"focalnet-{s}" + ("-lrf" if rf == "lrf" else ""))
       for s in ("tiny", "small", "base") for rf in ("srf", "lrf")},
    **{f"focalnet_{s}_iso": {"in1k": Published(1000, official=f"{_BLOB}focalnet_{s}_iso_16.pth")}
       for s in ("tiny", "small", "base")},
    "focalnet_large_fl3": _in22k("focalnet_large_fl3", _GH + "focalnet_large_lrf_384.pth"),
    "focalnet_large_fl4": _in22k(
        "focalnet_large_fl4", _GH + "focalnet_large_lrf_384_fl4.pth",
        official_hub=HF_PREFIX + "microsoft/focalnet-large-lrf-fl4/focalnet_large_lrf_384_fl4.pth"),
    "focalnet_xlarge_fl3": _in22k("focalnet_xlarge_fl3", _GH + "focalnet_xlarge_lrf_384.pth"),
    "focalnet_xlarge_fl4": _in22k("focalnet_xlarge_fl4", _GH + "focalnet_xlarge_lrf_384_fl4.pth"),
    "focalnet_huge_fl3": _in22k("focalnet_huge_fl3", _BLOB + "focalnet_huge_lrf_224.pth"),
    "focalnet_huge_fl4": _in22k("focalnet_huge_fl4", _BLOB + "focalnet_huge_lrf_224_fl4.pth", num_classes=0),
    "dat_tiny": {"in1k": Published(1000, official=_TSINGHUA.format("1367349deefc48efa650"),
                                   official_file="dat_tiny_in1k_224.pth")},
    "dat_small": {"in1k": Published(1000, official=_TSINGHUA.format("f04b18081e3e4606adb7"),
                                    official_file="dat_small_in1k_224.pth")},
    "dat_base": {"in1k": Published(1000, official=_TSINGHUA.format("a8d2a9645d454120b635"),
                                   official_file="dat_base_in1k_224.pth")},
    "dat_base_384": {"in1k": Published(1000, official=_TSINGHUA.format("cf6a6b543cd64e0d8e43"),
                                       official_file="dat_base_in1k_384.pth")},
}  # fmt: skip
for _size in ("tiny", "small", "base"):  # focalnet_tiny = focalnet_tiny_lrf (the paper's headline models)
    PUBLISHED[f"focalnet_{_size}"] = PUBLISHED[f"focalnet_{_size}_lrf"]
_OFFICIAL_FILES = {p.official: p.official_file for tags in PUBLISHED.values() for p in tags.values() if p.official_file}


def published(variant: str | None, tag) -> Published | None:
    """The table entry a ``true``/tag SOURCE names for ``variant``; None when ``tag`` is not a tag at all."""
    if not is_tag(tag):
        return None
    if variant is None:
        raise CheckpointError(f"{tag!r} stands for a model's published weights: name the model (model=NAME, "
                              f"create_model(NAME, pretrained=...), fetch_weights.py NAME[:TAG])")
    tags = PUBLISHED.get(variant)
    if not tags:
        have = ", ".join(sorted(PUBLISHED))
        raise CheckpointError(f"pretrained={tag!r}: {variant} has no published weights "
                              f"(published: {have}); pass a file, a directory, hf-hub:ORG/REPO or a URL")
    if tag is True or tag in TRUE_STRINGS:
        return next(iter(tags.values()))
    if tag not in tags:
        raise CheckpointError(f"pretrained={tag!r}: {variant} publishes {', '.join(tags)} (or true for "
                              f"{next(iter(tags))})")
    return tags[tag]


def is_tag(source) -> bool:
    """``true`` or a bare word like ``in1k`` (not a path, URL or hub id)."""
    if source is True or source in TRUE_STRINGS:
        return True
    return (isinstance(source, str) and source.isidentifier() and not os.path.exists(source)
            and source not in ("false", "False", "null", "None"))


# ---- resolution -----------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """A SOURCE found on this machine: its weights file and, for hub layouts, the parsed ``config.json``."""

    source: str  # as the user wrote it (plus the copy chosen for true/tags)
    weights: Path
    config: dict | None = None


def is_offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (huggingface_hub's switch) keeps every source off the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve(source, *, variant: str | None = None, local_only: bool = False) -> Resolved:
    """Find ``source`` on disk, downloading it into the standard cache unless offline or ``local_only``.

    ``variant`` (a registered model name) gives meaning to ``true`` and tags.
    Raises :class:`CheckpointError` with one actionable line.
    """
    local_only = local_only or is_offline()
    entry = published(variant, source)
    if entry is not None:
        return _resolve_published(source, variant, entry, local_only)
    source = os.fspath(source)
    if source.startswith(HF_PREFIX):
        return _resolve_hub(source, local_only)
    if source.startswith(("http://", "https://")):
        return Resolved(source, _resolve_url(source, local_only))
    return _resolve_path(source)


def _resolve_published(tag, variant: str, entry: Published, local_only: bool) -> Resolved:
    tag = "true" if tag is True or tag in TRUE_STRINGS else tag
    candidates = entry.candidates()
    for candidate in candidates:  # a copy already in a cache wins: no network at all
        try:
            found = resolve(candidate, local_only=True)
        except CheckpointError:
            continue
        found.source = f"{variant} {tag} = {candidate}"
        return found
    errors = []
    if not local_only:
        for candidate in candidates:
            try:
                found = resolve(candidate)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            found.source = f"{variant} {tag} = {candidate}"
            return found
    caches = sorted({hub_cache_dir() if c.startswith(HF_PREFIX) else torch_hub_dir() for c in candidates})
    why = f"; tried: {' | '.join(errors)}" if errors else ""
    raise CheckpointError(
        f"pretrained={tag} for {variant}: none of {', '.join(candidates)} is in the caches ({', '.join(caches)})"
        + (" and HF_HUB_OFFLINE=1 forbids downloads" if local_only and is_offline() else "")
        + f"; on a machine with internet run: {FETCH_COMMAND} {variant}" + (f":{tag}" if tag != "true" else "")
        + why
    )


def parse_hub_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf-hub:ORG/REPO[/FILE][@REVISION]`` -> (repo_id, file or None, revision or None)."""
    spec = source[len(HF_PREFIX):]
    spec, _, revision = spec.partition("@")
    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(f"{source}: expected hf-hub:ORG/REPO[/FILE][@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def torch_hub_dir() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _not_available(source: str, cache: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{source}: not in the cache ({cache}) and cannot be downloaded ({reason}); on a machine "
                           f"with internet run: {FETCH_COMMAND} {source}")


def _hub_file(repo_id: str, filename: str, revision: str | None, local_only: bool) -> Path | None:
    """A file of a hub repo through huggingface_hub's cache; None if the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except LocalEntryNotFoundError:
        if local_only:
            return None
        raise
    except EntryNotFoundError:  # the repo exists but has no such file
        return None


def _resolve_hub(source: str, local_only: bool) -> Resolved:
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, filename, revision = parse_hub_source(source)
    cache = hub_cache_dir()
    reason = "HF_HUB_OFFLINE=1" if is_offline() else "not asked to download"
    try:
        if filename:
            path = _hub_file(repo_id, filename, revision, local_only)
            if path is None:
                raise (_not_available(source, cache, reason) if local_only
                       else CheckpointError(f"{source}: the repository has no file {filename!r}"))
            return Resolved(source, path)
        config_path = _hub_file(repo_id, "config.json", revision, local_only)
        for name in HUB_WEIGHT_FILES:
            path = _hub_file(repo_id, name, revision, local_only)
            if path is not None:
                return Resolved(source, path, _read_json(config_path) if config_path else None)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError as e:  # online attempt failed (no connection) and nothing cached
        raise _not_available(source, cache, _first_line(e)) from None
    except Exception as e:  # repository not found, gated (no token), revision not found, HTTP errors
        raise CheckpointError(f"{source}: {type(e).__name__}: {_first_line(e)}") from None
    if local_only:
        raise _not_available(source, cache, reason)
    raise CheckpointError(f"{source}: the repository has neither {' nor '.join(HUB_WEIGHT_FILES)}; name the weights "
                          f"file: hf-hub:{repo_id}/FILE" + (f"@{revision}" if revision else ""))


def _resolve_url(url: str, local_only: bool) -> Path:
    """torch.hub's cache: ``$TORCH_HOME/hub/checkpoints/<file name>``, downloaded once (atomically by torch.hub)."""
    from urllib.parse import urlparse

    import torch

    name = _OFFICIAL_FILES.get(url) or os.path.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f"{url}: the URL names no file; download it and pass the path")
    cache = torch_hub_dir()
    path = Path(cache) / name
    if path.is_file():
        return path
    if local_only:
        raise _not_available(url, cache, "HF_HUB_OFFLINE=1" if is_offline() else "not asked to download")
    os.makedirs(cache, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as e:
        raise _not_available(url, cache, f"{type(e).__name__}: {_first_line(e)}") from None
    return path


def _resolve_path(source: str) -> Resolved:
    path = Path(source).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        hub_layout = path.name in HUB_WEIGHT_FILES and config.is_file()
        return Resolved(source, path, _read_json(config) if hub_layout else None)
    if path.is_dir():
        for name in HUB_WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "config.json"
                return Resolved(source, path / name, _read_json(config) if config.is_file() else None)
        weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(weights) == 1:
            return Resolved(source, weights[0])
        raise CheckpointError(f"{source}: a directory without {' or '.join(HUB_WEIGHT_FILES)}"
                              + (f" and with several weight files ({', '.join(p.name for p in weights)}): pass one"
                                 if weights else " or any weights file"))
    raise CheckpointError(f"{source}: no such file or directory (a SOURCE is a file, a directory, "
                          f"hf-hub:ORG/REPO[@REV], a URL, or true/a tag for a model with published weights)")


def check_source(source, variant: str | None = None) -> str | None:
    """What is wrong with ``source`` without touching the network (None if it may work): config validation."""
    if source is None or source is False:
        return None
    try:
        if published(variant, source) is not None:
            return None
    except CheckpointError as e:
        return str(e)
    if not isinstance(source, str) or not source:
        return f"{source!r} is not a SOURCE (a path, hf-hub:ORG/REPO[@REV], a URL, true or a tag)"
    if source.startswith(HF_PREFIX):
        try:
            parse_hub_source(source)
        except CheckpointError as e:
            return str(e)
        return None
    if source.startswith(("http://", "https://")):
        return None
    return None if Path(source).expanduser().exists() else "no such file or directory"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
