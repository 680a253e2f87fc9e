"""Overhead of the training loop: our engine's step vs a bare forward/backward/(clip)/step loop, in one run.

Both loops train the same model architecture (same init) on the same pre-made batches held in memory, so
the difference is the engine's per-step machinery: AMP step object, gradient-norm computation (and
clipping), LR schedule update, EMA when enabled, the per-step hook (logging every ``log_every``, progress
bar, checkpoint/preemption checks). Rounds rotate the order of the loops and the median img/s of each is
reported, in wall time and in this process's CPU time; on a CPU shared with other jobs (single-threaded
run) the CPU-time figure is the stable one and decides the overhead, on GPU the wall-time figure does.

    python scripts/bench_train.py                          # focalnet_micro, 64 px, batch 32, CPU
    python scripts/bench_train.py --compile                # + our loop under trainer.compile=true
    python scripts/bench_train.py --model focalnet_tiny_srf --img 224 --batch 64 --device cuda --amp bf16

Target: overhead <= 3% (ratio ours/bare >= 0.97).

``--compile`` adds "ours compiled (clip 5.0)": our loop with ``trainer.compile=true`` (torch.compile, Inductor),
its ratio against the eager bare loop with clipping (the speed-up compile buys, net of our overhead), timed
like the others after its warm-up; the compile time (the first warm-up update, minus one steady-state
update) is reported on its own line. Set ``TORCHINDUCTOR_CACHE_DIR`` to a fresh directory for an honest
compile time (Inductor reuses compiled kernels across processes otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from focalnet.engine.amp import AmpStep  # noqa: E402
from focalnet.engine.build import build_model, build_optimizer  # noqa: E402
from focalnet.engine.config import validate_config  # noqa: E402
from focalnet.engine.distributed import DistInfo  # noqa: E402
from focalnet.engine.trainer import TrainRun  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


class InMemoryBatches:
    """The loader interface the engine uses (len, set_epoch, handover, finisher) over a fixed list of batches."""

    finisher = None  # finished already

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.batches)

    def handover(self):
        return ((x, y, None) for x, y in self.batches[self.start:])


def make_run(args, run_dir: str, clip_grad: float | None, compile: bool = False) -> TrainRun:
    overrides = [
        f"model={args.model_cfg}", f"model.name={args.model}", "data=synthetic", f"data.img_size={args.img}",
        f"data.batch_size={args.batch}", "data.train_size=64", "data.val_size=16", "aug=none",
        f"trainer.amp={args.amp}", f"trainer.device={args.device}", "trainer.max_steps=1000000000",
        "trainer.ckpt_every_steps=null", f"trainer.log_every={args.log_every}",
        f"trainer.clip_grad={'null' if clip_grad is None else clip_grad}",
        f"trainer.ema_decay={args.ema if args.ema else 'null'}", "logger.wandb.mode=disabled",
        "schedule.warmup_epochs=0", "model.drop_path_rate=0.0", f"trainer.compile={compile}",
        "logger.pictures.inputs=false",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = run_dir
    run = TrainRun(validate_config(cfg), DistInfo())
    run.progress = run.make_progress(interactive=True, file=open(os.devnull, "w")).__enter__()  # a live bar
    return run


def time_ours(run: TrainRun, batches, steps: int) -> float:
    run.loaders.train = InMemoryBatches(batches[:steps])
    run.state.batch_in_epoch = 0
    clock = Clock(run.device)
    run.train_epoch()
    return clock.throughput(steps * batches[0][0].shape[0])


def time_bare(model, opt, amp: AmpStep, batches, steps: int, device, clip_grad: float | None = None) -> float:
    model.train()
    clock = Clock(device)
    for images, targets in batches[:steps]:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with amp.autocast():
            loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return clock.throughput(steps * batches[0][0].shape[0])


class Clock:
    """Wall time, and this process's CPU time: on a shared CPU machine other processes steal wall time
    unevenly between rounds, while the CPU time a loop needs is what its own work costs."""

    def __init__(self, device):
        self.device = device
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def throughput(self, images: int) -> tuple[float, float]:
        self._sync()
        return images / (time.perf_counter() - self.wall), images / (time.process_time() - self.cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="focalnet_micro")
    p.add_argument("--model-cfg", default="focalnet_micro", help="conf/model group to start from")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay for our loop (0 = off, like the bare loop)")
    p.add_argument("--compile", action="store_true", help="also time our loop under trainer.compile=true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ours = {"ours (no clip)": make_run(args, f"{tmp}/a", None), "ours (clip 5.0)": make_run(args, f"{tmp}/b", 5.0)}
        if args.compile:
            ours["ours compiled (clip 5.0)"] = make_run(args, f"{tmp}/c", 5.0, compile=True)
        device = next(iter(ours.values())).device
        torch.manual_seed(0)
        bare_model = build_model(next(iter(ours.values())).cfg["model"]).to(device)
        bare_opt = build_optimizer(bare_model, next(iter(ours.values())).cfg["optimizer"], 1e-4)  # ours' kernel
        bare_amp = AmpStep(args.amp, device)  # only its autocast context
        g = torch.Generator().manual_seed(0)
        n = max(args.steps, args.warmup)
        batches = [(torch.randn(args.batch, 3, args.img, args.img, generator=g),
                    torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(n)]
        if device.type == "cuda":
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]

        # Warm up every loop (allocator, kernels, autotuning) before timing anything.
        time_bare(bare_model, bare_opt, bare_amp, batches, args.warmup, device)
        compile_s = None
        for run in ours.values():
            if run.t["compile"]:  # the first update compiles; then warm up like the others
                start = time.perf_counter()
                time_ours(run, batches, 1)
                first = time.perf_counter() - start
                steady = args.batch / time_ours(run, batches, args.warmup)[0]
                compile_s = first - steady
            else:
                time_ours(run, batches, args.warmup)
        # Each of our loops is compared with the bare loop doing the same math (with or without clipping).
        loops = {"bare (no clip)": lambda: time_bare(bare_model, bare_opt, bare_amp, batches, args.steps, device),
                 "bare (clip 5.0)": lambda: time_bare(bare_model, bare_opt, bare_amp, batches, args.steps, device,
                                                      5.0),
                 **{name: (lambda run=run: time_ours(run, batches, args.steps)) for name, run in ours.items()}}
        results: dict[str, list[float]] = {k: [] for k in loops}
        names = list(loops)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
                results[name].append(loops[name]())

    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print(f"\nmodel {args.model}, img {args.img}, batch {args.batch}, amp {args.amp}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, order rotated, medians")
    def bare_of(name: str) -> str:
        return "bare" + name[name.index(" ("):]  # "ours (clip 5.0)" -> "bare (clip 5.0)"

    print(f"{'loop':<26}{'img/s (wall)':>13}{'ratio':>8}{'img/s (CPU time)':>18}{'ratio':>8}   (ratio: vs the bare "
          "(eager) loop doing the same math)")
    for name in results:
        print(f"{name:<26}{wall[name]:>13.1f}{wall[name] / wall[bare_of(name)]:>8.3f}"
              f"{cpu[name]:>18.1f}{cpu[name] / cpu[bare_of(name)]:>8.3f}")
    basis = cpu if device.type == "cpu" and torch.get_num_threads() == 1 else wall
    worst = 1 - min(v / basis[bare_of(k)] for k, v in basis.items() if k.startswith("ours") and "compiled" not in k)
    print(f"overhead of our loop ({'CPU time' if basis is cpu else 'wall'}): {worst * 100:.1f}% (target <= 3%)")
    if compile_s is not None:
        print(f"compile time (first update minus one steady-state update, wall): {compile_s:.1f} s")

if __name__ == "__main__":
    main()
