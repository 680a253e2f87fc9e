"""The package works installed and in a checkout, and a user's own ``data/`` folder never gets in the way.

* A checkout runs its own code: ``focalnet`` and ``focalnet.data`` (the repository's ``data/`` folder) load from
  this checkout, in this process and in the subprocesses the tests start with ``cwd=ROOT``, even when another
  checkout is pip-installed in editable mode in the same environment.
* (slow) ``pip install`` of the wheel (not editable) into a fresh virtual environment gives ``focalnet-train`` and
  ``focalnet-eval`` commands that train, evaluate and print the same resolved config as this checkout, run from a
  directory holding an unrelated ``data/`` package; the wheel holds every module and config file, and no top-level
  ``data`` module. The heavy dependencies (torch...) are not reinstalled: the fresh environment borrows this
  interpreter's site-packages through ``PYTHONPATH`` when its commands run (its own site-packages, where the wheel
  is installed, is the only place a ``focalnet`` package exists).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, ROOT, train_env
from test_config_snapshot import CONFIG_ENV, SNAPSHOT, flatten

import focalnet
import focalnet.data

WHERE = "import focalnet, focalnet.data, focalnet.layout as l; print(focalnet.__file__, focalnet.data.__file__, l.CONF_DIR)"
# Every module of the repository's data/ folder, imported by its package name (shards, file index, ...).
DATA_MODULES = ("import importlib, pkgutil, focalnet.data as d; "
                "print(*(importlib.import_module(f'focalnet.data.{m.name}').__file__ for m in pkgutil.iter_modules(d.__path__)))")
SMALL = ["model=focalnet_micro", "data=synthetic", "data.img_size=32", "data.train_size=64", "data.val_size=32",
         "data.batch_size=16", "aug=none", "trainer.amp=none", "trainer.max_steps=2", "trainer.device=cpu",
         "logger.wandb.mode=disabled"]


def _user_project(tmp_path: Path) -> Path:
    """A directory like an ML project's: its own ``data`` package, which must never be imported by us."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "__init__.py").write_text("raise ImportError('the user project data package was imported')\n")
    return project


def test_a_checkout_runs_its_own_code():
    for path in (focalnet.__file__, focalnet.data.__file__):
        assert Path(path).resolve().is_relative_to(ROOT), path
    out = subprocess.run([PYTHON, "-c", WHERE], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert paths == [ROOT / "focalnet" / "__init__.py", ROOT / "data" / "__init__.py", ROOT / "conf"]
    # Every module of data/ (shards, file index, ...) imports as focalnet.data.<name>, from this checkout.
    modules = [importlib.import_module(f"focalnet.data.{m.name}") for m in pkgutil.iter_modules(focalnet.data.__path__)]
    assert sorted(Path(m.__file__).resolve() for m in modules) == sorted(
        p.resolve() for p in (ROOT / "data").glob("*.py") if p.name != "__init__.py")


def test_a_users_data_package_does_not_shadow_ours(tmp_path):
    project = _user_project(tmp_path)
    env = train_env(PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, "-c", f"import focalnet.engine; {WHERE}"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.split()[1]) == ROOT / "data" / "__init__.py"
    # ...and the repository's data/ folder refuses to be imported under the plain name (a second copy).
    out = subprocess.run([PYTHON, "-c", "import data"], cwd=ROOT, env=train_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "the package focalnet.data" in out.stderr


def _wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the checkout (the build writes build/ and *.egg-info next to the sources)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build", "*.egg-info",
                                                             "__pycache__", ".*cache", "wandb"))
    proc = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def _expected_files() -> set[str]:
    """Every module and config of the checkout, at its installed path."""
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "focalnet").rglob("*.py")}
    files |= {f"focalnet/data/{p.name}" for p in (ROOT / "data").glob("*.py")}
    files |= {f"focalnet/{p.relative_to(ROOT)}" for p in (ROOT / "conf").rglob("*.yaml")}
    return files


@pytest.mark.slow
def test_pip_install_gives_commands_that_work_from_any_directory(tmp_path):
    wheel = _wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _expected_files() <= names, f"missing from the wheel (pyproject.toml packages): {_expected_files() - names}"
    assert {n.split("/")[0] for n in names} == {"focalnet", wheel.name.split("-")[0] + "-0.1.0.dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    proc = subprocess.run([PYTHON, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "focalnet" / "conf" / "config.yaml").is_file() and not (site / "data").exists()

    project = _user_project(tmp_path)
    deps = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    env = {k: v for k, v in train_env(PYTHONPATH=deps).items() if k not in CONFIG_ENV}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], cwd=project, env=env, capture_output=True, text=True, timeout=900)

    out = run(python, "-c", WHERE)
    assert out.returncode == 0, out.stderr
    assert all(Path(p).is_relative_to(site) for p in out.stdout.split()), out.stdout
    out = run(python, "-c", DATA_MODULES)  # every data module (shards, file index, ...) imports from the wheel
    assert out.returncode == 0, out.stderr
    installed = [Path(p) for p in out.stdout.split()]
    assert all(p.is_relative_to(site / "focalnet" / "data") for p in installed), out.stdout
    assert sorted(p.name for p in installed) == sorted(p.name for p in (ROOT / "data").glob("*.py") if p.name != "__init__.py")

    # The packaged config tree composes exactly what the checkout's does.
    name = "in1k_focalnet_tiny_srf"
    out = run(bin_dir / "focalnet-train", f"experiment={name}", "--cfg", "job", "--resolve")
    assert out.returncode == 0, out.stderr
    assert flatten(yaml.safe_load(out.stdout)) == yaml.safe_load(SNAPSHOT.read_text())["presets"][name]

    # Train and evaluate from the user's directory (its own data/ package is never imported).
    out = run(bin_dir / "focalnet-train", *SMALL, "hydra.run.dir=run")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (project / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["final/step"] == 2 and (project / "run" / "train.log").is_file()
    out = run(bin_dir / "focalnet-eval", "checkpoint=run/checkpoints/last.pt", *SMALL[1:6], "trainer.amp=none",
              "trainer.device=cpu", "hydra.run.dir=eval")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((project / "eval" / "eval.json").read_text())
    assert result["count"] == 32 and f"top1 {result['top1']:.3f}" in out.stdout  # printed and written
    assert (project / "eval" / "provenance.json").exists() and (project / "eval" / "config.yaml").exists()

    # Bad config: exit 2, one line naming the key, no traceback (both commands).
    out = run(bin_dir / "focalnet-train", *SMALL, "trainer.amp=fp8", "hydra.run.dir=bad")
    assert out.returncode == 2 and "trainer.amp='fp8' is not allowed" in out.stdout + out.stderr
    out = run(bin_dir / "focalnet-eval", *SMALL[1:6], "hydra.run.dir=bad_eval")
    assert out.returncode == 2 and "checkpoint is not set" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
