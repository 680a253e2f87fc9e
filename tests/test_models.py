"""FocalNet model zoo: sizes/FLOPs vs the paper, numerical equality with timm, layouts, checkpointing, compile."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from focalnet import FocalModulation, FocalNet, create_model, list_models
from focalnet.models.backbone import FocalNetBackbone
from focalnet.models.checkpoint import CheckpointError, convert_official_to_timm, load_checkpoint

# Paper / README table: params (M, 1000-way head) and GFLOPs (= GMACs) at 224.
PAPER = {
    "focalnet_tiny_srf": (28.4, 4.4),
    "focalnet_tiny_lrf": (28.6, 4.5),
    "focalnet_small_srf": (49.9, 8.6),
    "focalnet_small_lrf": (50.3, 8.7),
    "focalnet_base_srf": (88.1, 15.3),
    "focalnet_base_lrf": (88.7, 15.4),
    "focalnet_tiny_iso": (5.9, 1.1),
    "focalnet_small_iso": (22.4, 4.3),
    "focalnet_base_iso": (87.2, 16.9),
    "focalnet_large_fl3": (207, None),
    "focalnet_large_fl4": (207, None),
    "focalnet_xlarge_fl3": (366, None),
    "focalnet_xlarge_fl4": (366, None),
    "focalnet_huge_fl3": (687, None),
    "focalnet_huge_fl4": (689, None),
}
ALIASES = {"focalnet_tiny": "focalnet_tiny_lrf", "focalnet_small": "focalnet_small_lrf",
           "focalnet_base": "focalnet_base_lrf"}  # fmt: skip
PARAMS_22K = {"focalnet_large_fl3": 239.1, "focalnet_xlarge_fl3": 408.8, "focalnet_huge_fl3": 745.3}
TIMM_VARIANTS = [n for n in PAPER if not n.endswith("_iso")]
BIG = ("focalnet_large", "focalnet_xlarge", "focalnet_huge")


def _meta_model(name: str, **kw) -> FocalNet:
    with torch.device("meta"):
        return create_model(name, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Random weights that make every term matter: layerscale gammas ~U(0.5, 1.5), non-trivial norms/biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                base = 1.0 if "norm" in name or ".ln." in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def _timm_equivalent(ours: FocalNet) -> nn.Module:
    """timm's FocalNet with the same architecture (timm omits large_fl4's normalize_modulator: pass it)."""
    a = ours.arch
    return timm.models.focalnet.FocalNet(
        num_classes=ours.num_classes, embed_dim=a["embed_dim"], depths=a["depths"], focal_levels=a["focal_levels"],
        focal_windows=a["focal_windows"], use_overlap_down=a["use_conv_embed"], use_post_norm=a["use_postln"],
        use_post_norm_in_modulation=a["use_postln_in_modulation"], normalize_modulator=a["normalize_modulator"],
        layerscale_value=1e-4 if a["use_layerscale"] else None, drop_path_rate=0.0,
    )  # fmt: skip


def test_every_official_variant_is_registered():
    expected = set(PAPER) | set(ALIASES) | {"focalnet_micro"}
    assert expected <= set(list_models("focalnet_*"))


@pytest.mark.parametrize("name", list(PAPER) + list(ALIASES))
def test_param_count_matches_paper(name):
    expected = PAPER[ALIASES.get(name, name)][0]
    tol = 0.5 if isinstance(expected, int) else 0.05
    assert abs(_n_params(_meta_model(name)) / 1e6 - expected) <= tol


@pytest.mark.parametrize("name", list(PARAMS_22K))
def test_param_count_with_22k_head(name):
    assert abs(_n_params(_meta_model(name, num_classes=21842)) / 1e6 - PARAMS_22K[name]) <= 0.05


@pytest.mark.parametrize("name", [n for n, (_, fl) in PAPER.items() if fl is not None])
def test_macs_match_paper(name):
    model = _meta_model(name).eval()
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2 / 1e9  # FlopCounterMode counts 2 FLOPs per multiply-accumulate
    assert abs(gmacs - PAPER[name][1]) / PAPER[name][1] <= 0.03


def test_variant_settings_follow_official_yamls():
    def arch(name):  # a one-block-per-stage copy of the variant: the flags are what is checked here
        return _meta_model(name, depths=(1, 1, 1, 1)).arch

    assert arch("focalnet_large_fl4")["normalize_modulator"] is True
    for name in ("focalnet_large_fl3", "focalnet_xlarge_fl3", "focalnet_xlarge_fl4", "focalnet_huge_fl4"):
        assert arch(name)["normalize_modulator"] is False
    huge = arch("focalnet_huge_fl3")
    assert huge["use_postln_in_modulation"] and huge["use_postln"] and huge["use_conv_embed"]
    assert arch("focalnet_large_fl3")["focal_windows"] == (5, 5, 5, 5)
    iso = _meta_model("focalnet_tiny_iso")
    assert iso.arch["patch_size"] == 16 and len(iso.layers) == 1 and iso.layers[0].downsample is None


def test_official_state_dict_names_and_shapes():
    sd = _meta_model("focalnet_tiny_srf").state_dict()
    assert len(sd) == 212
    shapes = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "layers.0.blocks.0.modulation.f.weight": (195, 96),
        "layers.0.blocks.0.modulation.h.weight": (96, 96, 1, 1),
        "layers.0.blocks.0.modulation.focal_layers.1.0.weight": (96, 1, 5, 5),
        "layers.0.blocks.0.mlp.fc1.weight": (384, 96),
        "layers.0.downsample.proj.weight": (192, 96, 2, 2),
        "norm.weight": (768,),
        "head.weight": (1000, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    huge = _meta_model("focalnet_huge_fl3").state_dict()
    assert "layers.2.blocks.0.gamma_1" in huge and "layers.2.blocks.0.modulation.ln.weight" in huge
    assert huge["patch_embed.proj.weight"].shape[-1] == 7 and huge["layers.0.downsample.proj.weight"].shape[-1] == 3


def _assert_equal_to_timm(name: str, img_size: int, batch: int = 2):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.device("meta"):
        ours = create_model(name)
        theirs = _timm_equivalent(ours)
    ours.to_empty(device="cpu")
    _randomize(ours)
    ours.eval()
    # ours -> timm: converted tensors are shared with ours (assign=True), so big models cost one copy.
    theirs.load_state_dict(convert_official_to_timm(ours.state_dict(), use_postln=ours.arch["use_postln"]),
                           strict=True, assign=True)  # fmt: skip
    theirs.eval()
    with torch.no_grad():
        out_ours, out_timm = ours(x), theirs(x)
    assert (out_ours - out_timm).abs().max().item() <= 1e-4
    # timm -> ours: a fresh model loads timm's state dict through load_checkpoint (format detected).
    with torch.device("meta"):
        back = create_model(name)
    back.to_empty(device="cpu")
    report = load_checkpoint(back, theirs.state_dict(), strict=True)
    assert report.format == "timm"
    back.eval()
    with torch.no_grad():
        assert (back(x) - out_timm).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", [n for n in TIMM_VARIANTS if not n.startswith(BIG)])
def test_equal_to_timm(name):
    _assert_equal_to_timm(name, img_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TIMM_VARIANTS if n.startswith(BIG)])
def test_equal_to_timm_large(name):
    _assert_equal_to_timm(name, img_size=64, batch=1)


@pytest.mark.slow
def test_timm_registered_variants_have_our_architecture():
    # timm registers the same names; its constructors must build what we compare against (large_fl4 aside).
    for name in TIMM_VARIANTS:
        with torch.device("meta"):
            ours, theirs = create_model(name), timm.create_model(name, num_classes=1000)
        assert _n_params(ours) == _n_params(theirs), name


def test_micro_equal_to_timm_class():
    _assert_equal_to_timm("focalnet_micro", img_size=64)


def test_create_model_overrides():
    m = create_model("focalnet_micro", num_classes=10, drop_path_rate=0.3, img_size=96, focal_levels=3)
    assert m.head.out_features == 10
    assert m.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert m.arch["focal_levels"] == (3, 3, 3, 3)
    assert m(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    with pytest.raises(CheckpointError, match="focalnet_micro has no published weights"):
        create_model("focalnet_micro", pretrained=True)


def test_official_initialization():
    m = create_model("focalnet_micro")
    mod = m.layers[0].blocks[0].modulation
    for lin in (mod.f, mod.proj, m.layers[0].blocks[0].mlp.fc1, m.layers[3].blocks[0].mlp.fc2):
        assert abs(lin.weight.std().item() - 0.02) < 0.002  # trunc_normal(std=.02)
        assert torch.count_nonzero(lin.bias) == 0
    # Convs keep PyTorch's default kaiming-uniform init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 0.102 here.
    assert abs(mod.h.weight.std().item() - (1 / 32**0.5) / 3**0.5) < 0.01
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))


def test_focal_modulation_layouts_agree():
    torch.manual_seed(0)
    mod = FocalModulation(16, focal_window=3, focal_level=3, use_postln_in_modulation=True).eval()
    x = torch.randn(2, 9, 11, 16)  # (B, H, W, C), odd sizes on purpose
    out_last = mod(x)
    out_first = mod(x.permute(0, 3, 1, 2).contiguous(), channels_first=True)
    assert out_first.shape == (2, 16, 9, 11)
    torch.testing.assert_close(out_first.permute(0, 2, 3, 1), out_last, rtol=0, atol=1e-6)
    mod_cf = FocalModulation(16, focal_window=3, focal_level=3, use_postln_in_modulation=True, channels_first=True)
    mod_cf.load_state_dict(mod.state_dict())
    torch.testing.assert_close(mod_cf(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), out_last, rtol=0, atol=1e-6)
    # Training: the same input gradients in both layouts.
    x_last = x.clone().requires_grad_()
    x_first = x.permute(0, 3, 1, 2).contiguous().requires_grad_()
    mod(x_last).square().sum().backward()
    mod_cf(x_first).square().sum().backward()
    torch.testing.assert_close(x_first.grad.permute(0, 2, 3, 1), x_last.grad, rtol=1e-5, atol=1e-5)


def test_focal_modulation_maps_only_when_asked():
    mod = FocalModulation(8, focal_level=2)
    x = torch.randn(1, 6, 6, 8)
    mod(x)
    assert not hasattr(mod, "gates") and not hasattr(mod, "modulator")
    out, maps = mod(x, return_maps=True)
    assert maps["gates"].shape == (1, 3, 6, 6) and maps["modulator"].shape == (1, 8, 6, 6)
    mod.store_maps = True
    mod(x)
    assert mod.gates.shape == (1, 3, 6, 6) and not mod.modulator.requires_grad


def test_focal_modulation_matches_reference_formula():
    """Independent re-computation of the paper's equations on (B, C, H, W) tensors."""
    torch.manual_seed(0)
    dim, L = 8, 2
    mod = FocalModulation(dim, focal_window=3, focal_level=L, normalize_modulator=True).eval()
    x = torch.randn(2, 7, 7, dim)
    y = mod.f(x).permute(0, 3, 1, 2)
    q, ctx, gates = y[:, :dim], y[:, dim : 2 * dim], y[:, 2 * dim :]
    ctx_all = 0
    for level in range(L):
        conv = mod.focal_layers[level][0]
        ctx = nn.functional.gelu(nn.functional.conv2d(ctx, conv.weight, padding=conv.padding, groups=dim))
        ctx_all = ctx_all + ctx * gates[:, level : level + 1]
    ctx_all = ctx_all + nn.functional.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, L:]
    ctx_all = ctx_all / (L + 1)
    expected = mod.proj((q * mod.h(ctx_all)).permute(0, 2, 3, 1))
    torch.testing.assert_close(mod(x), expected, rtol=0, atol=1e-5)


def test_grad_checkpointing_gives_equal_grads():
    x = torch.randn(2, 3, 64, 64)

    def grads(enable: bool):
        torch.manual_seed(0)
        model = create_model("focalnet_micro", num_classes=10, drop_path_rate=0.1)
        _randomize(model)
        model.set_grad_checkpointing(enable)
        model.train()
        torch.manual_seed(1)  # same drop-path masks (checkpoint replays the RNG state on recompute)
        model(x).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_input_and_model():
    model = create_model("focalnet_micro").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_multiscale_features_and_backbone():
    model = create_model("focalnet_micro").eval()
    x = torch.randn(2, 3, 64, 96)
    feats = model.forward_features_multiscale(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    backbone = FocalNetBackbone("focalnet_micro", out_indices=(1, 2, 3))
    assert backbone.strides == [8, 16, 32] and backbone.channels == [64, 128, 256]
    outs = backbone(x)
    assert [f.shape[1] for f in outs] == [64, 128, 256]
    # The per-stage norm normalizes channels: mean ~0 over C at each position.
    assert outs[0].mean(1).abs().max() < 1e-4
    assert "norm1.weight" in backbone.state_dict()
    # The last stage before the final norm is what forward_features normalizes.
    torch.testing.assert_close(model.norm(model.forward_features_multiscale(x, (3,))[0].permute(0, 2, 3, 1)),
                               model.forward_features(x))  # fmt: skip


def test_no_graph_breaks_under_dynamo():
    model = create_model("focalnet_micro", num_classes=10, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_onednn_linear_matches_f_linear_with_grads(monkeypatch):
    import focalnet.models.focalnet as fm
    from focalnet.models.focalnet import linear

    monkeypatch.setattr(fm, "_ONEDNN_MIN_MACS", 0)  # the oneDNN path even for these small shapes
    torch.manual_seed(0)
    for shape, (n_out, n_in) in (((2, 5, 7, 24), (40, 24)), ((2, 5, 7, 40), (24, 40))):
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(n_out, n_in, requires_grad=True)
        b = torch.randn(n_out, requires_grad=True)
        for gelu in (False, True):
            out = linear(x, w, b, gelu=gelu)
            ref = nn.functional.linear(x, w, b)
            ref = nn.functional.gelu(ref) if gelu else ref
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, (x, w, b), g)
            ref_grads = torch.autograd.grad(ref, (x, w, b), g)
            for got, exp in zip(grads, ref_grads):
                torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
            with torch.no_grad():  # inference path (fused GELU)
                torch.testing.assert_close(linear(x, w, b, gelu=gelu), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn_min_macs", [0, 1 << 40])  # every matmul on oneDNN / on BLAS
def test_gradients_equal_to_timm(monkeypatch, onednn_min_macs):
    import focalnet.models.focalnet as fm

    monkeypatch.setattr(fm, "_ONEDNN_MIN_MACS", onednn_min_macs)
    torch.manual_seed(0)
    ours = create_model("focalnet_micro", num_classes=10, drop_path_rate=0.0, use_layerscale=True)
    _randomize(ours)
    theirs = _timm_equivalent(ours)
    theirs.load_state_dict(convert_official_to_timm(ours.state_dict(), use_postln=False))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    for m in (ours, theirs):
        nn.functional.cross_entropy(m(x), y).backward()
    ours_grads = convert_official_to_timm({n: p.grad for n, p in ours.named_parameters()}, use_postln=False)
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_chunked_recompute_mlp_matches_autograd(monkeypatch):
    import focalnet.models.focalnet as fm

    monkeypatch.setattr(fm, "_RECOMPUTE_MLP_BYTES", 0)  # force the chunked path on a small input
    monkeypatch.setattr(fm, "_CHUNK_BYTES", 4 << 20)
    torch.manual_seed(0)
    mlp = fm.Mlp(64, 4096)  # 4096 hidden -> 256-token chunks, so 2*16*20 = 640 tokens take 3 chunks
    assert len(fm._token_chunks(640, 4096)) == 3
    x = torch.randn(2, 16, 20, 64, requires_grad=True)
    out = mlp(x)
    assert out.grad_fn.name().endswith("_OneDNNMlpFnBackward")
    ref = nn.functional.linear(nn.functional.gelu(nn.functional.linear(x, mlp.fc1.weight, mlp.fc1.bias)),
                               mlp.fc2.weight, mlp.fc2.bias)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    for got, exp in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
