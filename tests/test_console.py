"""What a run prints: the start and end blocks, progress on a terminal (a real pseudo-terminal) and in a
redirected log (no carriage returns), log lines that never break the bar, and our one-line cosine warning."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import struct
import subprocess
import termios
import threading

import pytest
import torch
from conftest import PYTHON, ROOT, TINY, run_train, train_env

from focalnet.engine.console import Progress

RUN = ["trainer.epochs=2", "trainer.log_every=4"]  # 8 updates per epoch, 4 val batches
START_ROWS = ("model", "data", "devices", "batch", "precision", "steps", "lr", "run dir", "W&B")


def test_plain_progress_lines_every_log_every_and_at_validation_quarters(caplog):
    caplog.set_level(logging.INFO, logger="focalnet.engine.console")
    metrics = {"epoch": 0, "train/loss": 2.5, "train/lr": 1e-3, "train/img_per_s": 100.0, "train/eta_s": 65.0}
    with Progress(total=10, initial=0, log_every=5, interactive=False) as progress:
        assert progress.bar is None
        for step in range(1, 11):
            progress.update(step, metrics if step % 5 == 0 else None)
        batches = list(progress.validation(range(8)))
    assert batches == list(range(8))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train step 5/10 (50.0%) epoch 1: loss 2.5000, lr 1.000e-03, 100 img/s, eta 0:01:05",
                     "train step 10/10 (100.0%) epoch 1: loss 2.5000, lr 1.000e-03, 100 img/s, eta 0:01:05",
                     "val: 2/8 batches", "val: 4/8 batches", "val: 6/8 batches"]


def test_cosine_schedule_shorter_than_warmup_says_so_in_one_line(caplog):
    from focalnet.engine.build import build_scheduler

    caplog.set_level(logging.WARNING)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = {"name": "cosine", "warmup_epochs": 5}
    build_scheduler(opt, cfg, total_steps=4, steps_per_epoch=2, warmup_lr=1e-4, min_lr=1e-5)
    (record,) = caplog.records  # ours, and not timm's "Cosine annealing scheduler will have no effect ..."
    assert record.name == "focalnet.engine.build"
    assert "4 of the run's 4 updates are warmup (schedule.warmup_epochs=5)" in record.getMessage()
    caplog.clear()
    build_scheduler(opt, cfg, total_steps=100, steps_per_epoch=2, warmup_lr=1e-4, min_lr=1e-5)
    assert not caplog.records  # a schedule that decays: nothing to say


def run_in_pty(args: list[str]) -> tuple[int, str]:
    """Run train.py with stdout and stderr on a 120x40 pseudo-terminal; (exit code, everything printed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([PYTHON, str(ROOT / "train.py"), *TINY, *args], cwd=ROOT, env=train_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait(timeout=600)
    reader.join(timeout=60)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_shows_bars_and_log_lines_never_break_them(tmp_path):
    code, out = run_in_pty([f"hydra.run.dir={tmp_path / 'run'}", *RUN])
    assert code == 0, out[-4000:]
    assert re.search(r"train: +\d+%\|", out) and re.search(r"val: +\d+%\|", out)  # training and validation bars
    # Every log record starts on a fresh line: none is glued behind bar text (tqdm.write clears the bar first).
    segments = re.split(r"[\r\n]", out)
    records = [s for s in segments if "][focalnet." in s]
    bare = [re.sub(r"^(\x1b\[[0-9;]*[A-Za-z]| )*", "", s) for s in records]  # cursor moves, blanking
    assert len(records) >= 4 and all(s.startswith("[20") for s in bare), records
    assert "train step" not in out  # the plain lines are for logs that are not terminals
    assert "run ---" in out and "done at update 16" in out


@pytest.mark.slow
def test_redirected_output_has_plain_lines_and_the_start_and_end_blocks(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([f"hydra.run.dir={run_dir}", *RUN, "trainer.ema_decay=0.9"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out  # no carriage-return updates in a SLURM log
    steps = re.findall(r"train step (\d+)/16 \([\d.]+%\) epoch (\d): loss [\d.]+, lr [\d.e+-]+, \d+ img/s, eta", out)
    assert steps == [("4", "1"), ("8", "1"), ("12", "2"), ("16", "2")]
    assert out.count("val: 2/4 batches") == 2 and out.count("val (EMA): 2/4 batches") == 2

    start = out[out.index("run ---"):].split("\n")[1:len(START_ROWS) + 1]
    rows = dict(re.fullmatch(r"  (\S.*?) {2,}(.*)", row).groups() for row in start)
    assert list(rows) == list(START_ROWS)
    assert re.fullmatch(r"focalnet_micro: 1\.\d\dM params, [\d.]+ GMACs at 32 px", rows["model"])
    assert rows["data"] == "synthetic: 128 train / 64 val images, 10 classes"
    assert rows["devices"] == "1 process on cpu" and rows["precision"].startswith("none (fp32), compile off")
    assert rows["batch"] == "16 per process x 1 x 1 accumulation = 16 per update"
    assert rows["steps"] == "2 epochs x 8 updates = 16 updates" and rows["run dir"] == str(run_dir)
    assert rows["lr"].startswith("1.56e-05 (adamw, per-512 0.0005 x 16/512)") and rows["W&B"].startswith("disabled")

    end = out[out.index("done at update 16"):].split("\n")[1:4]
    vals = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val/top1"' in line]
    final = json.loads(vals[-1])
    assert f"final {final['val/top1']:.2f}%; EMA final {final['val_ema/top1']:.2f}%" in end[0]
    assert re.search(r"\d:\d\d:\d\d wall, \d:\d\d:\d\d training: [\d,]+ img/s mean over 256 images", end[1])
    assert end[2].split()[-2:] == [f"{run_dir}/checkpoints/{{best.pt,", "last.pt}"]
    assert "Cosine annealing" not in out and "wandb:" not in out
