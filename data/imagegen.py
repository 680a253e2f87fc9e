"""Generated image folders for tests and benchmarks: natural-image-like JPEGs and every kind of bad file.

Content is crops of scikit-learn's two bundled photographs (``load_sample_images``) when scikit-learn is
installed, blended with smooth gradients, shapes and blurred noise, so JPEG sizes and decode times
resemble real photos (pure noise would make JPEG decoding unrealistically slow, flat colour too fast).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BAD_KINDS = ("corrupt", "truncated", "zero_byte", "cmyk", "grayscale", "png16", "png_named_jpeg")
# Kinds that must decode to RGB; the others must be skipped and counted.
DECODABLE_KINDS = ("cmyk", "grayscale", "png16", "png_named_jpeg")


def _photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images

        return [np.asarray(im) for im in load_sample_images().images]  # 2 x (427, 640, 3) uint8
    except ImportError:
        return []


_PHOTOS: list[np.ndarray] | None = None


def natural_image(rng: np.random.Generator, size: tuple[int, int] = (500, 375), label: int = 0) -> Image.Image:
    """A (w, h) RGB image: photo crop + gradient + shapes + blurred noise; ``label`` tints it (learnable)."""
    global _PHOTOS
    if _PHOTOS is None:
        _PHOTOS = _photos()
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    hue = np.array([(label * 97) % 255, (label * 57 + 80) % 255, (label * 23 + 160) % 255], np.float32)
    grad = (xx[..., None] / w * hue + yy[..., None] / h * (255 - hue)) * 0.5
    noise = Image.fromarray(rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8))
    noise = np.asarray(noise.resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2)), np.float32)
    base = grad + 0.3 * noise
    if _PHOTOS:
        photo = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
        scale = float(rng.uniform(0.6, 1.0))
        cw, ch = int(photo.shape[1] * scale), int(photo.shape[0] * scale)
        x0, y0 = int(rng.integers(0, photo.shape[1] - cw + 1)), int(rng.integers(0, photo.shape[0] - ch + 1))
        crop = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        base = 0.7 * np.asarray(crop, np.float32) + 0.3 * base
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    return img


def write_image_folder(root: str, num_classes: int, per_class: int, *, size: tuple[int, int] = (500, 375),
                       quality: int = 90, seed: int = 0, jitter: bool = True, ext: str = ".JPEG") -> list[str]:
    """``root/<class>/<img>.JPEG`` with classes ``n0000000{i}``; sizes jitter +-20% when ``jitter``."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(num_classes):
        d = os.path.join(root, f"n{c:08d}")
        os.makedirs(d, exist_ok=True)
        for k in range(per_class):
            w, h = size
            if jitter:
                w, h = int(w * rng.uniform(0.8, 1.2)), int(h * rng.uniform(0.8, 1.2))
            p = os.path.join(d, f"n{c:08d}_{k}{ext}")
            natural_image(rng, (w, h), label=c).save(p, "JPEG", quality=quality)
            paths.append(p)
    return paths


def write_bad_image(path: str, kind: str, size: tuple[int, int] = (64, 48)) -> str:
    """Write one image of a ``BAD_KINDS`` kind at ``path`` (a ``.JPEG`` name whatever the content)."""
    rng = np.random.default_rng(BAD_KINDS.index(kind) if kind in BAD_KINDS else 0)
    img = natural_image(rng, size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    if kind == "corrupt":
        data = b"this is not an image" + bytes(rng.integers(0, 255, 200, dtype=np.uint8))
    elif kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "zero_byte":
        data = b""
    elif kind == "cmyk":
        buf = io.BytesIO()
        img.convert("CMYK").save(buf, "JPEG", quality=90)
        data = buf.getvalue()
    elif kind == "grayscale":
        buf = io.BytesIO()
        img.convert("L").save(buf, "JPEG", quality=90)
        data = buf.getvalue()
    elif kind == "png16":
        arr = (np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")  # uint16 -> mode I;16
        data = buf.getvalue()
    elif kind == "png_named_jpeg":
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data = buf.getvalue()
    else:
        raise ValueError(f"unknown bad image kind {kind!r}; one of {BAD_KINDS}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_bad_images(class_dir: str, kinds: Sequence[str] = BAD_KINDS) -> dict[str, str]:
    os.makedirs(class_dir, exist_ok=True)
    return {k: write_bad_image(os.path.join(class_dir, f"bad_{k}.JPEG"), k) for k in kinds}


def write_hostile_files(class_dir: str, *, huge_bytes: int = 12 << 30, bomb_side: int = 12_000) -> dict[str, str]:
    """Files a data loader must survive without reading them whole: a ``huge_bytes`` sparse file named ``.jpg``
    (no disk used), a ``bomb_side``^2-pixel PNG (144 Mpx by default; a few KB that decode to 432 MB of RGB)
    and a symlink loop named like an image."""
    os.makedirs(class_dir, exist_ok=True)
    huge = os.path.join(class_dir, "huge_sparse.jpg")
    with open(huge, "wb") as f:
        f.truncate(huge_bytes)
    bomb = os.path.join(class_dir, "bomb.png")
    Image.new("1", (bomb_side, bomb_side)).save(bomb, compress_level=1)
    loop_a, loop_b = os.path.join(class_dir, "loop_a.jpg"), os.path.join(class_dir, "loop_b.jpg")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    return {"huge": huge, "bomb": bomb, "loop": loop_a}
