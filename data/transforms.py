"""The FocalNet augmentation recipe, split so every pipeline (folder, ImageNet-22K, FFCV) applies it alike.

The official recipe is timm's ``create_transform(is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
re_prob=0.25, re_mode='pixel', color_jitter=0.4, interpolation='bicubic')``: RandomResizedCrop -> flip ->
RandAugment (color jitter is off whenever RandAugment is on, as in timm) -> to tensor -> normalize ->
RandomErasing. We keep timm's objects for every random decision and split the work in three stages:

1. ``TrainSampleTransform`` (per sample, in a loader worker): robust decode, RandomResizedCrop, flip and
   RandAugment, giving a ``uint8`` (3, H, W) tensor. The crop is resized by torch's native antialiased
   ``uint8`` bicubic kernel on a channels-last view (about 2x faster than PIL's here, same filter, within
   a grey level or two). With ``data.jpeg_draft=true``, libjpeg first downscales in the DCT domain (PIL
   ``draft``) whenever the crop is at least twice the output size: faster on large JPEGs, but not the same
   pixels as a full decode (see the README). The FFCV path decodes in FFCV and runs ``crop_array`` (the
   same draws and resize on the decoded full-resolution pixels) and ``augment_array`` (flip + RandAugment).
   ``EvalSampleTransform`` is the official eval transform exactly (full decode, PIL resize + center crop).
2. ``BatchFinisher`` (per batch, on the training device after the uint8 batch was copied there): normalize,
   then timm ``RandomErasing`` per sample. Loaders hand over uint8 batches (a quarter of float32's bytes).

Every random draw is made under :func:`seeded` with the sample's seed from the sampler, so augmentation
depends only on ``(seed, epoch, index)``, never on the worker, the process count or the resume point.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as _auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode

from focalnet.data.randaugment import fast_rand_augment, warm_up
from focalnet.schema import AugConfig, parse

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")  # timm auto_augment op names


def posterize_any_pillow(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize with Pillow < 13 semantics: RandAugment's PosterizeIncreasing reaches 0 bits at
    magnitude 10 (m9 + mstd 0.5 gets there), which Pillow 13 rejects; Pillow < 13 returned a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def with_any_pillow_posterize(transform):
    """Give the posterize ops inside ``transform`` (a timm ``AugmentOp``, ``RandAugment``, ``AutoAugment``,
    ``AugMixAugment`` or a ``Compose`` of them) :func:`posterize_any_pillow`, so the recipe runs on Pillow 13 as it
    did on Pillow < 13. Changes these objects only, never timm's module-wide ``NAME_TO_OP`` (other users of timm in
    the process keep timm's behaviour). Returns ``transform``."""
    if isinstance(transform, _auto_augment.AugmentOp):
        if transform.name in POSTERIZE_OPS:
            transform.aug_fn = posterize_any_pillow
        return transform
    children = [*getattr(transform, "transforms", ()), *getattr(transform, "ops", ()),
                *(op for sub in getattr(transform, "policy", ()) for op in sub)]  # AutoAugment: lists of ops
    for child in children:
        with_any_pillow_posterize(child)
    return transform


_NEAREST = TF.InterpolationMode.NEAREST
_TORCH_MODES = {TF.InterpolationMode.BICUBIC: "bicubic", TF.InterpolationMode.BILINEAR: "bilinear", _NEAREST: "nearest"}

# Truncated files must fail loudly (and be skipped and counted), not decode to half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty); the dataset skips and counts it."""


def seed_all(seed: int) -> None:
    """Seed the global Python, NumPy and torch (CPU) generators: timm's transforms draw from all three."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also walks every accelerator


@contextlib.contextmanager
def preserved_rng():
    """Restore the caller's global RNG states on exit, so per-sample seeding in the main process
    (``num_workers=0``, the batch finisher) leaves the training loop's random stream untouched."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def seeded(seed: int, preserve: bool = True):
    """Run a block with all global RNGs seeded by ``seed``; ``preserve=False`` in worker processes,
    whose global state nobody else reads (saving and restoring it costs as much as a small transform)."""
    if not preserve:
        seed_all(seed)
        yield
        return
    with preserved_rng():
        seed_all(seed)
        yield


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: CMYK, grayscale (L, LA, 1), palette (P), RGBA, and 16/32-bit (I;16, I, F)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNGs: convert('RGB') would clip at 255; scale the real range down to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


# Hostile-file limits (data.max_file_mb, data.max_image_pixels). A file larger than MAX_FILE_BYTES is skipped
# without being read (a 12 GB sparse ".jpg" would otherwise be read whole into a worker's memory); an image
# of more than MAX_IMAGE_PIXELS pixels is skipped before it is decoded (a decompression bomb: a small file
# that decodes to gigabytes). 89,478,485 px is Pillow's own warning threshold (0.25 GiB at 24 bits/pixel,
# ``PIL.Image.MAX_IMAGE_PIXELS``), made a hard limit here.
MAX_FILE_BYTES = 256 << 20
MAX_IMAGE_PIXELS = 89_478_485


def open_image(path_or_bytes, max_file_bytes: int = MAX_FILE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open (header only) whatever format the bytes hold: a PNG named ``.JPEG`` opens as the PNG it is.

    Raises :class:`BadImage` (skipped and counted by the datasets) for unreadable files and for files over the
    size or pixel limits, which are refused before their pixels are read.
    """
    try:
        if isinstance(path_or_bytes, bytes | bytearray | memoryview):
            data = bytes(path_or_bytes)
            if len(data) > max_file_bytes:  # a sample of a shard: the same limit as for a file
                raise BadImage(f"image of {len(data) / 2**20:.0f} MiB is over data.max_file_mb={max_file_bytes >> 20}")
        else:
            size = os.stat(path_or_bytes).st_size
            if size > max_file_bytes:
                raise BadImage(f"file of {size / 2**20:.0f} MiB is over data.max_file_mb={max_file_bytes >> 20} "
                               f"(not read)")
            with open(path_or_bytes, "rb") as f:
                data = f.read()
        if not data:
            raise BadImage("zero-byte file")
        with warnings.catch_warnings():  # Pillow warns from 1x its limit; ours below is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise BadImage(f"{img.width}x{img.height} = {img.width * img.height / 1e6:.0f} Mpx is over "
                           f"data.max_image_pixels={max_pixels} (a decompression bomb?; not decoded)")
        return img
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e


def decode_rgb(img: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image to RGB, optionally letting libjpeg downscale in the DCT domain first.

    ``draft_size`` is the smallest (w, h) the caller needs: PIL picks the largest 1/2, 1/4, 1/8 reduction
    that keeps the image at least that big, so quality is unchanged while decode work shrinks.
    """
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e


def load_rgb(path_or_bytes) -> Image.Image:
    """Read and fully decode one image to RGB, or raise :class:`BadImage`."""
    return decode_rgb(open_image(path_or_bytes))


def _pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) PIL -> (3, H, W) uint8 *view* in channels-last memory: no extra copy. torch's antialiased
    uint8 resize is fastest on channels-last input, and batch stacking makes the one copy we need."""
    arr = np.asarray(img, dtype=np.uint8)
    with warnings.catch_warnings():  # PIL's buffer is read-only; nothing writes into it (copying costs 0.1 ms)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).permute(2, 0, 1)


def timm_train_stages(aug: AugConfig, img_size: int):
    """timm's (primary, secondary) train transforms for ``aug``: [RRC, flip] and [RandAugment | jitter].

    ``aug.hflip`` (flip probability), ``aug.scale`` and ``aug.ratio`` (RandomResizedCrop ranges) go to
    timm as its ``hflip``/``scale``/``ratio`` arguments. The final stage (to tensor, normalize, erasing) is
    ours: see :class:`BatchFinisher`.
    """
    primary, secondary, _ = create_transform(
        img_size, is_training=True, auto_augment=aug.auto_augment or None, color_jitter=aug.color_jitter or None,
        interpolation=aug.interpolation, hflip=aug.hflip, scale=aug.scale, ratio=aug.ratio,
        re_prob=0.0, use_prefetcher=True, separate=True)
    return primary, with_any_pillow_posterize(secondary)


class TrainSampleTransform:
    """Opened image -> uint8 (3, S, S): RandomResizedCrop, flip, RandAugment. Call under ``seeded``.

    ``aug.scale: null`` replaces the random crop by the eval geometry (resize + center crop, ``aug.test_crop``),
    as ``aug=none`` asks: training then sees what evaluation sees, plus whatever flip/RandAugment is set.
    ``jpeg_draft`` (``data.jpeg_draft``): decode JPEGs at 1/2..1/8 scale when the crop is that much larger
    than the output (libjpeg's DCT-domain downscaling, PIL ``draft``).
    """

    def __init__(self, aug_cfg, img_size: int, jpeg_draft: bool = False):
        self.jpeg_draft = bool(jpeg_draft)
        aug = parse(AugConfig, aug_cfg, "aug")
        primary, secondary = timm_train_stages(aug, img_size)
        self.rrc = primary.transforms[0]          # timm RandomResizedCropAndInterpolation
        self.flips = primary.transforms[1:]       # torchvision RandomHorizontalFlip(aug.hflip), if > 0
        self.secondary = secondary                # RandAugment (PIL), or ColorJitter when aug has no AA
        self.size = tuple(self.rrc.size)          # (H, W)
        self.center = None
        if aug.scale is None:
            self.rrc = None
            self.center = EvalSampleTransform(img_size, aug.test_crop, aug.interpolation)
        # timm's RandAugment alone (the recipe): run it on arrays with the same draws (focalnet.data.randaugment).
        ops = secondary.transforms
        self.array_augment = None
        if len(ops) == 1 and isinstance(ops[0], _auto_augment.RandAugment):
            self.array_augment = fast_rand_augment(ops[0])
            warm_up()
        elif not ops:
            self.array_augment = _identity

    def _interpolation(self):
        interp = self.rrc.interpolation
        # timm draws the interpolation after the crop box when it is 'random'; keep that RNG order.
        return random.choice(interp) if isinstance(interp, list | tuple) else interp  # a torchvision mode

    def crop(self, img: Image.Image) -> np.ndarray:
        """Opened image -> (S, S, 3) uint8 crop: decode (reduced by libjpeg when the crop allows) + resize."""
        if self.rrc is None:
            return self.center(img).permute(1, 2, 0).numpy()  # (S, S, 3) view of PIL's pixels
        # Crop box on the full-resolution grid (PIL knows the size from the header, before decoding).
        top, left, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        interp = self._interpolation()
        full_w, full_h = img.size
        out_h, out_w = self.size
        reduce = 1
        while self.jpeg_draft and reduce < 8 and h >= 2 * reduce * out_h and w >= 2 * reduce * out_w:
            reduce *= 2
        pixels = _decode_jpeg_rgb(img) if reduce == 1 else None
        if pixels is not None:
            sx = sy = 1.0
        else:
            draft = (math.ceil(full_w / reduce), math.ceil(full_h / reduce)) if reduce > 1 else None
            rgb = decode_rgb(img, draft)
            sx, sy = rgb.size[0] / full_w, rgb.size[1] / full_h  # 1, 1/2, 1/4 or 1/8 after a draft
            with warnings.catch_warnings():  # PIL's buffer is read-only; nothing writes into it
                warnings.simplefilter("ignore", UserWarning)
                # (1, 3, H', W') uint8 view of PIL's (H', W', 3) pixels
                pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8)[None]).permute(0, 3, 1, 2)
        top, left = int(top * sy), int(left * sx)
        h, w = max(int(round(h * sy)), 1), max(int(round(w * sx)), 1)
        return self._resize_crop(pixels, top, left, h, w, interp)

    def crop_array(self, arr: np.ndarray) -> np.ndarray:
        """Decoded (H, W, 3) uint8 image (the FFCV path) -> (S, S, 3) uint8 crop: the draws and the resize
        kernel of :meth:`crop`, on full-resolution pixels. ``arr`` is only read."""
        if self.rrc is None:
            return self.center(Image.fromarray(arr)).permute(1, 2, 0).numpy()
        with warnings.catch_warnings():  # a read-only input is only read
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(arr[None]).permute(0, 3, 1, 2)  # (1, 3, H, W) channels-last view
        top, left, h, w = self.rrc.get_params(pixels[0], self.rrc.scale, self.rrc.ratio)
        return self._resize_crop(pixels, top, left, h, w, self._interpolation())

    def _resize_crop(self, pixels: torch.Tensor, top: int, left: int, h: int, w: int, interp) -> np.ndarray:
        """(1, 3, H, W) uint8 channels-last pixels -> their (h, w) box at (top, left) resized to (S, S, 3).

        torch's native uint8 antialiased kernel (what torchvision's resize calls for uint8) on a
        channels-last (1, 3, h, w) copy of the crop: channels-last in, channels-last out, so the HWC view
        of the result needs no copy. (A strided crop view, or a numpy-made copy whose strides torch does
        not label channels-last, make it resize in NCHW and copy back: 2.5x slower.)
        """
        out_h, out_w = self.size
        crop = pixels[:, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)  # (1,3,h,w)
        x = F.interpolate(crop, size=(out_h, out_w), mode=_TORCH_MODES[interp], antialias=interp != _NEAREST,
                          **({} if interp == _NEAREST else {"align_corners": False}))
        return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())  # (S, S, 3): already contiguous, no copy

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.augment_array(self.crop(img))).permute(2, 0, 1)  # (3, S, S) view

    def augment_array(self, arr: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 crop -> flip + RandAugment -> (S, S, 3) uint8 (writable; ``arr`` is not modified).

        The flip draws ``torch.rand(1) < p`` as torchvision's RandomHorizontalFlip does. RandAugment runs on
        the array (:mod:`focalnet.data.randaugment`, timm's draws); other secondary transforms (ColorJitter) on PIL.
        """
        src = arr
        for flip in self.flips:
            if torch.rand(1) < flip.p:
                arr = _hflip(arr)
        if self.array_augment is not None:
            out = self.array_augment(arr)
        else:
            out = np.asarray(self.secondary(Image.fromarray(np.ascontiguousarray(arr))), dtype=np.uint8)
        if out is src or not out.flags.writeable or not out.flags.c_contiguous:
            out = np.array(out)  # never hand out the caller's buffer or PIL's read-only one
        return out


def _decode_jpeg_rgb(img: Image.Image) -> torch.Tensor | None:
    """(1, 3, H, W) uint8 (channels-last memory) from torchvision's libjpeg-turbo decoder, or None.

    For full-size decodes of plain RGB JPEGs opened from memory: the same pixels as PIL's decoder (same
    library, checked in tests) in ~70% of the time, because PIL's chunked ``load`` plus the copy into a
    numpy array is skipped. CMYK/grey/other formats and drafts (DCT downscaling) stay with PIL.
    """
    if img.format != "JPEG" or img.mode != "RGB" or not isinstance(getattr(img, "fp", None), io.BytesIO):
        return None
    data = torch.frombuffer(img.fp.getbuffer(), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # torchvision announces a future move of its image I/O
            warnings.simplefilter("ignore")
            return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)[None]
    except RuntimeError as e:  # truncated or corrupt: skipped and counted like PIL's errors
        raise BadImage(f"decode_jpeg: {str(e).splitlines()[-1][:200]}") from e


def _hflip(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> a new, contiguous, mirrored array. torch's flip kernel: numpy's copy of a
    negative-stride view of 3-byte pixels is ~30x slower (0.33 vs 0.01 ms at 224 px)."""
    with warnings.catch_warnings():  # a read-only input (PIL's buffer) is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).flip(1).numpy()


def _identity(arr: np.ndarray) -> np.ndarray:
    return arr


class EvalSampleTransform:
    """Opened image -> uint8 (3, S, S), the official eval transform, pixel for pixel.

    ``test_crop=True``: resize the short side to ``int(256 / 224 * S)`` then center-crop S (the
    official ``TEST.CROP``); ``test_crop=False`` (384 fine-tunes): resize straight to (S, S).
    PIL decodes the whole image and resizes it as the official code (torchvision's ``Resize`` on PIL) does.
    No JPEG ``draft`` here: libjpeg's DCT-domain downscaling is a different filter (up to ~45 grey levels
    off on a 200x150 JPEG evaluated at 32 px), and evaluation must reproduce the official numbers.
    """

    def __init__(self, img_size: int, test_crop: bool = True, interpolation: str = "bicubic"):
        self.size, self.test_crop = int(img_size), bool(test_crop)
        self.interp = str_to_interp_mode(interpolation if interpolation != "random" else "bicubic")
        self.resize_to = int(256 / 224 * self.size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        rgb = decode_rgb(img)
        if self.test_crop:
            rgb = TF.center_crop(TF.resize(rgb, self.resize_to, interpolation=self.interp), [self.size])
        else:
            rgb = TF.resize(rgb, [self.size, self.size], interpolation=self.interp)
        return _pil_to_uint8_tensor(rgb)


class BatchFinisher:
    """uint8 (B, 3, H, W) batch + per-sample seeds -> normalized float32 batch with per-sample RandomErasing, on
    the batch's device (the training GPU, or the CPU).

    Loaders hand batches over as uint8 (a quarter of float32's bytes across PCIe); the engine finishes them where
    they are trained on (:class:`focalnet.data.loaders.DeviceLoader`), as timm's ``PrefetchLoader`` does. Erasing is timm's
    ``RandomErasing`` under a per-sample seed derived from the sample's augmentation seed: on the CPU the same
    draws, hence the same batches bit for bit, as when the loader workers finished every sample; on a GPU the
    rectangles are the same and the noise comes from the device's generator (same distribution). The caller's
    random streams (Python, torch CPU and the device's) are left as they were.
    """

    def __init__(self, aug_cfg=None, *, train: bool, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)
        aug = parse(AugConfig, aug_cfg, "aug")
        self.erase = None
        if train and aug.reprob > 0:
            self.erase = RandomErasing(probability=aug.reprob, mode=aug.remode, max_count=aug.recount, device="cpu")
        self._on_device: dict[torch.device, tuple] = {}  # device -> (scale, shift, eraser) there

    def _constants(self, device: torch.device) -> tuple:
        if device not in self._on_device:
            eraser = None
            if self.erase is not None:
                eraser = copy.copy(self.erase)
                eraser.device = device  # timm draws the erasing noise on this device
            self._on_device[device] = (self.scale.to(device), self.shift.to(device), eraser)
        return self._on_device[device]

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | None) -> torch.Tensor:
        """``images``: uint8 (B, 3, H, W) on any device; ``seeds``: the samples' augmentation seeds (Python ints,
        needed only for erasing). Returns float32 (B, 3, H, W) on the same device."""
        scale, shift, eraser = self._constants(images.device)
        x = torch.addcmul(shift, images, scale)  # (x / 255 - mean) / std, in float32
        if eraser is not None:
            with _rng_kept(images.device):
                for i, seed in enumerate(seeds):
                    erase_seed = (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & ((1 << 63) - 1)  # independent of the crop
                    random.seed(erase_seed)  # the rectangles (timm draws them from Python's generator)
                    torch.default_generator.manual_seed(erase_seed)  # the noise on the CPU
                    if images.device.type == "cuda":
                        torch.cuda.default_generators[images.device.index].manual_seed(erase_seed)
                    eraser(x[i])
        return x


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Restore Python's, torch's CPU and ``device``'s generators on exit (no host-device sync: a CUDA
    generator's state is its seed and offset, kept on the host)."""
    py_state, cpu_state = random.getstate(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
