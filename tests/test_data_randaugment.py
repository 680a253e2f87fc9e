"""focalnet.data.randaugment: timm's RandAugment on arrays must be timm's RandAugment on PIL, pixel for pixel.

The reference is timm as installed, unpatched: every op of the recipe's op set (and the non-'inc' variants) is
compared with timm's own PIL op at fixed magnitudes on natural-like images, then the whole
``rand-m9-mstd0.5-inc1`` transform over many seeds, including the RNG state it leaves behind (same draws, same
order). The one case timm cannot run on Pillow >= 13 (posterize to 0 bits, which Pillow 13 rejects) is
compared with Pillow < 13's result, a black image, which the pipeline restores locally
(``focalnet.data.transforms.with_any_pillow_posterize``) without touching timm's module.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import PIL
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from timm.data import auto_augment as aa
from timm.data import create_transform

from focalnet.data.imagegen import natural_image
from focalnet.data.randaugment import ARRAY_OPS, fast_rand_augment
from focalnet.data.transforms import (
    POSTERIZE_OPS,
    EvalSampleTransform,
    TrainSampleTransform,
    posterize_any_pillow,
    seeded,
    with_any_pillow_posterize,
)

RECIPE = "rand-m9-mstd0.5-inc1"
PILLOW_REJECTS_ZERO_BITS = int(PIL.__version__.split(".")[0]) >= 13
UNPATCHED_POSTERIZE = aa.posterize  # timm's own function, as its NAME_TO_OP holds it


def _images(n=4, size=(96, 80)):
    rng = np.random.default_rng(0)
    imgs = [np.asarray(natural_image(rng, size=size, label=i).convert("RGB")) for i in range(n)]
    flat = np.full((size[1], size[0], 3), 77, np.uint8)  # one level per channel: degenerate histograms
    return imgs + [flat]


def _timm_ra(auto_augment=RECIPE, interpolation="bicubic", size=80):
    """timm's own RandAugment for the recipe (create_transform as the official code calls it), unpatched."""
    _, secondary, _ = create_transform(size, is_training=True, auto_augment=auto_augment,
                                       interpolation=interpolation, separate=True)
    (ra,) = secondary.transforms
    assert all(op.aug_fn is aa.NAME_TO_OP[op.name] for op in ra.ops)
    return ra


def test_timm_module_is_left_alone():
    """Building the pipeline's transforms patches its own ops, not timm's NAME_TO_OP."""
    tf = TrainSampleTransform(OmegaConf.create({"auto_augment": RECIPE, "interpolation": "bicubic"}), 32)
    assert all(aa.NAME_TO_OP[name] is UNPATCHED_POSTERIZE for name in ("Posterize", "PosterizeIncreasing"))
    patched = [op for op in tf.secondary.transforms[0].ops if op.name in POSTERIZE_OPS]
    assert patched and all(op.aug_fn is posterize_any_pillow for op in patched)
    assert all(op.aug_fn is aa.NAME_TO_OP[op.name] for op in _timm_ra().ops)  # a new timm transform: untouched


def test_zero_bit_posterize_is_black_as_on_pillow_below_13():
    """The patched case on its own. timm's posterize at 0 bits: Pillow >= 13 raises, Pillow < 13 returned
    ``ImageOps.posterize``'s mask ~(2**8 - 1) & 0xFF = 0, a black image; ours (PIL and array) gives that."""
    img = Image.fromarray(_images(1)[0])
    if PILLOW_REJECTS_ZERO_BITS:
        with pytest.raises(ValueError):
            UNPATCHED_POSTERIZE(img, 0)
    else:
        np.testing.assert_array_equal(np.asarray(UNPATCHED_POSTERIZE(img, 0)), 0)
    assert np.asarray(posterize_any_pillow(img, 0)).max() == 0 and posterize_any_pillow(img, 0).size == img.size
    np.testing.assert_array_equal(ARRAY_OPS["PosterizeIncreasing"](np.asarray(img), 0), 0)
    for bits in range(1, 9):  # everywhere else it is timm's posterize
        np.testing.assert_array_equal(np.asarray(posterize_any_pillow(img, bits)),
                                      np.asarray(UNPATCHED_POSTERIZE(img, bits)))
        np.testing.assert_array_equal(np.asarray(posterize_any_pillow(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    # AutoAugment and AugMix transforms get the same local fix.
    for policy in ("original", "augmix-m5-w2"):
        _, secondary, _ = create_transform(32, is_training=True, auto_augment=policy, separate=True)
        with_any_pillow_posterize(secondary)
        t = secondary.transforms[0]
        ops = getattr(t, "ops", None) or [op for sub in t.policy for op in sub]
        assert all(op.aug_fn is posterize_any_pillow for op in ops if op.name in POSTERIZE_OPS)


@pytest.mark.parametrize("name", sorted(ARRAY_OPS))
def test_each_array_op_is_pixel_exact_against_timm_pil(name):
    hparams = _timm_ra().ops[0].hparams  # timm's hparams for the recipe: fill = mean colour, bicubic
    for magnitude in (0, 3, 9, 10):
        ref_op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)  # timm, unpatched
        args = []
        if name in POSTERIZE_OPS:  # note the bits timm asks for (magnitude noise can move m9 to m10)
            timm_fn = ref_op.aug_fn

            def ref_fn(img, *a, _fn=timm_fn, _args=args, **kw):
                _args.append(a)
                return _fn(img, *a, **kw)

            ref_op.aug_fn = ref_fn
        fast_op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
        fast_op.aug_fn = ARRAY_OPS[name]
        for i, arr in enumerate(_images()):
            for sign_seed in (i, i + 100):  # both signs of the signed ops
                random.seed(sign_seed)
                try:
                    ref = np.asarray(ref_op(Image.fromarray(arr)))
                except ValueError:
                    # Only 0-bit posterize fails, only on Pillow >= 13: the patched case has its own test above.
                    assert PILLOW_REJECTS_ZERO_BITS and args[-1] == (0,), (name, magnitude, args[-1:])
                    continue
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
    ref = _timm_ra(auto_augment, interpolation)  # timm as installed
    ref_any_pillow = with_any_pillow_posterize(copy.deepcopy(ref))  # for draws timm cannot run on this Pillow
    fast = fast_rand_augment(ref)
    imgs = _images(3)
    zero_bit_draws = 0
    for seed in range(150):
        arr = imgs[seed % len(imgs)]
        random.seed(seed)
        np.random.seed(seed)
        try:
            expected = np.asarray(ref(Image.fromarray(arr)))
        except ValueError:
            assert PILLOW_REJECTS_ZERO_BITS, seed
            zero_bit_draws += 1
            random.seed(seed)
            np.random.seed(seed)
            expected = np.asarray(ref_any_pillow(Image.fromarray(arr)))
        state = (random.getstate(), np.random.get_state()[1].copy())
        random.seed(seed)
        np.random.seed(seed)
        out = fast(arr)
        np.testing.assert_array_equal(out, expected, err_msg=f"seed {seed}")
        assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert not any(np.shares_memory(fast(a), a) and fast(a) is not a for a in imgs)
    # Most draws compare with unpatched timm; the recipe reaches 0-bit posterize only now and then.
    assert zero_bit_draws < 15


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
    ref = EvalSampleTransform(32, True, "bicubic")(img.copy())
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
