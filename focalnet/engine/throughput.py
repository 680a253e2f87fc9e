"""Model throughput, like the official ``main.py --throughput`` (50 warm-up, 30 timed batches of 128), extended:
img/s of forward passes for every precision (fp32, bf16/fp16 autocast) x eager/``torch.compile``, with params and
GMACs (the paper's "GFLOPs": multiply-accumulates, batch 1); printed as a table with the ratio to the first row
measured in the same run, and written to ``throughput.json``. ``eval.py mode=throughput`` runs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def throughput_rows(model: nn.Module, *, batch_size: int, img_size: int, precisions: list[str],
                    compile: list[bool], device: torch.device, warmup_iters: int, iters: int,
                    channels_last: bool = False) -> list[dict]:
    """One row per (compile, precision): img/s, or the error that stopped it; ``ratio`` to the first row."""
    rows = []
    for compiled in compile:
        for precision in precisions:
            row = {"precision": precision, "compile": compiled, "img_per_s": None, "error": None}
            try:
                row["img_per_s"] = measure_throughput(
                    model, batch_size=batch_size, img_size=img_size, precision=precision, compile=compiled,
                    device=device, warmup_iters=warmup_iters, iters=iters, channels_last=channels_last)
            except Exception as e:  # e.g. fp16 kernels missing on this device, no compiler for inductor
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
                log.warning("throughput %s compile=%s failed: %s", precision, compiled, row["error"])
            rows.append(row)
        if compiled:
            torch._dynamo.reset()  # each compiled row starts clean; frees the compiled graphs
    base = next((r["img_per_s"] for r in rows if r["img_per_s"]), None)
    for r in rows:
        r["ratio"] = r["img_per_s"] / base if r["img_per_s"] and base else None
    return rows


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
