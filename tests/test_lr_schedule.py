"""The LR schedule against independent references: timm's schedulers built with the OFFICIAL arguments.

References:
* the official ``lr_scheduler.py`` (microsoft/FocalNet @9253a7f, Swin's): ``CosineLRScheduler(t_initial=num_steps,
  t_mul=1., lr_min, warmup_lr_init, warmup_t, cycle_limit=1, t_in_epochs=False)`` and ``StepLRScheduler(decay_t,
  decay_rate, warmup_lr_init, warmup_t, t_in_epochs=False)``, with ``num_steps = int(EPOCHS * n_iter_per_epoch)``,
  ``warmup_steps = int(WARMUP_EPOCHS * n_iter_per_epoch)``, ``n_iter_per_epoch = len(data_loader_train)``;
* the official ``main.py`` loop, which calls ``lr_scheduler.step_update(epoch * num_steps + idx)`` after each update
  (``idx``: the 0-based micro-batch index; under accumulation only when ``(idx + 1) % ACCUMULATION_STEPS == 0``);
* timm 0.3.2, the version the paper-era INSTALL.md pins: values dumped from its scheduler files with those
  arguments (``tests/fixtures/timm032_lr_schedules.json``, which says how), and the installed timm called with the
  same arguments (``t_mul`` is ``cycle_mul`` today; 0.3.2's StepLRScheduler has no ``warmup_prefix``, i.e.
  today's ``warmup_prefix=False``).
Through ``train.py`` (slow, folded into runs ``tests/test_train_e2e.py`` makes anyway): the logged ``train/lr``
equals that replayed official loop at every logged step, for cosine without accumulation and for cosine and step
with ``trainer.accum_steps=3`` over 10 micro-batches per epoch (a micro-batch left over, never stepped on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from focalnet.engine.build import build_scheduler

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "timm032_lr_schedules.json").read_text())


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def official_scheduler(name: str, opt, *, epochs, n_iter, warmup_epochs, warmup_lr, min_lr, decay_epochs=30,
                       decay_rate=0.1, warmup_prefix=False):
    """microsoft/FocalNet @9253a7f lr_scheduler.py build_scheduler, on the installed timm (see module docstring);
    ``warmup_prefix`` is Swin's later TRAIN.LR_SCHEDULER.WARMUP_PREFIX (microsoft/Swin-Transformer #278)."""
    num_steps, warmup_steps = int(epochs * n_iter), int(warmup_epochs * n_iter)
    if name == "cosine":
        return CosineLRScheduler(opt, t_initial=(num_steps - warmup_steps) if warmup_prefix else num_steps,
                                 cycle_mul=1.0, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup_steps,
                                 cycle_limit=1, t_in_epochs=False, warmup_prefix=warmup_prefix)
    return StepLRScheduler(opt, decay_t=int(decay_epochs * n_iter), decay_rate=decay_rate, warmup_lr_init=warmup_lr,
                           warmup_t=warmup_steps, t_in_epochs=False, warmup_prefix=warmup_prefix)


def official_loop_lrs(scheduler, *, epochs: int, n_iter: int, accum: int) -> list[float]:
    """The LR the official main.py's optimizer holds after each update (index = update number - 1)."""
    lrs = []
    for epoch in range(epochs):
        for idx in range(n_iter):
            if accum > 1 and (idx + 1) % accum != 0:
                continue  # accumulating: no optimizer step, no step_update
            scheduler.step_update(epoch * n_iter + idx)
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    return lrs


def our_lrs(sched_cfg: dict, *, lr, steps, batches_per_epoch, accum=1, warmup_lr, min_lr) -> list[float]:
    """The LR our schedule gives after updates 1..steps (what train/lr logs), stepped as the training loop does."""
    opt = _optimizer(lr)
    sched = build_scheduler(opt, sched_cfg, total_steps=steps, batches_per_epoch=batches_per_epoch,
                            accum_steps=accum, warmup_lr=warmup_lr, min_lr=min_lr)
    sched.step_update(0)  # what the trainer does at start (and on resume, with the restored step)
    out = []
    for s in range(1, steps + 1):
        sched.step_update(s)
        out.append(opt.param_groups[0]["lr"])
    return out


def _cfg(name, **kw):
    return {"name": name, "warmup_epochs": 0, "decay_epochs": 30, "decay_rate": 0.1, "warmup_prefix": False, **kw}


@pytest.mark.parametrize("name, key, prefix", [("cosine", "cosine", False), ("step", "step", False),
                                               ("cosine", "cosine_warmup_prefix", True)])
def test_schedules_equal_paper_era_timm_values(name, key, prefix):
    c = FIXTURE["config"]
    n, epochs = c["batches_per_epoch"], c["epochs"]
    cfg = _cfg(name, warmup_epochs=c["warmup_epochs"], decay_epochs=c["decay_epochs"], decay_rate=c["decay_rate"],
               warmup_prefix=prefix)
    opt = _optimizer(c["lr"])
    sched = build_scheduler(opt, cfg, total_steps=epochs * n, batches_per_epoch=n, accum_steps=1,
                            warmup_lr=c["warmup_lr"], min_lr=c["min_lr"])
    ours = []
    for t in range(len(FIXTURE[key])):  # the underlying timm scheduler at every official index (and past the end)
        sched.scheduler.step_update(t)
        ours.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(FIXTURE[key], rel=1e-12, abs=0)
    # Stepped like the official loop: update s leaves the LR of index s - 1.
    logged = our_lrs(cfg, lr=c["lr"], steps=epochs * n, batches_per_epoch=n, warmup_lr=c["warmup_lr"],
                     min_lr=c["min_lr"])
    assert logged == pytest.approx(FIXTURE[key][: epochs * n], rel=1e-12, abs=0)


@pytest.mark.parametrize("accum, n_iter", [(1, 40), (4, 161)])  # 161 % 4 = 1: a micro-batch left over per epoch
def test_paper_recipe_cosine_equals_official_loop(accum, n_iter):
    """300 epochs with 20 of warmup, as the paper; fewer iterations per epoch than ImageNet to stay fast."""
    lr, warmup_lr, min_lr = 1e-3, 1e-6, 1e-5
    epochs = 300
    ref = official_loop_lrs(official_scheduler("cosine", _optimizer(lr), epochs=epochs, n_iter=n_iter,
                                               warmup_epochs=20, warmup_lr=warmup_lr, min_lr=min_lr),
                            epochs=epochs, n_iter=n_iter, accum=accum)
    updates = n_iter // accum
    ours = our_lrs(_cfg("cosine", warmup_epochs=20), lr=lr, steps=epochs * updates, batches_per_epoch=n_iter,
                   accum=accum, warmup_lr=warmup_lr, min_lr=min_lr)
    assert len(ours) == len(ref) == epochs * updates
    assert ours == ref  # same timm arithmetic on the same indices: bit for bit


def test_warmup_prefix_is_swins_later_switch():
    n, lr = 50, 1e-3
    ref = official_loop_lrs(official_scheduler("cosine", _optimizer(lr), epochs=30, n_iter=n, warmup_epochs=5,
                                               warmup_lr=1e-6, min_lr=1e-5, warmup_prefix=True),
                            epochs=30, n_iter=n, accum=1)
    ours = our_lrs(_cfg("cosine", warmup_epochs=5, warmup_prefix=True), lr=lr, steps=30 * n, batches_per_epoch=n,
                   warmup_lr=1e-6, min_lr=1e-5)
    assert ours == ref
    default = our_lrs(_cfg("cosine", warmup_epochs=5), lr=lr, steps=30 * n, batches_per_epoch=n, warmup_lr=1e-6,
                      min_lr=1e-5)
    assert default[15 * n] < 0.9 * ours[15 * n]  # the two curves really differ mid-run


def test_a_run_started_before_the_paper_exact_defaults_resumes_only_when_asked():
    """Checkpoints written before ``schedule.warmup_prefix`` / ``data.jpeg_draft`` existed ran the prefix curve on
    draft-decoded training crops (and focalnet_base_iso in the later reading): resuming them under the new
    defaults is refused (it would change the run), and the README's upgrade command resumes them as they were."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from focalnet.engine.rundir import ResumeRefused, check_resume_config

    def cfg(*overrides):
        return OmegaConf.to_container(compose_config(["experiment=in1k_focalnet_base_iso", "data.root=/data/imagenet",
                                                      *overrides]))

    old = cfg()
    del old["schedule"]["warmup_prefix"], old["data"]["jpeg_draft"]
    with pytest.raises(ResumeRefused, match=r"schedule\.warmup_prefix: '<absent>' -> False"):
        check_resume_config("last.pt", old, 1, cfg(), 1)
    upgrade = cfg("schedule.warmup_prefix=true", "data.jpeg_draft=true", "+model.kwargs.use_postln=true",
                  "+model.kwargs.use_postln_in_modulation=false",
                  "trainer.resume_allow_changes=[schedule.warmup_prefix,data.jpeg_draft,model.kwargs]")
    changes = check_resume_config("last.pt", old, 1, upgrade, 1)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in changes} == {"schedule.warmup_prefix", "data.jpeg_draft",
                                                                          "model.kwargs"}, changes
