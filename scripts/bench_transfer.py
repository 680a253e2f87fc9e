"""Host-to-device bytes per training step, before and after the uint8 handover, for the folder, FFCV and synthetic
paths: counted from the tensors handed to ``.to(device)``, not computed from shapes.

Before: the loader workers finished (normalized, erased) every sample, so the training process copied float32
batches to the device (the finished batch :class:`focalnet.data.loaders.DeviceLoader` produces, which equals that batch bit
for bit: ``tests/test_gpu_path.py``). After: the loaders hand over uint8 batches and ``DeviceLoader`` finishes
them on the device (its ``bytes_to_device`` counter). Labels (int64) are counted in both.

    python scripts/bench_transfer.py                                  # batch 128, 224 px: the ImageNet recipe
    python scripts/bench_transfer.py --batch-size 8 --img-size 32 --steps 2 --skip-ffcv
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

from focalnet.data import build_loaders  # noqa: E402
from focalnet.data.imagegen import write_image_folder  # noqa: E402
from focalnet.data.loaders import DeviceLoader  # noqa: E402
from focalnet.schema import AugConfig  # noqa: E402


def bytes_per_step(loader, steps: int) -> tuple[float, float]:
    """(before, after) bytes per step over the first ``steps`` batches of epoch 0."""
    loader.set_epoch(0)
    device_loader = DeviceLoader(loader, "cpu")
    before = n = 0
    for images, targets in device_loader:
        before += images.nbytes + targets.nbytes  # the finished float32 batch: what was copied before
        n += 1
        if n == steps:
            break
    return before / n, device_loader.bytes_to_device / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dir", help="reuse/generate the image folder here (default: a temp dir)")
    p.add_argument("--skip-ffcv", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = args.dir or tempfile.mkdtemp(prefix="bench_transfer_")
    if not os.path.isdir(os.path.join(root, "train")):
        per_class = -(-args.batch_size * args.steps // 4)
        write_image_folder(os.path.join(root, "train"), 4, per_class, size=(320, 240))
        write_image_folder(os.path.join(root, "val"), 4, 1, size=(320, 240), seed=1)
    aug = AugConfig()  # aug=deit: conf/aug/deit.yaml takes every value from AugConfig
    common = dict(num_classes=4, img_size=args.img_size, batch_size=args.batch_size, num_workers=1)
    paths = {"data=imagenet1k (folder)": lambda: build_loaders(OmegaConf.create(
        {**common, "name": "folder", "root": root, "val_count": 0}), aug).train}
    if not args.skip_ffcv:
        ffcv_dir = os.path.join(root, "ffcv")
        if not os.path.isfile(os.path.join(ffcv_dir, "train.beton")):
            from scripts.write_ffcv import main as write_ffcv

            write_ffcv(["data=folder", f"data.root={root}", "--out-dir", ffcv_dir, "--max-resolution", "320",
                        "--num-workers", "1"])
        paths["data=imagenet1k_ffcv"] = lambda: build_loaders(OmegaConf.create(
            {**common, "name": "imagenet1k_ffcv", "root": ffcv_dir, "train_path": "train.beton",
             "val_path": "val.beton"}), aug).train
    paths["data=synthetic"] = lambda: build_loaders(OmegaConf.create(
        {**common, "name": "synthetic", "train_size": args.batch_size * args.steps, "val_size": 4}), aug).train

    print(f"\nHost-to-device bytes per step, batch {args.batch_size}, {args.img_size} px (images + int64 labels)\n")
    print("| path | before (float32 handover) | after (uint8 handover) | after / before |")
    print("|---|---:|---:|---:|")
    for name, make in paths.items():
        loader = make()
        before, after = bytes_per_step(loader, args.steps)
        if hasattr(loader, "close"):
            loader.close()
        print(f"| {name} | {before:,.0f} B ({before / 2**20:.1f} MiB) | {after:,.0f} B ({after / 2**20:.1f} MiB) | "
              f"{after / before:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
