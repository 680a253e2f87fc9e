"""``train_detector(cfg)``: an Ultralytics detector trained and validated by Ultralytics, in our run directory.

What ``scripts/train_detector.py`` runs (config: ``conf/detect.yaml``). The training loop, losses, augmentation,
checkpoints (``weights/last.pt``, ``best.pt``) and mAP are Ultralytics' own (``DetectionTrainer`` for YOLO,
``RTDETRTrainer`` for RT-DETR, each with its validator); this module only

- checks the config and every input before work starts (exit code 2 and one line naming the key otherwise),
  including that nothing would be downloaded: the model YAML or ``.pt`` and the dataset images must be local;
- runs Ultralytics offline (:func:`focalnet.integrations.ultralytics.configure_offline`) with FocalModulation
  registered, writing into the Hydra run directory (``project``/``name`` point there);
- holds the run directory's lock (:class:`focalnet.engine.rundir.RunDirLock`), writes our ``config.yaml`` /
  ``provenance.json`` (first launch; every launch's in ``launches/<n>/``) and logs every epoch and the final validation to
  ``metrics.jsonl`` and W&B through :class:`focalnet.engine.loggers.RunLogger` (``logger.wandb``), with
  Ultralytics' metric names shortened: ``metrics/mAP50(B)`` -> ``val/mAP50``, ``lr/pg0`` -> ``train/lr_pg0``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from focalnet.engine.config import SCHEMA as TRAIN_SCHEMA
from focalnet.engine.config import (
    boolean,
    choice,
    integer,
    list_of,
    mapping,
    non_finite_numbers,
    optional,
    schema_errors,
    string,
)
from focalnet.engine.loggers import RunLogger, provenance, record_launch, redact_secrets, wandb_group
from focalnet.engine.rundir import RunDirLock

log = logging.getLogger(__name__)

SCHEMA = {
    "detector": {"model": string, "task": choice("detect", "rtdetr")},
    "data": {
        "yaml": optional(string),
        "shapes": {"root": string, "train_images": integer(1), "val_images": integer(1), "img_size": integer(32),
                   "seed": integer(0)},
    },
    "train": {
        "epochs": integer(1), "imgsz": integer(32), "batch": integer(1), "device": string, "workers": integer(0),
        "seed": integer(0), "optimizer": string, "plots": boolean, "resume": boolean, "extra": mapping,
    },
    "ultralytics_dir": string,
    "logger": TRAIN_SCHEMA["logger"],  # the same logger group (conf/logger/) as train.py
    "paths": {"output_root": string, "output_dir": string},
}


class DetectorConfigError(ValueError):
    """A config value or input file that cannot work; the message names the key and the fix."""


def _metric_name(key: str) -> str:
    """Ultralytics' metric keys in our style: ``metrics/mAP50-95(B)`` -> ``val/mAP50-95``, ``lr/pg0`` -> ``train/lr_pg0``."""
    if key.startswith("metrics/"):
        return "val/" + re.sub(r"\([A-Z]\)$", "", key.removeprefix("metrics/"))
    if key.startswith("lr/"):
        return "train/lr_" + key.removeprefix("lr/")
    return key


def _check_local(path: str, key: str) -> None:
    if "://" in path:
        raise DetectorConfigError(f"{key}={path}: a URL; this entry never downloads, give a local file")
    if path.endswith(".pt") and not Path(path).expanduser().is_file():
        raise DetectorConfigError(f"{key}={path}: no such file; this entry never downloads weights, give a local "
                                  ".pt (or a model YAML to train from scratch)")


def _resolve_model(cfg: dict) -> str:
    """The model to hand Ultralytics: a shipped YAML's path, or the config's value once known to be local."""
    from ultralytics.nn.tasks import yaml_model_load

    from focalnet.integrations import ultralytics as fu

    model = cfg["detector"]["model"]
    if model.removesuffix(".yaml") in fu.list_model_yamls():
        model = str(fu.model_yaml(model))
    _check_local(model, "detector.model")
    if model.endswith(".pt"):
        return str(Path(model).expanduser().resolve())
    try:
        spec = yaml_model_load(model)  # Ultralytics' own resolution of model YAML names (local files only)
    except (FileNotFoundError, OSError) as e:
        raise DetectorConfigError(f"detector.model={model}: {e}; use a shipped YAML ({', '.join(fu.list_model_yamls())}), "
                                  "an Ultralytics model YAML such as yolov8n.yaml, or a path") from e
    is_rtdetr = (spec.get("head") or [[None, None, ""]])[-1][2] == "RTDETRDecoder"
    if is_rtdetr != (cfg["detector"]["task"] == "rtdetr"):
        raise DetectorConfigError(f"detector.task={cfg['detector']['task']} does not fit detector.model={model} "
                                  f"(its head is {'' if is_rtdetr else 'not '}an RTDETRDecoder): use "
                                  f"detector.task={'rtdetr' if is_rtdetr else 'detect'}")
    return model


def _resolve_data(cfg: dict) -> str:
    """The dataset YAML, with every image directory on disk (the generated shapes set is written here if needed)."""
    from ultralytics.data.utils import check_det_dataset

    if cfg["data"]["yaml"] is None:
        from data.shapes_detection import ShapesConfigError, materialize

        s = cfg["data"]["shapes"]
        try:
            return str(materialize(s["root"], train_images=s["train_images"], val_images=s["val_images"],
                                   img_size=s["img_size"], seed=s["seed"]))
        except ShapesConfigError as e:
            raise DetectorConfigError(f"data.shapes.root: {e}") from e
    path = cfg["data"]["yaml"]
    _check_local(path, "data.yaml")
    try:
        spec = check_det_dataset(path, autodownload=False)  # Ultralytics' own path resolution, never downloading
    except (OSError, SyntaxError, ValueError, KeyError) as e:  # Ultralytics explains what is wrong
        raise DetectorConfigError(f"data.yaml={path}: {e}") from e
    for split in ("train", "val"):
        for p in spec[split] if isinstance(spec[split], list) else [spec[split]]:
            if not Path(p).exists():
                raise DetectorConfigError(f"data.yaml={path}: {split} images {p} are missing; this entry never "
                                          "downloads datasets, fetch them first")
    return path


def _ultralytics_args(cfg: dict, model: str, data: str, run_dir: Path) -> dict:
    t = cfg["train"]
    if "," in str(t["device"]):
        raise DetectorConfigError(f"train.device={t['device']}: one device only (cpu or one CUDA index); "
                                  "Ultralytics' multi-GPU mode re-launches workers this entry does not log from")
    for key, value in t["extra"].items():
        if isinstance(value, str):
            _check_local(value, f"train.extra.{key}")
    if t["resume"]:
        last = run_dir / "weights" / "last.pt"
        if not last.is_file():
            raise DetectorConfigError(f"train.resume=true but {last} does not exist; start a new run without it")
        return {"resume": str(last)}  # Ultralytics restores every argument from the checkpoint
    if (run_dir / "weights" / "last.pt").is_file():
        raise DetectorConfigError(f"{run_dir} already holds a detector run (weights/last.pt): continue it with "
                                  "train.resume=true or choose another run directory")
    args = {"model": model, "data": data, "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True,
            **{k: t[k] for k in ("epochs", "imgsz", "batch", "device", "workers", "seed", "optimizer", "plots")},
            **t["extra"]}
    from ultralytics.cfg import get_cfg

    try:
        get_cfg(overrides=dict(args))  # Ultralytics' own check of argument names and types
    except (SyntaxError, TypeError, ValueError) as e:
        raise DetectorConfigError(f"train / train.extra: {e}") from e
    return args


def _previous_wandb_id(run_dir: Path) -> str | None:
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def train_detector(cfg: DictConfig | dict) -> dict:
    """Train and validate as configured; returns the final validation metrics (``final/*``) and ``run_dir``."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    errors = non_finite_numbers(plain) or schema_errors(SCHEMA, plain)
    if errors:
        raise DetectorConfigError("invalid config:\n  " + "\n  ".join(errors))
    run_dir = Path(plain["paths"]["output_dir"]).resolve()

    from focalnet.integrations import ultralytics as fu

    fu.configure_offline(plain["ultralytics_dir"])
    fu.register()
    model = _resolve_model(plain)
    args = _ultralytics_args(plain, model, _resolve_data(plain), run_dir)
    lock = RunDirLock(run_dir)  # one owner at a time, like train.py's runs (a second launch exits 2)
    lock.acquire()
    try:
        return _train(plain, args, run_dir)
    finally:
        lock.release()


def _train(plain: dict, args: dict, run_dir: Path) -> dict:
    from ultralytics.models.rtdetr.train import RTDETRTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    prov = provenance(plain, world_size=1, device=str(plain["train"]["device"]))  # secrets redacted
    record_launch(run_dir, prov)  # config.yaml / provenance.json of the first launch, launches/<n>/ of each
    logger = RunLogger(run_dir, redact_secrets(plain), enabled=True, derived={}, prov=prov,
                       wandb_id=_previous_wandb_id(run_dir) if "resume" in args else None,
                       group=wandb_group(plain), job_type="detect")
    final: dict = {}

    def log_epoch(trainer) -> None:
        if trainer.epoch >= trainer.epochs:  # Ultralytics' final validation of best.pt: logged by log_final
            return
        metrics = {"epoch": trainer.epoch + 1, **trainer.label_loss_items(trainer.tloss, prefix="train"),
                   **{_metric_name(k): float(v) for k, v in {**trainer.metrics, **trainer.lr}.items()}}
        logger.log(metrics, step=trainer.epoch + 1)

    def log_final(trainer) -> None:  # after Ultralytics' final validation of best.pt
        final.update({"final/" + _metric_name(k).removeprefix("val/"): float(v) for k, v in trainer.metrics.items()})
        logger.log(final, step=trainer.epochs + 1)
        logger.summary(final)

    trainer_cls = RTDETRTrainer if plain["detector"]["task"] == "rtdetr" else DetectionTrainer
    failed = True
    try:
        trainer = trainer_cls(overrides=args)
        trainer.add_callback("on_fit_epoch_end", log_epoch)
        trainer.add_callback("on_train_end", log_final)
        trainer.train()
        failed = False
    finally:
        logger.close(failed=failed)
    log.info("final validation of %s: %s", trainer.best, ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return {**final, "run_dir": str(run_dir), "best": str(trainer.best)}
