"""The benchmark scripts run end to end on tiny inputs and print their tables (so `make bench` cannot rot).

They are measurement tools, not timed tests: what is asserted is what the tables say besides the timings —
GMACs equal to the count on the official module and on timm's, parameter counts, and every printed ratio
being the quotient of the printed columns it is made from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import focalnet

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_MICRO_MACS = json.loads((ROOT / "tests" / "fixtures" / "focalnet_official" / "macs.json").read_text())[
    "micro_flop_counter_by_img_size"]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_model  # noqa: E402


def run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str) -> list[list[str]]:
    """The cells of every markdown table row printed (header and separator lines excluded)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| model") and "---" not in line]
    return [r for r in rows if not r[0].startswith(("workers", "loop"))]


def test_bench_model_row_counts_macs_like_the_official_module_and_timms():
    args = argparse.Namespace(img_size=64, batch_size=2, iters=1, warmup=0, drop_path=0.1, no_baseline=False,
                              channels_last=False)
    row = bench_model.bench_model("focalnet_micro", args)
    assert row["gmacs"] * 1e9 == OFFICIAL_MICRO_MACS["64_1000_classes"]  # the official module, same architecture
    assert row["gmacs_timm"] == row["gmacs"]                           # timm's module, counted the same way
    theirs = timm.models.focalnet.FocalNet(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(2,) * 4,
                                           focal_windows=(3,) * 4)
    assert row["params"] * 1e6 == sum(p.numel() for p in theirs.parameters())
    assert row["params"] * 1e6 == sum(p.numel() for p in focalnet.create_model("focalnet_micro").parameters())
    cells = table_rows(bench_model.markdown([row], args))[0]
    assert cells[:4] == ["focalnet_micro", f"{row['params']:.2f}", f"{row['gmacs']:.2f}", "timm FocalNet"]
    assert cells[6] == f"{row['fwd'] / row['fwd_timm']:.2f}x" and cells[9] == f"{row['train'] / row['train_timm']:.2f}x"
    assert cells[12] == f"{row['mem'] / row['mem_timm']:.2f}x" and row["mem"] > 0 and row["mem_timm"] > 0


def assert_ratio(cell: str, numerator: str, denominator: str) -> None:
    """A printed ratio equals the quotient of the printed values it comes from, within their rounding."""
    ratio = float(cell.rstrip("x"))
    num, den = float(numerator), float(denominator)
    digits = max(len(s.split(".")[1]) if "." in s else 0 for s in (numerator, denominator))
    slack = 0.5 * 10 ** -digits  # each printed value is off by at most half a unit in its last digit
    low, high = (num - slack) / (den + slack), (num + slack) / max(den - slack, 1e-12)
    assert low - 0.005 <= ratio <= high + 0.005, (cell, numerator, denominator)


@pytest.mark.slow
def test_bench_model_prints_rows_with_ratios_for_focalnet_and_dat():
    out = run("bench_model.py", "--models", "focalnet_micro", "dat_micro", "--batch-size", "2",
              "--img-size", "64", "--iters", "1", "--warmup", "0", "--threads", "1")
    rows = {r[0]: r for r in table_rows(out)}
    assert rows["focalnet_micro"][3] == "timm FocalNet" and rows["dat_micro"][3] == "our FocalNet-LRF"
    assert rows["focalnet_micro"][2] == f"{OFFICIAL_MICRO_MACS['64_1000_classes'] / 1e9:.2f}"
    for r in rows.values():  # fwd, fwd+bwd and memory: ours / baseline
        for ratio, ours, baseline in ((6, 4, 5), (9, 7, 8), (12, 10, 11)):
            assert_ratio(r[ratio], r[ours], r[baseline])


@pytest.mark.slow
def test_bench_train_reports_the_overhead():
    out = run("bench_train.py", "--img", "32", "--batch", "8", "--steps", "2", "--warmup", "1", "--rounds", "2")
    rows = {m[0].strip(): m[1:] for m in re.findall(r"^(\w+ \([\w .]+\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                                                      out, flags=re.M)}
    assert set(rows) == {"bare (no clip)", "bare (clip 5.0)", "ours (no clip)", "ours (clip 5.0)"}
    for name, (wall, wall_ratio, cpu, cpu_ratio) in rows.items():  # each loop vs the bare loop with its math
        bare = rows["bare" + name[name.index(" "):]]
        assert_ratio(wall_ratio, wall, bare[0])
        assert_ratio(cpu_ratio, cpu, bare[2])
    # negative when our loop measured faster than the bare one (timing noise on a quiet machine)
    basis, overhead = re.search(r"overhead of our loop \((CPU time|wall)\): (-?[\d.]+)%", out).groups()
    column = 3 if basis == "CPU time" else 1
    worst = 1 - min(float(rows[n][column]) for n in ("ours (no clip)", "ours (clip 5.0)"))
    assert abs(float(overhead) - 100 * worst) <= 0.1 + 0.05  # from 3-decimal ratios, printed to 0.1%


@pytest.mark.slow
def test_bench_data_compares_the_four_pipelines(tmp_path):
    out = run("bench_data.py", "--dir", str(tmp_path / "jpegs"), "--images", "48", "--classes", "4",
              "--batch-size", "8", "--workers", "1", "--epochs", "1", "--img-size", "64")
    rows = table_rows(out)
    assert [r[1][:3] for r in rows] == ["(a)", "(b)", "(c)", "(d)"]
    assert "(d) ours: data=imagenet1k_wds" in out and "shards (d) vs folder (b)" in out
    official = rows[0]
    for workers, _, rate, per_worker, ratio, cpu_ms, per_core, cpu_ratio in rows:
        assert_ratio(ratio, rate, official[2])            # img/s vs the official pipeline
        assert_ratio(cpu_ratio, official[5], cpu_ms)      # CPU-ms/img: the official one over ours
        assert abs(float(per_worker) - float(rate) / int(workers)) <= 1 and abs(float(per_core) - 1000 / float(cpu_ms)) <= 1


def test_bench_pixels_measures_the_folder_decode_paths(tmp_path, capsys):
    """In process and tiny (a subprocess costs a torch import). Its FFCV section writes and reads four .beton
    files, minutes on CI, so it is left out; the raw-pixel FFCV path's equality with the folder path is
    tests/test_data_ffcv.py's."""
    from scripts.bench_pixels import main

    assert main(["--sizes", "120x90,500x375", "--images", "1", "--crops", "1", "--rounds", "1", "--img-size", "64",
                 "--dir", str(tmp_path), "--skip-ffcv"]) == 0
    rows = {line.split("|")[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("|")}
    assert rows["500x375"].startswith("|500x375|0.00 / 0|") and rows["500x375"].endswith("x|")  # eval is exact


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
