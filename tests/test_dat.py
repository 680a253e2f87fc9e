"""DAT (Vision Transformer with Deformable Attention, v1) in the model zoo.

* full-size DAT-T/S/B: parameter counts within 1% and MACs within 3% of the paper (fvcore conventions),
  shapes at 224 and 384;
* official LeapLabTHU/DAT (commit 566a593) compatibility: a state dict in the official key layout
  (tests/fixtures/dat_tiny_official_state_dict.txt, dumped from the official DAT(**configs/dat_tiny.yaml))
  loads strictly through ``focalnet.load_checkpoint``, and with deterministic weights our forward reproduces
  logits computed by the official code;
* 224 -> 384 position-table interpolation, no weight decay on the tables, gradient checkpointing, gradients
  into the offset network, no graph breaks under torch.compile;
* presets ``in1k_dat_*`` compose with the DAT recipe; (slow) a few training steps through ``train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_train
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

import focalnet
from focalnet.engine.build import build_model, param_groups
from focalnet.engine.config import scaled_lrs, validate_config
from focalnet.models.checkpoint import CheckpointError
from focalnet.models.dat import DAT, DeformableAttention, fvcore_flop_formulas

FIXTURE = Path(__file__).parent / "fixtures" / "dat_tiny_official_state_dict.txt"

# Paper table (Xia et al., CVPR 2022, Table 1 / official README): params (M), GMACs at 224.
PAPER = {"dat_tiny": (28.3, 4.59), "dat_small": (49.7, 9.01), "dat_base": (87.9, 15.79)}


def count_gmacs(model: torch.nn.Module, img_size: int, formulas: dict | None = None) -> float:
    """Multiply-accumulates of one image (FlopCounterMode flops / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=formulas or {}) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2e9


def read_official_layout() -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    rows = []
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, dtype, shape = line.split()
        rows.append((name, getattr(torch, dtype), tuple(int(s) for s in shape.split("x"))))
    return rows


# ---- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER))
def test_param_and_mac_counts_match_the_paper(name):
    params_m, gmacs = PAPER[name]
    model = focalnet.create_model(name).eval()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n / params_m - 1) <= 0.01, (name, n)
    # The paper counted with fvcore: matmuls/convs + LayerNorm (5/elem) + grid_sample (4/output elem).
    paper_like = count_gmacs(model, 224, fvcore_flop_formulas())
    assert abs(paper_like / gmacs - 1) <= 0.03, (name, paper_like)
    # Plain FlopCounterMode misses the CPU fused-attention kernel (about 2-4% of DAT) and counts no norms:
    # the formulas are what closes the gap, and matmuls/convs alone are already within 1%.
    plain = count_gmacs(model, 224)
    matmul_only = count_gmacs(model, 224, fvcore_flop_formulas(elementwise=False))
    assert plain < matmul_only < paper_like and abs(matmul_only / gmacs - 1) <= 0.01, (plain, matmul_only)


def test_shapes_at_224_and_384():
    model = focalnet.create_model("dat_tiny", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 7, 7, 768)
    # The official 384 setting: window 12 (configs/dat_base_384.yaml) so windows tile 96/48/24/12.
    big = focalnet.create_model("dat_tiny", img_size=384, window_sizes=(12, 12, 12, 12)).eval()
    assert big.stages[2].attns[1].rpe_table.shape == (12, 47, 47)
    with torch.no_grad():
        logits, positions, references = big.forward_with_points(torch.randn(1, 3, 384, 384))
    assert logits.shape == (1, 1000)
    assert positions[0] == [None, None] and positions[2][1].shape == (1, 3, 24, 24, 2)
    assert references[3][1].shape == (1, 6, 12, 12, 2)
    assert focalnet.create_model("dat_base_384").img_size == 384


def test_sizes_that_windows_cannot_tile_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"window_sizes\[0\]=7 .*\[12, 12, 12, 12\]"):
        focalnet.create_model("dat_tiny", img_size=384)
    model = focalnet.create_model("dat_micro")
    with pytest.raises(ValueError, match="built for 64px"):
        model(torch.randn(1, 3, 32, 32))


# ---- official checkpoint compatibility ---------------------------------------------------------------------


def test_state_dict_in_the_official_layout_loads_strictly(tmp_path):
    layout = read_official_layout()
    ours = focalnet.create_model("dat_tiny")
    assert [(k, v.dtype, tuple(v.shape)) for k, v in ours.state_dict().items()] == layout
    # Hand-checked against models/dat.py + dat_blocks.py @566a593: stem, LayerNormProxy's `.norm`, the
    # stage lists, the shifted-window mask buffer, the offset network and the per-stage offset kernels.
    spot = {name: shape for name, _, shape in layout}
    assert spot["patch_proj.0.weight"] == (96, 3, 4, 4) and spot["patch_proj.1.norm.weight"] == (96,)
    assert spot["stages.0.layer_norms.3.norm.bias"] == (96,)
    assert spot["stages.0.attns.1.attn_mask"] == (64, 49, 49)  # 8x8 windows of 7x7 at 56x56
    assert spot["stages.1.attns.0.relative_position_bias_table"] == (169, 6)
    assert spot["stages.2.attns.1.conv_offset.0.weight"] == (128, 1, 5, 5)  # depthwise 5x5 per group (3x128)
    assert spot["stages.2.attns.1.conv_offset.3.weight"] == (2, 128, 1, 1)
    assert spot["stages.3.attns.1.conv_offset.0.weight"] == (128, 1, 3, 3)  # 768 / 6 groups, 3x3 at stage 4
    assert spot["stages.2.attns.1.rpe_table"] == (12, 27, 27) and spot["stages.3.attns.1.rpe_table"] == (
        24,
        13,
        13,
    )
    assert spot["stages.2.mlps.5.chunk.linear1.weight"] == (1536, 384)
    assert spot["down_projs.2.0.weight"] == (768, 384, 2, 2) and "down_projs.2.0.bias" not in spot
    assert spot["cls_norm.norm.weight"] == (768,) and spot["cls_head.weight"] == (1000, 768)

    # A released-style file: {"model": state_dict} with official names, built from the fixture alone.
    gen = torch.Generator().manual_seed(0)
    official = {}
    for name, dtype, shape in layout:
        if dtype == torch.int64:  # relative_position_index: Swin's deterministic index
            official[name] = ours.state_dict()[name].clone()
        else:
            official[name] = torch.randn(shape, generator=gen)
    torch.save({"model": official}, tmp_path / "dat_tiny_in1k_224.pth")

    model = focalnet.create_model("dat_tiny")
    report = focalnet.load_checkpoint(model, tmp_path / "dat_tiny_in1k_224.pth")
    assert not report.missing_keys and not report.unexpected_keys
    assert torch.equal(model.stages[2].attns[3].rpe_table, official["stages.2.attns.3.rpe_table"])
    assert torch.equal(
        model.stages[3].attns[1].conv_offset[0].weight, official["stages.3.attns.1.conv_offset.0.weight"]
    )
    assert torch.equal(model.cls_head.bias, official["cls_head.bias"])

    del official["stages.2.attns.1.conv_offset.3.weight"]
    with pytest.raises(CheckpointError, match="stages.2.attns.1.conv_offset.3.weight"):
        focalnet.load_checkpoint(model, official)


def _deterministic_weights(model: torch.nn.Module) -> None:
    """Weights from the official key order alone: entry i ~ N(0, 0.1) from seed i (+1 for norm scales)."""
    with torch.no_grad():
        for i, (name, value) in enumerate(model.state_dict().items()):
            if name.endswith(("relative_position_index", "attn_mask")):
                continue
            noise = 0.1 * torch.randn(value.shape, generator=torch.Generator().manual_seed(i))
            value.copy_(1 + noise if ".norm.weight" in name else noise)


# Logits of the OFFICIAL code (models/dat.py @566a593) for DAT(img_size=64, patch_size=4, num_classes=5,
# dim_stem=32, dims=[32, 64, 128, 256], depths=[1, 1, 2, 2], heads=[1, 2, 4, 8], window_sizes=[4, 4, 4, 2],
# stage_spec=[[S], [S], [L, D], [L, D]], groups=[-1, -1, 2, 4], use_pes=[F, F, T, T], strides=[-1, -1, 1, 1],
# offset_range_factor=[-1, -1, 2, 2]) (= our dat_micro) with _deterministic_weights, on
# torch.randn(2, 3, 64, 64, generator=manual_seed(0)).
OFFICIAL_MICRO_LOGITS = [
    [3.970957, -0.77024, -0.977829, 0.210101, 0.903935],
    [1.539147, 0.572173, -0.501961, -0.028331, 0.624582],
]


def test_forward_reproduces_the_official_code():
    model = focalnet.create_model("dat_micro", num_classes=5).eval()
    _deterministic_weights(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, positions, references = model.forward_with_points(x)
        assert torch.allclose(model(x), logits, atol=1e-5)
    torch.testing.assert_close(logits, torch.tensor(OFFICIAL_MICRO_LOGITS), atol=1e-4, rtol=1e-4)
    # The offsets really moved the sampling points (bounded by factor / Hk = 2 / 2 at stage 4).
    moved = (positions[3][1] - references[3][1]).abs()
    assert 0.1 < moved.max() <= 1.0


def test_224_checkpoint_loads_into_a_384_model_with_interpolated_tables(tmp_path):
    small = focalnet.create_model("dat_tiny")
    with torch.no_grad():
        small.stages[2].attns[1].rpe_table.fill_(0.25)  # a constant table must stay constant
        # A ramp along the vertical displacement only (table rows are (dy, dx) row-major): after resizing it
        # must still vary along dy only, increasing -- catches transposed or mis-reshaped tables.
        ramp = torch.linspace(-1, 1, 13)[:, None, None].expand(13, 13, 3)
        small.stages[0].attns[0].relative_position_bias_table.copy_(ramp.reshape(169, 3))
        small.stages[3].attns[1].rpe_table.copy_(torch.linspace(-1, 1, 13)[None, None, :].expand(24, 13, 13))
    torch.save({"model": small.state_dict()}, tmp_path / "dat_tiny_224.pth")

    big = focalnet.create_model("dat_tiny", img_size=384, window_sizes=(12, 12, 12, 12))
    # load_checkpoint fits the tables itself (model.adapt_state_dict); the raw state dict does not fit.
    state = torch.load(tmp_path / "dat_tiny_224.pth", weights_only=True)["model"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        big.load_state_dict(state)
    report = focalnet.load_checkpoint(big, tmp_path / "dat_tiny_224.pth")
    assert not report.missing_keys and not report.unexpected_keys

    assert torch.allclose(big.stages[2].attns[1].rpe_table, torch.full((12, 47, 47), 0.25))
    bias = big.stages[0].attns[0].relative_position_bias_table.detach().reshape(23, 23, 3)
    assert torch.allclose(bias, bias[:, :1, :].expand_as(bias)) and (bias[1:, 0] > bias[:-1, 0]).all()
    rpe = big.stages[3].attns[1].rpe_table.detach()  # ramp along x (the last axis) this time
    assert rpe.shape == (24, 23, 23) and torch.allclose(rpe, rpe[:, :1, :].expand_as(rpe))
    assert (rpe[0, 0, 1:] > rpe[0, 0, :-1]).all()
    # Buffers come from the model (window 12 at 96x96: 64 windows of 144 tokens); weights unchanged.
    assert big.stages[0].attns[1].attn_mask.shape == (64, 144, 144)
    assert torch.equal(big.stages[0].attns[1].proj_qkv.weight, small.stages[0].attns[1].proj_qkv.weight)
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


# ---- training behaviour ------------------------------------------------------------------------------------


def test_position_tables_get_no_weight_decay():
    model = focalnet.create_model("dat_micro")
    assert model.no_weight_decay_keywords() == {"relative_position_bias_table", "rpe_table"}
    tables = {
        n for n, _ in model.named_parameters() if n.endswith(("relative_position_bias_table", "rpe_table"))
    }
    assert model.no_weight_decay() == tables and len(tables) == 6
    decay, no_decay = param_groups(model, 0.05)
    params = dict(model.named_parameters())
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert all(id(params[n]) in no_decay_ids for n in tables)
    assert id(params["stages.2.attns.1.proj_q.weight"]) not in no_decay_ids  # weights still decay
    assert id(params["stages.2.attns.1.conv_offset.0.weight"]) in {id(p) for p in decay["params"]}


def test_gradient_reaches_the_offset_network():
    torch.manual_seed(0)
    model = focalnet.create_model("dat_micro", drop_path_rate=0.0)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for stage in (2, 3):
        attn = model.stages[stage].attns[1]
        assert isinstance(attn, DeformableAttention)
        # conv_offset.3 only influences the output through the sampling positions (grid_sample + bias).
        for p in (attn.conv_offset[0].weight, attn.conv_offset[1].norm.weight, attn.conv_offset[3].weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert attn.rpe_table.grad.abs().sum() > 0


def test_training_and_inference_attention_paths_agree():
    """With a trainable bias on CPU attention runs the explicit form; without grad the fused SDPA kernel."""
    model = focalnet.create_model("dat_micro", num_classes=5).eval()
    _deterministic_weights(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with_grad = model(x)
    with torch.no_grad():
        fused = model(x)
    torch.testing.assert_close(with_grad.detach(), fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_grad.detach(), torch.tensor(OFFICIAL_MICRO_LOGITS), atol=1e-4, rtol=1e-4)


def test_bf16_autocast_keeps_sampling_positions_in_fp32():
    model = focalnet.create_model("dat_micro").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, positions, _ = model.forward_with_points(x)
    assert logits.dtype == torch.bfloat16 and positions[2][1].dtype == torch.float32
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = focalnet.create_model("dat_micro", drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_graph_breaks_under_torch_compile():
    model = focalnet.create_model("dat_micro").eval()
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# ---- configs -----------------------------------------------------------------------------------------------

# preset: (model, drop path, base lr per 512, warmup epochs, clip), from DAT configs/dat_*.yaml + config.py
RECIPES = {
    "in1k_dat_tiny": ("dat_tiny", 0.2, 5e-4, 20, 5.0),
    "in1k_dat_small": ("dat_small", 0.3, 5e-4, 20, 5.0),
    "in1k_dat_base": ("dat_base", 0.5, 4e-4, 50, 1.0),
}


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_presets_compose_with_the_dat_recipe(preset):
    model_name, drop_path, lr, warmup, clip = RECIPES[preset]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose(
            config_name="config", overrides=[f"experiment={preset}", "paths.output_dir=/tmp/unused"]
        )
    cfg = validate_config(raw)
    assert cfg["model"] == {
        "name": model_name,
        "library": "focalnet",
        "num_classes": 1000,
        "drop_path_rate": drop_path,
        "pretrained": None,
        "grad_checkpointing": False,
        "kwargs": {"img_size": 224},
    }
    assert cfg["optimizer"]["lr"] == lr and cfg["optimizer"]["weight_decay"] == 0.05
    assert cfg["optimizer"]["name"] == "adamw" and not cfg["optimizer"]["official_no_weight_decay"]
    assert cfg["schedule"]["warmup_epochs"] == warmup and cfg["schedule"]["name"] == "cosine"
    assert cfg["trainer"]["clip_grad"] == clip and cfg["trainer"]["epochs"] == 300
    assert cfg["aug"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and cfg["aug"]["mixup"] == 0.8
    assert cfg["data"]["batch_size"] == 128 and cfg["data"]["img_size"] == 224
    assert scaled_lrs(cfg, world_size=8)["total_batch"] == 1024
    assert scaled_lrs(cfg, world_size=8)["lr"] == pytest.approx(lr * 2)
    with torch.device("meta"):
        model = build_model(cfg["model"])
    assert isinstance(model, DAT) and model.stages[0].drop_path[1].drop_prob == pytest.approx(
        drop_path / (sum(len(s.attns) for s in model.stages) - 1)
    )


@pytest.mark.slow
def test_a_few_training_steps_through_train_py_lower_the_loss(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "model=dat_tiny",
            "model.name=dat_micro",
            "model.drop_path_rate=0",
            "data.img_size=64",
            "data.train_size=128",
            "data.val_size=32",
            "trainer.epochs=2",
            "trainer.log_every=2",
            "optimizer.lr=3e-3",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) >= 4 and losses[-1] < 0.7 * losses[0], losses
    # The run checkpoint carries the official DAT names: the official code (or we) can load it.
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "stages.2.attns.1.conv_offset.0.weight" in last["model"]
    report = focalnet.load_checkpoint(focalnet.create_model("dat_micro", num_classes=10), last["model"])
    assert not report.missing_keys
