"""Convert a file-based dataset (data=imagenet1k | imagenet22k | folder) to FFCV ``.beton`` files.

    python scripts/write_ffcv.py data=imagenet1k data.root=/data/imagenet --out-dir /data/imagenet_ffcv
    python train.py data=imagenet1k_ffcv data.root=/data/imagenet_ffcv

The positional arguments are Hydra overrides composed with the training config, so every dataset kind
and key (map files, label layout, ``data.val_count`` hold-out, ...) works as in training. Each split
becomes ``<out-dir>/<split>.beton`` with fields ``image`` (RGBImageField, ``proportion`` write mode:
JPEG with probability ``--compress-probability``, raw pixels otherwise; longest side at most
``--max-resolution``) and ``label`` (IntField), plus ``<split>.beton.json`` (counts, classes, settings).
Images are decoded whole; ``data.jpeg_draft=true`` lets JPEGs at least twice ``--max-resolution`` decode at
1/2..1/8 scale first (libjpeg's DCT-domain downscaling: faster, other pixels).
Unreadable images are stored as an 8x8 placeholder with label -1 (the writer cannot drop samples once
started); the FFCV loaders skip them and report the count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402,F401  (registers the config resolvers)
from data.folder import dataset_samples  # noqa: E402
from data.transforms import BadImage, decode_rgb, open_image  # noqa: E402

log = logging.getLogger("write_ffcv")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class BetonSource:
    """Indexable (image HxWx3 uint8, label) source for FFCV's DatasetWriter; never raises on bad files."""

    def __init__(self, samples, max_resolution: int | None, jpeg_draft: bool = False):
        self.samples, self.max_resolution, self.jpeg_draft = samples, max_resolution, jpeg_draft

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = open_image(path)
            w, h = img.size
            draft = None
            if self.jpeg_draft and self.max_resolution and max(w, h) >= 2 * self.max_resolution:
                # data.jpeg_draft: let libjpeg decode at 1/2..1/8 scale when the stored size is that small anyway
                # (faster; other pixels than FFCV's resize of the full decode).
                s = self.max_resolution / max(w, h)
                draft = (math.ceil(w * s), math.ceil(h * s))
            return np.asarray(decode_rgb(img, draft), dtype=np.uint8), label
        except BadImage as e:
            # A raised exception would hang FFCV's writer (it waits for every sample): mark and move on.
            log.warning("skipping unreadable image %s (%s)", path, e)
            return np.zeros((8, 8, 3), np.uint8), -1


def compose_data_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg.data


def write_split(samples, out_path: str, *, num_classes: int, max_resolution: int | None, jpeg_quality: int,
                compress_probability: float, num_workers: int, chunk_size: int, source: str,
                jpeg_draft: bool = False) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=max_resolution,
                               compress_probability=compress_probability, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }
    start = time.time()
    # FFCV shows a tqdm progress bar while its worker processes encode.
    DatasetWriter(out_path, fields, num_workers=num_workers).from_indexed_dataset(
        BetonSource(samples, max_resolution, jpeg_draft), chunksize=chunk_size)
    reader = Reader(out_path)
    labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
    meta = {
        "num_samples": int(len(labels)), "readable_samples": int((labels >= 0).sum()),
        "skipped_images": int((labels < 0).sum()), "num_classes": int(num_classes), "source": source,
        "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
        "compress_probability": compress_probability, "bytes": os.path.getsize(out_path),
        "seconds": round(time.time() - start, 1),
    }
    with open(out_path + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=imagenet22k data.root=/x")
    p.add_argument("--out-dir", required=True, help="directory for <split>.beton (+ .json)")
    p.add_argument("--splits", default="train,val", help="comma-separated: train,val")
    p.add_argument("--max-resolution", type=int, default=512, help="longest side stored (0 = keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="proportion mode: fraction stored as JPEG (rest raw: faster, larger)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-size", type=int, default=100)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from data.ffcv_loader import require_ffcv

    require_ffcv()
    data_cfg = compose_data_cfg(args.overrides)
    train, val, num_classes = dataset_samples(data_cfg)
    by_split = {"train": train, "val": val}
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        if split not in by_split:
            p.error(f"--splits: unknown split {split!r} (train, val)")
        out = os.path.join(args.out_dir, f"{split}.beton")
        log.info("writing %d %s images of data=%s to %s", len(by_split[split]), split, data_cfg.name, out)
        meta = write_split(by_split[split], out, num_classes=num_classes,
                           max_resolution=args.max_resolution or None, jpeg_quality=args.jpeg_quality,
                           compress_probability=args.compress_probability, num_workers=args.num_workers,
                           chunk_size=args.chunk_size, source=f"data={data_cfg.name} root={data_cfg.root}",
                           jpeg_draft=bool(data_cfg.get("jpeg_draft", False)))
        log.info("%s: %d samples, %d skipped (unreadable), %.1f MB in %.1f s", out, meta["num_samples"],
                 meta["skipped_images"], meta["bytes"] / 1e6, meta["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
