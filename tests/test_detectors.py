"""FocalModulation inside Ultralytics' YOLOv8 and RT-DETR, checked against the installed Ultralytics itself.

* the shipped YAMLs equal Ultralytics' own ``yolov8n/s.yaml`` and ``rtdetr-l.yaml`` except the one row where
  SPPF / AIFI was; built by Ultralytics, every other layer has the same type, inputs and parameter shapes, and
  the block receives and returns exactly the tensor shapes SPPF / AIFI did;
* forward + backward through Ultralytics' own detection losses reaches the block and everything else;
* ``register()`` is idempotent, and a model parser that resolves names differently fails with the version range;
* the generated shapes set is valid YOLO data (Ultralytics' own dataset check reads it);
* (slow) ``scripts/train_detector.py`` trains yolov8n-focal with Ultralytics' trainer, its validator reports
  mAP50 > 0, W&B's reader sees the offline run, and no socket left the machine (an audit hook records every
  attempt; HTTP(S) proxies point at a dead local port);
* (slow) the benchmark script prints params, GFLOPs and the latency ratio.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PYTHON, ROOT, train_env
from torch.utils.flop_counter import FlopCounterMode

from data import shapes_detection

NO_NETWORK = ROOT / "tests" / "no_network"
WANDB = str(Path(sys.executable).with_name("wandb"))
# The short training run of the slow test (and of the README's demo command): 128 generated images at 64 px.
TINY_RUN = ["train.epochs=12", "train.imgsz=64", "train.optimizer=AdamW", "data.shapes.train_images=128",
            "data.shapes.val_images=32", "data.shapes.img_size=96",
            "+train.extra={nbs: 16, warmup_epochs: 1, lr0: 0.005, lrf: 0.2, mosaic: 0.0}"]


@pytest.fixture(scope="session")
def fu(tmp_path_factory):
    """The integration, registered, with Ultralytics offline (settings and fonts in a session temp dir)."""
    from focalnet.integrations import ultralytics as integration

    integration.configure_offline(tmp_path_factory.mktemp("ultralytics"))
    integration.register()
    return integration


def test_pillow_keeps_its_own_error_for_undecodable_files(fu):
    """Ultralytics replaces PIL.Image.open at import; the data pipeline skips and counts undecodable images by
    Pillow's UnidentifiedImageError, which must survive a process that imported Ultralytics."""
    from PIL import Image, UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"not an image"))


def build(fu, name_or_path: str):
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    cls = RTDETRDetectionModel if "rtdetr" in str(name_or_path) else DetectionModel
    return cls(str(name_or_path), verbose=False)


def rows(spec: dict) -> list:
    return spec["backbone"] + spec["head"]


@pytest.mark.parametrize("name", ["yolov8n-focal", "yolov8s-focal", "rtdetr-l-focal"])
def test_shipped_yaml_is_ultralytics_own_but_one_row(fu, name):
    from ultralytics.nn.tasks import yaml_model_load

    stock_name, index, stock_layer = fu.STOCK_COUNTERPARTS[name]
    stock = yaml_model_load(stock_name)  # the YAML the installed Ultralytics ships
    ours = yaml.safe_load(fu.model_yaml(name).read_text())
    scale = stock["scale"] or next(iter(stock["scales"]))  # rtdetr-l.yaml's name carries no scale: its only one
    assert ours["nc"] == stock["nc"] and ours["scales"] == {scale: stock["scales"][scale]}
    assert len(rows(ours)) == len(rows(stock)) and len(ours["backbone"]) == len(stock["backbone"])
    for i, (a, b) in enumerate(zip(rows(ours), rows(stock))):
        if i == index:
            assert b[2] == stock_layer and a[2] == "FocalModulation" and a[:2] == b[:2] == [-1, 1]
        else:
            assert a == b, f"row {i}"


@pytest.mark.parametrize("name", ["yolov8n-focal", "yolov8s-focal", "rtdetr-l-focal"])
def test_block_sits_where_the_stock_layer_was_and_the_graph_is_unchanged(fu, name):
    stock_name, index, stock_layer = fu.STOCK_COUNTERPARTS[name]
    stock, ours = build(fu, stock_name), build(fu, fu.model_yaml(name))
    assert len(stock.model) == len(ours.model) and stock.save == ours.save
    for i, (a, b) in enumerate(zip(stock.model, ours.model)):
        assert a.f == b.f and a.i == b.i == i
        if i == index:
            assert a.type.endswith(stock_layer) and b.type == "focalnet.integrations.ultralytics.FocalModulation"
            continue
        assert a.type == b.type, f"layer {i}"
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    # The block reads and returns exactly the tensors the stock layer did (256 px input: P5 is 8x8).
    shapes = {}

    def record(key):
        def hook(module, inputs, output):
            shapes[key] = (inputs[0].shape, output.shape)
        return hook

    for key, model in (("stock", stock), ("ours", ours)):
        model.model[index].register_forward_hook(record(key))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 256, 256))
    assert shapes["ours"] == shapes["stock"] and shapes["ours"][0] == shapes["ours"][1]
    # Ultralytics' GFLOPs (thop, in model.info) count the block's functional linears: at 640 px (P5 20x20) the
    # focal - stock difference matches torch's FlopCounterMode on the two layers (which skips norms, hence 3%).
    layer_gflops = {}
    for key, model in (("stock", stock), ("ours", ours)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model[index](torch.zeros(1, shapes[key][0][1], 20, 20))
        layer_gflops[key] = counter.get_total_flops() / 1e9
    info_delta = ours.info(imgsz=640)[3] - stock.info(imgsz=640)[3]
    assert info_delta == pytest.approx(layer_gflops["ours"] - layer_gflops["stock"], rel=0.03)
    block = ours.model[index].modulation
    assert isinstance(block, __import__("focalnet").FocalModulation) and block.channels_first
    assert block.dim == shapes["ours"][0][1] and (block.focal_window, block.focal_level) == (7, 2)
    rtdetr = name.startswith("rtdetr")
    assert block.normalize_modulator == block.use_postln_in_modulation == rtdetr


@pytest.mark.parametrize("name", ["yolov8n-focal", "rtdetr-l-focal"])
def test_forward_backward_through_ultralytics_losses(fu, name):
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    model = build(fu, fu.model_yaml(name))
    model.args, model.nc = get_cfg(), 80  # what Ultralytics' trainer attaches (loss gains, class count)
    model.train()
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0], [1.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.7, 0.6, 0.4, 0.5], [0.5, 0.5, 0.6, 0.6]])}
    loss, items = model.loss(batch)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and all(torch.isfinite(torch.as_tensor(v)).all() for v in items.values())
    index = fu.STOCK_COUNTERPARTS[name][1]
    block = dict(model.model[index].named_parameters())
    assert {"modulation.f.weight", "modulation.h.weight", "modulation.proj.weight",
            "modulation.focal_layers.0.0.weight"} <= set(block)
    for pname, p in block.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    with_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()]
    assert sum(with_grad) / len(with_grad) > 0.9  # the rest of the detector trains too


def test_checkpoints_load_under_ultralytics_restricted_weights_only_loading(fu, tmp_path):
    from ultralytics.nn.tasks import torch_safe_load

    model = build(fu, fu.model_yaml("yolov8n-focal"))
    torch.save({"model": model.half(), "train_args": {}}, tmp_path / "model.pt")  # Ultralytics' checkpoint layout
    ckpt, _ = torch_safe_load(str(tmp_path / "model.pt"), safe_only=True)  # weights_only=True + its allow-list
    loaded = ckpt["model"].model[9]
    assert isinstance(loaded, fu.FocalModulation) and torch.equal(loaded.modulation.f.weight, model.model[9].modulation.f.weight)


def test_register_is_idempotent_and_a_different_parser_names_the_supported_versions(fu, monkeypatch):
    import ultralytics.nn.tasks as tasks

    wrapped = tasks.parse_model
    fu.register()
    assert tasks.parse_model is wrapped and tasks.FocalModulation is fu.FocalModulation

    # Ultralytics' own parse_model, resolving layer names in a namespace of its own (as a registry would):
    # FocalModulation is then unknown to it, which register() must report, leaving Ultralytics as it was.
    original = wrapped.focalnet_wrapped
    namespace = {k: v for k, v in original.__globals__.items() if k != "FocalModulation"}
    isolated = types.FunctionType(original.__code__, namespace, original.__name__,
                                  original.__defaults__, original.__closure__)
    monkeypatch.setattr(tasks, "parse_model", isolated)
    monkeypatch.delattr(tasks, "FocalModulation")
    with pytest.raises(fu.UltralyticsIntegrationError, match=r"supports ultralytics>=8\.4\.0,<8\.5 .*KeyError"):
        fu.register()
    assert tasks.parse_model is isolated and not hasattr(tasks, "FocalModulation")


def test_a_row_reading_several_layers_is_refused(fu):
    from ultralytics.nn.tasks import parse_model

    d = {"nc": 1, "backbone": [[-1, 1, "Conv", [8, 3, 2]], [[-1, 0], 1, "FocalModulation", []]], "head": []}
    with pytest.raises(ValueError, match="takes one input"):
        parse_model(d, ch=3, verbose=False)


# ------------------------------------------------------------------------------------------------ data
def test_shapes_set_is_valid_yolo_data_and_deterministic(fu, tmp_path):
    from ultralytics.data.utils import check_det_dataset

    kw = dict(train_images=6, val_images=3, img_size=64, seed=3)
    path = shapes_detection.materialize(tmp_path / "a", **kw)
    again = shapes_detection.materialize(tmp_path / "b", **kw)
    assert shapes_detection.materialize(tmp_path / "a", **kw) == path  # already there: nothing rewritten
    spec = check_det_dataset(str(path), autodownload=False)  # Ultralytics' own reading of the dataset YAML
    assert spec["nc"] == 3 and spec["names"] == {0: "circle", 1: "square", 2: "triangle"}
    for split, n in (("train", 6), ("val", 3)):
        images = sorted((tmp_path / "a" / "images" / split).glob("*.jpg"))
        labels = sorted((tmp_path / "a" / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == n and Path(spec[split]) == images[0].parent
        for label in labels:
            lines = [line.split() for line in label.read_text().splitlines()]
            assert 1 <= len(lines) <= 3
            for cls, *box in lines:
                x, y, w, h = map(float, box)
                assert cls in ("0", "1", "2") and 0 < w < 1 and 0 < h < 1
                assert 0 <= x - w / 2 and x + w / 2 <= 1 and 0 <= y - h / 2 and y + h / 2 <= 1
            assert label.read_text() == (again.parent / "labels" / split / label.name).read_text()
            image = label.parent.parent.parent / "images" / split / f"{label.stem}.jpg"
            assert image.read_bytes() == (again.parent / "images" / split / image.name).read_bytes()
    with pytest.raises(shapes_detection.ShapesConfigError, match="written with"):
        shapes_detection.materialize(tmp_path / "a", **{**kw, "seed": 4})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(shapes_detection.ShapesConfigError, match="not a generated shapes set"):
        shapes_detection.materialize(tmp_path / "c", **kw)


# ------------------------------------------------------------------------------------------------ entry
def compose_detect(overrides, run_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from focalnet.engine.distributed import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="detect", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.mark.parametrize("overrides, message", [
    (["detector.model=/nowhere/yolov8n.pt"], "never downloads weights"),
    (["detector.model=https://example.com/yolov8n.pt"], "a URL"),
    (["detector.model=no_such_model.yaml"], "detector.model=no_such_model.yaml"),
    (["detector=yolov8n", "detector.task=rtdetr"], "use detector.task=detect"),
    (["data.yaml=/nowhere/data.yaml"], "data.yaml=/nowhere/data.yaml"),
    (["train.device='0,1'"], "one device only"),
    (["+train.extra={pretrained: yolov8n.pt}"], "train.extra.pretrained=yolov8n.pt: no such file"),
    (["+train.extra={no_such_argument: 1}"], "no_such_argument"),
    (["train.epochs=0"], "train.epochs=0 is not allowed"),
])
def test_bad_inputs_are_refused_before_any_work(fu, tmp_path, overrides, message):
    from focalnet.integrations.ultralytics_train import DetectorConfigError, train_detector

    cfg = compose_detect([*overrides, f"data.shapes.root={tmp_path / 'shapes'}", "data.shapes.train_images=2",
                          "data.shapes.val_images=1", "logger.wandb.mode=disabled",
                          f"ultralytics_dir={tmp_path / 'u'}"], tmp_path / "run")
    with pytest.raises(DetectorConfigError, match=message.replace(".", r"\.").replace("{", r"\{")):
        train_detector(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_finished_run_directory_is_not_overwritten(fu, tmp_path):
    from focalnet.integrations.ultralytics_train import DetectorConfigError, train_detector

    (tmp_path / "run" / "weights").mkdir(parents=True)
    (tmp_path / "run" / "weights" / "last.pt").write_bytes(b"x")
    cfg = compose_detect([f"data.shapes.root={tmp_path / 'shapes'}", "data.shapes.train_images=2",
                          "data.shapes.val_images=1", "logger.wandb.mode=disabled"], tmp_path / "run")
    with pytest.raises(DetectorConfigError, match="train.resume=true"):
        train_detector(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path: Path) -> dict:
    """A user's shell without network: the audit hook of tests/no_network records and blocks any attempt.

    Ultralytics' own switches (YOLO_OFFLINE...) are not set, as in a user's shell: the entry has to set them.
    """
    dead = f"http://127.0.0.1:{free_port()}"
    env = train_env(PYTHONPATH=os.pathsep.join([str(NO_NETWORK), str(ROOT)]), NO_NETWORK_LOG=str(tmp_path / "net.log"),
                    NO_NETWORK_DEAD_PORT=dead.rsplit(":", 1)[1], HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead,
                    http_proxy=dead, https_proxy=dead, FOCALNET_CACHE=str(tmp_path / "cache"))
    return {k: v for k, v in env.items() if not k.startswith(("YOLO_", "ULTRALYTICS_"))}


def test_the_network_guard_sees_ultralytics_probe_when_not_offline(tmp_path):
    env = {**offline_env(tmp_path), "YOLO_CONFIG_DIR": str(tmp_path / "u")}  # settings file away from $HOME
    proc = subprocess.run([PYTHON, "-c", "import ultralytics.utils as u; print(u.ONLINE)"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "False", proc.stderr[-2000:]
    assert "socket.getaddrinfo 'one.one.one.one'" in (tmp_path / "net.log").read_text()


def test_cli_exit_code_2_names_the_missing_dataset(tmp_path):
    env = offline_env(tmp_path)
    proc = subprocess.run([PYTHON, "scripts/train_detector.py", f"hydra.run.dir={tmp_path / 'run'}",
                           "data.yaml=/nowhere/coco.yaml", "logger.wandb.mode=disabled"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.yaml=/nowhere/coco.yaml" in proc.stderr + proc.stdout
    assert not (tmp_path / "net.log").exists()


@pytest.mark.slow
def test_trains_with_ultralytics_trainer_offline_and_validator_finds_objects(tmp_path):
    run_dir = tmp_path / "run"
    env = offline_env(tmp_path)
    proc = subprocess.run([PYTHON, "scripts/train_detector.py", f"hydra.run.dir={run_dir}", *TINY_RUN,
                           "logger.wandb.mode=offline"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()
    assert "128 images, 0 backgrounds, 0 corrupt" in proc.stdout + proc.stderr  # Ultralytics' label scan

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val/mAP50" in r]
    final = records[-1]
    assert [r["epoch"] for r in epochs] == list(range(1, 13)) and final["step"] == 13
    assert final["final/mAP50"] > 0, final  # Ultralytics' validator on weights/best.pt
    assert {"train/box_loss", "train/cls_loss", "train/dfl_loss", "val/mAP50-95", "train/lr_pg0"} <= set(epochs[0])
    assert epochs[-1]["train/box_loss"] < epochs[0]["train/box_loss"]
    assert (run_dir / "weights" / "best.pt").is_file() and (run_dir / "results.csv").is_file()
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["packages"]["ultralytics"] == "8.4.190" and prov["config"]["detector"]["model"] == "yolov8n-focal"
    settings = json.loads((tmp_path / "cache" / "ultralytics" / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False and settings["wandb"] is False

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(wandb_run)], capture_output=True,
                         text=True, timeout=120, env=train_env())
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["state"] == "finished" and summary["summary"]["final/mAP50"] == final["final/mAP50"]
    print(f"yolov8n-focal, 12 epochs at 64 px on 128 generated images: final mAP50 {final['final/mAP50']:.3f}, "
          f"mAP50-95 {final['final/mAP50-95']:.3f}")


@pytest.mark.slow
def test_rtdetr_focal_trains_with_ultralytics_rtdetr_trainer(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([PYTHON, "scripts/train_detector.py", "detector=rtdetr_l_focal", f"hydra.run.dir={run_dir}",
                           "train.epochs=1", "train.imgsz=64", "train.batch=4", "data.shapes.train_images=8",
                           "data.shapes.val_images=4", "data.shapes.img_size=64", "logger.wandb.mode=disabled"],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rtdetr-l-focal.yaml" in (run_dir / "args.yaml").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/giou_loss", "train/l1_loss", "val/mAP50"} <= set(records[0])  # RT-DETR's own losses
    assert "final/mAP50" in records[-1]
    assert not (tmp_path / "net.log").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_with_ultralytics_resume_into_the_same_logs(tmp_path):
    """SIGKILL during epoch 2 (after epoch 1's checkpoint and log record), then ``train.resume=true``."""
    run_dir = tmp_path / "run"
    env = offline_env(tmp_path)
    args = [PYTHON, "scripts/train_detector.py", f"hydra.run.dir={run_dir}", "train.epochs=3", "train.imgsz=64",
            "data.shapes.train_images=32", "data.shapes.val_images=4", "data.shapes.img_size=64",
            "logger.wandb.mode=offline"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    # Epoch 1's record is written by our on_fit_epoch_end callback, after Ultralytics wrote weights/last.pt.
    while not (metrics.exists() and '"epoch": 1' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before epoch 1 was logged"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    relaunch = subprocess.run([*args, "train.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert "Resuming training" in relaunch.stdout + relaunch.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records if "val/mAP50" in r][-2:] == [2, 3] and "final/mAP50" in records[-1]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run, two launches
    assert not (tmp_path / "net.log").exists()


@pytest.mark.slow
def test_benchmark_prints_params_gflops_and_latency_ratio():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, "scripts/bench_detectors.py", "--models", "yolov8n", "--imgsz", "64",
                           "--iters", "2", "--warmup", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| yolov8n")]
    assert len(rows) == 1 and rows[0].count("|") == 8 and rows[0].count("x |") == 2  # wall and CPU-time ratios
