"""load_checkpoint: official/our/timm formats, head options, legacy isotropic checkpoints, safety, errors."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from timm.data import ImageNetInfo

from focalnet import create_model, load_checkpoint
from focalnet.models.checkpoint import (
    CheckpointError,
    convert_official_to_timm,
    convert_timm_to_official,
)


def _micro(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return create_model("focalnet_micro", **kw).eval()


def _same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), rtol=0, atol=1e-6)


def test_official_format_round_trip(tmp_path):
    src = _micro(seed=1)
    # Official releases: {"model": state_dict, ...extra entries}; also bare state dicts.
    torch.save({"model": src.state_dict(), "epoch": 300, "max_accuracy": 82.1}, tmp_path / "official.pth")
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    for name in ("official.pth", "bare.pth"):
        dst = _micro(seed=2)
        assert not _same_outputs(src, dst)
        report = load_checkpoint(dst, tmp_path / name)
        assert report.format == "official" and report.head == "loaded"
        assert not report.missing_keys and not report.unexpected_keys
        assert _same_outputs(src, dst)
    # The file we write is loadable by plain torch with strict=True under the official names.
    dst = _micro(seed=3)
    dst.load_state_dict(torch.load(tmp_path / "official.pth", weights_only=True)["model"], strict=True)
    assert _same_outputs(src, dst)


def test_our_checkpoint_model_and_ema_entries(tmp_path):
    model, ema = _micro(seed=1), _micro(seed=2)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "step": 10, "epoch": 1}  # fmt: skip
    torch.save(ckpt, tmp_path / "last.pt")
    dst = _micro(seed=3)
    load_checkpoint(dst, tmp_path / "last.pt", key="ema")
    assert _same_outputs(ema, dst)
    load_checkpoint(dst, tmp_path / "last.pt")
    assert _same_outputs(model, dst)
    with pytest.raises(CheckpointError, match="pass key"):
        load_checkpoint(dst, {"weights": model.state_dict(), "step": 3})


def test_wrapper_prefixes_are_stripped():
    src = _micro(seed=1)
    ddp_sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    dst = _micro(seed=2)
    load_checkpoint(dst, {"model": ddp_sd})
    assert _same_outputs(src, dst)


def test_timm_state_dict_file_loads_and_exports(tmp_path):
    torch.manual_seed(0)
    theirs = timm.create_model("focalnet_tiny_srf", num_classes=1000, pretrained=False).eval()
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    ours = create_model("focalnet_tiny_srf").eval()
    report = load_checkpoint(ours, tmp_path / "timm.pth")
    assert report.format == "timm"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4
    # Export back: timm loads our weights strictly, and the conversions are exact inverses.
    exported = convert_official_to_timm(ours.state_dict(), use_postln=False)
    theirs.load_state_dict(exported, strict=True)
    back = convert_timm_to_official(exported)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_postln_names_convert_both_ways():
    sd = create_model("focalnet_micro", use_postln=True, use_layerscale=True,
                      use_postln_in_modulation=True).state_dict()  # fmt: skip
    timm_sd = convert_official_to_timm(sd, use_postln=True)
    assert "layers.0.blocks.0.norm1_post.weight" in timm_sd and "layers.0.blocks.0.ls1.gamma" in timm_sd
    assert "layers.0.blocks.0.modulation.norm.weight" in timm_sd and "layers.1.downsample.proj.weight" in timm_sd
    assert "stem.proj.weight" in timm_sd and "head.fc.weight" in timm_sd
    assert timm_sd["layers.0.blocks.0.mlp.fc1.weight"].ndim == 4
    back = convert_timm_to_official(timm_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


class _Exploit:
    """Unpickling this would create a file (stands in for arbitrary code execution)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": _micro().state_dict(), "payload": _Exploit(str(marker))}, f, protocol=2)
    # Sanity: the payload really would run with an unrestricted unpickler.
    with open(evil, "rb") as f:
        pickle.load(f).get("payload").close()
    assert marker.exists()
    marker.unlink()

    torch.save({"model": _micro().state_dict(), "payload": _Exploit(str(marker))}, tmp_path / "evil2.pth")
    for path in (evil, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_checkpoint(_micro(), path)
        assert not marker.exists()


def test_head_mismatch_error_is_actionable():
    src = _micro(num_classes=10)
    with pytest.raises(CheckpointError, match="head='reinit'") as err:
        load_checkpoint(_micro(num_classes=5), src.state_dict())
    assert "10 classes" in str(err.value) and "num_classes=10" in str(err.value)


def test_head_reinit_and_auto():
    src = _micro(num_classes=10, seed=1)
    dst = _micro(num_classes=5, seed=2)
    report = load_checkpoint(dst, src.state_dict(), head="reinit")
    assert report.head == "reinit"
    assert torch.equal(dst.layers[0].blocks[0].modulation.f.weight, src.layers[0].blocks[0].modulation.f.weight)
    assert dst.head.weight.shape == (5, 256) and dst.head.weight.std() < 0.05
    assert load_checkpoint(_micro(num_classes=5), src.state_dict(), head="auto").head == "reinit"
    assert load_checkpoint(_micro(num_classes=10), src.state_dict(), head="auto").head == "loaded"


def test_22k_head_sliced_to_1k():
    # The released 22K layout is timm's imagenet22k_ms: its first 1000 classes are ImageNet-1K in 1K order.
    in22k, in1k = ImageNetInfo("imagenet22k_ms"), ImageNetInfo("imagenet-1k")
    assert in22k.num_classes() == 21842
    assert [in22k.index_to_label_name(i) for i in range(1000)] == [in1k.index_to_label_name(i) for i in range(1000)]

    src = _micro(num_classes=21842, seed=1)
    for mode in ("slice_22k_to_1k", "auto"):
        dst = _micro(num_classes=1000, seed=2)
        report = load_checkpoint(dst, {"model": src.state_dict()}, head=mode)
        assert report.head == "sliced 21842->1000"
        assert torch.equal(dst.head.weight, src.head.weight[:1000]) and torch.equal(dst.head.bias, src.head.bias[:1000])
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x)[:, :1000], rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="slice_22k_to_1k"):
        load_checkpoint(_micro(num_classes=1000), src.state_dict())
    with pytest.raises(CheckpointError, match="needs a 21842-way"):
        load_checkpoint(_micro(num_classes=10), src.state_dict(), head="slice_22k_to_1k")


def test_legacy_isotropic_modulation_ln_checkpoint_loads():
    """focalnet_base_iso_16.pth (microsoft/FocalNet #23): `modulation.ln` = LayerNorm inside the modulation."""
    iso = dict(embed_dim=32, depths=(2,), use_layerscale=True)  # a small focalnet_base_iso
    torch.manual_seed(1)
    trained = create_model("focalnet_base_iso", **iso, use_postln=False, use_postln_in_modulation=True).eval()
    for blk in trained.layers[0].blocks:  # non-trivial LayerNorm parameters, so using them matters
        blk.modulation.ln.weight.data.uniform_(0.5, 1.5)
    released = {"model": trained.state_dict()}
    assert any(".modulation.ln." in k for k in released["model"])

    official_build = create_model("focalnet_base_iso", **iso)  # today's flags: layerscale + block post-LN
    assert official_build.arch["use_postln"] and not official_build.arch["use_postln_in_modulation"]
    report = load_checkpoint(official_build, released)
    assert any("#23" in note for note in report.notes)
    assert _same_outputs(trained, official_build, size=64)


def test_missing_and_unexpected_keys_listed_with_hint():
    src = _micro(use_conv_embed=True)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_micro(), src.state_dict())
    msg = str(err.value)
    assert "shape mismatches" in msg and "patch_embed.proj.weight" in msg and "'use_conv_embed': True" in msg

    sd = _micro().state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_micro(), sd)
    assert "missing keys (1): norm.weight" in str(err.value) and "unexpected keys (1): extra.weight" in str(err.value)
    report = load_checkpoint(_micro(), sd, strict=False)
    assert report.missing_keys == ["norm.weight"] and report.unexpected_keys == ["extra.weight"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(_micro(), tmp_path / "nope.pth")


def test_create_model_checkpoint_path(tmp_path):
    src = _micro(num_classes=1000, seed=1)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    dst = create_model("focalnet_micro", checkpoint_path=str(tmp_path / "w.pth"))
    assert _same_outputs(src, dst)
