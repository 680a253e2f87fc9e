"""The benchmark scripts run end to end on tiny inputs and print their tables (so `make bench` cannot rot).

They are measurement tools, not timed tests: only their output format and completeness are asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_model_prints_rows_with_ratios_for_focalnet_and_dat():
    out = run("bench_model.py", "--models", "focalnet_micro", "dat_micro", "--batch-size", "2",
              "--img-size", "64", "--iters", "1", "--warmup", "0", "--threads", "1")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "timm FocalNet" in rows["focalnet_micro"] and "our FocalNet-LRF" in rows["dat_micro"]
    for row in (rows["focalnet_micro"], rows["dat_micro"]):
        assert row.count("x |") == 3  # fwd, fwd+bwd and memory ratios against the baseline


@pytest.mark.slow
def test_bench_train_reports_the_overhead():
    out = run("bench_train.py", "--img", "32", "--batch", "8", "--steps", "2", "--warmup", "1", "--rounds", "2")
    assert "bare (no clip)" in out and "ours (clip 5.0)" in out
    assert "overhead of our loop" in out


@pytest.mark.slow
def test_bench_data_compares_the_three_pipelines(tmp_path):
    out = run("bench_data.py", "--dir", str(tmp_path / "jpegs"), "--images", "48", "--classes", "4",
              "--batch-size", "8", "--workers", "1", "--epochs", "1", "--img-size", "64")
    for path in ("(a)", "(b)", "(c)"):
        assert path in out


def test_bench_transfer_counts_a_quarter_of_the_bytes(tmp_path, capsys):
    """In process: a subprocess would spend its time importing torch (the script itself takes a second)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "scripts" / "bench_transfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--dir", str(tmp_path / "images"), "--batch-size", "4", "--img-size", "32",
                           "--steps", "2", "--skip-ffcv"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets 1
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| data=")}
    # 4 x 3 x 32 x 32 uint8 + 4 int64 labels, against the same in float32.
    assert "| 49,184 B" in rows["data=imagenet1k (folder)"] and "| 12,320 B" in rows["data=imagenet1k (folder)"]
    assert rows["data=imagenet1k (folder)"].endswith("| 0.250 |") and rows["data=synthetic"].endswith("| 1.000 |")
