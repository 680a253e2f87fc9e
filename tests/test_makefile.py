"""`make install` is idempotent (README "Install"): a second run changes nothing and does no work.

The Makefile runs in a scratch copy of the project files it depends on, with stand-ins for the installers it
calls (``pip`` and ``python`` in ``.venv/bin``, ``dpkg``) that only record their arguments: what is tested is
make's own decision to run them. Where the real environment was installed by ``make install`` (CI), the real
tree is checked too: make reports it up to date.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDER = '#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n'


def sandbox(tmp_path: Path) -> tuple[Path, Path, dict]:
    work, bin_dir, log = tmp_path / "project", tmp_path / "bin", tmp_path / "calls.log"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    (work / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for exe in (work / ".venv" / "bin" / "pip", work / ".venv" / "bin" / "python", bin_dir / "dpkg"):
        exe.write_text(RECORDER.format(log=log))
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("MAKEFLAGS", None)
    return work, log, env


def make(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args, "install"], cwd=work, env=env, capture_output=True, text=True, timeout=60)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_second_make_install_does_nothing_until_its_inputs_change(tmp_path):
    work, log, env = sandbox(tmp_path)
    first = make(work, env)
    assert first.returncode == 0, first.stdout + first.stderr
    installs = [c for c in calls(log) if c.startswith("pip install")]
    extras = tomllib.loads((work / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    editable = [c.split("-e ", 1)[1] for c in installs if "-e ." in c]
    assert len(editable) == 1 and (work / ".venv" / ".install-stamp").exists()
    assert set(editable[0].removeprefix(".[").removesuffix("]").split(",")) == set(extras)  # every extra: CI runs them all

    before = calls(log)
    second = make(work, env)
    assert second.returncode == 0 and calls(log) == before  # no dpkg query, no pip: nothing ran
    assert "Nothing to be done for 'install'" in second.stdout
    assert make(work, env, "-q").returncode == 0            # make itself: up to date

    os.utime(work / "pyproject.toml")                        # a dependency changed: install again
    os.utime(work / ".venv" / ".install-stamp", (0, 0))
    third = make(work, env)
    assert third.returncode == 0 and len(calls(log)) > len(before)


@pytest.mark.skipif(not (ROOT / ".venv" / ".install-stamp").exists(), reason="no `make install` in this checkout")
def test_installed_checkout_is_up_to_date():
    """After `make install` (CI's first step), make has nothing left to do for `make install`."""
    proc = subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
