"""Weight SOURCEs end to end, without the internet: files of every format, the Hugging Face cache, URLs, tags.

A module fixture builds randomly initialised models in each ecosystem's own format, written by that ecosystem's
own code (timm's ``save_for_hf``; transformers' ``FocalNetForImageClassification`` with ``config.json`` +
``pytorch_model.bin`` as the microsoft/focalnet-* repositories hold; an official ``.pth``), publishes them on a
local Hub stand-in (``tests/localhub.py``, 127.0.0.1) under the real repository ids of the published-weights
table, and runs ``scripts/fetch_weights.py`` against it (``HF_ENDPOINT``): the real ``huggingface_hub`` client
fills a real cache. The stand-in is then shut down and everything else reads that cache with
``HF_HUB_OFFLINE=1``, as a compute node without internet does.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import timm
import torch
from conftest import PYTHON, ROOT, train_env
from localhub import LocalHub
from safetensors.torch import save_file

import focalnet
from focalnet.models.checkpoint import (
    CheckpointError,
    convert_official_to_timm,
    convert_official_to_transformers,
    convert_transformers_to_official,
    read_weights,
)

transformers = pytest.importorskip("transformers")
from transformers import FocalNetConfig, FocalNetForImageClassification  # noqa: E402

TIMM_REPO = "timm/focalnet_tiny_srf.ms_in1k"  # PUBLISHED["focalnet_tiny_srf"]["in1k"].timm
HF_REPO = "microsoft/focalnet-tiny-lrf"  # PUBLISHED["focalnet_tiny_lrf"]["in1k"].transformers
OFFICIAL_REPO = "org/focalnet-micro-official"  # a repository holding an official .pth under its own name
TOL = 1e-4


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _micro(seed: int, num_classes: int = 10):
    torch.manual_seed(seed)
    return focalnet.create_model("focalnet_micro", num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """Publish random models of each format on the local hub, fetch them with fetch_weights.py, stop the hub."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    timm_model = timm.create_model("focalnet_tiny_srf", pretrained=False).eval()
    timm.models.save_for_hf(timm_model, str(root / "timm"), safe_serialization=True)
    torch.manual_seed(1)
    hf_model = FocalNetForImageClassification(FocalNetConfig(focal_levels=[3, 3, 3, 3], num_labels=1000)).eval()
    (root / "hf").mkdir()
    hf_model.config.to_json_file(root / "hf" / "config.json")
    torch.save(hf_model.state_dict(), root / "hf" / "pytorch_model.bin")
    micro_main, micro_v1 = _micro(2), _micro(3)
    for rev, m in (("main", micro_main), ("v1", micro_v1)):
        (root / f"official_{rev}").mkdir()
        torch.save({"model": m.state_dict(), "epoch": 300}, root / f"official_{rev}" / "micro.pth")

    env = train_env(HF_HOME=str(root / "hf_home"), TORCH_HOME=str(root / "torch_home"), HF_HUB_DISABLE_TELEMETRY="1")
    with LocalHub() as hub:
        hub.add_repo(TIMM_REPO, root / "timm")
        hub.add_repo(HF_REPO, root / "hf")
        hub.add_repo(OFFICIAL_REPO, root / "official_main")
        hub.add_repo(OFFICIAL_REPO, root / "official_v1", revision="v1")
        url = hub.add_file("focalnet_micro_official.pth", root / "official_main" / "micro.pth")
        sources = [f"hf-hub:{TIMM_REPO}", "focalnet_tiny_lrf", f"hf-hub:{OFFICIAL_REPO}/micro.pth",
                   f"hf-hub:{OFFICIAL_REPO}/micro.pth@v1", url]
        out = subprocess.run([PYTHON, str(ROOT / "scripts" / "fetch_weights.py"), *sources], cwd=ROOT,
                             env={**env, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    x = _x()
    with torch.no_grad():
        logits = {"timm": timm_model(x), "hf": hf_model(x).logits, "main": micro_main(x), "v1": micro_v1(x)}
    return dict(root=root, env=env, url=url, stdout=out.stdout, logits=logits)


@pytest.fixture
def offline(fetched, monkeypatch):
    """This process reads the fetched caches with HF_HUB_OFFLINE=1 (huggingface_hub's switch, read at import:
    its constants are set here as the environment would)."""
    from huggingface_hub import constants

    root = fetched["root"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(root / "torch_home"))
    return fetched


def _logits(model, size: int = 32):
    with torch.no_grad():
        return model.eval()(_x(size))


def _script(name: str):
    """A script's module (its ``main(argv)`` runs in this process: one interpreter start is seconds on CI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the module fixture publishes and fetches full-size FocalNet-T copies
def test_fetch_weights_prints_where_each_source_went(fetched):
    lines = fetched["stdout"].splitlines()
    hub_cache = fetched["root"] / "hf_home" / "hub"
    assert any(line.startswith(f"hf-hub:{TIMM_REPO}: ") and str(hub_cache / "models--timm--focalnet_tiny_srf.ms_in1k")
               in line and line.endswith("model.safetensors (+ config.json)") for line in lines), lines
    # `true` for focalnet_tiny_lrf: timm's repo is not on this hub, so the transformers copy was fetched.
    assert any(line.startswith("focalnet_tiny_lrf: focalnet_tiny_lrf true = hf-hub:microsoft/focalnet-tiny-lrf")
               for line in lines), lines
    assert any(str(fetched["root"] / "torch_home" / "hub" / "checkpoints") in line for line in lines), lines


@pytest.mark.slow  # the module fixture publishes and fetches full-size FocalNet-T copies
def test_hub_ids_and_true_load_offline_with_the_references_logits(offline):
    ref = offline["logits"]
    by_id = focalnet.create_model("focalnet_tiny_srf", pretrained=f"hf-hub:{TIMM_REPO}")
    assert (_logits(by_id) - ref["timm"]).abs().max() <= TOL
    for source in (True, "true", "in1k"):  # the table's copies; the cached one is found without network
        model = focalnet.create_model("focalnet_tiny_srf", pretrained=source)
        assert (_logits(model) - ref["timm"]).abs().max() <= TOL
    lrf = focalnet.create_model("focalnet_tiny_lrf", pretrained=True)
    assert (_logits(lrf) - ref["hf"]).abs().max() <= TOL
    weights = read_weights(True, variant="focalnet_tiny_lrf")
    assert weights.format == "transformers" and weights.hub_config["model_type"] == "focalnet"
    assert weights.source == f"focalnet_tiny_lrf true = hf-hub:{HF_REPO}"


@pytest.mark.slow  # the module fixture publishes and fetches full-size FocalNet-T copies
def test_repository_files_revisions_and_urls(offline):
    ref = offline["logits"]
    main = focalnet.create_model("focalnet_micro", num_classes=10, pretrained=f"hf-hub:{OFFICIAL_REPO}/micro.pth")
    v1 = focalnet.create_model("focalnet_micro", num_classes=10, pretrained=f"hf-hub:{OFFICIAL_REPO}/micro.pth@v1")
    assert torch.equal(_logits(main), ref["main"]) and torch.equal(_logits(v1), ref["v1"])
    url = focalnet.create_model("focalnet_micro", num_classes=10, pretrained=offline["url"])  # torch.hub's cache, offline
    assert torch.equal(_logits(url), ref["main"])


@pytest.mark.slow  # the module fixture publishes and fetches full-size FocalNet-T copies
def test_nothing_cached_offline_is_one_line_naming_cache_and_command(offline):
    cache = str(offline["root"] / "hf_home" / "hub")
    with pytest.raises(CheckpointError) as err:
        focalnet.create_model("focalnet_micro", pretrained="hf-hub:org/not-fetched")
    msg = str(err.value)
    assert "\n" not in msg and cache in msg and "python scripts/fetch_weights.py hf-hub:org/not-fetched" in msg
    with pytest.raises(CheckpointError) as err:
        focalnet.create_model("focalnet_small_srf", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and cache in msg and "fetch_weights.py focalnet_small_srf" in msg
    assert "hf-hub:timm/focalnet_small_srf.ms_in1k" in msg and "hf-hub:microsoft/focalnet-small" in msg


@pytest.mark.slow  # the module fixture publishes and fetches full-size FocalNet-T copies
def test_transformers_config_for_another_variant_is_refused_naming_both(offline):
    with pytest.raises(CheckpointError) as err:
        focalnet.create_model("focalnet_tiny_srf", pretrained=f"hf-hub:{HF_REPO}")
    msg = str(err.value)
    assert "focal_levels=[3, 3, 3, 3]" in msg and "focal_levels=[2, 2, 2, 2]" in msg
    assert "(focalnet_tiny_srf)" in msg and "those weights are focalnet_tiny_lrf" in msg
    # Post-LN leaves no trace in the names: only config.json tells, and it is checked too.
    cfg = json.loads((offline["root"] / "hf" / "config.json").read_text())
    (offline["root"] / "postln").mkdir(exist_ok=True)
    (offline["root"] / "postln" / "config.json").write_text(json.dumps({**cfg, "use_post_layernorm": True}))
    os.link(offline["root"] / "hf" / "pytorch_model.bin", offline["root"] / "postln" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="use_postln=True"):
        focalnet.create_model("focalnet_tiny_lrf", pretrained=str(offline["root"] / "postln"))


def test_published_table_errors_name_the_choices():
    with pytest.raises(CheckpointError, match="focalnet_micro has no published weights"):
        focalnet.create_model("focalnet_micro", pretrained=True)
    with pytest.raises(CheckpointError, match="focalnet_large_fl3 publishes in22k"):
        focalnet.create_model("focalnet_large_fl3", pretrained="in1k")


def test_dat_published_official_file_is_found_in_torch_hub_cache(tmp_path, monkeypatch):
    """DAT's weights exist only as the authors' .pth (TsinghuaCloud): the table names the file in torch.hub's cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    ref = focalnet.create_model("dat_tiny")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    sd = ref.state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"model": sd}, tmp_path / "hub" / "checkpoints" / "dat_tiny_in1k_224.pth")
    model = focalnet.create_model("dat_tiny", pretrained=True)
    assert all(torch.equal(p, sd[k]) for k, p in model.named_parameters())


def test_local_files_of_every_format(tmp_path):
    src = _micro(5)
    sd = src.state_dict()
    files = {
        "ours.pt": lambda p: torch.save({"model": _micro(6).state_dict(), "ema": sd, "step": 3}, p),
        "official.pth": lambda p: torch.save({"model": sd}, p),
        "timm.pth": lambda p: torch.save(convert_official_to_timm(sd), p),
        "timm.bin": lambda p: torch.save(convert_official_to_timm(sd), p),
        "timm.safetensors": lambda p: save_file(convert_official_to_timm(sd), str(p)),
        "model.safetensors": lambda p: save_file(convert_official_to_transformers(sd), str(p)),
        "pytorch_model.bin": lambda p: torch.save(convert_official_to_transformers(sd), p),
    }
    for name, write in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write(tmp_path / name)
        model = focalnet.create_model("focalnet_micro", num_classes=10)
        report = focalnet.load_checkpoint(model, tmp_path / name, key="ema" if name == "ours.pt" else "model")
        assert torch.equal(_logits(model), _logits(src)), (name, report)
    assert convert_transformers_to_official(convert_official_to_transformers(sd)).keys() == sd.keys()


def test_fetch_weights_without_network_or_cache_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _script("fetch_weights").main(["hf-hub:microsoft/focalnet-tiny"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(tmp_path / "hf" / "hub") in line and "fetch_weights.py hf-hub:microsoft/focalnet-tiny" in line


# ---- the CLIs, offline, from the fetched cache ------------------------------------------------------------------


@pytest.mark.slow
def test_eval_py_checkpoint_hf_hub_from_the_cache(fetched, tmp_path):
    env = {**fetched["env"], "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([PYTHON, str(ROOT / "eval.py"), f"checkpoint=hf-hub:{HF_REPO}", "data=synthetic",
                          "data.num_classes=1000", "data.val_size=16", "data.batch_size=16", "trainer.amp=none",
                          f"hydra.run.dir={tmp_path / 'eval'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"] == "focalnet_tiny" and result["format"] == "transformers"  # = focalnet_tiny_lrf
    assert result["model_source"] == "detected from the weights and config.json" and result["count"] == 16



@pytest.mark.slow
def test_train_py_model_pretrained_hf_hub_from_the_cache(fetched, tmp_path):
    env = {**fetched["env"], "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    out = subprocess.run([PYTHON, str(ROOT / "train.py"), "model=focalnet_tiny_srf",
                          f"model.pretrained=hf-hub:{TIMM_REPO}", "data=synthetic", "data.train_size=32",
                          "data.val_size=16", "data.batch_size=16", "aug=none", "trainer.amp=none",
                          "trainer.max_steps=1", "optimizer.lr=1e-12", "schedule.warmup_epochs=0",
                          "logger.wandb.mode=disabled", f"hydra.run.dir={run}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    trained = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    published = read_weights(fetched["root"] / "timm" / "model.safetensors").official()
    for k, v in trained.items():  # the run started from the hub weights (an LR of 1e-12 leaves them as they were)
        if not k.startswith("head."):
            assert torch.allclose(v, published[k], atol=1e-6), k
    assert trained["head.weight"].shape == (10, 768)  # 1000-way head re-initialized for 10 classes (init_head=auto)
    assert f"initialized weights from hf-hub:{TIMM_REPO}" in (run / "train.log").read_text()


# ---- configuration and the export script ------------------------------------------------------------------------


def test_config_validates_sources_before_any_work(tmp_path):
    from conftest import TINY, compose_config

    from focalnet.engine import ConfigError, validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(compose_config([*TINY, "model.pretrained=true"], tmp_path))
    assert "model.pretrained=True: pretrained=True: focalnet_micro has no published weights" in str(err.value)
    with pytest.raises(ConfigError, match="model.pretrained='/nowhere/w.pth': no such file or directory"):
        validate_config(compose_config([*TINY, "model.pretrained=/nowhere/w.pth"], tmp_path))
    with pytest.raises(ConfigError, match="set one of them"):
        validate_config(compose_config([*TINY, f"model.pretrained={ROOT}", f"trainer.init_from={ROOT}"], tmp_path))
    for ok in ("hf-hub:microsoft/focalnet-tiny@main", "https://host/w.pth"):  # checked when resolved, not here
        validate_config(compose_config([*TINY, f"model.pretrained={ok}"], tmp_path))
    validate_config(compose_config([*TINY, "model=focalnet_large_fl3", "model.pretrained=in22k"], tmp_path))


def test_timm_model_kwargs_pretrained_takes_a_file(tmp_path):
    """`model=timm model.kwargs.pretrained=...` used to crash (pretrained passed twice); it is model.pretrained now."""
    from focalnet.engine.build import build_model

    torch.manual_seed(0)
    src = timm.create_model("test_convnext", pretrained=False)  # its default 1000 classes: the head loads too
    torch.save(src.state_dict(), tmp_path / "w.pth")
    cfg = {"name": "test_convnext", "library": "timm", "num_classes": 1000, "drop_path_rate": 0.0}
    for extra in ({"kwargs": {"pretrained": str(tmp_path / "w.pth")}}, {"pretrained": str(tmp_path / "w.pth")}):
        model = build_model({**cfg, **extra}, timm_pretrained=True)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert not torch.equal(next(iter(build_model({**cfg, "pretrained": str(tmp_path / "w.pth")}).parameters())),
                           next(iter(src.parameters())))  # without timm_pretrained (eval): no weights loaded


def test_export_weights_script_round_trips_a_run_checkpoint(tmp_path, monkeypatch, capsys):
    ema = _micro(7)
    run_cfg = {"model": {"name": "focalnet_micro", "library": "focalnet", "num_classes": 10, "kwargs": {},
                         "drop_path_rate": 0.1}}
    torch.save({"model": _micro(8).state_dict(), "ema": ema.state_dict(), "config": run_cfg}, tmp_path / "last.pt")
    monkeypatch.chdir(tmp_path)
    export = _script("export_weights").main
    for fmt in ("official", "transformers"):
        assert export([str(tmp_path / "last.pt"), "--weights", "ema", "--to", fmt]) == 0
        path = tmp_path / ("last_official.pth" if fmt == "official" else "last_transformers")
        out = capsys.readouterr().out
        assert f"-> {path.name}" in out and "load it with:" in out
        back = focalnet.create_model("focalnet_micro", num_classes=10, pretrained=str(path))
        assert torch.equal(_logits(back), _logits(ema))
    theirs = FocalNetForImageClassification.from_pretrained(tmp_path / "last_transformers").eval()
    with torch.no_grad():
        assert (theirs(_x()).logits - _logits(ema)).abs().max() <= TOL
    assert export([str(tmp_path / "last.pt"), "--to", "official"]) == 2
    assert "exists" in capsys.readouterr().err
    assert export([str(tmp_path / "last.pt"), "--to", "timm"]) == 2
    assert "timm registers no focalnet_micro" in capsys.readouterr().err
