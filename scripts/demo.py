"""``make demo``: train FocalNet-Micro on the embedded digits, then draw the modulation maps of its best weights.

    python scripts/demo.py                          # what `make demo` runs
    python scripts/demo.py trainer.epochs=3         # extra arguments are Hydra overrides for train.py
    python scripts/demo.py --run-dir /tmp/demo      # choose the run directory
    python scripts/demo.py --threads 4              # torch threads (default: CPU count - 1)

Steps: ``train.py experiment=demo`` (digits written to ``data.root`` on first use; the trainer draws
``metrics.png`` and ``inputs.png``), then ``scripts/visualize_modulation.py`` on validation digits with the best
checkpoint (-> ``modulation.png``), and finally where everything is and how to upload the offline W&B run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> None:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, **kwargs)
    if proc.returncode != 0:
        print(f"demo: {' '.join(cmd[:2])} failed with exit code {proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode)


def final_val(run_dir: Path) -> dict:
    last: dict = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "val/top1" in record:
                last = record
    return last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="run directory (default: ${FOCALNET_OUTPUT_ROOT:-outputs}/demo_<time>)")
    p.add_argument("--num-images", type=int, default=6, help="validation digits in modulation.png")
    p.add_argument("--threads", type=int, help="torch/OpenMP threads of the training process (default: one "
                                                "core fewer than the machine has, at least 1: the data loader "
                                                "worker needs the other)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, e.g. trainer.epochs=3")
    args = p.parse_args(argv)

    root = Path(os.environ.get("FOCALNET_OUTPUT_ROOT", "outputs"))
    run_dir = (args.run_dir or root / time.strftime("demo_%Y-%m-%d_%H-%M-%S")).resolve()
    py = sys.executable
    # More compute threads than free cores makes OpenMP spin: on a busy 2-core CPU, 2 threads plus the loader
    # worker trained 4x slower than 1 thread (30 steps: 178 s vs 43 s).
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    run([py, "train.py", "experiment=demo", f"hydra.run.dir={run_dir}", *args.overrides], env=env)
    train_s = time.perf_counter() - start
    run([py, "scripts/visualize_modulation.py", str(run_dir / "checkpoints" / "best.pt"), "--val",
         str(args.num_images), "-o", str(run_dir / "modulation.png")], env=env, stdout=subprocess.DEVNULL)

    val = final_val(run_dir)
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    wandb_bin = Path(py).with_name("wandb")
    wandb_cmd = str(wandb_bin) if wandb_bin.exists() else "wandb"
    lines = [
        "",
        "=" * 78,
        f"Demo done in {train_s / 60:.1f} min of training: val top-1 {val.get('val/top1', float('nan')):.2f}% "
        f"(top-5 {val.get('val/top5', float('nan')):.2f}%) on {val.get('val/count', '?')} held-out digits.",
        f"  run directory  {run_dir}",
        f"  checkpoints    {run_dir / 'checkpoints' / 'last.pt'}  (and best.pt)",
        f"  metrics        {run_dir / 'metrics.jsonl'}",
        f"  config         {run_dir / 'config.yaml'}  (resolved; provenance.json has git SHA and versions)",
        f"  curves         {run_dir / 'metrics.png'}",
        f"  inputs         {run_dir / 'inputs.png'}  (the first augmented training batch)",
        f"  modulation     {run_dir / 'modulation.png'}",
    ]
    if wandb_runs:
        lines += [f"  W&B (offline)  {wandb_runs[-1]}",
                  f"Upload it to W&B:  {wandb_cmd} login && {wandb_cmd} sync {wandb_runs[-1]}"]
    else:
        lines.append("  W&B            no offline run (logger.wandb.mode was changed)")
    lines.append("=" * 78)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
