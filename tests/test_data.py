"""Folder-based data pipelines (data=imagenet1k | imagenet22k | folder) on generated image folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from focalnet.data import build_loaders
from focalnet.data.folder import DataConfigError
from focalnet.data.imagegen import BAD_KINDS, DECODABLE_KINDS, write_bad_image, write_image_folder
from focalnet.data.transforms import EvalSampleTransform, TrainSampleTransform, load_rgb, open_image, seeded
from focalnet.schema import AugConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT = AugConfig()  # aug=deit: conf/aug/deit.yaml takes every value from AugConfig


def data_cfg(name="folder", **kw):
    base = dict(name=name, root=None, num_classes=3, img_size=32, batch_size=4, num_workers=0,
                train_split="train", val_split="val", val_count=0, persistent_workers=False)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(str(root / "train"), 3, 4, size=(80, 60))
    write_image_folder(str(root / "val"), 3, 2, size=(80, 60), seed=1)
    return root


def epoch_batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------------------------------ bad images
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_decodes_to_rgb_or_is_skipped_and_counted(tmp_path, kind):
    write_image_folder(str(tmp_path / "train"), 2, 3, size=(64, 48))
    write_image_folder(str(tmp_path / "val"), 2, 1, size=(64, 48), seed=1)
    bad = write_bad_image(str(tmp_path / "train" / "n00000001" / "bad.JPEG"), kind)
    loaders = build_loaders(data_cfg(root=str(tmp_path), num_classes=2, batch_size=7), DEIT, seed=3)
    assert loaders.info["train_size"] == 7
    loaders.train.set_epoch(0)
    batches = list(loaders.train)
    assert [x.shape for x, _ in batches] == [(7, 3, 32, 32)]  # full batch either way
    assert torch.isfinite(batches[0][0]).all()
    skipped = loaders.train.stats()["skipped_images"]
    if kind in DECODABLE_KINDS:
        img = load_rgb(bad)
        assert img.mode == "RGB" and img.size == (64, 48)
        assert skipped == 0
        if kind == "png16":  # scaled down from 16 bits, not clipped to white
            assert 10 < np.asarray(img).mean() < 245
    else:
        assert skipped == 1


def test_skip_count_survives_worker_processes_and_replacement_is_deterministic(tmp_path):
    write_image_folder(str(tmp_path / "train"), 2, 4, size=(64, 48))
    write_image_folder(str(tmp_path / "val"), 2, 1, size=(64, 48), seed=1)
    for kind in ("corrupt", "truncated", "zero_byte"):
        write_bad_image(str(tmp_path / "train" / "n00000000" / f"bad_{kind}.JPEG"), kind)
    out = {}
    for workers in (0, 2):
        loaders = build_loaders(data_cfg(root=str(tmp_path), num_classes=2, num_workers=workers), DEIT, seed=5)
        out[workers] = epoch_batches(loaders.train, 1)
        # Sorted, the 3 bad files come first: index 0 skips 3 files before a good one, index 1 two, index 2
        # one -> 6 skip events, counted in the worker processes and read here.
        assert loaders.train.stats()["skipped_images"] == 6
        assert all(x.shape[0] == 4 for x, _ in out[workers])
    for (x0, y0), (x2, y2) in zip(out[0], out[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# -------------------------------------------------------------------------------- errors at the start
def test_missing_root_names_the_path_and_key(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.root=.*nowhere: no such directory"):
        build_loaders(data_cfg(root=str(tmp_path / "nowhere")), DEIT)
    with pytest.raises(DataConfigError, match=r"data\.root is not set"):
        build_loaders(data_cfg(name="imagenet1k", root=None), DEIT)


def test_empty_split_names_the_path_and_key(tmp_path):
    (tmp_path / "train" / "n00000000").mkdir(parents=True)
    with pytest.raises(DataConfigError, match=r"data\.root/data\.train_split: no images .*train"):
        build_loaders(data_cfg(root=str(tmp_path), num_classes=1), DEIT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError, match=r"data\.root/data\.train_split: .*empty has no class folders"):
        build_loaders(data_cfg(root=str(tmp_path), train_split="empty"), DEIT)


def test_class_count_mismatch_names_the_path_and_keys(folder):
    with pytest.raises(DataConfigError, match=r"train\) has 3 classes but data\.num_classes=1000 \(model\.num_classes"):
        build_loaders(data_cfg(name="imagenet1k", root=str(folder), num_classes=1000), DEIT)


def test_missing_val_split_suggests_val_count(folder, tmp_path):
    os.symlink(folder / "train", tmp_path / "train")
    with pytest.raises(DataConfigError, match=r"data\.val_split.*data\.val_count"):
        build_loaders(data_cfg(root=str(tmp_path)), DEIT)
    loaders = build_loaders(data_cfg(root=str(tmp_path), val_count=3), DEIT)
    assert (loaders.info["train_size"], loaders.info["val_size"]) == (9, 3)


# ------------------------------------------------------------------------------ order, resume, recipe
def test_folder_batches_are_a_function_of_seed_epoch_and_resume_exactly(folder):
    loaders = build_loaders(data_cfg(root=str(folder)), DEIT, seed=11)
    full = epoch_batches(loaders.train, 2)
    tail = epoch_batches(loaders.train, 2, start=1)
    assert len(full) == len(loaders.train) == 3 and len(tail) == 2
    for (a, ya), (b, yb) in zip(full[1:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other = epoch_batches(loaders.train, 3)
    assert not torch.equal(full[0][0], other[0][0])  # a new epoch reshuffles and re-augments
    again = epoch_batches(build_loaders(data_cfg(root=str(folder)), DEIT, seed=11).train, 2)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, again))


def test_val_covers_every_image_once_with_the_official_eval_transform(folder):
    loaders = build_loaders(data_cfg(root=str(folder), batch_size=4), DEIT)
    labels = torch.cat([y for _, y in loaders.val])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Official eval: PIL Resize(int(256/224*S), bicubic) + CenterCrop(S); our uint8 output must equal it.
    import torchvision.transforms as T

    path = sorted((folder / "val" / "n00000000").iterdir())[0]
    official = T.Compose([T.Resize(int(256 / 224 * 32), interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(32), T.PILToTensor()])
    ours = EvalSampleTransform(32, test_crop=True)(open_image(str(path)))
    assert torch.equal(ours, official(Image.open(path).convert("RGB")))
    squash = EvalSampleTransform(32, test_crop=False)(open_image(str(path)))
    assert squash.shape == (3, 32, 32)
    x, _ = next(iter(loaders.val))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    first = official(Image.open(sorted((folder / "val" / "n00000000").iterdir())[0]).convert("RGB"))
    assert torch.allclose(x[0], ((first.float() / 255 - mean) / std)[0], atol=1e-5)


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_train_crop_matches_timm_pil_crop(tmp_path, jpeg_draft):
    # Our uint8 torch resize must match timm's PIL RandomResizedCrop closely (same box, same filter).
    path = write_image_folder(str(tmp_path), 1, 1, size=(900, 700))[0]
    aug = OmegaConf.create({"auto_augment": None, "color_jitter": None, "interpolation": "bicubic"})
    tf = TrainSampleTransform(aug, 112, jpeg_draft=jpeg_draft)
    tf.flips = []
    diffs = []
    for seed in range(8):
        with seeded(seed):
            ours = tf(open_image(path))
        with seeded(seed):
            ref = tf.rrc(Image.open(path).convert("RGB"))  # timm: same params, PIL crop + resize
        diffs.append((ours.int() - torch.from_numpy(np.array(ref)).permute(2, 0, 1).int()).abs())
    if jpeg_draft:  # DCT 1/2..1/8 decoding for large crops: a few grey levels on average
        assert max(d.float().mean() for d in diffs) < 4.0
    else:  # the full decode: torch's and PIL's bicubic kernels round differently, by at most 2 grey levels
        assert max(int(d.max()) for d in diffs) <= 2


def test_recipe_is_the_focalnet_one():
    tf = TrainSampleTransform(DEIT, 224)
    assert (tf.rrc.scale, tf.size) == ((0.08, 1.0), (224, 224))
    assert "RandAugment" in repr(tf.secondary) and "ColorJitter" not in repr(tf.secondary)  # timm: AA disables CJ
    ra = tf.secondary.transforms[0]
    assert ra.num_layers == 2 and ra.ops[0].magnitude == 9 and ra.ops[0].magnitude_std == 0.5
    from focalnet.data.transforms import BatchFinisher

    fin = BatchFinisher(DEIT, train=True)
    assert (fin.erase.probability, fin.erase.mode, fin.erase.max_count) == (0.25, "pixel", 1)
    assert BatchFinisher(DEIT, train=False).erase is None


# ------------------------------------------------------------------------------------------ 22K layouts
def test_imagenet22k_folders_use_focalnet_22k_label_layout(tmp_path):
    from timm.data import ImageNetInfo

    names = ImageNetInfo("imagenet22k_ms").label_names()
    picks = [0, 999, 1000, 21841]
    for i in picks:
        d = tmp_path / "train" / names[i]
        d.mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (40, 30), (i % 255, k * 40, 0)).save(d / f"{k}.JPEG")
    cfg = data_cfg(name="imagenet22k", root=str(tmp_path), num_classes=21842, val_count=4,
                   label_layout="imagenet22k_ms", train_map=None, val_map=None, image_dir="")
    loaders = build_loaders(cfg, DEIT)
    assert loaders.num_classes == 21842 and (loaders.info["train_size"], loaders.info["val_size"]) == (8, 4)
    seen = {lab for _, lab in [*loaders.train.dataset.samples, *loaders.val.dataset.samples]}
    assert seen == set(picks)
    with pytest.raises(DataConfigError, match=r"data\.label_layout=imagenet22k_ms.*data\.num_classes=100"):
        build_loaders(OmegaConf.merge(cfg, {"num_classes": 100}), DEIT)
    (tmp_path / "train" / "not_a_synset").mkdir()
    with pytest.raises(DataConfigError, match=r"not in the label layout"):
        build_loaders(cfg, DEIT)


def test_imagenet22k_map_files_with_labels_as_written(tmp_path):
    write_image_folder(str(tmp_path / "imgs"), 2, 3, size=(40, 30))
    files = sorted(p.relative_to(tmp_path / "imgs") for p in (tmp_path / "imgs").rglob("*.JPEG"))
    (tmp_path / "train_map.txt").write_text("".join(f"{p}\t{7 + i % 2}\n" for i, p in enumerate(files[:4])))
    (tmp_path / "val_map.txt").write_text("".join(f"{p}\t{i}\n" for i, p in enumerate(files[4:])))
    cfg = data_cfg(name="imagenet22k", root=str(tmp_path), num_classes=21842, val_count=0, image_dir="imgs",
                   train_map="train_map.txt", val_map="val_map.txt", label_layout="imagenet22k_ms", map_labels="file")
    loaders = build_loaders(cfg, DEIT)
    assert [lab for _, lab in loaders.train.dataset.samples] == [7, 8, 7, 8]
    loaders.val.set_epoch(0)
    assert torch.cat([y for _, y in loaders.val]).tolist() == [0, 1]
    (tmp_path / "bad_map.txt").write_text("only_a_path.JPEG\n")
    with pytest.raises(DataConfigError, match=r"data\.train_map: .*bad_map\.txt:1"):
        build_loaders(OmegaConf.merge(cfg, {"train_map": "bad_map.txt"}), DEIT)


# ------------------------------------------------------------------------------------ composed configs
@pytest.mark.parametrize("name", ["imagenet1k", "imagenet22k", "folder", "imagenet1k_ffcv", "imagenet22k_ffcv"])
def test_data_configs_compose_with_the_contract_keys(name, folder):
    from conftest import compose_config

    import focalnet.data  # noqa: F401  (registers ${folder_num_classes:})

    overrides = [f"data={name}", f"data.root={folder}"]
    cfg = compose_config(overrides)
    d = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("name", "root", "num_classes", "img_size", "batch_size", "num_workers"):
        assert key in d
    assert d["name"] == name
    if name == "folder":
        assert d["num_classes"] == 3 == cfg.model.num_classes  # inferred from the class folders


def test_ffcv_batch_buffers_are_reused_only_when_nobody_holds_them():
    from focalnet.data.ffcv_loader import BatchBuffers

    bufs = BatchBuffers((2, 3, 4, 4), recycled=3, spare=2)
    assert bufs.recycled == 3  # torch exposes storage use counts
    k0 = bufs.acquire()
    x0 = bufs.hand_out(k0, 2)
    k1 = bufs.acquire()
    assert k1 != k0
    view = x0[:1]  # the caller drops the batch but keeps a view of it: still in use
    del x0
    k2 = bufs.acquire()
    assert k2 not in (k0, k1)  # k1 is in the pool (busy), k0 is still seen through ``view``
    del view
    assert bufs.acquire() == k0  # nobody sees k0 any more
    held = [bufs.hand_out(k, 2) for k in (k1, k2, k0)]
    k = bufs.acquire()  # every recycled buffer is held: a spare, handed out as a copy
    assert k >= bufs.recycled
    batch = bufs.hand_out(k, 2)
    assert batch.untyped_storage().data_ptr() != bufs.buffers[k].untyped_storage().data_ptr()
    assert all(h.shape == (2, 3, 4, 4) for h in held)
