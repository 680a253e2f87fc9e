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
       while training it. In the same pass the evaluator keeps each batch's top-k classes for what
       ``validate`` does not compute: ReaL scores, per-class accuracy, the class-850 exclusion.
    5. Rank 0 prints a summary and writes ``eval.json`` (+ ``metrics.jsonl``, W&B when enabled) to the run dir.

``mode=throughput``
    img/s at ``throughput.batch_size`` after ``warmup_iters`` batches (timed over ``iters``; the official
    ``--throughput`` uses 50 and 30) for every precision (fp32, bf16/fp16 autocast) x eager/``torch.compile``,
    with params and GMACs (the paper's "GFLOPs": multiply-accumulates, batch 1); printed as a table with the
    ratio to the first row measured in the same run, and written to ``throughput.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import focalnet
from data.eval_sets import EVAL_SETS, EvalSet, build_eval_set
from data.loaders import DeviceLoader
from focalnet.engine import distributed as D
from focalnet.engine.amp import AmpStep
from focalnet.engine.build import build_model
from focalnet.engine.checkpointing import first_non_finite, load_file
from focalnet.engine.config import ConfigError, non_finite_numbers
from focalnet.engine.loggers import RunLogger, provenance, wandb_group, write_run_files
from focalnet.engine.loop import validate
from focalnet.engine.trainer import resolve_device
from focalnet.models.checkpoint import (
    IN1K_CLASSES,
    IN22K_CLASSES,
    CheckpointError,
    model_config_for,
    read_weights,
)
from focalnet.models.flops import count_macs
from focalnet.models.sources import check_source

log = logging.getLogger(__name__)

MODES = ("accuracy", "throughput")
WEIGHTS = ("auto", "model", "ema")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# ImageNet-1K class 850 (n04399382, teddy bear) is in the imagenet22k_ms layout but has no ImageNet-22K images.
MISSING_22K_CLASS = 850


def evaluate(cfg: DictConfig | Mapping) -> dict:
    """Run eval.py's config (``conf/eval.yaml``); returns the results dict that is also written as JSON."""
    plain = check_eval_config(cfg)
    if plain["mode"] == "throughput":
        return run_throughput(plain)
    return run_accuracy(plain)


# ---- config ---------------------------------------------------------------------------------------------


def check_eval_config(cfg: DictConfig | Mapping) -> dict:
    """Resolve eval.py's config to a plain dict; every problem is reported at once, naming the key."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    errors = []

    def one_of(key, value, allowed):
        if value not in allowed:
            errors.append(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")

    one_of("mode", c.get("mode"), MODES)
    one_of("weights", c.get("weights"), WEIGHTS)
    one_of("eval_set", c.get("eval_set"), EVAL_SETS)
    one_of("trainer.amp", c["trainer"].get("amp"), ("bf16", "fp16", "none"))
    one_of("trainer.device", c["trainer"].get("device"), ("auto", "cpu", "cuda"))
    if c["trainer"].get("device") == "cuda" and not torch.cuda.is_available():
        errors.append("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    ckpt = c.get("checkpoint")
    problem = check_source(ckpt, c["model"]["name"] if "model" in c else None) if ckpt is not None else None
    if problem:
        errors.append(f"checkpoint={ckpt!r}: {problem}")
    if c.get("mode") == "accuracy" and ckpt is None:
        errors.append("checkpoint is not set: pass checkpoint=SOURCE (our .pt, an official .pth, a timm or "
                      "transformers file or directory, hf-hub:ORG/REPO, a URL, or true with model=NAME)")
    if c.get("real_labels") is not None and not Path(str(c["real_labels"])).is_file():
        errors.append(f"real_labels={c['real_labels']!r}: no such file")
    if c.get("mode") == "throughput":
        tp = c["throughput"]
        if ckpt is None and "model" not in c:
            errors.append("mode=throughput needs model=NAME (or checkpoint=PATH to take the model from)")
        for p in tp["precisions"]:
            one_of("throughput.precisions[]", p, tuple(PRECISIONS))
        if not all(isinstance(x, bool) for x in tp["compile"]):
            errors.append(f"throughput.compile={tp['compile']!r} must be a list of true/false")
        for key, lo in (("batch_size", 1), ("iters", 1), ("warmup_iters", 0), ("img_size", 1)):
            v = tp[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                errors.append(f"throughput.{key}={v!r} must be an integer >= {lo}")
    errors += non_finite_numbers(c)
    if errors:
        raise ConfigError("invalid eval config:\n  " + "\n  ".join(errors))
    return c


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
    if ckpt_classes in (None, num_classes):
        head = "strict"
    elif ckpt_classes == IN22K_CLASSES and num_classes == IN1K_CLASSES:
        head = "slice_22k_to_1k"
    else:
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


class EvalOutputs(nn.Module):
    """The evaluated network: model logits restricted to the eval set's classes (ImageNet-A/R), keeping each
    batch's top-k class indices for the metrics ``validate`` does not compute."""

    def __init__(self, model: nn.Module, class_indices: list[int] | None = None, keep_topk: int = 0):
        super().__init__()
        self.model, self.keep_topk = model, keep_topk
        self.register_buffer("class_indices", torch.tensor(class_indices) if class_indices else None,
                             persistent=False)
        self.topk: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)  # (B, model classes)
        if self.class_indices is not None:
            logits = logits.index_select(1, self.class_indices)  # (B, eval-set classes)
        if self.keep_topk:
            k = min(self.keep_topk, logits.shape[1])
            self.topk.append(logits.float().topk(k, dim=1).indices.cpu())  # (B, k), as validate ranks them
        return logits


class TargetTap:
    """Iterates a loader unchanged, keeping the targets (paired in order with ``EvalOutputs.topk``)."""

    def __init__(self, loader):
        self.loader, self.targets = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets in self.loader:
            self.targets.append(targets.to("cpu", copy=True))
            yield images, targets


def _first_k_without(preds: torch.Tensor, cls: int, k: int) -> torch.Tensor:
    """(N, m) ranked predictions -> (N, k) ranked predictions that never name ``cls`` (m > k)."""
    keep = preds != cls
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, ranks preserved
    return preds.gather(1, order)[:, :k]


def extra_metrics(preds: torch.Tensor, targets: torch.Tensor, es: EvalSet, *, missing: int | None,
                  per_class: bool, device: torch.device) -> dict:
    """ReaL, per-class and class-850-excluded scores from this rank's (N, k) ranked predictions, summed over ranks.

    Also recounts top-1 from ``preds`` so the caller can check it pairs predictions and targets correctly.
    """
    out: dict = {}
    n_cls = es.num_classes
    top1 = preds[:, 0].eq(targets)
    top5 = preds[:, :5].eq(targets[:, None]).any(1)
    sums = [top1.sum()]
    if missing is not None:
        others = targets.ne(missing)
        p = _first_k_without(preds, missing, min(5, preds.shape[1] - 1))
        sums += [(p[:, 0].eq(targets) & others).sum(), (p.eq(targets[:, None]).any(1) & others).sum(),
                 others.sum(), (~others).sum()]
    if es.real_labels is not None:
        if len(es.real_labels) != len(targets):
            raise RuntimeError(f"ReaL labels for {len(es.real_labels)} samples, {len(targets)} evaluated")
        r1 = r5 = rn = 0
        for row, labels in zip(preds.tolist(), es.real_labels, strict=True):
            if labels:
                rn += 1
                r1 += row[0] in labels
                r5 += any(p in labels for p in row[:5])
        sums += [torch.tensor(r1), torch.tensor(r5), torch.tensor(rn)]
    totals = D.all_reduce_sum(torch.stack([torch.as_tensor(s) for s in sums]).to(torch.float64).to(device))
    totals = [int(v) for v in totals.tolist()]
    out["_top1_correct"] = totals.pop(0)
    if missing is not None:
        c1, c5, n, n_missing = totals[:4]
        totals = totals[4:]
        out.update(top1_excl_850=100.0 * c1 / max(n, 1), top5_excl_850=100.0 * c5 / max(n, 1), count_excl_850=n,
                   count_class_850=n_missing)
    if es.real_labels is not None:
        r1, r5, rn = totals
        out.update(real_top1=100.0 * r1 / max(rn, 1), real_top5=100.0 * r5 / max(rn, 1), real_count=rn)
    if per_class:
        counts = torch.zeros(3, n_cls, dtype=torch.float64)  # images, top-1 correct, top-5 correct
        counts[0].index_add_(0, targets, torch.ones(len(targets), dtype=torch.float64))
        counts[1].index_add_(0, targets, top1.to(torch.float64))
        counts[2].index_add_(0, targets, top5.to(torch.float64))
        counts = D.all_reduce_sum(counts.to(device)).cpu()
        names = es.class_names or [None] * n_cls
        rows = [{"class": c, "name": names[c], "count": int(counts[0, c]),
                 "top1": 100.0 * counts[1, c].item() / counts[0, c].item() if counts[0, c] else None,
                 "top5": 100.0 * counts[2, c].item() / counts[0, c].item() if counts[0, c] else None}
                for c in range(n_cls)]
        seen = [r["top1"] for r in rows if r["top1"] is not None]
        out["per_class_mean_top1"] = sum(seen) / max(len(seen), 1)
        out["per_class"] = rows
    return out


def run_accuracy(cfg: dict) -> dict:
    info = D.init_distributed()
    t = cfg["trainer"]
    device = resolve_device(t["device"], info.local_rank)
    data_cfg, aug_cfg = OmegaConf.create(cfg["data"]), OmegaConf.create(cfg["aug"])
    es = build_eval_set(cfg["eval_set"], data_cfg, aug_cfg, root=cfg.get("eval_root"),
                        real_labels=cfg.get("real_labels"), rank=info.rank, world_size=info.world_size,
                        seed=t["seed"])
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
    net = EvalOutputs(model, es.class_indices, keep_topk).to(device)
    tap = TargetTap(DeviceLoader(es.loader, device))  # finished on the device, as in training
    amp = AmpStep(t["amp"], device)
    log.info("evaluating %s on eval_set=%s (%d classes, %s images) with %s", report["model"], es.name,
             es.num_classes, es.size, report.get("load_report", ""))
    start = time.perf_counter()
    metrics = validate(net, tap, device, amp, t["channels_last"])  # the training loop's exact validation
    preds = torch.cat(net.topk) if net.topk else torch.zeros(0, keep_topk, dtype=torch.long)
    targets = torch.cat(tap.targets) if tap.targets else torch.zeros(0, dtype=torch.long)
    extra = extra_metrics(preds, targets, es, missing=missing, per_class=cfg["per_class"], device=device)
    recount = extra.pop("_top1_correct")
    if abs(100.0 * recount / max(metrics["count"], 1) - metrics["top1"]) > 1e-9:
        log.warning("top-1 recounted from kept predictions (%d) differs from validate's (%.4f%% of %d): tied logits?",
                    recount, metrics["top1"], metrics["count"])

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


# ---- throughput -----------------------------------------------------------------------------------------


def measure_throughput(model: nn.Module, *, batch_size: int, img_size: int, precision: str, compile: bool,
                       device: torch.device, warmup_iters: int, iters: int, channels_last: bool = False) -> float:
    """Images per second of forward passes (no grad) after warm-up; compile happens during warm-up."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(model) if compile else model
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast:
        for _ in range(max(warmup_iters, 1 if compile else 0)):
            fn(x)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        sync()
        elapsed = time.perf_counter() - start
    return batch_size * iters / elapsed


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
    rows = []
    for compiled in tp["compile"]:
        for precision in tp["precisions"]:
            row = {"precision": precision, "compile": compiled, "img_per_s": None, "error": None}
            try:
                row["img_per_s"] = measure_throughput(
                    model, batch_size=tp["batch_size"], img_size=tp["img_size"], precision=precision,
                    compile=compiled, device=device, warmup_iters=tp["warmup_iters"], iters=tp["iters"],
                    channels_last=t["channels_last"])
            except Exception as e:  # e.g. fp16 kernels missing on this device, no compiler for inductor
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
                log.warning("throughput %s compile=%s failed: %s", precision, compiled, row["error"])
            rows.append(row)
        if compiled:
            torch._dynamo.reset()  # each compiled row starts clean; frees the compiled graphs
    base = next((r["img_per_s"] for r in rows if r["img_per_s"]), None)
    for r in rows:
        r["ratio"] = r["img_per_s"] / base if r["img_per_s"] and base else None
    results = {"mode": "throughput", "model": report["model"], "model_source": report["model_source"],
               "params_m": report["num_params"] / 1e6, "gmacs": gmacs, "batch_size": tp["batch_size"],
               "img_size": tp["img_size"], "warmup_iters": tp["warmup_iters"], "iters": tp["iters"],
               "device": str(device), "channels_last": t["channels_last"], "rows": rows,
               "torch": torch.__version__}
    _write_results(cfg, info, device, {k: v for k, v in results.items()}, "throughput.json")
    if info.is_main:
        print(format_throughput(results), flush=True)
    return results


def format_throughput(r: dict) -> str:
    gmacs = f"{r['gmacs']:.3f}" if r["gmacs"] is not None else "-"
    lines = [f"{r['model']}: {r['params_m']:.2f}M params, {gmacs} GMACs (paper 'GFLOPs') at {r['img_size']}px; "
             f"batch {r['batch_size']}, {r['warmup_iters']} warm-up + {r['iters']} timed batches on {r['device']}",
             "",
             "| precision | compile | img/s | vs first row |",
             "|---|---|---:|---:|"]
    for row in r["rows"]:
        ips = f"{row['img_per_s']:.1f}" if row["img_per_s"] else f"failed ({row['error']})"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] and not math.isnan(row["ratio"]) else "-"
        lines.append(f"| {row['precision']} | {'yes' if row['compile'] else 'no'} | {ips} | {ratio} |")
    return "\n".join(lines)
