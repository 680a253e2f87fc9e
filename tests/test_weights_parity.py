"""Our FocalNets against the installed references, in both directions, for every variant they support.

* transformers (a test/dev extra): ``FocalNetForImageClassification`` built from ``FocalNetConfig`` for every
  registered FocalNet (transformers' FocalNet can express all of them, isotropic ones included);
* timm: ``timm.create_model(<variant>, pretrained=False)`` for every variant timm registers.

For each variant: (1) at full size on the meta device, the converted names and shapes equal the reference's
exactly, both ways; (2) with real numbers, ours -> theirs (our weights converted/exported, loaded strictly by their
code) and theirs -> ours (their randomly initialised model written by their own writer, read by our loaders) give
logits equal to <= 1e-4. Full-size numbers for the T/S/B and isotropic models would take minutes on CI, so (2)
runs every variant's exact flags (levels, windows, conv-embed, layerscale, post-LN, LN in the modulation,
normalize_modulator, patch size, number of stages) at width 32 with at most two blocks per stage, plus full size
for FocalNet-T SRF through the files each library writes. Every layer-norm weight and layerscale gamma is drawn from
U(0.5, 1.5) first, so a block that was computed differently (pre- vs post-LN, a missing norm) changes the logits.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.focalnet import FocalNet as TimmFocalNet

import focalnet
from focalnet.models.checkpoint import (
    convert_official_to_timm,
    convert_official_to_transformers,
    convert_timm_to_official,
    convert_transformers_to_official,
    transformers_config,
)
from focalnet.models.export import export_weights

transformers = pytest.importorskip("transformers")  # the dev extra installs it; the runtime never needs it
from transformers import FocalNetConfig, FocalNetForImageClassification  # noqa: E402

TOL = 1e-4
VARIANTS = [n for n in focalnet.list_models("focalnet_*") if n not in ("focalnet_tiny", "focalnet_small", "focalnet_base")]
TIMM_VARIANTS = [n for n in VARIANTS if timm.is_model(n)]
FULL_SIZE = ("focalnet_tiny_srf",)
# `make test` runs a few variants that cover every flag (CI runs all): the rest are marked slow.
FAST = ("focalnet_micro", "focalnet_tiny_lrf", "focalnet_tiny_iso", "focalnet_huge_fl4", "focalnet_large_fl4")
VARIANT_PARAMS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in VARIANTS]  # the hub tests (test_sources.py) load a full-size tiny_lrf too


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("bias"):  # LayerNorm weights, layerscale gammas
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def small(name: str) -> dict:
    """The variant's flags at width 32, at most two blocks per stage."""
    return dict(embed_dim=32, depths=tuple(min(d, 2) for d in _arch(name)["depths"]))


def _arch(name: str) -> dict:
    with torch.device("meta"):
        return focalnet.create_model(name).arch


def hf_config(arch: dict, num_classes: int) -> FocalNetConfig:
    fields = {k: v for k, v in transformers_config(arch, num_classes).items() if k not in ("architectures", "model_type")}
    return FocalNetConfig(**fields)


def timm_kwargs(arch: dict) -> dict:
    """timm FocalNet constructor arguments for our flags (timm has no patch size: 4 always)."""
    return dict(embed_dim=arch["embed_dim"], depths=arch["depths"], focal_levels=arch["focal_levels"],
                focal_windows=arch["focal_windows"], use_overlap_down=arch["use_conv_embed"],
                use_post_norm=arch["use_postln"], use_post_norm_in_modulation=arch["use_postln_in_modulation"],
                normalize_modulator=arch["normalize_modulator"],
                layerscale_value=1e-4 if arch["use_layerscale"] else None)  # fmt: skip


def image(name: str) -> torch.Tensor:
    size = 64 if name.endswith("_iso") else 32  # iso: patch 16 -> 4x4 tokens; hierarchical: 8x8 ... 1x1
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    d = float((a - b).abs().max())
    print(f"PARITY {what}: max |logit diff| {d:.2e}")  # `pytest -s -k parity | grep PARITY` lists them all
    return d


@pytest.mark.parametrize("name", VARIANT_PARAMS)
def test_parity_every_variant(name, monkeypatch):
    # (1) Full size, meta device: the converted names and shapes are the references' exactly, both ways. (timm's
    #     trunc_normal_ takes seconds per model on meta tensors, which hold no values: skipped while building.)
    with monkeypatch.context() as m, torch.device("meta"):
        m.setattr(timm.models.focalnet, "trunc_normal_", lambda t, *a, **k: t)
        ours = focalnet.create_model(name)
        hf = FocalNetForImageClassification(hf_config(ours.arch, 1000))
        tm = timm.create_model(name, pretrained=False, num_classes=1000) if name in TIMM_VARIANTS else None
    assert shapes(convert_official_to_transformers(ours.state_dict())) == shapes(hf.state_dict())
    assert shapes(convert_transformers_to_official(hf.state_dict())) == shapes(ours.state_dict())
    if tm is not None:
        assert shapes(convert_official_to_timm(ours.state_dict(), use_postln=ours.arch["use_postln"])) == \
            shapes(tm.state_dict())
        assert shapes(convert_timm_to_official(tm.state_dict())) == shapes(ours.state_dict())

    # (2) The variant's flags, small, real numbers: each reference's randomly initialised model -> ours, and ours
    #     -> each reference, through the converters the loaders and exporters use.
    kw = small(name)
    arch = {**_arch(name), **kw}
    x = image(name)
    torch.manual_seed(0)
    ours = randomize_norms(focalnet.create_model(name, num_classes=10, **kw), seed=1)
    theirs = randomize_norms(FocalNetForImageClassification(hf_config(arch, 10)), seed=2)
    with torch.no_grad():
        ref = theirs(x).logits
        focalnet.load_checkpoint(ours, theirs.state_dict())  # transformers names -> ours
        assert max_diff(ours(x), ref, f"{name} small transformers->ours") <= TOL
        randomize_norms(ours, seed=3)
        theirs.load_state_dict(convert_official_to_transformers(ours.state_dict()), strict=True)
        assert max_diff(theirs(x).logits, ours(x), f"{name} small ours->transformers") <= TOL
    if name in TIMM_VARIANTS:  # timm's registrations fix the width: its FocalNet class with the variant's flags
        theirs = randomize_norms(TimmFocalNet(num_classes=10, **timm_kwargs(arch)), seed=4)
        with torch.no_grad():
            focalnet.load_checkpoint(ours, theirs.state_dict())  # timm names -> ours
            assert max_diff(ours(x), theirs(x), f"{name} small timm->ours") <= TOL
            randomize_norms(ours, seed=5)
            theirs.load_state_dict(convert_official_to_timm(ours.state_dict(), use_postln=arch["use_postln"]),
                                   strict=True)
            assert max_diff(theirs(x), ours(x), f"{name} small ours->timm") <= TOL


# ---- full size, through the files each ecosystem writes and reads ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_transformers_files_both_directions(name, tmp_path):
    x = image(name)
    torch.manual_seed(0)
    ours = randomize_norms(focalnet.create_model(name, num_classes=10))
    theirs = FocalNetForImageClassification.from_pretrained(export_weights(ours, "transformers", tmp_path / "hf"))
    with torch.no_grad():
        assert max_diff(theirs.eval()(x).logits, ours(x), f"{name} full export -> from_pretrained") <= TOL

    torch.manual_seed(1)
    theirs = randomize_norms(FocalNetForImageClassification(hf_config(ours.arch, 10)))
    theirs.save_pretrained(tmp_path / "theirs")
    mine = focalnet.create_model(name, num_classes=10, pretrained=str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        assert max_diff(mine(x), theirs(x).logits, f"{name} full save_pretrained -> ours") <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_timm_files_both_directions(name, tmp_path):
    x = image(name)
    torch.manual_seed(0)
    theirs = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10))
    timm.models.save_for_hf(theirs, str(tmp_path / "theirs"), safe_serialization=True)
    mine = focalnet.create_model(name, num_classes=10, pretrained=str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        assert max_diff(mine(x), theirs(x), f"{name} full timm save_for_hf -> ours") <= TOL

    ours = randomize_norms(focalnet.create_model(name, num_classes=10), seed=1)
    out = export_weights(ours, "timm", tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 10
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert max_diff(theirs(x), ours(x), f"{name} full export -> timm local-dir") <= TOL
