"""``evaluate(cfg)``, what ``eval.py`` runs: a checkpoint's accuracy on an evaluation set, or model throughput.

``mode=accuracy``
    1. Read the checkpoint SOURCE once (``weights_only=True`` or safetensors; ``focalnet.models.sources``): our run
       checkpoints (``weights=auto``/``model``: the ``model`` entry, whose scores ``val/*`` logged and ``best.pt``
       was chosen on; ``weights=ema``: the EMA weights), official microsoft/FocalNet ``.pth`` files, timm and
       transformers FocalNet files or hub directories, ``hf-hub:`` ids, URLs, or ``true``/a tag with ``model=NAME``.
    2. The model: ``model=NAME`` when given; else the checkpoint's stored ``config`` (our checkpoints); else the
       registered FocalNet variant whose parameter names and shapes equal the file's (official/timm/transformers
       files; a transformers config.json decides the flags the names cannot show).
    3. The class space: the eval set's (``data.num_classes`` for ``eval_set=val``, 1000 for ReaL/V2/A/R). A
       21842-way ImageNet-22K head evaluated on a 1000-class set keeps rows 0..999 (FocalNet's
       ``imagenet22k_ms`` layout puts ImageNet-1K first, in 1K order), which is ``logits[:, :1000]``.
       ImageNet-1K class 850 (n04399382, teddy bear) has no images in ImageNet-22K, so that row was never
       trained on a positive: ``top1``/``top5`` count class 850 as is (the official README's protocol), and
       ``top1_excl_850``/``top5_excl_850`` leave its images out and never predict it (its logit is masked).
    4. ``focalnet.engine.loop.validate`` — the training loop's own validation pass, exact counts summed over
       torchrun ranks — gives top-1/top-5/loss, so evaluating a checkpoint reproduces the numbers logged
       while training it. The same pass keeps each sample's ranked top-k classes for what ``validate`` does not
       compute (:mod:`focalnet.engine.metrics`): ReaL scores, per-class accuracy, the class-850 exclusion.
    5. Rank 0 prints a summary and writes ``eval.json`` (+ ``metrics.jsonl``, W&B when enabled) to the run dir.

``mode=throughput``
    img/s at ``throughput.batch_size`` after ``warmup_iters`` batches (timed over ``iters``) for every precision x
    eager/``torch.compile`` (:mod:`focalnet.engine.throughput`), written to ``throughput.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

import focalnet
from focalnet.data.eval_sets import build_eval_set
from focalnet.data.loaders import DeviceLoader
from focalnet.engine import distributed as D
from focalnet.engine.amp import AmpStep
from focalnet.engine.build import build_model
from focalnet.engine.checkpointing import first_non_finite, load_file
from focalnet.engine.config import validate_eval_config
from focalnet.engine.loggers import RunLogger, provenance, wandb_group, write_run_files
from focalnet.engine.loop import validate
from focalnet.engine.metrics import MISSING_22K_CLASS, extra_metrics
from focalnet.engine.throughput import format_throughput, throughput_rows
from focalnet.engine.trainer import resolve_device
from focalnet.models.checkpoint import (
    IN1K_CLASSES,
    CheckpointError,
    auto_head,
    model_config_for,
    read_weights,
)
from focalnet.models.flops import count_macs

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig | Mapping) -> dict:
    """Run eval.py's config (``conf/eval.yaml``); returns the results dict that is also written as JSON."""
    plain = validate_eval_config(cfg)
    if plain["mode"] == "throughput":
        return run_throughput(plain)
    return run_accuracy(plain)


# ---- checkpoint -> model --------------------------------------------------------------------------------


def _head_weight_name(model: nn.Module) -> str | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    weight = getattr(head, "weight", None)
    return next((n for n, p in model.named_parameters() if p is weight), None) if weight is not None else None


def build_eval_model(cfg: dict, num_classes: int, *, load_weights: bool = True) -> tuple[nn.Module, dict]:
    """Model for ``cfg`` with a ``num_classes``-way head, loaded from ``cfg['checkpoint']``; plus a report."""
    report: dict = {}
    weights, official_sd, stored = None, None, None
    if cfg.get("checkpoint") is not None:
        variant = cfg["model"]["name"] if "model" in cfg else None
        weights = read_weights(cfg["checkpoint"], cfg["weights"], variant=variant, torch_load=load_file)
        bad = first_non_finite(weights.state_dict)
        if bad is not None:  # a diverged model scores at chance: an error, not a number
            raise CheckpointError(f"{weights.source}: weight {bad} ({weights.key or 'state dict'}) is NaN/inf: this "
                                  f"checkpoint comes from a diverged run; evaluate an earlier one")
        official_sd, stored = weights.official(), weights.train_config
        report.update(checkpoint=weights.source, weights=weights.key or "state_dict", ema_available=weights.has_ema,
                      format=weights.format)

    model_cfg, source = model_config_for(weights, cfg.get("model")) if weights is not None else (
        dict(cfg["model"]), "model=" + cfg["model"]["name"])
    if source == "checkpoint config":
        _warn_on_transform_change(stored, cfg)
    model_cfg.update(num_classes=num_classes, drop_path_rate=0.0, grad_checkpointing=False)
    model = build_model(model_cfg)
    report.update(model=model_cfg["name"], model_source=source, num_params=sum(p.numel() for p in model.parameters()))
    if weights is None or not load_weights:
        return model, report

    head_name = _head_weight_name(model)
    ckpt_classes = official_sd[head_name].shape[0] if head_name in official_sd else None
    head = auto_head(ckpt_classes, num_classes) if ckpt_classes is not None else "strict"
    if head == "reinit":  # a fresh head scores at chance: not an evaluation
        raise CheckpointError(f"the checkpoint's head has {ckpt_classes} classes but the eval set has {num_classes}: "
                              f"evaluate it on a {ckpt_classes}-class set (data.num_classes), or fine-tune it "
                              f"(trainer.init_from=...) first")
    result = focalnet.load_checkpoint(model, weights, head=head)
    report.update(head=result.head, checkpoint_classes=ckpt_classes, load_report=str(result))
    return model, report


def _warn_on_transform_change(stored: Mapping, cfg: dict) -> None:
    """Evaluating at another resolution/crop than the checkpoint was validated with is allowed, but said."""
    then, now = stored.get("data", {}), cfg["data"]
    for key, a, b in (("data.img_size", then.get("img_size"), now.get("img_size")),
                      ("aug.test_crop", stored.get("aug", {}).get("test_crop"), cfg["aug"].get("test_crop"))):
        if a is not None and a != b:
            log.warning("%s=%s here, but the checkpoint was trained/validated with %s=%s", key, b, key, a)


# ---- accuracy -------------------------------------------------------------------------------------------


def run_accuracy(cfg: dict) -> dict:
    info = D.init_distributed()
    t = cfg["trainer"]
    device = resolve_device(t["device"], info.local_rank)
    es = build_eval_set(cfg["eval_set"], cfg["data"], cfg["aug"], root=cfg["eval_root"],
                        real_labels=cfg["real_labels"], rank=info.rank, world_size=info.world_size, seed=t["seed"])
    model_classes = IN1K_CLASSES if es.class_indices is not None else es.num_classes
    model, report = build_eval_model(cfg, model_classes)
    sliced = report.get("head", "").startswith("sliced")
    missing = None  # the eval-set class whose 22K head row was never trained on a positive (ImageNet-1K 850)
    if sliced and es.class_indices is None:
        missing = MISSING_22K_CLASS
    elif sliced and MISSING_22K_CLASS in es.class_indices:  # ImageNet-A has teddy bears, ImageNet-R does not
        missing = es.class_indices.index(MISSING_22K_CLASS)
    keep_topk = 6 if missing is not None else 5  # one spare rank for when class 850 is dropped

    model.to(device)
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)
    amp = AmpStep(t["amp"], device)
    log.info("evaluating %s on eval_set=%s (%d classes, %s images) with %s", report["model"], es.name,
             es.num_classes, es.size, report.get("load_report", ""))
    start = time.perf_counter()
    # The training loop's exact validation, on the eval set's classes, keeping each sample's top-k classes.
    # (batches finished on the device through DeviceLoader, as in training)
    metrics = validate(model, DeviceLoader(es.loader, device), device, amp, t["channels_last"],
                       class_indices=es.class_indices, keep_topk=keep_topk)
    preds, targets = metrics.pop("preds"), metrics.pop("targets")
    extra = extra_metrics(preds, targets, es, missing=missing, per_class=cfg["per_class"], device=device)

    results = {
        "mode": "accuracy", **metrics, **{k: v for k, v in extra.items() if k != "per_class"},
        "eval_set": es.name, "data": cfg["data"]["name"], "num_classes": es.num_classes,
        "img_size": cfg["data"]["img_size"], "test_crop": cfg["aug"].get("test_crop"), "amp": t["amp"],
        "world_size": info.world_size, "device": str(device), "seconds": round(time.perf_counter() - start, 3),
        **report, "notes": list(es.notes),
    }
    if sliced:
        results["notes"].append(
            "ImageNet-22K head on ImageNet-1K classes: logits[:, :1000] (imagenet22k_ms layout). Class 850 "
            "(n04399382, teddy bear) has no ImageNet-22K images: top1/top5 count it as is; top1_excl_850/"
            "top5_excl_850 leave out its images and never predict it")
    if cfg["weights"] == "auto" and report.get("ema_available"):
        results["notes"].append("evaluated the 'model' weights (what best.pt was chosen on and val/* logged); this "
                                "checkpoint also has EMA weights (val_ema/*): weights=ema evaluates them")
    if "per_class" in extra:
        results["per_class"] = extra["per_class"]
    _write_results(cfg, info, device, results, "eval.json")
    if info.is_main:
        print(format_accuracy(results), flush=True)
    return results


def format_accuracy(r: dict) -> str:
    lines = [f"eval_set={r['eval_set']} ({r['data']}, {r['count']} images, {r['num_classes']} classes, "
             f"img {r['img_size']}, amp {r['amp']}, world {r['world_size']})",
             f"model {r['model']} ({r['model_source']}); {r.get('load_report', '')}",
             f"top1 {r['top1']:.3f}  top5 {r['top5']:.3f}  loss {r['loss']:.4f}"]
    if "top1_excl_850" in r:
        lines.append(f"excluding class 850 ({r['count_class_850']} images, no 22K training data): "
                     f"top1 {r['top1_excl_850']:.3f}  top5 {r['top5_excl_850']:.3f} over {r['count_excl_850']}")
    if "real_top1" in r:
        lines.append(f"ReaL top1 {r['real_top1']:.3f}  top5 {r['real_top5']:.3f} over {r['real_count']} images")
    if "per_class" in r:
        rows = sorted((x for x in r["per_class"] if x["top1"] is not None), key=lambda x: x["top1"])
        worst = ", ".join(f"{x['name'] or x['class']} {x['top1']:.1f}" for x in rows[:5])
        lines.append(f"per-class mean top1 {r['per_class_mean_top1']:.3f}; lowest: {worst}")
    return "\n".join(lines)


def _write_results(cfg: dict, info: D.DistInfo, device: torch.device, results: dict, name: str) -> None:
    """``name`` (JSON), ``metrics.jsonl`` (+ W&B), ``config.yaml`` and ``provenance.json`` on rank 0."""
    run_dir = Path(cfg["paths"]["output_dir"]).resolve()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(run_dir, provenance(cfg, info.world_size, str(device)))
        (run_dir / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
        results["output"] = str(run_dir / name)
    group = wandb_group(cfg, cfg.get("checkpoint"), parent_first=True) if info.is_main else None
    logger = RunLogger(run_dir, cfg, enabled=info.is_main, wandb_id=None, derived={}, group=group, job_type="eval")
    if logger.wandb is not None:
        log.info("W&B: %s", logger.describe())
    flat = {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    logger.log(flat, step=0)
    logger.summary(flat)
    logger.close()


def run_throughput(cfg: dict) -> dict:
    info = D.init_distributed()
    t, tp = cfg["trainer"], cfg["throughput"]
    device = resolve_device(t["device"], info.local_rank)
    num_classes = cfg["model"]["num_classes"] if "model" in cfg else cfg["data"]["num_classes"]
    model, report = build_eval_model(cfg, num_classes, load_weights=False)  # speed does not depend on weights
    model.eval().to(device)
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)
    gmacs = count_macs(model, tp["img_size"], device) / 1e9 if tp["flops"] else None
    rows = throughput_rows(model, batch_size=tp["batch_size"], img_size=tp["img_size"], precisions=tp["precisions"],
                           compile=tp["compile"], device=device, warmup_iters=tp["warmup_iters"], iters=tp["iters"],
                           channels_last=t["channels_last"])
    results = {"mode": "throughput", "model": report["model"], "model_source": report["model_source"],
               "params_m": report["num_params"] / 1e6, "gmacs": gmacs, "batch_size": tp["batch_size"],
               "img_size": tp["img_size"], "warmup_iters": tp["warmup_iters"], "iters": tp["iters"],
               "device": str(device), "channels_last": t["channels_last"], "rows": rows,
               "torch": torch.__version__}
    _write_results(cfg, info, device, dict(results), "throughput.json")
    if info.is_main:
        print(format_throughput(results), flush=True)
    return results
