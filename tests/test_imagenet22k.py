"""ImageNet-22K label order: Swin-format map files, and fine-tuning from a headless 22K checkpoint.

References:
* Swin's ImageNet-22K annotation files (microsoft/Swin-Transformer ``data/imagenet22k_dataset.py``, read with
  ``json.load``): a JSON list ``[[relative_path, label], ...]`` whose labels are the ids of Google's 21843-class
  BiT list (shipped by timm as ``imagenet21k_goog_synsets.txt``) with "21841->9205; 21842->15027" (the two ids
  without images). A file in that format is generated here from those two sources.
* FocalNet's 21842-way head: ``timm.data.ImageNetInfo('imagenet22k_ms')``; ImageNet-1K: ``ImageNetInfo('imagenet1k')``.
* timm's pretrained config of ``focalnet_huge_fl4.ms_in22k``, which is published without a head.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_config
from PIL import Image
from timm.data import ImageNetInfo

import focalnet
from focalnet.data import build_loaders
from focalnet.data.folder import DataConfigError
from focalnet.engine.build import init_weights_from
from focalnet.models.checkpoint import CheckpointError, convert_official_to_timm

GOOG = Path(timm.data.__file__).parent / "_info" / "imagenet21k_goog_synsets.txt"
IN22K_MS = ImageNetInfo("imagenet22k_ms").label_names()
IN1K = ImageNetInfo("imagenet1k").label_names()
# 1K classes (first, last), 22K-only ones, and the two classes Swin moves to the imageless ids 9205 / 15027.
PICKS = [IN22K_MS[0], IN22K_MS[999], IN22K_MS[1000], IN22K_MS[12345], "n15102455", "n15102894"]


def swin_labels() -> dict[str, int]:
    goog = GOOG.read_text().split()
    assert len(goog) == 21843 and goog[9205] not in IN22K_MS and goog[15027] not in IN22K_MS  # imageless ids
    return {w: {21841: 9205, 21842: 15027}.get(i, i) for i, w in enumerate(goog)}


def write_swin_22k(root: Path, per_class: int = 2) -> tuple[list, list]:
    """Swin's layout (imagenet22k/fall11_whole/<wnid>/...) and its train/val JSON annotation files."""
    swin = swin_labels()
    entries = []
    for wnid in PICKS:
        d = root / "fall11_whole" / wnid
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (40, 30), (k * 60, 90, 30)).save(d / f"{wnid}_{k}.JPEG")
            entries.append([f"fall11_whole/{wnid}/{wnid}_{k}.JPEG", swin[wnid]])
    train, val = entries[::2], entries[1::2]
    (root / "ILSVRC2011fall_whole_map_train.txt").write_text(json.dumps(train))
    (root / "ILSVRC2011fall_whole_map_val.txt").write_text(json.dumps(val))
    return train, val


def cfg_22k(root: Path, **kw):
    from conftest import compose_config

    overrides = ["data=imagenet22k", f"data.root={root}", "data.num_workers=0", "data.img_size=32",
                 "data.train_map=ILSVRC2011fall_whole_map_train.txt", "data.val_map=ILSVRC2011fall_whole_map_val.txt",
                 *[f"data.{k}={v}" for k, v in kw.items()]]
    return compose_config(overrides).data


def labels_of(loader) -> list[int]:
    return [label for _, label in loader.dataset.samples]


def test_swin_json_map_files_get_focalnet_22k_labels_from_their_synsets(tmp_path, caplog):
    train, val = write_swin_22k(tmp_path)
    with caplog.at_level(logging.WARNING, logger="focalnet.data.folder"):
        loaders = build_loaders(cfg_22k(tmp_path), compose_config(["aug=none"]).aug)
    for entries, loader in ((train, loaders.train), (val, loaders.val)):
        wnids = [os.path.basename(os.path.dirname(p)) for p, _ in entries]
        assert labels_of(loader) == [IN22K_MS.index(w) for w in wnids]
        assert all(p == str(tmp_path / e[0]) for (p, _), e in zip(loader.dataset.samples, entries))
    # ImageNet-1K classes land on their 1K index, so logits[:, :1000] are 1K logits and the 22K->1K slice holds.
    in1k_labels = [lab for lab in labels_of(loaders.train) if lab < 1000]
    assert [IN1K[lab] for lab in in1k_labels] == PICKS[:2]
    # Said once per file, with counts, naming Swin's order and the switch.
    warnings = [r.getMessage() for r in caplog.records if "differ from their synset" in r.getMessage()]
    assert len(warnings) == 2
    assert "6 of 6 labels" in warnings[0] and "Swin's 21841-class order" in warnings[0]
    assert "data.map_labels=file" in warnings[0] and "ILSVRC2011fall_whole_map_val.txt" in warnings[1]

    # data.map_labels=file: the file's integers as written (Swin's order), silently: the user asked for them.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="focalnet.data.folder"):
        as_written = build_loaders(cfg_22k(tmp_path, map_labels="file"), None)
    assert labels_of(as_written.train) == [label for _, label in train] and not caplog.records


def test_tsv_map_file_in_focalnet_order_is_read_silently(tmp_path, caplog):
    train, val = write_swin_22k(tmp_path)
    for name, entries in (("train", train), ("val", val)):
        lines = "".join(f"{p}\t{IN22K_MS.index(p.split('/')[1])}\n" for p, _ in entries)
        (tmp_path / f"ILSVRC2011fall_whole_map_{name}.txt").write_text(lines)
    with caplog.at_level(logging.WARNING, logger="focalnet.data.folder"):
        loaders = build_loaders(cfg_22k(tmp_path), None)
    assert labels_of(loaders.train) == [IN22K_MS.index(p.split("/")[1]) for p, _ in train]
    assert not caplog.records


def test_map_file_paths_without_a_synset_name_the_switch(tmp_path):
    write_swin_22k(tmp_path)
    (tmp_path / "ILSVRC2011fall_whole_map_train.txt").write_text(json.dumps([["images/cat_1.jpg", 3]]))
    with pytest.raises(DataConfigError, match=r"data\.train_map: .*'images/cat_1\.jpg' has no synset.*map_labels=file"):
        build_loaders(cfg_22k(tmp_path), None)
    (tmp_path / "ILSVRC2011fall_whole_map_train.txt").write_text(json.dumps([["a.jpg", 3, "extra"]]))
    with pytest.raises(DataConfigError, match=r"entry 0: expected \[relative_path, label\]"):
        build_loaders(cfg_22k(tmp_path), None)


# -- a headless 22K checkpoint -----------------------------------------------------------------------------

def _headless_huge_fl4_file(tmp_path) -> Path:
    """A timm-format focalnet_huge_fl4 state dict with the head timm's ms_in22k config declares (none), at a tiny
    width so the test is fast; the flags are huge_fl4's."""
    num_classes = timm.models.get_pretrained_cfg("focalnet_huge_fl4.ms_in22k").num_classes
    assert num_classes == 0
    theirs = timm.models.focalnet.FocalNet(
        embed_dim=16, depths=(1, 1, 1, 1), focal_levels=(4,) * 4, focal_windows=(3,) * 4, use_overlap_down=True,
        use_post_norm=True, use_post_norm_in_modulation=True, layerscale_value=1e-4, num_classes=num_classes)
    torch.save(theirs.state_dict(), tmp_path / "focalnet_huge_fl4.ms_in22k.pth")
    return tmp_path / "focalnet_huge_fl4.ms_in22k.pth"


def _tiny_huge_fl4():
    return focalnet.create_model("focalnet_huge_fl4", embed_dim=16, depths=(1, 1, 1, 1), num_classes=1000)


@pytest.mark.parametrize("head", ["slice_22k_to_1k", "keep"])
def test_headless_22k_checkpoint_cannot_be_sliced_and_says_reinit(tmp_path, head):
    path = _headless_huge_fl4_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"no classifier head.*trainer\.init_head=reinit"):
        init_weights_from(_tiny_huge_fl4(), str(path), head)


@pytest.mark.parametrize("head", ["auto", "reinit"])
def test_headless_22k_checkpoint_with_auto_or_reinit_starts_a_fresh_head(tmp_path, head):
    path = _headless_huge_fl4_file(tmp_path)
    heads = []
    for _ in range(2):
        model = _tiny_huge_fl4()
        report = init_weights_from(model, str(path), head, seed=3)
        assert report.head == "reinit" and not report.missing_keys and not report.unexpected_keys
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])  # drawn from trainer.seed, like every re-initialized head
    trunk = convert_official_to_timm({k: v for k, v in model.state_dict().items() if not k.startswith("head.")},
                                     use_postln=True)
    saved = torch.load(path, weights_only=True)
    assert set(trunk) == set(saved) and all(torch.equal(trunk[k], saved[k]) for k in saved)
