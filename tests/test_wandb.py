"""Weights & Biases (README "Weights & Biases"), fast: the mode ``auto`` resolves and a real offline run is
read back with W&B's own reader.

* ``logger.wandb.mode=auto`` is online exactly when W&B itself finds an API key (its environment and netrc
  readers, ``wandb.sdk.lib.wbauth``, are the reference) for ``WANDB_BASE_URL``'s host, offline otherwise;
  ``WANDB_MODE`` decides when set; explicit modes pass through;
* a training run with ``logger.wandb.{project,entity,name,tags}`` writes an offline run whose project, entity,
  name, tags, config, id and final metrics ``wandb leet inspect`` shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_env
from wandb.sdk.lib.wbauth import HostUrl
from wandb.sdk.lib.wbauth.authenticate import _try_env_auth
from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth_with_source

from focalnet.engine.checkpointing import load_file
from focalnet.engine.loggers import resolve_wandb_mode
from focalnet.engine.trainer import train

WANDB = str(Path(sys.executable).with_name("wandb"))
KEY = "0123456789abcdef0123456789abcdef01234567"  # the form of a W&B API key (40 hex digits)


def wandb_finds_a_key() -> bool:
    """What wandb.init's login would find, by W&B's own readers: WANDB_API_KEY, then the netrc file."""
    host = HostUrl(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return bool(_try_env_auth(host=host) or read_netrc_auth_with_source(host=host))


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """No W&B variables, no NETRC, HOME in tmp_path (so no ~/.netrc of the machine)."""
    for k in list(os.environ):
        if k.startswith("WANDB_") or k == "NETRC":
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def netrc_entry(host: str, password: str = KEY) -> str:
    return f"machine {host}\n  login user\n  password {password}\n"


@pytest.mark.parametrize("setup, expected", [
    ({}, "offline"),                                                                   # nothing configured
    ({"env": {"WANDB_API_KEY": KEY}}, "online"),
    ({"home_netrc": netrc_entry("api.wandb.ai")}, "online"),                           # `wandb login` wrote it
    ({"home_netrc": netrc_entry("other.example.com")}, "offline"),                     # a key for another host
    ({"netrc_var": netrc_entry("api.wandb.ai")}, "online"),                            # NETRC=/some/file
    ({"home_netrc": netrc_entry("wandb.corp.example"),
      "env": {"WANDB_BASE_URL": "https://wandb.corp.example"}}, "online"),            # a private server
    ({"home_netrc": netrc_entry("api.wandb.ai"),
      "env": {"WANDB_BASE_URL": "https://wandb.corp.example"}}, "offline"),
])
def test_auto_is_online_exactly_when_wandb_finds_a_key(clean_home, monkeypatch, setup, expected):
    for k, v in setup.get("env", {}).items():
        monkeypatch.setenv(k, v)
    if "home_netrc" in setup:
        (clean_home / ".netrc").write_text(setup["home_netrc"])
    if "netrc_var" in setup:
        (clean_home / "elsewhere").write_text(setup["netrc_var"])
        monkeypatch.setenv("NETRC", str(clean_home / "elsewhere"))
    assert wandb_finds_a_key() == (expected == "online")  # the reference agrees with the expectation
    assert resolve_wandb_mode("auto") == expected


def test_wandb_mode_variable_decides_and_explicit_modes_pass_through(clean_home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    for mode in ("offline", "disabled", "online"):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert resolve_wandb_mode("auto") == mode
    monkeypatch.delenv("WANDB_MODE")
    assert [resolve_wandb_mode(m) for m in ("offline", "disabled")] == ["offline", "disabled"]
    monkeypatch.delenv("WANDB_API_KEY")
    assert resolve_wandb_mode("online") == "online"  # asked for explicitly: W&B then logs in or says why not


def test_offline_run_read_back_with_wandbs_reader(compose_cfg, clean_home, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg("logger.wandb.mode=offline", "logger.wandb.project=focalnet-tests", "logger.wandb.entity=my-team",
                      "logger.wandb.name=tiny-run", "logger.wandb.tags=[in1k,tiny]", "data.train_size=32",
                      "optimizer.lr=0.02")
    result = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(offline)], capture_output=True,
                         text=True, timeout=120, env=train_env(HOME=str(clean_home)))
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout)
    assert (run["project"], run["entity"], run["name"], run["tags"]) == ("focalnet-tests", "my-team", "tiny-run",
                                                                          ["in1k", "tiny"])
    assert run["state"] == "finished" and run["run_id"] == load_file(run_dir / "checkpoints" / "last.pt")["wandb_id"]
    assert run["config"]["optimizer"]["lr"] == 0.02 and run["config"]["logger"]["wandb"]["name"] == "tiny-run"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run["summary"]["val/top1"] == result["val/top1"] == [m for m in logged if "val/top1" in m][-1]["val/top1"]
    assert run["summary"]["train/loss"] == [m for m in logged if "train/loss" in m][-1]["train/loss"]
