"""Pixel fidelity of every decode path against the official pipelines, and what JPEG draft decoding buys.

    python scripts/bench_pixels.py                                       # 4 sizes x 12 generated q90 JPEGs
    python scripts/bench_pixels.py --sizes 500x375,3000x2000 --images 24 --skip-ffcv

References, run here: torchvision ``Resize(int(256/224*S), bicubic) + CenterCrop(S)`` on the full PIL decode
(microsoft/FocalNet's eval transform) and timm's ``RandomResizedCropAndInterpolation`` on the full PIL decode
(its training crop). Differences are mean / max |difference| in uint8 grey levels (0-255). Per image size:
* eval (folder path, the default) and eval after a draft decode (libjpeg's DCT-domain 1/2..1/8 downscaling,
  PIL ``draft``: what evaluation did before it was made exact);
* training crops with ``data.jpeg_draft=false`` (default) and ``true`` (same crop draws), and the CPU time per
  crop (decode + crop + resize, one thread; both timed per crop in alternating order) as a ratio to the full
  decode (the 500x375 row, where draft never applies, shows the measurement noise);
* the FFCV eval path for several ``write_ffcv.py`` settings (``--skip-ffcv`` to leave it out), and FFCV's JPEG
  decoder alone against PIL's on the same bytes.
Times are only comparable within one invocation (shared machines).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from focalnet.data import build_loaders  # noqa: E402
from focalnet.data.imagegen import natural_image  # noqa: E402
from focalnet.data.transforms import EvalSampleTransform, TrainSampleTransform, decode_rgb, open_image, seeded  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def draft_eval(img: Image.Image, size: int) -> torch.Tensor:
    """The eval transform after a draft decode: libjpeg keeps at least the resize target, then PIL resizes."""
    resize_to = int(256 / 224 * size)
    w, h = img.size
    short = min(w, h)
    rgb = decode_rgb(img, (math.ceil(w * resize_to / short), math.ceil(h * resize_to / short)))
    rgb = TF.center_crop(TF.resize(rgb, resize_to, interpolation=T.InterpolationMode.BICUBIC), [size])
    return torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)


def absdiff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def stat(diffs: list[torch.Tensor]) -> str:
    d = torch.cat([x.float().flatten() for x in diffs])
    return f"{d.mean():.2f} / {int(d.max())}"


def to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Normalized float batch -> the uint8 pixels it was made from (exact: float32 error << 0.5 grey levels)."""
    return ((batch * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"|{'|'.join(head)}|")
    print(f"|{'|'.join('---' for _ in head)}|")
    for row in rows:
        print(f"|{'|'.join(row)}|")
    print(flush=True)


def folder_rows(paths_by_size: dict[str, list[str]], size: int, crops: int, rounds: int) -> list[tuple[str, ...]]:
    official_eval = T.Compose([T.Resize(int(256 / 224 * size), interpolation=T.InterpolationMode.BICUBIC),
                               T.CenterCrop(size), T.PILToTensor()])
    aug = OmegaConf.create({"auto_augment": None, "color_jitter": None, "interpolation": "bicubic", "hflip": 0.0})
    exact_tf, draft_tf = TrainSampleTransform(aug, size), TrainSampleTransform(aug, size, jpeg_draft=True)
    rows = []
    for spec, paths in paths_by_size.items():
        blobs = [open(path, "rb").read() for path in paths]
        ev_exact, ev_draft, tr_exact, tr_draft = [], [], [], []
        for path, blob in zip(paths, blobs):
            ref = official_eval(Image.open(path).convert("RGB"))
            ev_exact.append(absdiff(EvalSampleTransform(size)(open_image(blob)), ref))
            ev_draft.append(absdiff(draft_eval(open_image(blob), size), ref))
            for c in range(crops):
                with seeded(c):  # timm's draws, PIL crop + resize of the full decode
                    timm_crop = torch.from_numpy(np.array(exact_tf.rrc(Image.open(path).convert("RGB"))))
                for tf, out in ((exact_tf, tr_exact), (draft_tf, tr_draft)):
                    with seeded(c):
                        out.append(absdiff(tf(open_image(blob)), timm_crop.permute(2, 0, 1)))
        # CPU time of this single-threaded process (robust on a busy machine), each crop timed with both
        # transforms back to back in alternating order; per transform, the median over rounds of the mean.
        times = {False: [], True: []}
        for r in range(rounds):
            total = {False: 0.0, True: 0.0}
            for c, blob in enumerate(blobs * crops):
                for draft in ((False, True) if (c + r) % 2 == 0 else (True, False)):
                    tf = draft_tf if draft else exact_tf
                    with seeded(c):
                        start = time.process_time()
                        tf(open_image(blob))
                        total[draft] += time.process_time() - start
            for draft, seconds in total.items():
                times[draft].append(seconds / (len(blobs) * crops) * 1e3)
        ms_exact, ms_draft = statistics.median(times[False]), statistics.median(times[True])
        rows.append((spec, stat(ev_exact), stat(ev_draft), stat(tr_exact), stat(tr_draft), f"{ms_exact:.1f}",
                     f"{ms_draft:.1f}", f"{ms_exact / ms_draft:.2f}x"))
    return rows


# FFCV's writer stores a sample in one 8 MB page (DatasetWriter page_size): raw images above that fail to write.
FFCV_PAGE_BYTES = 8 << 20


def ffcv_rows(paths: list[str], tmp: str, size: int) -> list[tuple[str, ...]]:
    """FFCV eval batches vs the folder path's (= the official transform) for several write_ffcv.py settings, on
    the images whose raw pixels fit one FFCV page."""
    from scripts.write_ffcv import main as write_ffcv

    root = os.path.join(tmp, "ffcv_src")
    os.makedirs(os.path.join(root, "val", "n00000000"))
    for path in paths:
        with Image.open(path) as img:
            if img.width * img.height * 3 <= FFCV_PAGE_BYTES:
                os.symlink(path, os.path.join(root, "val", "n00000000", os.path.basename(path)))
    common = {"root": root, "num_classes": 1, "img_size": size, "batch_size": 8, "num_workers": 1,
              "train_split": "val", "val_split": "val", "val_count": 0, "persistent_workers": False}
    folder = [x for x, _ in build_loaders(OmegaConf.create({**common, "name": "folder"})).val]
    settings = {
        "raw pixels, full size (`--compress-probability 0 --max-resolution 0`)": ("0", "0"),
        "JPEG q90, full size (`--compress-probability 1 --max-resolution 0`)": ("1", "0"),
        "raw pixels, longest side 512 (`--compress-probability 0`)": ("0", "512"),
        "JPEG q90, longest side 512 (`--compress-probability 1`)": ("1", "512"),
    }
    rows = []
    for i, (name, (prob, res)) in enumerate(settings.items()):
        out = os.path.join(tmp, f"ffcv{i}")
        write_ffcv(["data=folder", f"data.root={root}", "data.train_split=val", "--out-dir", out, "--splits", "val",
                    "--compress-probability", prob, "--max-resolution", res, "--jpeg-quality", "90",
                    "--num-workers", "1"])
        cfg = {**common, "name": "imagenet1k_ffcv", "root": out, "train_path": "val.beton", "val_path": "val.beton"}
        ffcv = [x for x, _ in build_loaders(OmegaConf.create(cfg)).val]
        rows.append((name, stat([absdiff(to_uint8(a), to_uint8(b)) for a, b in zip(ffcv, folder)])))
    return rows


def ffcv_decoder_row(paths: list[str]) -> tuple[str, ...]:
    """FFCV's libjpeg-turbo decode (its imdecode, as our FFCV loader calls it) vs PIL's, on the same bytes
    (the bytes FFCV's writer stores: OpenCV re-encodes the decoded image at the given quality)."""
    import cv2
    from ffcv.libffcv import imdecode

    diffs = []
    for path in paths:
        arr = np.asarray(Image.open(path).convert("RGB"))
        h, w = arr.shape[:2]
        enc = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), 90])[1]
        enc = enc.reshape(-1)
        dst = np.zeros((h, w, 3), np.uint8)
        imdecode(enc, dst, h, w, h, w, 0, 0, 1, 1, False, False)
        pil = np.asarray(Image.open(io.BytesIO(enc.tobytes())).convert("RGB"))
        diffs.append(absdiff(torch.from_numpy(dst), torch.from_numpy(pil)))
    return ("FFCV decoder vs PIL on the same q90 JPEG bytes (full-size pixels, before any resize)", stat(diffs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="500x375,1024x768,2048x1536,3000x2000")
    p.add_argument("--images", type=int, default=12, help="JPEGs per size")
    p.add_argument("--crops", type=int, default=4, help="random training crops per image")
    p.add_argument("--rounds", type=int, default=3, help="alternated timing rounds")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--skip-ffcv", action="store_true")
    p.add_argument("--dir", default=None, help="where to write the JPEGs (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        class_dir = os.path.join(tmp, "val", "n00000000")
        os.makedirs(class_dir)
        paths_by_size = {}
        for spec in args.sizes.split(","):
            w, h = (int(v) for v in spec.split("x"))
            rng = np.random.default_rng(w * h)
            paths_by_size[spec] = [os.path.join(class_dir, f"{spec}_{i:03d}.JPEG") for i in range(args.images)]
            for i, path in enumerate(paths_by_size[spec]):
                natural_image(rng, (w, h), label=i).save(path, "JPEG", quality=90)
        print(f"{args.images} generated q90 JPEGs per size; {args.img_size} px; 1 torch thread\n")
        table(("JPEG size", "eval vs official", "eval after draft vs official", "train crop vs timm",
               "train crop (jpeg_draft) vs timm", "CPU ms/crop", "CPU ms/crop (jpeg_draft)", "jpeg_draft speed-up"),
              folder_rows(paths_by_size, args.img_size, args.crops, args.rounds))
        if not args.skip_ffcv:
            every = [p for paths in paths_by_size.values() for p in paths]
            rows = ffcv_rows(every, tmp, args.img_size)
            rows.append(ffcv_decoder_row(every))
            table(("FFCV eval path (sizes above up to 8 MB of raw pixels) vs the folder path = official",
                   "grey levels"), rows)
    print("grey levels: mean / max |difference| in uint8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
