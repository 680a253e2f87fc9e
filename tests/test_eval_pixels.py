"""Validation batches equal the official eval pipeline, pixel for pixel.

Reference (microsoft/FocalNet @9253a7f data/build.py, run here through torchvision): ``datasets.ImageFolder`` +
``Resize(int(256 / 224 * S), bicubic)`` + ``CenterCrop(S)`` (``TEST.CROP``; at 384 without it:
``Resize((S, S))``) + ``ToTensor`` + ``Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)``, on generated
JPEGs from 500x375 to 3000x2000 (and CMYK / grayscale ones). The uint8 pixels before normalization are equal
bit for bit; the normalized floats differ by float32 rounding only, because we compute ``x * (1 / (255 * std)) -
mean / std`` in one fused op where torchvision computes ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from focalnet.data import build_loaders
from focalnet.data.imagegen import natural_image, write_bad_image

SIZES = [(500, 375), (375, 500), (1024, 768), (2048, 1536), (3000, 2000)]


def photo(rng, w: int, h: int, label: int) -> Image.Image:
    """A natural-looking image, generated at 1/4 size (generating 3000x2000 directly takes seconds), upscaled, with
    sharp-edged shapes drawn at full size (edges are where DCT-domain downscaling shows)."""
    img = natural_image(rng, (w // 4, h // 4), label=label).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_pixels")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("n01440764", "n01443537")):
        d = root / "val" / cls
        d.mkdir(parents=True)
        for w, h in SIZES[c::2]:
            photo(rng, w, h, c).save(d / f"{w}x{h}.JPEG", "JPEG", quality=90)
    write_bad_image(str(root / "val" / "n01443537" / "cmyk.JPEG"), "cmyk", size=(900, 700))
    write_bad_image(str(root / "val" / "n01443537" / "gray.JPEG"), "grayscale", size=(700, 900))
    os.symlink(root / "val", root / "train")
    return root


def official(root, size: int, crop: bool, normalize: bool):
    resize = [T.Resize(int(256 / 224 * size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)] \
        if crop else [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    tail = [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)] if normalize else [T.PILToTensor()]
    return tvd.ImageFolder(str(root / "val"), transform=T.Compose(resize + tail))


@pytest.mark.parametrize("size, crop", [(224, True), (384, False)])
def test_validation_batches_equal_the_official_eval_pipeline(val_root, size, crop):
    from conftest import compose_config

    cfg = compose_config(["data=imagenet1k", f"data.root={val_root}", "data.num_classes=2", f"data.img_size={size}",
                          "data.batch_size=3", "data.num_workers=0", "aug=deit", f"aug.test_crop={crop}"])
    loader = build_loaders(cfg.data, cfg.aug).val
    ours = [(x, y) for x, y in loader]
    x, y = torch.cat([b[0] for b in ours]), torch.cat([b[1] for b in ours])

    ref_u8 = official(val_root, size, crop, normalize=False)
    ref_f = official(val_root, size, crop, normalize=True)
    assert y.tolist() == [label for _, label in ref_u8.samples] and len(x) == len(ref_u8) == 7
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for i in range(len(ref_u8)):
        pixels = ((x[i] * std + mean) * 255).round().to(torch.uint8)  # our batch, back to the uint8 it came from
        assert torch.equal(pixels, ref_u8[i][0]), ref_u8.samples[i][0]
        torch.testing.assert_close(x[i], ref_f[i][0], atol=2e-6, rtol=0)
