"""A tiny generated object-detection set in YOLO format: circles, squares and triangles on textured backgrounds.

For the detector demo and tests (``scripts/train_detector.py``), like the digits set for classification: no
download, written once on first use by :func:`materialize` (deterministic for a given configuration)::

    <root>/images/{train,val}/<index>.jpg
    <root>/labels/{train,val}/<index>.txt   one "class x_center y_center width height" line per object, in [0, 1]
    <root>/shapes.yaml                      the Ultralytics dataset YAML (absolute ``path``, class ``names``)
    <root>/shapes.json                      what was written (sizes, counts, seed); written last, marks completion

Each image has 1-3 objects of 18-45% of the image side, with random fill colours, overlapping each other by at
most 10% IoU, on a background of smooth colour gradients, blurred noise and random strokes (so colour or edges
alone do not give the class away). Boxes are the exact extents of the drawn shapes. Creation is atomic: a
temporary sibling directory renamed into place, so concurrent runs may race for it safely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle")
FORMAT_VERSION = 1
META_FILE = "shapes.json"
YAML_FILE = "shapes.yaml"


class ShapesConfigError(ValueError):
    """``root`` holds something else, or a set written with other settings."""


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = (rng.uniform(40, 215, 3).astype(np.float32) for _ in range(3))
    grad = c0 + xx[..., None] * (c1 - c0) + yy[..., None] * (c2 - c0)  # (S, S, 3) smooth colour ramp
    noise = Image.fromarray(rng.integers(0, 256, (size // 4 + 1, size // 4 + 1, 3), dtype=np.uint8))
    noise = np.asarray(noise.resize((size, size), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1)),
                       np.float32)
    img = Image.fromarray(np.clip(0.65 * grad + 0.35 * noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # strokes: edges that are not objects
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return img


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def draw_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[int, float, float, float, float]]]:
    """One RGB image and its objects as (class, x0, y0, x1, y1) pixel boxes."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[int, float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            side = float(rng.uniform(0.18, 0.45)) * size
            x0, y0 = (float(v) for v in rng.uniform(0, size - side, 2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, o[1:]) <= 0.1 for o in objects):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        outline = tuple(255 - v for v in fill)
        if CLASSES[cls] == "circle":
            draw.ellipse(box, fill=fill, outline=outline)
        elif CLASSES[cls] == "square":
            draw.rectangle(box, fill=fill, outline=outline)
        else:
            draw.polygon([(box[0] + side / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill, outline=outline)
        objects.append((cls, *box))
    return img, objects


def _expected_meta(train_images: int, val_images: int, img_size: int, seed: int) -> dict:
    return {"format": FORMAT_VERSION, "train_images": int(train_images), "val_images": int(val_images),
            "img_size": int(img_size), "seed": int(seed)}


def _read_meta(root: Path) -> dict | None:
    path = root / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write(tmp: Path, root: Path, want: dict) -> None:
    rng = np.random.default_rng(want["seed"])
    size, counts = want["img_size"], {}
    for split in ("train", "val"):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        n_objects = 0
        for i in range(want[f"{split}_images"]):
            img, objects = draw_sample(rng, size)
            img.save(tmp / "images" / split / f"{i:05d}.jpg", quality=95)
            lines = [f"{c} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} {(x1 - x0) / size:.6f} "
                     f"{(y1 - y0) / size:.6f}" for c, x0, y0, x1, y1 in objects]
            (tmp / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
            n_objects += len(objects)
        counts[split] = {"images": want[f"{split}_images"], "objects": n_objects}
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASSES))
    (tmp / YAML_FILE).write_text(f"# Generated by data/shapes_detection.py ({META_FILE} says how)\npath: {root}\n"
                                 f"train: images/train\nval: images/val\nnames:\n{names}\n")
    meta = {**want, "classes": list(CLASSES), "counts": counts, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def materialize(root: str | os.PathLike, *, train_images: int = 256, val_images: int = 64, img_size: int = 128,
                seed: int = 0) -> Path:
    """Write the set at ``root`` unless it is already there; return the path of its dataset YAML."""
    root = Path(root).expanduser().resolve()
    want = _expected_meta(train_images, val_images, img_size, seed)
    have = _read_meta(root)
    if have is not None:
        have_cmp = {k: have.get(k) for k in want}
        if have_cmp != want:
            raise ShapesConfigError(f"{root} holds a shapes set written with {have_cmp}, but {want} is asked for; "
                                    f"point the root at another directory or delete {root}")
        return root / YAML_FILE
    if root.exists() and any(root.iterdir()):
        raise ShapesConfigError(f"{root} exists but is not a generated shapes set ({META_FILE} missing); point "
                                "the root at an empty or new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(tmp, root, want)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one: the first writer wins.
            os.rename(tmp, root)
        except OSError:
            if _read_meta(root) is None:  # not a lost race: something else is in the way
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return materialize(root, train_images=train_images, val_images=val_images, img_size=img_size, seed=seed)
