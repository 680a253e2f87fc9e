"""Stock vs FocalModulation detectors: params and GFLOPs (Ultralytics' own model info), CPU latency side by side.

    python scripts/bench_detectors.py                                  # yolov8n, yolov8s, rtdetr-l at 640 px
    python scripts/bench_detectors.py --models yolov8n --imgsz 320 --iters 20 --threads 2

For each model the stock Ultralytics YAML and ours (SPPF / AIFI -> FocalModulation) are built by Ultralytics;
params and GFLOPs are ``model.info()`` (thop, unfused, at ``--imgsz``). Latency: batch 1, eval mode, Conv+BN
fused as Ultralytics' predictor and validator run them, fp32, ``--threads`` torch threads; each iteration times
the two models back to back in alternating order (the machine's load hits both alike) and the table reports
medians of wall time and of the process's CPU time (robust on a shared machine) with focal/stock ratios. Offline: Ultralytics' settings live in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focalnet.integrations import ultralytics as fu  # noqa: E402

STOCK = {"yolov8n": "yolov8n-focal", "yolov8s": "yolov8s-focal", "rtdetr-l": "rtdetr-l-focal"}


def build(yaml_path: str):
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    cls = RTDETRDetectionModel if "rtdetr" in yaml_path else DetectionModel
    return cls(yaml_path, verbose=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(STOCK), choices=list(STOCK))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    fu.configure_offline(tempfile.mkdtemp(prefix="bench_detectors_"))
    fu.register()
    import ultralytics

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    rows = []
    for name in args.models:
        stock_yaml = fu.STOCK_COUNTERPARTS[STOCK[name]][0]
        models = {"stock": build(stock_yaml), "focal": build(str(fu.model_yaml(STOCK[name])))}
        info = {k: m.info(imgsz=args.imgsz) for k, m in models.items()}  # prints; (layers, params, grads, GFLOPs)
        for m in models.values():
            m.fuse(verbose=False).eval()
        wall, cpu = {"stock": [], "focal": []}, {"stock": [], "focal": []}
        with torch.inference_mode():
            for i in range(args.warmup + args.iters):
                order = ("stock", "focal") if i % 2 == 0 else ("focal", "stock")
                for key in order:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    models[key](x)
                    if i >= args.warmup:
                        wall[key].append(time.perf_counter() - start)
                        cpu[key].append(time.process_time() - start_cpu)
        rows.append((name, info, *({k: 1000 * statistics.median(v) for k, v in d.items()} for d in (wall, cpu))))
        print(f"{name}: done", file=sys.stderr, flush=True)

    print(f"\nultralytics {ultralytics.__version__}, torch {torch.__version__}, {args.imgsz} px, batch 1, fp32, "
          f"{args.threads} thread(s), median of {args.iters} interleaved iterations\n")
    print("| model | params (M) stock / focal | GFLOPs stock / focal | wall ms stock / focal | wall ratio | "
          "CPU ms stock / focal | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, info, wall, cpu in rows:
        print(f"| {name} | {info['stock'][1] / 1e6:.2f} / {info['focal'][1] / 1e6:.2f} | {info['stock'][3]:.1f} / "
              f"{info['focal'][3]:.1f} | {wall['stock']:.0f} / {wall['focal']:.0f} | {wall['focal'] / wall['stock']:.2f}x | "
              f"{cpu['stock']:.0f} / {cpu['focal']:.0f} | {cpu['focal'] / cpu['stock']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
