"""The cached file list of folder datasets (data/file_index.py): built once, reused, noticed when the tree changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torchvision

from focalnet.data import file_index
from focalnet.data.file_index import FileList, cache_locations
from focalnet.data.folder import IMG_EXTENSIONS, DataConfigError, hold_out, scan_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAST = time.time() - 3600  # a real dataset's folders are older than the racy window


def make_tree(root, classes=4, per_class=3, backdate=True):
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for k in range(per_class):
            (d / f"img_{k}.JPEG").write_bytes(b"x")
        (d / "notes.txt").write_text("not an image")
        if backdate:
            os.utime(d, (PAST, PAST))
    return root


@pytest.fixture
def count_scans(monkeypatch):
    scanned = []
    real = file_index._scan_class

    def counting(class_dir, extensions):
        scanned.append(os.path.basename(class_dir))
        return real(class_dir, extensions)

    monkeypatch.setattr(file_index, "_scan_class", counting)
    return scanned


def test_list_equals_torchvision_imagefolder(tmp_path):
    tree = make_tree(tmp_path / "train")
    (tree / "n00000001" / "extra.png").write_bytes(b"x")
    (tree / "n00000002" / "UPPER.JPG").write_bytes(b"x")
    reference = torchvision.datasets.ImageFolder(str(tree), loader=lambda p: p)  # the field's own listing
    classes, samples = scan_folder(str(tree), "data.root/data.train_split")
    assert classes == reference.classes and list(samples) == reference.samples
    assert tuple(torchvision.datasets.folder.IMG_EXTENSIONS) == IMG_EXTENSIONS


def test_second_listing_reads_the_cache_and_a_changed_folder_is_listed_again(tmp_path, count_scans):
    tree = make_tree(tmp_path / "train")
    scan_folder(str(tree), "k")
    assert sorted(count_scans) == [f"n{c:08d}" for c in range(4)]
    assert os.path.isfile(tree / ".focalnet_filelist")  # under data.root: the tree is writable
    count_scans.clear()
    _, samples = scan_folder(str(tree), "k")
    assert count_scans == [] and len(samples) == 12
    (tree / "n00000002" / "new.JPEG").write_bytes(b"x")  # a file added: its folder's mtime moves
    _, samples = scan_folder(str(tree), "k")
    assert count_scans == ["n00000002"] and len(samples) == 13
    assert (str(tree / "n00000002" / "new.JPEG"), 2) in list(samples)
    count_scans.clear()
    (tree / "n00000004").mkdir()  # a new class folder, and one removed
    (tree / "n00000004" / "a.JPEG").write_bytes(b"x")
    for f in (tree / "n00000000").iterdir():
        f.unlink()
    (tree / "n00000000").rmdir()
    classes, samples = scan_folder(str(tree), "k")
    assert classes == ["n00000001", "n00000002", "n00000003", "n00000004"]
    assert count_scans == ["n00000002", "n00000004"] and len(samples) == 11  # n00000002 changed just now: racy
    assert [lab for _, lab in samples] == [0] * 3 + [1] * 4 + [2] * 3 + [3]


def test_folders_changed_around_listing_time_are_listed_again(tmp_path, count_scans):
    tree = make_tree(tmp_path / "train", backdate=False)  # written a moment ago: a same-tick change is possible
    scan_folder(str(tree), "k")
    count_scans.clear()
    scan_folder(str(tree), "k")
    assert len(count_scans) == 4
    for d in tree.iterdir():
        os.utime(d, (PAST, PAST))
    scan_folder(str(tree), "k")
    count_scans.clear()
    scan_folder(str(tree), "k")
    assert count_scans == []


def test_read_only_tree_caches_in_the_user_cache_dir(tmp_path, monkeypatch, count_scans):
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    tree = make_tree(tmp_path / "ro" / "train")
    os.chmod(tree, 0o555)
    monkeypatch.setenv("FOCALNET_CACHE", str(tmp_path / "cache"))
    try:
        scan_folder(str(tree), "k")
        in_tree, user = cache_locations(str(tree))
        assert not os.path.exists(in_tree) and os.path.isfile(user) and user.startswith(str(tmp_path / "cache"))
        count_scans.clear()
        _, samples = scan_folder(str(tree), "k")
        assert count_scans == [] and len(samples) == 12
    finally:
        os.chmod(tree, 0o755)


def test_moved_tree_keeps_its_cache_and_a_corrupt_cache_is_rebuilt(tmp_path, count_scans):
    tree = make_tree(tmp_path / "a" / "train")
    scan_folder(str(tree), "k")
    moved = tmp_path / "b"
    os.rename(tmp_path / "a", moved)
    count_scans.clear()
    _, samples = scan_folder(str(moved / "train"), "k")
    assert count_scans == [] and samples[0][0] == str(moved / "train" / "n00000000" / "img_0.JPEG")
    (moved / "train" / ".focalnet_filelist").write_bytes(b"garbage")
    _, samples = scan_folder(str(moved / "train"), "k")
    assert len(count_scans) == 4 and len(samples) == 12


def test_hold_out_is_the_same_split_for_cached_lists_and_plain_lists(tmp_path):
    tree = make_tree(tmp_path / "train", classes=5, per_class=7)
    _, samples = scan_folder(str(tree), "k")
    train, val = hold_out(samples, 9, "data.val_count")
    plain_train, plain_val = hold_out(list(samples), 9, "data.val_count")
    assert list(train) == plain_train and list(val) == plain_val and len(val) == 9
    assert list(train.labels()) == [lab for _, lab in plain_train]
    with pytest.raises(DataConfigError, match="data.val_count"):
        hold_out(samples, 35, "data.val_count")


def test_file_format_round_trip_and_empty_folders(tmp_path):
    tree = make_tree(tmp_path / "train", classes=3, per_class=2)
    for f in (tree / "n00000001").iterdir():
        f.unlink()
    files = file_index.checked_or_built(str(tree), ["n00000000", "n00000001", "n00000002"], (".jpeg",))
    again = FileList.read(files.source, str(tree))
    assert [again.path(i) for i in range(len(again))] == [files.path(i) for i in range(len(files))]
    assert again.class_files(1) == [] and again.class_files(2) == ["img_0.JPEG", "img_1.JPEG"]


RANKS_SCRIPT = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import torch.distributed as dist
from focalnet.data.file_index import list_image_files
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=int(sys.argv[3]), world_size=2)
tree = sys.argv[1]
classes = sorted(e.name for e in os.scandir(tree) if e.is_dir() and not e.name.startswith("."))
files = list_image_files(tree, classes, (".jpeg",))
print("RESULT" + json.dumps({"rank": dist.get_rank(), "n": len(files), "last": files.path(len(files) - 1)}))
dist.destroy_process_group()
"""


def launch(tree, tmp_path) -> tuple[list[dict], str]:
    """Two real processes in one gloo process group (a file store: no port), as torchrun would start them."""
    store = tmp_path / f"store{len(list(tmp_path.glob('store*')))}"
    procs = [subprocess.Popen([sys.executable, "-c", RANKS_SCRIPT, str(tree), str(store), str(rank)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    results = [json.loads(line.split("RESULT", 1)[1]) for out in outputs for line in out.splitlines() if "RESULT" in line]
    return sorted(results, key=lambda r: r["rank"]), "".join(outputs)


@pytest.mark.slow
def test_two_ranks_one_builder_then_later_launches_read_the_cache(tmp_path):
    tree = make_tree(tmp_path / "train", classes=6, per_class=5)
    results, log = launch(tree, tmp_path)
    assert [r["n"] for r in results] == [30, 30]
    assert log.count("cached in") == 1 and "first time" in log  # rank 0 built it, rank 1 read it
    (tree / "n00000005" / "zz_new.JPEG").write_bytes(b"x")
    results, log = launch(tree, tmp_path)  # a later launch: 5 folders from the cache, the changed one listed
    assert [r["n"] for r in results] == [31, 31] and all(r["last"].endswith("zz_new.JPEG") for r in results)
    assert log.count("1 of 6 folders listed (changed or new)") == 1 and "first time" not in log
    # (a launch with nothing changed lists no folder at all: test_second_listing_reads_the_cache_...)
