"""Start-up of a folder dataset with ImageNet-22K's 21,841 class folders: listing every file at every start
(what every rank did before the file list was cached) vs the first start (rank 0 lists and caches) vs a
cached start (the class folders are checked, the list is read), for 1 process and for N local ranks.

    python scripts/bench_file_index.py                         # 21,841 folders x 30 files in a temp dir
    python scripts/bench_file_index.py --per-class 60 --ranks 1,4,8 --dir /tmp/in22k_tree --keep

The files are tiny (a listing never opens them); the folders are the real fall11 synsets, dated an hour back
like any dataset that is not being written. Each measurement starts R real processes (a gloo process group
when R > 1, as under torchrun), waits until all are ready, then times ``focalnet.data.folder.scan_folder`` on the
train split: seconds until the slowest rank has its sample list, and the directory entries and ``stat``
calls one start costs the file system (the number that matters on a parallel file system, where each is a
metadata operation). The page cache is warm in every row: on a cold network file system the listing rows
grow with the file count, the cached rows with the folder count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MINI_JPEG = b"\xff\xd8\xff\xd9"  # start and end of image: a listing never reads it

RANK_SCRIPT = r"""
import json, os, sys, time
import torch.distributed as dist
from focalnet.data.folder import IMG_EXTENSIONS, list_classes, scan_folder
train_dir, mode, world, rank, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    dist.barrier()
start, cpu = time.perf_counter(), time.process_time()
if mode == "list":  # every rank lists every class folder, as data/folder.py did before the cache
    classes = list_classes(train_dir, "train")
    samples = []
    for i, c in enumerate(classes):
        d = os.path.join(train_dir, c)
        files = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        samples += [(os.path.join(d, f), i) for f in files]
else:
    classes, samples = scan_folder(train_dir, "train")
    path = samples[len(samples) - 1][0]  # the list is usable
result = {"rank": rank, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "n": len(samples)}
if world > 1:
    dist.barrier()
print("RESULT" + json.dumps(result), flush=True)
"""


NAMES = {"list": "every rank lists every folder (before)", "first": "first start: rank 0 lists and caches",
         "cached": "cached start: folders checked, list read"}


def metadata_ops(mode: str, world: int, classes: int, files: int) -> tuple[int, int]:
    """(directory entries read, stat calls) of one start: every rank reads the split's folder names; listing
    reads every file name (every rank before; rank 0 once, stating each folder for the cache); a cached start
    stats the folders on rank 0 (file types come from the directory entries, without a stat)."""
    if mode == "list":
        return world * (classes + files), 0
    if mode == "first":
        return world * classes + files, classes
    return world * classes, classes


def make_tree(train_dir: str, per_class: int) -> int:
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo("imagenet22k").label_names()  # the 21,841 fall11 synsets
    past = time.time() - 3600
    for s in synsets:
        d = os.path.join(train_dir, s)
        os.makedirs(d, exist_ok=True)
        for k in range(per_class):
            with open(os.path.join(d, f"{s}_{k}.JPEG"), "wb") as f:
                f.write(MINI_JPEG)
        os.utime(d, (past, past))
    return len(synsets)


def run(train_dir: str, mode: str, world: int, tmp: str) -> dict:
    store = os.path.join(tmp, f"store_{time.time_ns()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, train_dir, mode, str(world), str(r), store],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(err[-3000:])
        results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[6:]))
    return {"seconds": max(r["seconds"] for r in results), "cpu": sum(r["cpu"] for r in results),
            "n": results[0]["n"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="where to generate the tree (default: a temp dir, removed at the end)")
    p.add_argument("--per-class", type=int, default=30, help="files per class folder")
    p.add_argument("--ranks", default="1,4", help="comma-separated process counts")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is reported")
    p.add_argument("--keep", action="store_true", help="keep the generated tree")
    args = p.parse_args(argv)
    from focalnet.data.file_index import cache_locations

    root = args.dir or tempfile.mkdtemp(prefix="in22k_tree_")
    train_dir = os.path.join(root, "train")
    try:
        if not os.path.isdir(train_dir):
            t = time.perf_counter()
            classes = make_tree(train_dir, args.per_class)
            print(f"generated {classes} folders x {args.per_class} files in {time.perf_counter() - t:.0f} s",
                  flush=True)
        classes = sum(1 for e in os.scandir(train_dir) if e.is_dir())
        rows = []
        for world in [int(r) for r in args.ranks.split(",")]:
            measured = {}
            for mode in ("list", "first", "cached"):
                best = None
                for _ in range(args.repeats):
                    if mode == "first":
                        for path in cache_locations(train_dir):
                            if os.path.exists(path):
                                os.unlink(path)
                    r = run(train_dir, mode, world, root)
                    best = r if best is None or r["seconds"] < best["seconds"] else best
                    print(f"  ranks={world} {mode}: {r['seconds']:.2f} s", flush=True)
                measured[mode] = best
            rows.append((world, measured))
        files = rows[0][1]["list"]["n"]
        print(f"\nStart-up listing of {classes:,} class folders, {files:,} files (warm page cache), "
              f"{os.cpu_count()} CPUs; fastest of {args.repeats}\n")
        print("| ranks | start | seconds (slowest rank) | vs listing | CPU s (all ranks) | dir entries read | stat calls |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for world, m in rows:
            for mode in ("list", "first", "cached"):
                entries, stats = metadata_ops(mode, world, classes, files)
                print(f"| {world} | {NAMES[mode]} | {m[mode]['seconds']:.2f} | "
                      f"{m['list']['seconds'] / m[mode]['seconds']:.1f}x | {m[mode]['cpu']:.2f} | "
                      f"{entries:,} | {stats:,} |")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
