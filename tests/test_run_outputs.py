"""What a run leaves in W&B and its run directory, read back with W&B's own reader (``wandb leet inspect``).

* groups and job types: a training run's group is its id (run directory name); a fine-tune from its
  checkpoint and an ``eval.py`` of it join that group as ``finetune`` / ``eval``; ``logger.wandb.group``
  overrides; ``WANDB_PROJECT``/``WANDB_ENTITY`` fill a null project/entity (sweeps: tests/test_sweeps.py);
* checkpoint artifacts (``best`` / ``last`` policies): name, type, aliases, the file's MD5 digest and size in
  the run file, the file kept for ``wandb sync``; a non-finite state is never uploaded;
* pictures: ``inputs.png`` and the modulation maps as W&B images (same bytes), ``metrics.png``; the trainer's
  modulation picture is the one ``scripts/visualize_modulation.py`` draws for the same checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, run_train, train_env, wandb_records
from PIL import Image

from focalnet.engine.checkpointing import load_file


def wandb_run_record_of(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def artifacts(records: list[dict]) -> list[dict]:
    return [r["artifact"] for r in records if r["type"] == "artifact"]


def images(records: list[dict], key: str) -> list[dict]:
    """The W&B image entries logged under ``key`` (from history records)."""
    out = []
    for r in records:
        if r["type"] == "history":
            item = r["history"]["item"]
            if f"{key}._type" in item:
                out.append({k[len(key) + 1:]: v for k, v in item.items() if k.startswith(key + ".")} |
                           {"step": r["history"]["step"]["num"]})
    return out


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def assert_artifact_is(art: dict, path: Path, run_id: str) -> None:
    assert art["name"] == f"model-{run_id}" and art["type"] == "model"
    (entry,) = art["manifest"]["contents"]
    assert entry["path"] == "checkpoint.pt"
    assert entry["digest"] == md5_b64(path) and int(entry["size"]) == path.stat().st_size
    assert Path(entry["local_path"]).read_bytes() == path.read_bytes()  # kept for `wandb sync`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch offline run: best-checkpoint artifacts, pictures, project/entity from the environment."""
    run_dir = tmp_path_factory.mktemp("train") / "pretrain"
    check(run_train([f"hydra.run.dir={run_dir}", "trainer.epochs=2", "logger.wandb.mode=offline",
                     "logger.wandb.log_checkpoints=best", "logger.pictures.modulation_every=1"],
                    env=train_env(WANDB_PROJECT="proj-from-env", WANDB_ENTITY="team-from-env")))
    return run_dir


@pytest.mark.slow
def test_training_run_group_job_type_project_and_best_artifacts(trained):
    records = wandb_records(trained)
    run = wandb_run_record_of(records)
    assert run["run_group"] == trained.name and run["job_type"] == "train"  # group: the run's id
    assert run["project"] == "proj-from-env" and run["entity"] == "team-from-env"
    last = load_file(trained / "checkpoints" / "last.pt")
    assert last["wandb_group"] == trained.name and run["run_id"] == last["wandb_id"]

    uploads = artifacts(records)
    vals = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines() if "val/top1" in x]
    improved = [v for i, v in enumerate(vals) if v["val/top1"] > max([u["val/top1"] for u in vals[:i]], default=-1)]
    assert len(uploads) == len(improved) >= 1  # one version per new best.pt, none otherwise
    for art, val in zip(uploads, improved):
        assert {"best", "latest", f"step-{val['step']}"} <= set(art["aliases"])
        meta = json.loads(art["metadata"])
        assert meta["step"] == val["step"] and meta["best_top1"] == val["val/top1"]
    assert_artifact_is(uploads[-1], trained / "checkpoints" / "best.pt", last["wandb_id"])


@pytest.mark.slow
def test_pictures_in_the_run_dir_and_in_wandb(trained):
    records = wandb_records(trained)
    (inputs,) = images(records, "pictures/inputs")
    png = trained / "inputs.png"
    assert inputs["step"] == 0 and inputs["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert Image.open(png).size == (inputs["width"], inputs["height"])
    (offline,) = (trained / "wandb").glob("offline-run-*")
    assert (offline / "files" / inputs["path"]).read_bytes() == png.read_bytes()

    maps = images(records, "pictures/modulation")
    assert [m["step"] for m in maps] == [8, 16]  # every epoch (modulation_every=1)
    for m in maps:
        drawn = trained / "pictures" / f"modulation_step{m['step']}.png"
        assert m["sha256"] == hashlib.sha256(drawn.read_bytes()).hexdigest()
    assert (trained / "modulation.png").read_bytes() == (trained / "pictures" / "modulation_step16.png").read_bytes()
    assert Image.open(trained / "metrics.png").format == "PNG"  # redrawn at every validation, no W&B needed


@pytest.mark.slow
def test_finetune_and_eval_join_the_training_runs_group(trained, tmp_path):
    ft_dir = tmp_path / "finetune"
    best = trained / "checkpoints" / "best.pt"
    check(run_train([f"hydra.run.dir={ft_dir}", f"trainer.init_from={best}", "trainer.max_steps=3",
                     "logger.wandb.mode=offline", "logger.wandb.log_checkpoints=last"]))
    records = wandb_records(ft_dir)
    run = wandb_run_record_of(records)
    assert run["run_group"] == trained.name and run["job_type"] == "finetune"
    assert run["project"] == "focalnet"  # neither the config nor the environment names one
    (art,) = artifacts(records)  # `last`: the final checkpoint only
    assert {"latest", "step-3"} <= set(art["aliases"])
    assert_artifact_is(art, ft_dir / "checkpoints" / "last.pt", load_file(ft_dir / "checkpoints" / "last.pt")["wandb_id"])

    eval_dir = tmp_path / "eval"
    proc = subprocess.run([PYTHON, str(ROOT / "eval.py"), f"checkpoint={best}", "data=synthetic", "data.img_size=32",
                           "data.val_size=64", "data.batch_size=16", "aug=none", "trainer.amp=none",
                           "logger.wandb.mode=offline", f"hydra.run.dir={eval_dir}"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    check(proc)
    records = wandb_records(eval_dir)
    run = wandb_run_record_of(records)
    assert run["run_group"] == trained.name and run["job_type"] == "eval"
    summary = next(r["summary"]["update"] for r in reversed(records) if r["type"] == "summary"
                   and "eval/top1" in r["summary"]["update"])
    assert summary["eval/top1"] == json.loads((eval_dir / "eval.json").read_text())["top1"]


@pytest.mark.slow
def test_group_override_and_no_artifacts_by_default(tmp_path):
    run_dir = tmp_path / "run"
    check(run_train([f"hydra.run.dir={run_dir}", "trainer.max_steps=2", "logger.wandb.mode=offline",
                     "logger.wandb.group=ablation-7", "logger.pictures.inputs=false"]))
    records = wandb_records(run_dir)
    assert wandb_run_record_of(records)["run_group"] == "ablation-7" and not artifacts(records)
    assert not images(records, "pictures/inputs") and not (run_dir / "inputs.png").exists()
    assert not (run_dir / "wandb" / "artifact-files").exists()


@pytest.mark.slow
def test_non_finite_state_is_never_uploaded(tmp_path):
    """The uploader itself, on a real offline W&B run: NaN weights are refused, finite ones become a version."""
    import wandb

    from focalnet.engine.artifacts import CheckpointUploader

    run = wandb.init(project="t", dir=str(tmp_path), mode="offline", id="nonfin01",
                     settings=wandb.Settings(console="off", silent=True))
    uploader = CheckpointUploader(run, tmp_path, "all")
    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir()
    good = {"w": torch.ones(3), "steps": torch.tensor(3)}
    bad = {"w": torch.tensor([1.0, float("nan"), 2.0]), "steps": torch.tensor(4)}
    torch.save(bad, ckpt)
    assert not uploader.saved(ckpt, bad, step=4, epoch=0, best=True, final=False, preempting=False, metadata={})
    torch.save(good, ckpt)
    assert uploader.saved(ckpt, good, step=5, epoch=0, best=False, final=False, preempting=False, metadata={})
    assert not uploader.saved(ckpt, good, step=6, epoch=0, best=True, final=True, preempting=True, metadata={})
    uploader.close()
    run.finish()
    (art,) = artifacts(wandb_records(tmp_path))
    assert set(art["aliases"]) == {"latest", "step-5"} and json.loads(art["metadata"])["step"] == 5
    assert_artifact_is(art, ckpt, "nonfin01")


@pytest.mark.parametrize("policy, best, final, expected", [
    ("best", True, False, True), ("best", False, True, False), ("last", False, True, True),
    ("last", True, False, False), ("all", False, False, True), (False, True, True, False),
])
def test_which_checkpoints_each_policy_uploads(policy, best, final, expected):
    from focalnet.engine.artifacts import CheckpointUploader

    uploader = CheckpointUploader(object(), Path("/nonexistent"), policy)
    assert uploader.wants(best=best, final=final, preempting=False) is expected
    assert not uploader.wants(best=best, final=final, preempting=True)  # never while the job is being stopped
    uploader.close()


@pytest.mark.slow
def test_trainer_modulation_picture_is_the_scripts_picture(tmp_path):
    """Digits (image files): the trainer's fixed val images are the script's ``--val 4`` images, so the final
    picture equals the script's for the same weights, byte for byte."""
    from data.digits import materialize

    root = materialize(tmp_path / "digits", store_size=16)
    run_dir = tmp_path / "run"
    check(run_train([f"hydra.run.dir={run_dir}", "model=focalnet_micro", "data=digits", f"data.root={root}",
                     "data.store_size=16", "data.img_size=32", "data.batch_size=16", "data.num_workers=0", "aug=none",
                     "aug.test_crop=false", "trainer.amp=none", "trainer.max_steps=2", "logger.wandb.mode=disabled",
                     "logger.pictures.modulation_every=1", "logger.pictures.modulation_images=4"], tiny=False))
    out = tmp_path / "script.png"
    proc = subprocess.run([PYTHON, "scripts/visualize_modulation.py", str(run_dir / "checkpoints" / "last.pt"),
                           "--val", "4", "-o", str(out)], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=600)
    check(proc)
    assert (run_dir / "modulation.png").read_bytes() == out.read_bytes()
