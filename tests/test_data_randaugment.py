"""focalnet.data.randaugment: timm's RandAugment on arrays must be timm's RandAugment on PIL, pixel for pixel.

Every op of the recipe's op set (and the non-'inc' variants) is compared with timm's PIL op at fixed
magnitudes on natural-like images, then the whole ``rand-m9-mstd0.5-inc1`` transform over many seeds,
including the RNG state it leaves behind (same draws, same order).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data import auto_augment as aa
from timm.data import create_transform

import focalnet.data.transforms
from focalnet.data.imagegen import natural_image
from focalnet.data.randaugment import ARRAY_OPS, fast_rand_augment
from focalnet.data.transforms import TrainSampleTransform, seeded, use_pre_pillow13_posterize

RECIPE = "rand-m9-mstd0.5-inc1"


def _images(n=4, size=(96, 80)):
    rng = np.random.default_rng(0)
    imgs = [np.asarray(natural_image(rng, size=size, label=i).convert("RGB")) for i in range(n)]
    flat = np.full((size[1], size[0], 3), 77, np.uint8)  # one level per channel: degenerate histograms
    return imgs + [flat]


def _timm_ra(auto_augment=RECIPE, interpolation="bicubic", size=80):
    _, secondary, _ = create_transform(size, is_training=True, auto_augment=auto_augment,
                                       interpolation=interpolation, separate=True)
    return use_pre_pillow13_posterize(secondary.transforms[0])  # Pillow < 13 posterize, as the pipeline uses


@pytest.mark.parametrize("name", sorted(ARRAY_OPS))
def test_each_array_op_is_pixel_exact_against_timm_pil(name):
    hparams = _timm_ra().ops[0].hparams  # timm's hparams for the recipe: fill = mean colour, bicubic
    for magnitude in (0, 3, 9, 10):
        ref_op = use_pre_pillow13_posterize(aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams))
        fast_op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
        fast_op.aug_fn = ARRAY_OPS[name]
        for i, arr in enumerate(_images()):
            for sign_seed in (i, i + 100):  # both signs of the signed ops
                random.seed(sign_seed)
                ref = np.asarray(ref_op(Image.fromarray(arr)))
                random.seed(sign_seed)
                out = fast_op(arr)
                assert out.dtype == np.uint8 and out.shape == arr.shape
                np.testing.assert_array_equal(out, ref, err_msg=f"{name} m={magnitude} image {i}")


@pytest.mark.parametrize("auto_augment,interpolation", [
    (RECIPE, "bicubic"),                   # the FocalNet recipe
    ("rand-m9-mstd0.5", "bicubic"),        # the non-increasing op set
    ("rand-m7-n3-mstd1.0-inc1", "random"),  # filter drawn per op (bilinear runs timm's PIL op)
])
def test_whole_randaugment_matches_timm_draw_for_draw(auto_augment, interpolation):
    ref, fast = _timm_ra(auto_augment, interpolation), None
    fast = fast_rand_augment(ref)
    imgs = _images(3)
    for seed in range(150):
        arr = imgs[seed % len(imgs)]
        random.seed(seed)
        np.random.seed(seed)
        expected = np.asarray(ref(Image.fromarray(arr)))
        state = (random.getstate(), np.random.get_state()[1].copy())
        random.seed(seed)
        np.random.seed(seed)
        out = fast(arr)
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")
        assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert not any(np.shares_memory(fast(a), a) and fast(a) is not a for a in imgs)


def test_train_transform_matches_flip_plus_timm_randaugment_on_pil():
    tf = TrainSampleTransform(OmegaConf.create({"auto_augment": RECIPE, "interpolation": "bicubic"}), 80)
    assert tf.array_augment is not None and len(tf.flips) == 1
    arr = _images(1)[0]
    before = arr.copy()
    flipped = 0
    for seed in range(60):
        with seeded(seed):
            out = tf.augment_array(arr)
        with seeded(seed):  # the reference: torchvision's flip and timm's RandAugment, both on PIL
            img = tf.flips[0](Image.fromarray(arr))
            ref = np.asarray(tf.secondary(img))
        flipped += not np.array_equal(np.asarray(img), arr)
        np.testing.assert_array_equal(out, ref)
        assert out.flags.writeable and out.flags.c_contiguous
    assert 10 < flipped < 50  # the flip really is drawn (p = 0.5)
    np.testing.assert_array_equal(arr, before)  # the caller's crop is never written


def test_aug_keys_hflip_scale_ratio_and_center_crop_training():
    base = {"auto_augment": None, "color_jitter": None, "interpolation": "bicubic", "test_crop": True}
    tf = TrainSampleTransform(OmegaConf.create({**base, "hflip": 0.0, "scale": [0.5, 1.0], "ratio": [0.9, 1.1]}), 32)
    assert tf.flips == [] and tf.rrc.scale == (0.5, 1.0) and tf.rrc.ratio == (0.9, 1.1)
    tf = TrainSampleTransform(OmegaConf.create({**base, "hflip": 0.3}), 32)
    assert [f.p for f in tf.flips] == [0.3] and tf.rrc.scale == (0.08, 1.0)
    # aug.scale: null -> the eval geometry (resize 256/224, center crop) for training, deterministic
    tf = TrainSampleTransform(OmegaConf.create({**base, "hflip": 0.0, "scale": None}), 32)
    img = natural_image(np.random.default_rng(1), size=(64, 48))
    outs = []
    for seed in range(3):
        with seeded(seed):
            outs.append(tf(img.copy()))
    assert all(torch.equal(outs[0], o) for o in outs) and outs[0].shape == (3, 32, 32)
    ref = focalnet.data.transforms.EvalSampleTransform(32, True, "bicubic")(img.copy())
    assert torch.equal(outs[0], ref)


def test_torchvision_jpeg_decode_equals_pil_and_bad_files_are_bad(tmp_path):
    from focalnet.data.imagegen import write_bad_image, write_image_folder
    from focalnet.data.transforms import BadImage, _decode_jpeg_rgb, open_image

    for path in write_image_folder(str(tmp_path / "ok"), 2, 3, size=(120, 90)):
        pil = np.asarray(Image.open(path).convert("RGB"))
        ours = _decode_jpeg_rgb(open_image(path))
        np.testing.assert_array_equal(ours[0].permute(1, 2, 0).numpy(), pil)
    assert _decode_jpeg_rgb(open_image(write_bad_image(str(tmp_path / "g.jpg"), "grayscale"))) is None  # -> PIL
    with pytest.raises(BadImage):
        _decode_jpeg_rgb(open_image(write_bad_image(str(tmp_path / "t.jpg"), "truncated")))
