"""The README cannot rot: its commands are extracted from README.md itself and checked.

Every fenced ``bash`` or ``python`` block must be preceded by a marker comment ``<!-- readme-test: MODE -->``:

* ``run [overrides]``: run on the CPU with bash, ``python`` being this interpreter; ``outputs/`` paths go to a
  temporary directory and the overrides are appended to every ``train.py`` / ``scripts/demo.py`` line (slow).
* ``compose``: each line's Hydra config is composed (and validated) without running: ``python train.py``,
  ``python eval.py`` (or ``focalnet-train``/``focalnet-eval``), ``python scripts/train_detector.py``,
  ``torchrun ... train.py``, ``srun ... python train.py``, ``scripts/launch_torchrun.sh``, ``scripts/write_ffcv.py``
  and ``scripts/write_shards.py`` (whose ``--flags`` must appear in their ``--help``). ``-m`` sweeps compose every
  point.
* ``dry``: ``make`` lines run as ``make -n`` (the target exists and expands).
* ``python``: the block is executed.
* ``skip: reason``: cannot be checked here (the reason is required).

The configuration table's group options must exist as ``conf/<group>/<option>.yaml``.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, train_env
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

README = ROOT / "README.md"
# Fences start a line: a paragraph that quotes ```` ```bash ```` or the marker in backticks is not a block.
BLOCK = re.compile(r"(?:^<!--\s*readme-test:\s*(?P<marker>.*?)\s*-->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```",
                   re.S | re.M)
MODES = ("run", "compose", "dry", "python", "skip")
# The pip-installed commands run the checkout's entry points (focalnet.cli); tests/test_packaging.py runs them.
INSTALLED = {"focalnet-train": "train.py", "focalnet-eval": "eval.py"}


def readme_blocks() -> list[tuple[str, str, str, int]]:
    """[(lang, marker, body, line number)] of every fenced code block."""
    text = README.read_text()
    return [(m["lang"], (m["marker"] or "").strip(), m["body"], text[: m.start("body")].count("\n") + 1)
            for m in BLOCK.finditer(text)]


def blocks(mode: str) -> list:
    found = [b for b in readme_blocks() if b[1].split(":")[0].split()[:1] == [mode]]
    return [pytest.param(b, id=f"line{b[3]}") for b in found]


def commands(body: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            out.append(shlex.join(tokens))
    return out


def test_every_shell_and_python_block_is_marked():
    found = readme_blocks()
    assert len(found) >= 10
    for lang, marker, _, line in found:
        if lang not in ("bash", "python"):
            continue
        mode = marker.split(":")[0].split()[:1]
        assert mode and mode[0] in MODES, f"README.md line {line}: ```{lang} block without <!-- readme-test: MODE -->"
        if mode[0] == "skip":
            assert marker.partition(":")[2].strip(), f"README.md line {line}: skip needs a reason"


def test_config_table_lists_existing_options():
    table = README.read_text().split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [r.split("|") for r in table.splitlines() if r.startswith("| `")]
    checked = 0
    for row in rows:
        group = row[1].strip().strip("`")
        for option in re.findall(r"`([a-z0-9_]+)`", row[2]):
            assert (ROOT / "conf" / group / f"{option}.yaml").is_file(), f"README lists {group}={option}"
            checked += 1
    assert checked >= 20
    # ...and every data/model config we ship is listed, so new ones get documented.
    for group in ("data", "model"):
        listed = next(r[2] for r in rows if r[1].strip().strip("`") == group)
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            if group == "model" and path.stem not in ("focalnet_micro", "focalnet_tiny", "timm"):
                continue  # the model table lists the model zoo; the config table its everyday options
            assert f"`{path.stem}`" in listed, f"conf/{group}/{path.name} is missing from the README's table"


# ------------------------------------------------------------------------------------------------ compose
def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Hydra ``-m`` overrides -> the list of single-run override lists (every combination)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(p) for p in itertools.product(*choices)]


def compose_and_validate(config_name: str, overrides: list[str], tmp_path: Path) -> None:
    """Compose like the CLI would (Hydra's own groups included), then resolve and validate the job config."""
    import focalnet.data  # noqa: F401  (config resolvers)
    from focalnet.data.folder import DataConfigError
    from focalnet.engine import ConfigError, validate_config
    from focalnet.engine.distributed import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    OmegaConf.to_container(cfg.hydra.launcher, resolve=False)  # the launcher plugin's config composed
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
    if config_name != "config":
        OmegaConf.to_container(cfg, resolve=False)
        return
    try:
        validate_config(cfg)
    except DataConfigError as e:  # a placeholder dataset path (data=folder counts its classes): config is fine
        assert "data.root" in str(e), e
    except InterpolationResolutionError as e:  # the same, raised by a resolver (data=folder / data=wds num_classes)
        assert str(e).startswith("DataConfigError raised") and "data.root" in str(e), e
    except ConfigError as e:  # placeholder checkpoint paths (trainer.init_from=/ckpt/...) are the only errors
        problems = str(e).splitlines()[1:]
        assert problems and all("no such file" in p for p in problems), e


def _script_and_args(tokens: list[str]) -> tuple[str, list[str], list[str]]:
    """A command line -> (script, flags before the overrides, the remaining arguments)."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if tokens[0] in ("torchrun", "srun"):  # launcher flags, then the script (srun: after `python`)
        i = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        return tokens[i], [], tokens[i + 1:]
    if tokens[0] == "python":
        tokens = tokens[1:]
    tokens = [INSTALLED.get(tokens[0], tokens[0]), *tokens[1:]]
    flags = []
    rest = tokens[1:]
    while rest and rest[0] in ("-m", "--multirun"):
        flags.append(rest.pop(0))
    return tokens[0], flags, rest


@pytest.mark.parametrize("block", blocks("compose"))
def test_readme_compose_commands(block, tmp_path):
    _, _, body, line = block
    help_texts: dict[str, str] = {}
    for cmd in commands(body):
        script, flags, args = _script_and_args(shlex.split(cmd))
        assert (ROOT / script).is_file(), f"README line {line}: {script} does not exist"
        if script.endswith(("write_ffcv.py", "write_shards.py")):
            if script not in help_texts:
                help_texts[script] = subprocess.run([PYTHON, script, "--help"], cwd=ROOT, capture_output=True,
                                                    text=True, env=train_env(), timeout=120).stdout
            used = [a.split("=")[0] for a in args if a.startswith("--")]
            assert used and all(f in help_texts[script] for f in used), f"README line {line}: {used} vs --help"
            args = [a for i, a in enumerate(args) if not a.startswith("--") and not (i and args[i - 1].startswith("--"))]
        config_name = {"eval.py": "eval", "scripts/train_detector.py": "detect"}.get(script, "config")
        points = _sweep_points(args) if flags else [args]
        for overrides in points:
            try:
                compose_and_validate(config_name, overrides, tmp_path)
            except Exception as e:
                raise AssertionError(f"README line {line}: `{cmd}` does not compose: {e}") from e


# ------------------------------------------------------------------------------------------------ dry / python
@pytest.mark.parametrize("block", blocks("dry"))
def test_readme_make_targets_exist(block):
    _, _, body, line = block
    for cmd in commands(body):
        tokens = shlex.split(cmd)
        assert tokens[0] == "make", f"README line {line}: dry blocks hold make commands"
        proc = subprocess.run(["make", "-n", *tokens[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"README line {line}: make -n {tokens[1:]}: {proc.stderr}"


@pytest.mark.parametrize("block", blocks("python"))
def test_readme_python_blocks_run(block):
    _, _, body, line = block
    exec(compile(body, f"README.md:{line}", "exec"), {"__name__": "readme"})


# ------------------------------------------------------------------------------------------------ run
@pytest.mark.slow
@pytest.mark.parametrize("block", blocks("run"))
def test_readme_run_blocks(block, tmp_path):
    _, marker, body, line = block
    extra = marker.split()[1:]
    lines = []
    for cmd in commands(body):
        cmd = cmd.replace("outputs/", f"{tmp_path}/outputs/")
        if re.search(r"(train|demo)\.py", cmd):
            cmd += "".join(f" {shlex.quote(o)}" for o in extra)
        lines.append(cmd)
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    env = train_env(FOCALNET_CACHE=str(tmp_path / "cache"), FOCALNET_OUTPUT_ROOT=str(tmp_path / "outputs"),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"README line {line}:\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    # The demo block's promises: a trained checkpoint and both pictures.
    if "visualize_modulation.py" in body:
        run_dir = tmp_path / "outputs" / "digits"
        assert (run_dir / "metrics.png").is_file() and (run_dir / "modulation.png").is_file()
        assert "predicted" in proc.stdout


def test_no_file_cites_notes_users_do_not_have():
    """Facts in code, configs and docs cite public sources (paper, official files at a commit, issues); the
    team's internal notes directory is not shipped, so a reference to it is a dead end for users."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    internal = "/".join(["..", "shared"])  # spelled apart so this file does not match itself
    citing = [f for f in files if (ROOT / f).is_file() and internal in (ROOT / f).read_text(errors="ignore")]
    assert not citing, f"these files cite {internal}/, which users never have: {citing}"
