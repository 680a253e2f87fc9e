"""Write FFCV ``.beton`` files from a list of ``(image path, label)`` samples (``scripts/write_ffcv.py``, data=digits_ffcv).

Each split becomes ``<split>.beton`` with fields ``image`` (RGBImageField, ``proportion`` write mode: JPEG with
probability ``compress_probability``, raw pixels otherwise; longest side at most ``max_resolution``) and
``label`` (IntField), plus ``<split>.beton.json`` (counts, classes, settings). Unreadable images are stored as
an 8x8 placeholder with label -1 (FFCV's writer cannot drop samples once started); the FFCV loaders skip them
and report the count. Images are decoded whole; ``jpeg_draft`` (``data.jpeg_draft``) lets JPEGs at least twice
``max_resolution`` decode at 1/2..1/8 scale first (libjpeg's DCT-domain downscaling: faster, other pixels). FFCV is
imported inside :func:`write_split`, so this module imports without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np

from focalnet.data.transforms import BadImage, decode_rgb, open_image

log = logging.getLogger(__name__)


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


def write_split(samples, out_path: str, *, num_classes: int, max_resolution: int | None, jpeg_quality: int,
                compress_probability: float, num_workers: int, chunk_size: int, source: str,
                jpeg_draft: bool = False) -> dict:
    """Write ``samples`` to ``out_path`` (+ ``.json`` metadata, returned)."""
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
