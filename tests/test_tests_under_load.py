"""``scripts/tests_under_load.sh`` (``make test-under-load``, README "Development"): every run goes beside busy CPU
hogs, a failed run fails the script, each run's output is kept, and no hog outlives it.

The script runs a probe test file instead of the real selection: the probe reads the hogs' CPU time from
``/proc`` (they must be burning CPU while the tests run) and fails on the second run on purpose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import os, time
from pathlib import Path

def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

def test_hogs_are_burning_cpu():
    pids = [int(p) for p in os.environ["TESTS_UNDER_LOAD_HOGS"].split()]
    assert len(pids) == int(os.environ["HOGS"])
    for pid in pids:
        assert "while True" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    before = [cpu_seconds(p) for p in pids]
    time.sleep(1.0)
    assert all(cpu_seconds(p) - b > 0.05 for p, b in zip(pids, before))

def test_second_run_fails():
    counter = Path(os.environ["PROBE_COUNTER"])
    run = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(run))
    assert run != 2
'''


def test_each_run_goes_beside_busy_hogs_a_failed_run_fails_the_script_and_no_hog_survives(tmp_path):
    probe, logs = tmp_path / "test_probe.py", tmp_path / "logs"
    probe.write_text(PROBE)
    env = {**os.environ, "RUNS": "3", "HOGS": "2", "PYTEST_WORKERS": "0", "FILES": str(probe),
           "LOG_DIR": str(logs), "PYTHON": sys.executable, "PROBE_COUNTER": str(tmp_path / "counter")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "tests_under_load.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # run 2 failed
    runs = re.findall(r"^run (\d): exit (\d+), (.*), load [\d.]+ [\d.]+ [\d.]+$", proc.stdout, re.M)
    assert [(r, e) for r, e, _ in runs] == [("1", "0"), ("2", "1"), ("3", "0")], out
    assert "2 passed" in runs[0][2] and "1 failed, 1 passed" in runs[1][2] and "2 passed" in runs[2][2], out
    assert "test_second_run_fails" in (logs / "run2.log").read_text()  # each run's whole output is kept
    hogs = re.findall(r"^\d+ runs beside (\d+) CPU hog", proc.stdout, re.M)
    assert hogs == ["2"], out
    leftover = subprocess.run(["pgrep", "-f", "-x", f"{sys.executable} -c while True: pass"], capture_output=True,
                              text=True)
    assert leftover.stdout == "", f"hogs left running: {leftover.stdout}"
