"""Benchmark our models against timm's implementation, side by side in one process on the same inputs.

Per model one markdown row: params, GMACs (multiply-accumulates, ``torch.utils.flop_counter`` / 2, batch 1),
forward img/s (eval, no_grad), forward+backward img/s (train mode, cross-entropy, drop path on), peak memory of
one forward+backward step, each for ours and timm with the ratio. timm gets our weights (converted), so both
compute the same function.

Timing: ours and timm alternate within every iteration (the order flips each time) and the median is
reported, so machine noise hits both columns alike. Peak memory: the largest amount of tensor memory
allocated by PyTorch's CPU allocator during one forward+backward step beyond what was live before it
(activations, gradients, temporaries; torch.profiler memory events). It excludes parameters and is
what grows with batch size.

Models without a timm counterpart (``focalnet_tiny_iso``) get a row with empty baseline columns. DAT rows
(``dat_tiny``...) are compared with our FocalNet of the same size (``focalnet_tiny_lrf``...), the paper's
comparison at similar FLOPs; DAT's GMACs are counted like the DAT paper (fvcore rules, see
``focalnet.models.dat.fvcore_flop_formulas``). Other families add a builder to ``BASELINES``.

Our FocalNets are built by ``create_model``, i.e. with the CPU kernels of ``focalnet.ops.cpu``. ``--plain`` adds
a row per model with ``cpu_kernels=False`` (the plain model code) against the same baseline; ``--compile`` adds a
row with both models under ``torch.compile`` (Inductor; on CPU it compiles C++ with gcc, minutes per model),
the path GPU users take.

    python scripts/bench_model.py                                   # focalnet_tiny_srf/lrf, batch 16, 224px
    python scripts/bench_model.py --models focalnet_tiny_srf --plain --compile --threads 2
    python scripts/bench_model.py --models dat_tiny focalnet_tiny_lrf --batch-size 8   # DAT vs FocalNet
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's focalnet

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from focalnet import create_model  # noqa: E402
from focalnet.models.checkpoint import convert_official_to_timm  # noqa: E402
from focalnet.models.flops import count_macs  # noqa: E402


def timm_focalnet(name: str, ours: nn.Module, drop_path_rate: float) -> nn.Module | None:
    """timm's FocalNet with our weights. Variants timm does not register (focalnet_micro) are built from
    timm's FocalNet class with the same architecture; isotropic ones (patch 16) have no timm equivalent."""
    arch = ours.arch
    if len(arch["depths"]) == 1:
        return None
    model = timm.models.focalnet.FocalNet(
        num_classes=ours.num_classes,
        embed_dim=arch["embed_dim"],
        depths=arch["depths"],
        mlp_ratio=ours.mlp_ratio,
        focal_levels=arch["focal_levels"],
        focal_windows=arch["focal_windows"],
        use_overlap_down=arch["use_conv_embed"],
        use_post_norm=arch["use_postln"],
        use_post_norm_in_modulation=arch["use_postln_in_modulation"],
        normalize_modulator=arch["normalize_modulator"],
        layerscale_value=1e-4 if arch["use_layerscale"] else None,
        drop_path_rate=drop_path_rate,
    )
    model.load_state_dict(convert_official_to_timm(ours.state_dict(), use_postln=arch["use_postln"]))
    return model


def focalnet_for_dat(name: str, ours: nn.Module, drop_path_rate: float) -> nn.Module | None:
    """Our FocalNet (LRF) of DAT's size: dat_tiny -> focalnet_tiny_lrf (dat_micro -> focalnet_micro)."""
    size = name.removeprefix("dat_").removesuffix("_384")
    baseline = "focalnet_micro" if size == "micro" else f"focalnet_{size}_lrf"
    return create_model(baseline, drop_path_rate=drop_path_rate, num_classes=ours.num_classes)


# Model-name prefix -> (baseline label, builder (name, our model, drop_path_rate) -> module or None).
BASELINES: dict[str, tuple[str, Callable[[str, nn.Module, float], nn.Module | None]]] = {
    "focalnet_": ("timm FocalNet", timm_focalnet),
    "dat_": ("our FocalNet-LRF", focalnet_for_dat),
}


def build_baseline(name: str, ours: nn.Module, drop_path_rate: float) -> tuple[str, nn.Module | None]:
    for prefix, (label, fn) in BASELINES.items():
        if name.startswith(prefix):
            model = fn(name, ours, drop_path_rate)
            return (label if model is not None else "-"), model
    return "-", None


@contextlib.contextmanager
def _quiet_stderr():
    """The Kineto profiler prints start/stop lines straight to fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()


def fwd_step(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def peak_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak extra bytes allocated by PyTorch during one forward+backward (grads freed before)."""
    model.train()
    model.zero_grad(set_to_none=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        train_step(model, x, y)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    model.zero_grad(set_to_none=True)
    return peak


def time_interleaved(fns: list[Callable[[], None]], iters: int, warmup: int) -> list[float]:
    """Median seconds per call of each fn; fns alternate within each iteration, order flipped each time."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for it in range(iters):
        order = list(range(len(fns)))
        if it % 2:
            order.reverse()
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_model(name: str, args, variant: str = "eager") -> dict:
    """One row: ``variant`` is ``eager`` (as create_model builds it), ``plain`` (``cpu_kernels=False``) or
    ``compile`` (both models under ``torch.compile``)."""
    torch.manual_seed(0)
    extra = {"img_size": args.img_size} if name.startswith("dat_") else {}  # DAT is built for one input size
    if variant == "plain":
        extra["cpu_kernels"] = False
    ours = create_model(name, drop_path_rate=args.drop_path, **extra)
    label, base = ("-", None) if args.no_baseline else build_baseline(name, ours, args.drop_path)
    models = [m for m in (ours, base) if m is not None]
    if args.channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, ours.num_classes, (args.batch_size,))

    suffix = {"eager": "", "plain": " (cpu_kernels=False)", "compile": " (torch.compile)"}[variant]
    row = dict(model=name + suffix, baseline=label, params=sum(p.numel() for p in ours.parameters()) / 1e6)
    row["gmacs"] = count_macs(ours, args.img_size) / 1e9
    if base is not None:
        row["gmacs_timm"] = count_macs(base, args.img_size) / 1e9
    if variant == "compile":  # after counting MACs on the eager modules; the warm-up iterations compile
        models = [torch.compile(m) for m in models]

    for m in models:
        m.eval()
    warmup = max(args.warmup, 1) if variant == "compile" else args.warmup  # compiling is not timed
    fwd = time_interleaved([lambda m=m: fwd_step(m, x) for m in models], args.iters, warmup)
    for m in models:
        m.train()
    train = time_interleaved([lambda m=m: train_step(m, x, y) for m in models], args.iters, warmup)
    mem = [peak_step_memory(m, x, y) for m in models]
    bs = args.batch_size
    row["fwd"], row["train"], row["mem"] = bs / fwd[0], bs / train[0], mem[0] / 2**20
    if base is not None:
        row["fwd_timm"], row["train_timm"], row["mem_timm"] = bs / fwd[1], bs / train[1], mem[1] / 2**20
    return row


def markdown(rows: list[dict], args) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    head = (
        "| model | params (M) | GMACs | baseline | fwd img/s ours | fwd img/s baseline | fwd ratio "
        "| fwd+bwd img/s ours | fwd+bwd img/s baseline | fwd+bwd ratio | peak MB ours | peak MB baseline "
        "| memory ours/baseline |"
    )
    lines = [
        f"batch {args.batch_size}, {args.img_size}px, fp32, {torch.get_num_threads()} threads, "
        f"median of {args.iters} interleaved iterations; ratio = ours / baseline (higher is faster; for "
        "memory lower is better)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        g = r.get
        lines.append(
            f"| {r['model']} | {r['params']:.2f} | {r['gmacs']:.2f} | {r['baseline']} | {f(g('fwd'), '.1f')} | "
            f"{f(g('fwd_timm'), '.1f')} | {ratio(g('fwd'), g('fwd_timm'))} | {f(g('train'), '.1f')} | "
            f"{f(g('train_timm'), '.1f')} | {ratio(g('train'), g('train_timm'))} | {f(g('mem'), '.0f')} | "
            f"{f(g('mem_timm'), '.0f')} | {ratio(g('mem'), g('mem_timm'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["focalnet_tiny_srf", "focalnet_tiny_lrf"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per model and mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--drop-path", type=float, default=0.2, help="drop_path_rate for both (train step)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model memory format")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline columns")
    p.add_argument("--plain", action="store_true", help="add rows for our models built with cpu_kernels=False")
    p.add_argument("--compile", action="store_true", help="add rows with both models under torch.compile")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["eager"] + ["plain"] * args.plain + ["compile"] * args.compile
    rows = []
    for name in args.models:
        for variant in variants:
            rows.append(bench_model(name, args, variant))
            torch._dynamo.reset()
            print(f"done {name} ({variant})", file=sys.stderr, flush=True)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
