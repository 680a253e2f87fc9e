"""Convert a file-based dataset (data=imagenet1k | imagenet22k | folder) to FFCV ``.beton`` files.

    python scripts/write_ffcv.py data=imagenet1k data.root=/data/imagenet --out-dir /data/imagenet_ffcv
    python train.py data=imagenet1k_ffcv data.root=/data/imagenet_ffcv

The positional arguments are Hydra overrides composed with the training config, so every dataset kind
and key (map files, label layout, ``data.val_count`` hold-out, ...) works as in training. Each split
becomes ``<out-dir>/<split>.beton`` (+ ``.json``), written by :mod:`focalnet.data.ffcv_writer`: JPEG with
probability ``--compress-probability``, raw pixels otherwise, longest side at most ``--max-resolution``;
unreadable images are stored with label -1, skipped by the loaders and counted. Images are decoded whole;
``data.jpeg_draft=true`` lets JPEGs at least twice ``--max-resolution`` decode at 1/2..1/8 scale first
(libjpeg's DCT-domain downscaling: faster, other pixels).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import focalnet.data  # noqa: E402,F401  (registers the config resolvers)
from focalnet.data.ffcv_writer import write_split  # noqa: E402
from focalnet.data.folder import dataset_samples  # noqa: E402
from focalnet.layout import CONF_DIR  # noqa: E402

log = logging.getLogger("write_ffcv")


def compose_data_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg.data


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

    from focalnet.data.ffcv_loader import require_ffcv

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
