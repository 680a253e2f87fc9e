"""Write a file-based dataset (data=imagenet1k | imagenet22k | folder) as webdataset tar shards with an index.

    python scripts/write_shards.py data=imagenet22k data.root=/data/in22k --out /data/in22k_wds
    python train.py data=imagenet22k_wds data.root=/data/in22k_wds

The positional arguments are Hydra overrides composed with the training config, so every dataset kind and
key (map files, label layout, the ``data.val_count`` hold-out, ...) works as in training, and labels are in
our order (ImageNet: by synset; 22K: FocalNet's ``imagenet22k_ms`` head). Per split S the output is
``S-000000.tar ...`` (samples in a fixed random order, ``<key>.jpg`` with the original bytes and
``<key>.cls``), ``S.json`` (shard list, wids format), ``S.idx.npy`` (per-sample byte offsets: random access)
and timm's ``_info.json``; see data/shards.py. ``--max-resolution N`` re-encodes (JPEG, ``--jpeg-quality``)
only images whose longer side exceeds N; every other image keeps its bytes.

Every image is decoded once (JPEGs at 1/8 scale, which still reads the whole stream) and unreadable files
are left out and reported: logged, counted in ``S.json`` and listed in ``S.skipped.tsv``.
Shards are written in parallel (``--num-workers`` processes). The run is resumable: each shard is written
under a temporary name and renamed when complete, and ``S.json`` appears only when every shard is there,
so a crash leaves nothing a reader takes as complete; run the same command again to finish the rest.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import focalnet.data  # noqa: E402,F401  (registers the config resolvers)
from focalnet.data.folder import DataConfigError, dataset_samples, file_limits  # noqa: E402
from focalnet.data.shards import INDEX_KIND, SAMPLE_DTYPE, shard_name  # noqa: E402
from focalnet.data.transforms import BadImage, decode_rgb, open_image  # noqa: E402
from scripts.write_ffcv import compose_data_cfg  # noqa: E402

log = logging.getLogger("write_shards")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm", "GIF": "gif"}
TAR_OVERHEAD = 1792  # per sample: two 512-byte headers, the label's block, half a block of padding


class UsageError(Exception):
    """Bad arguments or an output directory that cannot be used: one line, exit code 2."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 1GB, 256MB or 500000000")
    return int(float(m[1]) * (1024 if m[3].startswith("i") else 1000) ** " kmgt".index(m[2] or " "))


def encode(path: str, max_resolution: int | None, jpeg_quality: int, limits: dict) -> tuple[bytes, str]:
    """A sample's stored bytes and extension: the file as it is, or re-encoded when it is larger than asked.
    ``limits`` (data.max_file_mb, data.max_image_pixels) refuse hostile files as training does."""
    try:
        size = os.stat(path).st_size
        if size > limits["max_file_bytes"]:
            raise BadImage(f"file of {size / 2**20:.0f} MiB is over data.max_file_mb={limits['max_file_bytes'] >> 20} "
                           "(not read)")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e
    img = open_image(raw, **limits)
    w, h = img.size
    if max_resolution and max(w, h) > max_resolution:
        s = max_resolution / max(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        rgb = decode_rgb(img, size if max(w, h) >= 2 * max_resolution else None)  # libjpeg draft: less work
        buf = io.BytesIO()
        rgb.resize(size, resample=3).save(buf, "JPEG", quality=jpeg_quality)  # 3: bicubic (antialiased)
        return buf.getvalue(), "jpg"
    decode_rgb(img, (1, 1))  # the whole stream decodes (a JPEG at 1/8 scale), else BadImage
    return raw, EXTENSIONS.get(img.format or "", (img.format or "img").lower())


def sample_key(path: str, base: str) -> str:
    """The webdataset key of a file: its path under ``base`` without extension, with no dot in the file name
    (webdataset splits a member name at the first dot of its base name)."""
    rel = os.path.relpath(path, base)
    if rel.startswith(".."):
        rel = path.lstrip("/")
    head, name = os.path.split(rel)
    key = os.path.join(head, os.path.splitext(name)[0].replace(".", "_")).replace(os.sep, "/")
    if len(key) > 200:  # tar's ustar format holds names up to 255 bytes
        key = hashlib.sha1(key.encode()).hexdigest() + "_" + key[-60:].replace("/", "_")
    return key


# ------------------------------------------------------------------------------------------------ one shard
def write_shard(task: dict) -> dict:
    """Write shard ``task['k']`` (in a worker process): samples, then its part record, then the rename."""
    out, split, k = task["out"], task["split"], task["k"]
    final = os.path.join(out, shard_name(split, k))
    tmp = os.path.join(out, f".{shard_name(split, k)}.tmp")
    import webdataset

    labels, members, skipped, used = [], [], [], set()
    with open(tmp, "wb") as f:
        with webdataset.TarWriter(f, encoder=False, mtime=0) as tar:  # an int: a float adds a pax header
            for path, label in task["items"]:
                try:
                    data, ext = encode(path, task["max_resolution"], task["jpeg_quality"], task["limits"])
                except BadImage as e:
                    skipped.append((path, str(e)))
                    continue
                key = base_key = sample_key(path, task["base"])
                n = 1
                while key in used:
                    n += 1
                    key = f"{base_key}_{n}"
                used.add(key)
                tar.write({"__key__": key, ext: data, "cls": str(label).encode()})
                labels.append(label)
                members.append(f"{key}.{ext}")
        f.flush()
        os.fsync(f.fileno())
    with tarfile.open(tmp) as t:  # where each image's bytes landed (tarfile parses the headers we wrote)
        where = {m.name: (m.offset_data, m.size) for m in t}
    records = np.array([(*where[m], lab) for m, lab in zip(members, labels)], dtype=SAMPLE_DTYPE)
    filesize = os.path.getsize(tmp)
    part, part_tmp = part_path(out, split, k), part_path(out, split, k) + ".tmp"
    with open(part_tmp, "wb") as f:
        np.savez(f, records=records, filesize=np.int64(filesize), skipped=np.array(json.dumps(skipped)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part_tmp, part)  # part first: a shard that exists always has its part
    os.replace(tmp, final)
    return {"k": k, "samples": len(records), "bytes": filesize, "skipped": skipped}


def part_path(out: str, split: str, k: int) -> str:
    return os.path.join(out, f".{split}.parts", f"{k:06d}.npz")


def read_part(out: str, split: str, k: int) -> dict | None:
    """The record of a finished shard, or None when the shard must be (re)written."""
    try:
        with np.load(part_path(out, split, k), allow_pickle=False) as z:
            part = {"records": z["records"], "filesize": int(z["filesize"]), "skipped": json.loads(str(z["skipped"]))}
        if os.path.getsize(os.path.join(out, shard_name(split, k))) == part["filesize"]:
            return part
    except (OSError, ValueError, KeyError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ one split
def samples_digest(samples) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def estimate_per_shard(samples, order: np.ndarray, shard_size: int, max_resolution: int | None,
                       jpeg_quality: int, limits: dict) -> int:
    """Samples per shard for shards of about ``shard_size`` bytes, from up to 256 evenly spread samples."""
    sizes = []
    for i in order[np.linspace(0, len(order) - 1, min(256, len(order))).astype(np.int64)]:
        path = samples[int(i)][0]
        try:
            sizes.append(len(encode(path, max_resolution, jpeg_quality, limits)[0]) if max_resolution
                         else min(os.path.getsize(path), limits["max_file_bytes"]))
        except (BadImage, OSError):
            continue
    mean = (sum(sizes) / len(sizes) if sizes else 100_000) + TAR_OVERHEAD
    return max(1, int(shard_size // mean))


def write_split(split: str, samples, *, out: str, base: str, num_classes: int, args, source: str,
                limits: dict) -> dict:
    settings = {"max_resolution": args.max_resolution or None, "jpeg_quality": args.jpeg_quality,
                "seed": args.seed, "shard_size": args.shard_size}
    digest = samples_digest(samples)
    index_path = os.path.join(out, f"{split}.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            done = json.load(f)["focalnet"]
        if done.get("samples_sha256") == digest and all(done.get(k) == v for k, v in settings.items()):
            log.info("%s is complete already (same images, labels and settings): nothing to do", index_path)
            return done
        raise UsageError(f"--out {out} already holds a different {split} split ({index_path}); choose another "
                         "--out or delete that split's files")
    plan_path = os.path.join(out, f".{split}.plan.json")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).numpy()
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        if plan["samples_sha256"] != digest or plan["settings"] != settings:
            raise UsageError(f"--out {out} holds an unfinished write of {split} with other images or settings "
                             f"({plan_path}); rerun it with the same command, or delete .{split}.* and {split}-*.tar")
        log.info("resuming the write of %s into %s", split, out)
    else:
        per_shard = estimate_per_shard(samples, order, args.shard_size, settings["max_resolution"], args.jpeg_quality,
                                       limits)
        plan = {"samples_sha256": digest, "settings": settings, "num_samples": len(samples),
                "samples_per_shard": per_shard, "num_shards": max(1, math.ceil(len(samples) / per_shard))}
        os.makedirs(os.path.dirname(part_path(out, split, 0)), exist_ok=True)
        with open(plan_path + ".tmp", "w") as f:
            json.dump(plan, f, indent=1)
        os.replace(plan_path + ".tmp", plan_path)
    os.makedirs(os.path.dirname(part_path(out, split, 0)), exist_ok=True)
    per_shard, num_shards = plan["samples_per_shard"], plan["num_shards"]
    todo = [k for k in range(num_shards) if read_part(out, split, k) is None]
    log.info("%s: %d images -> %d shards of %d (%d to write) with %d processes", split, len(samples), num_shards,
             per_shard, len(todo), args.num_workers)
    started, written, written_bytes, skipped_count = time.perf_counter(), 0, 0, 0

    def task(k: int) -> dict:
        items = [samples[int(i)] for i in order[k * per_shard:(k + 1) * per_shard]]
        return {"out": out, "split": split, "k": k, "items": items, "base": base,
                "max_resolution": settings["max_resolution"], "jpeg_quality": args.jpeg_quality, "limits": limits}

    with cf.ProcessPoolExecutor(args.num_workers, mp_context=mp.get_context("fork")) as pool:
        pending, queue = set(), iter(todo)
        while True:
            while len(pending) < 2 * args.num_workers and (k := next(queue, None)) is not None:
                pending.add(pool.submit(write_shard, task(k)))  # a bounded number of tasks in memory
            if not pending:
                break
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                r = fut.result()
                for path, reason in r["skipped"]:
                    log.warning("skipping unreadable image %s (%s)", path, reason)
                written, written_bytes, skipped_count = written + 1, written_bytes + r["bytes"], skipped_count + len(r["skipped"])
                rate = written_bytes / max(time.perf_counter() - started, 1e-9)
                log.info("%s: %d samples, %.1f MB (%d/%d shards to write; %.1f MB/s, %d skipped so far)",
                         shard_name(split, r["k"]), r["samples"], r["bytes"] / 1e6, written, len(todo), rate / 1e6,
                         skipped_count)
    return finish_split(split, out, num_shards, num_classes=num_classes, digest=digest, settings=settings,
                        source=source)


def finish_split(split: str, out: str, num_shards: int, *, num_classes: int, digest: str, settings: dict,
                 source: str) -> dict:
    """Assemble the parts into ``S.idx.npy``, ``S.json`` (written last) and timm's ``_info.json``."""
    parts = [read_part(out, split, k) for k in range(num_shards)]
    if any(p is None for p in parts):
        raise RuntimeError(f"{split}: shards {[k for k, p in enumerate(parts) if p is None][:5]} are missing")
    records = np.concatenate([p["records"] for p in parts])
    skipped = [s for p in parts for s in p["skipped"]]
    idx_name = f"{split}.idx.npy"
    buf = io.BytesIO()
    np.save(buf, records, allow_pickle=False)
    atomic_write(os.path.join(out, idx_name), buf.getvalue())
    if skipped:
        atomic_write(os.path.join(out, f"{split}.skipped.tsv"),
                     "".join(f"{p}\t{r}\n" for p, r in skipped).encode())
    meta = {"version": 1, "num_samples": len(records), "num_classes": num_classes, "skipped": len(skipped),
            "sample_index": idx_name, "sample_index_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
            "sample_index_bytes": len(buf.getvalue()), "samples_sha256": digest, **settings, "source": source,
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    spec = {"__kind__": INDEX_KIND, "wids_version": 1, "name": split,
            "shardlist": [{"url": shard_name(split, k), "nsamples": len(p["records"]), "filesize": p["filesize"]}
                          for k, p in enumerate(parts)],
            "focalnet": meta}
    atomic_write(os.path.join(out, f"{split}.json"), json.dumps(spec, indent=1).encode())
    update_timm_info(out, split, spec)
    for k in range(num_shards):
        os.unlink(part_path(out, split, k))
    os.rmdir(os.path.dirname(part_path(out, split, 0)))
    os.unlink(os.path.join(out, f".{split}.plan.json"))
    total = sum(p["filesize"] for p in parts)
    log.info("%s: %d samples in %d shards, %.3g GB, %d unreadable images skipped%s", split, len(records),
             num_shards, total / 1e9, len(skipped), f" (listed in {split}.skipped.tsv)" if skipped else "")
    return meta


def update_timm_info(out: str, split: str, spec: dict) -> None:
    """timm's ``wds/`` reader takes split sizes and shard lists from ``_info.json`` (timm/data/readers/reader_wds.py)."""
    path = os.path.join(out, "_info.json")
    info = {"name": os.path.basename(os.path.abspath(out)), "splits": {}}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    shards = spec["shardlist"]
    info.setdefault("splits", {})[split] = {
        "name": split, "num_samples": sum(s["nsamples"] for s in shards),
        "filenames": [s["url"] for s in shards], "shard_lengths": [s["nsamples"] for s in shards]}
    atomic_write(path, json.dumps(info, indent=1).encode())


def atomic_write(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=imagenet22k data.root=/x")
    p.add_argument("--out", required=True, help="output directory (data.root of data=*_wds)")
    p.add_argument("--splits", default="train,val", help="comma-separated: train,val")
    p.add_argument("--shard-size", type=parse_size, default="1GB", help="about this many bytes per shard (1GB)")
    p.add_argument("--max-resolution", type=int, default=0,
                   help="re-encode images whose longer side exceeds this (0: keep every image's bytes)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="for re-encoded images")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--seed", type=int, default=0, help="the fixed sample order inside the shards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import fcntl

    try:
        data_cfg = compose_data_cfg(args.overrides)
        train, val, num_classes = dataset_samples(data_cfg)
        limits = file_limits(data_cfg)  # data.max_file_mb / data.max_image_pixels: hostile files are skipped
        by_split = {"train": train, "val": val}
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        unknown = [s for s in splits if s not in by_split]
        if unknown:
            raise UsageError(f"--splits: unknown split {unknown[0]!r} (train, val)")
        os.makedirs(args.out, exist_ok=True)
        base = os.path.expanduser(str(data_cfg.root))
        for split in splits:
            lock = open(os.path.join(args.out, f".{split}.lock"), "w")  # noqa: SIM115  (held until we exit)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--out {args.out}: another write_shards.py is writing {split} there") from None
            write_split(split, by_split[split], out=args.out, base=base, num_classes=num_classes, args=args,
                        source=f"data={data_cfg.name} root={data_cfg.root}", limits=limits)
            lock.close()
    except (DataConfigError, UsageError) as e:
        print(f"write_shards.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
