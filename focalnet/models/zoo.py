"""The registered FocalNet variants (``create_model("focalnet_tiny_srf")``...): the official architectures by name."""

from __future__ import annotations

from focalnet.models.focalnet import FocalNet
from focalnet.models.registry import register_model
from focalnet.ops.cpu import use_cpu_kernels

_CONFIGS: dict[str, dict] = {
    # ImageNet-1K hierarchical models: SRF = focal level 2, LRF = focal level 3, windows 3.
    "focalnet_tiny_srf": dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(2,) * 4),
    "focalnet_tiny_lrf": dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3,) * 4),
    "focalnet_small_srf": dict(embed_dim=96, depths=(2, 2, 18, 2), focal_levels=(2,) * 4),
    "focalnet_small_lrf": dict(embed_dim=96, depths=(2, 2, 18, 2), focal_levels=(3,) * 4),
    "focalnet_base_srf": dict(embed_dim=128, depths=(2, 2, 18, 2), focal_levels=(2,) * 4),
    "focalnet_base_lrf": dict(embed_dim=128, depths=(2, 2, 18, 2), focal_levels=(3,) * 4),
    # Isotropic (ViT-like): patch 16, one stage of 12 blocks, no downsample (official yaml: level 3, window 3).
    "focalnet_tiny_iso": dict(embed_dim=192, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,)),
    "focalnet_small_iso": dict(embed_dim=384, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,)),
    # The paper-era code (microsoft/FocalNet @9253a7f) builds focalnet_base_iso_16 with use_layerscale=True,
    # use_postln=True, where use_postln then meant a LayerNorm inside the modulation (`modulation.ln`) with
    # pre-LN blocks: the network that was trained and released (issue #23). Later commits renamed that flag
    # use_postln_in_modulation and made use_postln mean block post-LN; use_postln=True,
    # use_postln_in_modulation=False builds that later reading.
    "focalnet_base_iso": dict(
        embed_dim=768, depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,),
        use_layerscale=True, use_postln_in_modulation=True,
    ),
    # ImageNet-22K models (official yamls): conv-embed, layerscale 1e-4, post-LN.
    "focalnet_large_fl3": dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_large_fl4": dict(
        embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, normalize_modulator=True,
    ),
    "focalnet_xlarge_fl3": dict(
        embed_dim=256, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(5,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_xlarge_fl4": dict(
        embed_dim=256, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True,
    ),
    "focalnet_huge_fl3": dict(
        embed_dim=352, depths=(2, 2, 18, 2), focal_levels=(3,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
    ),
    "focalnet_huge_fl4": dict(
        embed_dim=352, depths=(2, 2, 18, 2), focal_levels=(4,) * 4, focal_windows=(3,) * 4,
        use_conv_embed=True, use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
    ),
    # Tiny demo/test model (not in the paper): ~1.4M params (10 classes), fast on CPU.
    "focalnet_micro": dict(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(2,) * 4, focal_windows=(3,) * 4),
}  # fmt: skip
# The paper's headline models are the LRF ones.
for _size in ("tiny", "small", "base"):
    _CONFIGS[f"focalnet_{_size}"] = _CONFIGS[f"focalnet_{_size}_lrf"]


def _create(name: str, overrides: dict) -> FocalNet:
    """Build a variant; ``overrides`` replace its defaults (weights: ``create_model(name, pretrained=...)``).

    ``cpu_kernels`` (default true) swaps in the CPU fp32 kernels of :mod:`focalnet.ops.cpu`, which leave every
    other device and dtype to the plain model code; false builds the plain model.
    """
    cpu_kernels = overrides.pop("cpu_kernels", True)
    kwargs = dict(_CONFIGS[name])
    kwargs.update(overrides)
    # Per-stage lists given as a scalar (e.g. focal_levels=3) apply to every stage.
    n = len(kwargs["depths"])
    for key in ("focal_levels", "focal_windows"):
        if isinstance(kwargs.get(key), int):
            kwargs[key] = (kwargs[key],) * n
    model = FocalNet(**kwargs)
    if cpu_kernels:
        use_cpu_kernels(model)
    return model


def _make_constructor(name: str):
    def constructor(**overrides) -> FocalNet:
        return _create(name, overrides)

    constructor.__name__ = name
    constructor.__qualname__ = name
    cfg = _CONFIGS[name]
    constructor.__doc__ = f"FocalNet variant ``{name}``: {cfg}. Keyword arguments override these defaults."
    return constructor


for _name in _CONFIGS:
    globals()[_name] = register_model(_make_constructor(_name))

del _name, _size

