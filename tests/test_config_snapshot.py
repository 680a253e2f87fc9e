"""Restructuring the config tree must not change a single value a user gets.

``tests/fixtures/config_snapshot.yaml`` holds, as ``dotted.key: value`` maps:

* ``presets``: every ``conf/experiment/*.yaml`` composed with the training config and resolved, i.e. what
  ``python train.py experiment=NAME --cfg job --resolve`` prints (``paths.output_dir`` is null there);
* ``options``: every option of every config group, composed on top of the defaults, unresolved (so options
  that need a dataset to resolve, e.g. ``data=folder``, are compared too);
* ``eval``: eval.py's default config, unresolved.

``tests/test_packaging.py`` checks that the installed ``focalnet-train ... --cfg job --resolve`` prints the same.

The snapshot was written from the code before the config tree was restructured (issue 14), last from the
integration branch with the GPU hot path (issue 20: ``trainer.check_every_s``, ``async_save``,
``ddp_static_graph``), and is compared exactly. When a value changes on purpose, rewrite it with ``python tests/test_config_snapshot.py`` and review
the diff.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SNAPSHOT = ROOT / "tests" / "fixtures" / "config_snapshot.yaml"
# Environment variables the config reads (${oc.env:...}); unset, every value has its documented default.
CONFIG_ENV = ("IMAGENET_ROOT", "IMAGENET_FFCV_ROOT", "IMAGENET22K_ROOT", "IMAGENET22K_FFCV_ROOT",
              "FOCALNET_CACHE", "FOCALNET_OUTPUT_ROOT")
GROUPS = ("model", "data", "optimizer", "schedule", "aug", "trainer", "logger")


def flatten(node, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (empty dicts too)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


@contextlib.contextmanager
def config_dir():
    """Hydra initialized on conf/ (with our resolvers) for the ``compose`` calls below."""
    from focalnet.engine.distributed import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _hydra():
    with config_dir():
        yield


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def resolved_preset(name: str) -> dict:
    cfg = compose("config", [f"experiment={name}", "paths.output_dir=null"])
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def group_option(group: str, option: str) -> dict:
    cfg = compose("config", [f"{group}={option}"])
    return flatten(OmegaConf.to_container(cfg[group], resolve=False))


def eval_defaults() -> dict:
    return flatten(OmegaConf.to_container(compose("eval", []), resolve=False))


def current() -> dict:
    return {"presets": {n: resolved_preset(n) for n in preset_names()},
            "options": {f"{g}={o}": group_option(g, o) for g, o in group_options()},
            "eval": eval_defaults()}


@pytest.fixture(scope="module")
def snapshot():
    return yaml.safe_load(SNAPSHOT.read_text())


@pytest.fixture(autouse=True)
def _default_env(monkeypatch):
    for var in CONFIG_ENV:
        monkeypatch.delenv(var, raising=False)


def test_every_preset_resolves_to_the_snapshot(snapshot):
    assert preset_names() == sorted(snapshot["presets"])
    for name in preset_names():
        assert resolved_preset(name) == snapshot["presets"][name], name


def test_every_group_option_composes_to_the_snapshot(snapshot):
    assert [f"{g}={o}" for g, o in group_options()] == list(snapshot["options"])
    for group, option in group_options():
        assert group_option(group, option) == snapshot["options"][f"{group}={option}"], f"{group}={option}"


def test_eval_config_matches_the_snapshot(snapshot):
    assert eval_defaults() == snapshot["eval"]


if __name__ == "__main__":  # rewrite the snapshot from the current config tree
    sys.path.insert(0, str(ROOT))  # this checkout's focalnet, not an installed one
    for var in CONFIG_ENV:
        os.environ.pop(var, None)
    with config_dir():
        SNAPSHOT.write_text(yaml.safe_dump(current(), sort_keys=False, width=120))
    print(f"wrote {SNAPSHOT}")
