"""FocalModulation inside Ultralytics detectors: a layer name for Ultralytics model YAMLs, and the shipped YAMLs.

    from focalnet.integrations import ultralytics as fu
    fu.register()                                     # once per process, before building a model
    from ultralytics import YOLO
    model = YOLO(fu.model_yaml("yolov8n-focal"))      # YOLOv8n with FocalModulation where SPPF was (layer 9)

Needs the ``detect`` extra (``pip install 'focalnet-train[detect]'``); Ultralytics is AGPL-3.0 and the core
framework never imports it. A YAML row reads ``[from, repeats, FocalModulation, [focal_window, focal_level,
focal_factor, bias, proj_drop, use_postln_in_modulation, normalize_modulator]]``: the arguments of
:class:`focalnet.FocalModulation` after ``dim``, in that (the official) order, all optional. ``dim`` (input and
output channels) is the channel count of the ``from`` layer, as Ultralytics does for its own layers; the block
runs channels-first, (B, C, H, W) in and out.

No file of Ultralytics is edited. Its ``parse_model`` looks layer names up in the globals of
``ultralytics.nn.tasks`` and hands input channels only to layer types it lists, so :func:`register` adds
``FocalModulation`` to those globals and wraps ``parse_model``: Ultralytics first parses the rows up to the last
FocalModulation with each of them replaced by an ``nn.BatchNorm2d`` row (a row type Ultralytics gives exactly the
channels of its ``from`` layer), the wrapper reads those channel counts, then Ultralytics parses the real YAML with
each count prepended to its FocalModulation row's arguments. ``register`` ends with a self-test (a tiny model whose
FocalModulation reads a layer other than the previous one) and raises :class:`UltralyticsIntegrationError`, naming
the supported Ultralytics versions, when Ultralytics' internals no longer behave that way.

Offline use (:func:`configure_offline`, called before Ultralytics is imported): no connectivity probe, update check,
analytics or auto-install, settings in a directory of ours, and the fonts Ultralytics would download found locally.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import focalnet

__all__ = ["FocalModulation", "UltralyticsIntegrationError", "register", "model_yaml", "list_model_yamls",
           "STOCK_COUNTERPARTS", "SUPPORTED_VERSIONS", "TESTED_VERSIONS", "configure_offline"]

# The model parser's behaviour this integration relies on, checked by tests/test_detectors.py: YAMLs, placement and
# shapes with ultralytics 8.4.0 and 8.4.190 (also 8.3.253); training, losses and restricted loading with 8.4.190.
SUPPORTED_VERSIONS = ">=8.4.0,<8.5"
TESTED_VERSIONS = ("8.4.0", "8.4.190")
LAYER_NAME = "FocalModulation"
MODELS_DIR = Path(__file__).with_name("ultralytics_models")

# Each shipped YAML, the Ultralytics YAML it is derived from, and the one row that differs: (index, stock layer).
STOCK_COUNTERPARTS = {
    "yolov8n-focal": ("yolov8n.yaml", 9, "SPPF"),
    "yolov8s-focal": ("yolov8s.yaml", 9, "SPPF"),
    "rtdetr-l-focal": ("rtdetr-l.yaml", 11, "AIFI"),
}


class UltralyticsIntegrationError(RuntimeError):
    """Ultralytics is missing, or its model parser no longer works the way this integration relies on."""


class FocalModulation(nn.Module):
    """:class:`focalnet.FocalModulation` as an Ultralytics layer: (B, C, H, W) -> (B, C, H, W), ``C = c1``.

    ``c1`` is filled in by the registered parser from the ``from`` layer; the other arguments are the YAML's. The
    block is the child ``modulation`` (Ultralytics tags every layer with attributes ``i``, ``f``, ``type``, ``np``,
    and ``f`` is the block's first linear under the official names), so its weights are named like a FocalNet
    block's: ``model.<layer>.modulation.{f,h,proj,focal_layers.<k>.0,ln}``.
    """

    def __init__(self, c1: int, focal_window: int = 3, focal_level: int = 2, focal_factor: int = 2,
                 bias: bool = True, proj_drop: float = 0.0, use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False):
        super().__init__()
        self.modulation = focalnet.FocalModulation(
            c1, focal_window=focal_window, focal_level=focal_level, focal_factor=focal_factor, bias=bias,
            proj_drop=proj_drop, use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator, channels_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The block returns a channels_last-strided view; the layers after SPPF/AIFI get the plain NCHW layout
        # those layers produce, so nothing downstream changes memory format.
        return self.modulation(x).contiguous()


def model_yaml(name: str) -> Path:
    """Path of a shipped model YAML by name (``yolov8n-focal``, ``yolov8s-focal``, ``rtdetr-l-focal``)."""
    path = MODELS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise ValueError(f"no shipped model YAML {name!r}; shipped: {', '.join(list_model_yamls())}")
    return path


def list_model_yamls() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def _installed_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        return "not installed"


def _unsupported(detail: str) -> UltralyticsIntegrationError:
    return UltralyticsIntegrationError(
        f"focalnet.integrations.ultralytics supports ultralytics{SUPPORTED_VERSIONS} (tested: "
        f"{', '.join(TESTED_VERSIONS)}); the installed ultralytics {_installed_version()} {detail}. Install a "
        f"supported version: pip install 'ultralytics{SUPPORTED_VERSIONS}' (or: pip install '.[detect]')")


def _wrap_parse_model(parse_model):
    """``parse_model`` that gives each FocalModulation row the channel count of its ``from`` layer (see module doc)."""

    @functools.wraps(parse_model)
    def parse_model_with_focal_modulation(d, ch, verbose=True):
        rows = d["backbone"] + d["head"]
        ours = [i for i, row in enumerate(rows) if row[2] == LAYER_NAME]
        if not ours:
            return parse_model(d, ch, verbose)
        for i in ours:
            if not isinstance(rows[i][0], int):
                raise ValueError(f"model YAML row {i} {rows[i]}: {LAYER_NAME} takes one input, so 'from' must be "
                                 f"one layer index (e.g. -1), not {rows[i][0]!r}")
        probe = copy.deepcopy({**d, "head": []})
        probe["backbone"] = [[row[0], row[1], "nn.BatchNorm2d", []] if i in ours else row
                             for i, row in enumerate(copy.deepcopy(rows[: ours[-1] + 1]))]
        if probe.get("scales") and not probe.get("scale"):
            probe["scale"] = next(iter(probe["scales"]))  # Ultralytics' own default; it warns once, for the real parse
        with torch.device("meta"):  # only the channel counts are wanted: no memory, no initialization
            probe_layers, _ = parse_model(probe, ch, verbose=False)
        real = copy.deepcopy(d)
        real_rows = real["backbone"] + real["head"]  # the same row lists as in `real`
        for i in ours:
            bn = probe_layers[i] if isinstance(probe_layers[i], nn.BatchNorm2d) else probe_layers[i][0]
            real_rows[i][3] = [bn.num_features, *real_rows[i][3]]
        return parse_model(real, ch, verbose)

    parse_model_with_focal_modulation.focalnet_wrapped = parse_model
    return parse_model_with_focal_modulation


def _self_test(tasks) -> None:
    """A 3-layer model whose FocalModulation reads layer 0 (8 channels), not the previous layer (16)."""
    d = {"nc": 1, "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [0, 1, LAYER_NAME, [3, 1]]],
         "head": []}
    layers, _ = tasks.parse_model(d, ch=3, verbose=False)
    block = layers[2]
    dim = getattr(getattr(block, "modulation", None), "dim", None)
    if not isinstance(block, FocalModulation) or dim != 8:
        raise _unsupported(f"built {type(block).__name__} with dim {dim} for a row reading an 8-channel layer")
    if block(torch.zeros(1, 8, 4, 4)).shape != (1, 8, 4, 4):
        raise _unsupported("changed the shape a FocalModulation layer returns")


def register() -> None:
    """Make ``FocalModulation`` usable by name in Ultralytics model YAMLs (idempotent, process-wide)."""
    try:
        import ultralytics.nn.tasks as tasks
        from ultralytics.utils.checks import check_version
    except ImportError as e:
        raise UltralyticsIntegrationError(
            f"Ultralytics is not installed ({e}): pip install '.[detect]' (ultralytics{SUPPORTED_VERSIONS}, "
            "AGPL-3.0)") from e
    keep_pillow_open()
    if getattr(tasks.parse_model, "focalnet_wrapped", None) is not None:
        return
    existing = vars(tasks).get(LAYER_NAME)
    if existing is not None and existing is not FocalModulation:
        raise _unsupported(f"defines its own {LAYER_NAME} ({existing!r}), which this integration would shadow")
    original = tasks.parse_model
    tasks.FocalModulation = FocalModulation
    tasks.parse_model = _wrap_parse_model(original)
    try:
        _self_test(tasks)
    except Exception as e:
        tasks.parse_model = original
        del tasks.FocalModulation
        if isinstance(e, UltralyticsIntegrationError):
            raise
        raise _unsupported(f"failed the model-parser self-test ({type(e).__name__}: {e})") from e
    # Checkpoints of these models load under Ultralytics' restricted loading (ULTRALYTICS_SAFE_LOAD=1, weights_only)
    torch.serialization.add_safe_globals([FocalModulation, focalnet.FocalModulation])
    if not check_version(_installed_version(), SUPPORTED_VERSIONS):
        warnings.warn(f"ultralytics {_installed_version()} is outside the tested range {SUPPORTED_VERSIONS}; "
                      "the model-parser self-test passed", stacklevel=2)


def keep_pillow_open() -> None:
    """Undo Ultralytics' process-wide replacement of ``PIL.Image.open`` (made when it is imported).

    ``ultralytics/utils/patches.py`` swaps in a wrapper that, when Pillow cannot identify a file, tries to install
    and import ``pi-heif`` and so raises ``ModuleNotFoundError`` instead of Pillow's ``UnidentifiedImageError``.
    The data pipeline skips and counts undecodable images by Pillow's own error, so in a process that imported
    Ultralytics one corrupt image would stop training. Pillow's function goes back (HEIF files are then
    unreadable, as without Ultralytics). Its other patch, a retrying ``torch.save``, is left: it writes the same.
    """
    from PIL import Image
    from ultralytics.utils import patches

    if Image.open is getattr(patches, "image_open", None):
        Image.open = patches._image_open


# ------------------------------------------------------------------------------------------------ offline
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def configure_offline(config_dir: str | os.PathLike) -> Path:
    """Run Ultralytics without network access; call before ``ultralytics`` is imported. Returns its settings dir.

    Called again after an offline import, it keeps the directory of the first call.

    - ``YOLO_OFFLINE=1``: Ultralytics skips its connectivity probe (two DNS look-ups at import), and with it the
      update check, analytics and auto-installs (``YOLO_AUTOINSTALL=false`` too).
    - ``YOLO_CONFIG_DIR=config_dir``: its ``settings.json`` lives there, with analytics (``sync``) and every
      experiment-tracker integration off (our logger logs to W&B).
    - Fonts: its dataset check and plots want ``Arial.ttf`` / ``Arial.Unicode.ttf`` and download them from GitHub
      when absent; they are matplotlib's bundled DejaVu Sans, copied there under those names.
    Weights and datasets are never fetched by the callers of this function: they pass local files only.
    """
    if "ultralytics.utils" in sys.modules:  # imported already: its probe and settings directory are fixed
        from ultralytics.utils import ONLINE, USER_CONFIG_DIR

        if ONLINE:
            raise RuntimeError("configure_offline() must run before ultralytics is imported (it probes the "
                               "network at import)")
        user_dir = Path(USER_CONFIG_DIR)  # keep the directory it was imported with
    else:
        config_dir = Path(config_dir).expanduser().resolve()
        user_dir = config_dir / "Ultralytics"  # where Ultralytics keeps settings.json and fonts under YOLO_CONFIG_DIR
        os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="false", YOLO_CONFIG_DIR=str(config_dir))
    user_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONTS:
        if not (user_dir / name).is_file():
            tmp = user_dir / f".{name}.tmp{os.getpid()}"
            shutil.copyfile(dejavu, tmp)
            os.replace(tmp, user_dir / name)  # atomic: concurrent runs sharing the directory never see half a font

    from ultralytics.utils import SETTINGS

    keep_pillow_open()
    off = {"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False, "raytune": False,
           "tensorboard": False, "wandb": False}
    if any(SETTINGS.get(k) != v for k, v in off.items()):
        SETTINGS.update(off)
    return user_dir
