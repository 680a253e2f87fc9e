"""Builders shared by training and evaluation: model, optimizer parameter groups, LR schedule, loss/mixup.

Every builder takes the resolved plain-dict config groups (``cfg["model"]``, ``cfg["optimizer"]``...), so
``evaluate`` and scripts can reuse them without a Hydra context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler, StepLRScheduler

import focalnet
from focalnet.engine.checkpointing import load_file
from focalnet.models.checkpoint import model_name, read_weights

log = logging.getLogger(__name__)


def build_model(model_cfg: Mapping, *, timm_pretrained: bool = False) -> nn.Module:
    """``model.library=focalnet`` -> ``focalnet.create_model``; ``timm`` -> ``timm.create_model``.

    No weights are loaded here, except, with ``timm_pretrained``, a timm model's ``model.pretrained`` through timm's
    own loader (``true`` / a tag = timm's published weights, ``hf-hub:ORG/REPO``, a file). FocalNet/DAT weights are
    loaded by :func:`init_weights_from`, which keeps ``trainer.init_head``'s head handling.
    """
    kwargs = dict(model_cfg.get("kwargs") or {})
    pretrained = pretrained_source(model_cfg)
    kwargs.pop("pretrained", None)
    common = dict(num_classes=model_cfg["num_classes"], drop_path_rate=model_cfg["drop_path_rate"], **kwargs)
    if model_cfg["library"] == "focalnet":
        model = focalnet.create_model(model_cfg["name"], **common)
    elif model_cfg["library"] == "timm":
        name, timm_kwargs = model_cfg["name"], {}
        if timm_pretrained and pretrained is not None:
            name, timm_kwargs = _timm_pretrained_args(name, pretrained)
        model = timm.create_model(name, **timm_kwargs, **common)
    else:
        raise ValueError(f"model.library={model_cfg['library']!r}; choose focalnet or timm")
    if model_cfg.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return model


def pretrained_source(model_cfg: Mapping):
    """``model.pretrained`` (``model.kwargs.pretrained`` is accepted too, as timm users write it); None if unset."""
    source, legacy = model_cfg.get("pretrained"), (model_cfg.get("kwargs") or {}).get("pretrained")
    if source not in (None, False) and legacy not in (None, False) and source != legacy:
        raise ValueError(f"model.pretrained={source!r} and model.kwargs.pretrained={legacy!r}: set only model.pretrained")
    source = source if source not in (None, False) else legacy
    return None if source in (None, False, "false", "False", "") else source


def _timm_pretrained_args(name: str, source) -> tuple[str, dict]:
    """A SOURCE for a timm model in timm's terms: ``true`` -> its default tag, a tag -> ``name.tag``,
    ``hf-hub:ORG/REPO`` -> that repository, a file -> ``pretrained_cfg_overlay=dict(file=...)``."""
    from focalnet.models.sources import HF_PREFIX, is_tag

    if source is True or source in ("true", "True"):
        return name, {"pretrained": True}
    if is_tag(source):
        return f"{name.split('.')[0]}.{source}", {"pretrained": True}
    if str(source).startswith(HF_PREFIX):
        return name, {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": str(source)[len(HF_PREFIX):]}}
    return name, {"pretrained": True, "pretrained_cfg_overlay": {"file": str(source)}}


# trainer.init_head -> focalnet.load_checkpoint(head=...)
INIT_HEAD_MODES = {"auto": "auto", "keep": "strict", "reinit": "reinit", "slice_22k_to_1k": "slice_22k_to_1k"}


def init_weights_from(model: nn.Module, source, head: str = "auto", seed: int = 0):
    """Fine-tuning start: weights only (optimizer, schedule and step start fresh), via ``focalnet.load_checkpoint``.

    ``source`` is any weight SOURCE (``trainer.init_from`` or ``model.pretrained``: a file, a directory,
    ``hf-hub:ORG/REPO``, a URL, ``true``/a tag for the model's published weights).

    ``head``: ``keep`` (the checkpoint's head; class counts must match), ``reinit`` (a fresh head),
    ``slice_22k_to_1k`` (rows 0..999 of a 21842-way ImageNet-22K head), ``auto`` (keep when the counts match,
    slice 21842 -> 1000, else reinit). A re-initialized head is drawn from ``seed`` in a forked RNG: the same on
    every rank (the EMA copy is taken before DDP broadcasts), and the run's RNG stream is left untouched.
    Returns the :class:`~focalnet.models.checkpoint.LoadReport`.
    """
    if head not in INIT_HEAD_MODES:
        raise ValueError(f"trainer.init_head={head!r}; choose one of {', '.join(INIT_HEAD_MODES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = read_weights(source, variant=model_name(model), torch_load=load_file)  # checksums verified
        result = focalnet.load_checkpoint(model, weights, head=INIT_HEAD_MODES[head])
    log.info("initialized weights from %s (%s)", source, result)
    return result


def _no_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    # Norm weights, biases and other 1-D params (layerscale gammas `gamma_1/2` are 1-D too; matched by
    # name as well in case a variant stores them otherwise) and model-declared names (e.g. pos_embed).
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name.endswith(".bias") or leaf.startswith("gamma") or name in skip


def param_groups(model: nn.Module, weight_decay: float, official_no_weight_decay: bool = False) -> list[dict]:
    """Two groups: decay on weights, none on norms/biases/gammas.

    ``official_no_weight_decay=True`` reproduces microsoft/FocalNet exactly: its ``no_weight_decay_keywords``
    returns ``{''}``, and ``'' in name`` is always true, so *no* parameter gets weight decay.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if official_no_weight_decay:
        return [{"params": [p for _, p in params], "weight_decay": 0.0, "group": "no_decay"}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay = [p for n, p in params if not _no_decay(n, p, skip)]
    no_decay = [p for n, p in params if _no_decay(n, p, skip)]
    return [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]


# Devices with torch's fused AdamW/SGD kernels that we train on. torch checks the device only at the first step.
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, opt_cfg: Mapping, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups`, with torch's fused kernel when every parameter is on a device that has
    one (:data:`FUSED_DEVICES`), else the foreach kernel. A fused optimizer skips a non-finite update on the device
    (see ``focalnet.engine.amp``)."""
    groups = param_groups(model, opt_cfg["weight_decay"], opt_cfg.get("official_no_weight_decay", False))
    if opt_cfg["name"] == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=lr, betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"])
    elif opt_cfg["name"] == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=lr, momentum=opt_cfg["momentum"],
                                            nesterov=opt_cfg.get("nesterov", False))
    else:
        raise ValueError(f"optimizer.name={opt_cfg['name']!r}; choose adamw or sgd")
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    return cls(groups, **kwargs, **({"fused": True} if fused else {"foreach": True}))


class UpdateSchedule:
    """A timm scheduler stepped exactly as the official ``main.py`` steps it (microsoft/FocalNet @9253a7f).

    The official loop calls ``lr_scheduler.step_update(epoch * num_steps + idx)`` after each optimizer update,
    where ``num_steps = len(data_loader)`` counts micro-batches and ``idx`` is the 0-based index of the update's
    last micro-batch (under gradient accumulation FocalNet's main.py keeps counting micro-batches; Swin's later
    main.py divides by the accumulation steps). Without accumulation, update ``s`` (1-based) thus runs with the
    LR of index ``s - 2``: the first two updates share the initial LR. ``step_update(num_updates=s)`` applies
    the index the official code passes after update ``s`` (0 before the first update), so the LR is a pure
    function of the step and a resumed run continues the same curve.
    """

    def __init__(self, scheduler, batches_per_epoch: int, accum_steps: int):
        self.scheduler = scheduler
        self.batches_per_epoch, self.accum_steps = batches_per_epoch, accum_steps
        self.updates_per_epoch = batches_per_epoch // accum_steps

    def index(self, step: int) -> int:
        """The official ``step_update`` argument after ``step`` updates."""
        if step <= 0:
            return 0
        epoch, k = divmod(step - 1, self.updates_per_epoch)
        return epoch * self.batches_per_epoch + (k + 1) * self.accum_steps - 1

    def step_update(self, num_updates: int) -> None:
        self.scheduler.step_update(self.index(num_updates))

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Mapping, *, total_steps: int,
                    batches_per_epoch: int, accum_steps: int, warmup_lr: float, min_lr: float) -> UpdateSchedule:
    """The official ``lr_scheduler.py`` (microsoft/FocalNet @9253a7f, Swin's), in the official step units.

    Lengths are counted in micro-batches, as the official code counts them (``n_iter_per_epoch =
    len(data_loader_train)``): ``t_initial = int(epochs * n)``, ``warmup_t = int(warmup_epochs * n)``,
    ``decay_t = int(decay_epochs * n)`` (``trainer.max_steps`` ends the curve after that many updates instead).

    * ``cosine``: ``CosineLRScheduler(t_initial=ALL steps, warmup_t, warmup_lr_init, lr_min, cycle_limit=1,
      t_in_epochs=False)`` without ``warmup_prefix``: one cosine spans the whole run and the linear warmup
      replaces its first ``warmup_t`` steps.
    * ``step``: ``StepLRScheduler(decay_t, decay_rate, warmup_t, warmup_lr_init, t_in_epochs=False)``. The
      paper-era timm (0.3.2) has no ``warmup_prefix``: decays count from step 0. timm >= 0.9 defaults to
      ``warmup_prefix=True``, so it is passed explicitly.
    * ``constant``: the LR after warmup (``step`` with ``decay_rate=1``).

    ``schedule.warmup_prefix: true`` puts the warmup in front instead: the cosine spans the steps after
    warmup (Swin's later ``TRAIN.LR_SCHEDULER.WARMUP_PREFIX``, microsoft/Swin-Transformer #278) and step
    decays count from the end of warmup.
    """
    updates_per_epoch = batches_per_epoch // accum_steps
    # Micro-batches consumed when training ends: whole epochs count every batch, like the official loop.
    total = (total_steps // updates_per_epoch) * batches_per_epoch + (total_steps % updates_per_epoch) * accum_steps
    warmup = int(sched_cfg["warmup_epochs"] * batches_per_epoch)
    prefix = bool(sched_cfg.get("warmup_prefix", False))
    name = sched_cfg["name"]
    if name == "cosine":
        if total - warmup < 2:
            warmup_updates = min(-(-warmup // accum_steps), total_steps)
            log.warning("schedule=cosine: %d of the run's %d updates are warmup (schedule.warmup_epochs=%g), so the "
                        "LR never decays; fine for a smoke test, otherwise raise trainer.epochs/max_steps or lower "
                        "schedule.warmup_epochs", warmup_updates, total_steps, sched_cfg["warmup_epochs"])
        # timm warns "Cosine annealing scheduler will have no effect" (t_initial == 1) itself: said above instead.
        timm_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = timm_log.level
        timm_log.setLevel(logging.ERROR)
        try:
            scheduler = CosineLRScheduler(optimizer, t_initial=max(total - warmup if prefix else total, 1),
                                          lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                                          warmup_prefix=prefix, cycle_limit=1, t_in_epochs=False)
        finally:
            timm_log.setLevel(level)
    elif name in ("step", "constant"):
        decay_t = int(sched_cfg["decay_epochs"] * batches_per_epoch) if name == "step" else 1
        scheduler = StepLRScheduler(optimizer, decay_t=max(decay_t, 1),
                                    decay_rate=sched_cfg["decay_rate"] if name == "step" else 1.0,
                                    warmup_t=warmup, warmup_lr_init=warmup_lr, warmup_prefix=prefix,
                                    t_in_epochs=False)
    else:
        raise ValueError(f"schedule.name={name!r}; choose cosine, step or constant")
    return UpdateSchedule(scheduler, batches_per_epoch, accum_steps)


def build_mixup_and_loss(aug_cfg: Mapping, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm Mixup/CutMix (label smoothing applied inside, soft targets) or label-smoothing CE."""
    active = (aug_cfg["mixup"] > 0 or aug_cfg["cutmix"] > 0 or aug_cfg.get("cutmix_minmax") is not None) \
        and aug_cfg["mixup_prob"] > 0
    if active:
        mixup = Mixup(mixup_alpha=aug_cfg["mixup"], cutmix_alpha=aug_cfg["cutmix"],
                      cutmix_minmax=aug_cfg.get("cutmix_minmax"), prob=aug_cfg["mixup_prob"],
                      switch_prob=aug_cfg["mixup_switch_prob"], mode=aug_cfg["mixup_mode"],
                      label_smoothing=aug_cfg["label_smoothing"], num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if aug_cfg["label_smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=aug_cfg["label_smoothing"])
    return None, nn.CrossEntropyLoss()
