"""What a FocalNet looks at: the modulator magnitude and the per-level gates of each stage, as a PNG.

    python scripts/visualize_modulation.py CHECKPOINT IMAGE [IMAGE ...] -o modulation.png
    python scripts/visualize_modulation.py outputs/<run>/checkpoints/best.pt --val 4      # 4 val images
    python scripts/visualize_modulation.py best.pt --val 4 --data-root /data/imagenet    # the dataset moved
    python scripts/visualize_modulation.py focalnet_tiny_srf.pth cat.jpg --model focalnet_tiny_srf --img-size 224

One row per image: the input (with the predicted class and its probability), then for every stage the
maps of the stage's last block (``--block`` picks another): ``|m|``, the modulator magnitude
``mean_c |h(sum_l g_l * z_l)|`` (the paper's visualization of where context is gathered), and the gates
``g_0 .. g_{L-1}`` of the L focal levels plus ``g_glob`` of the global level. Gates are the raw linear
outputs of ``f`` (no sigmoid in FocalNet), so they are drawn on a diverging scale centred at 0.

The model comes from the checkpoint's stored config (our run checkpoints), or from ``--model`` /
``--num-classes`` (official microsoft/FocalNet ``.pth`` or timm files, loaded by ``focalnet.load_checkpoint``).
Images are prepared like validation images (``data.transforms.EvalSampleTransform``). The maps are recorded
through :class:`focalnet.FocalModulation`'s ``store_maps`` switch, only for this forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import focalnet  # noqa: E402
from data.transforms import BatchFinisher, EvalSampleTransform, open_image  # noqa: E402
from focalnet.engine.checkpointing import load_file  # noqa: E402
from focalnet.engine.pictures import draw_modulation, record_maps, spread_over_classes  # noqa: E402


def build_model(ckpt_path: str, model_name: str | None, num_classes: int | None, key: str):
    """(model with weights, its stored run config or {}) for a checkpoint in any supported format."""
    obj = load_file(ckpt_path)  # weights_only=True: a malicious pickle is refused
    run_cfg = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else {}
    if model_name is None:
        if not run_cfg:
            raise SystemExit(f"{ckpt_path} carries no run config: pass --model NAME (and --num-classes N)")
        mcfg = run_cfg["model"]
        if mcfg.get("library", "focalnet") != "focalnet":
            raise SystemExit(f"{ckpt_path}: model.library={mcfg.get('library')} has no focal modulation")
        model_name, kwargs = mcfg["name"], dict(mcfg.get("kwargs") or {})
        num_classes = num_classes or mcfg["num_classes"]
    else:
        kwargs = {}
    model = focalnet.create_model(model_name, num_classes=num_classes or 1000, **kwargs)
    if key == "ema" and not (isinstance(obj, dict) and obj.get("ema") is not None):
        raise SystemExit(f"{ckpt_path} has no EMA weights (trained with trainer.ema_decay=null)")
    focalnet.load_checkpoint(model, obj, key=key)
    return model.eval(), run_cfg


def val_images(run_cfg: dict, count: int, data_root: str | None = None) -> list[tuple[str, int]]:
    """``count`` validation images of the run's dataset, spread over the classes (first of each class first).

    The dataset is read from ``data_root`` when given, else from the root stored in the checkpoint. Nothing is
    ever written into a directory named by a checkpoint (a file from elsewhere could name any path): the digits
    are written, when missing, only into ``data_root`` or the cache (``$FOCALNET_CACHE``, ~/.cache/focalnet).
    """
    import data  # noqa: F401  (registers the config resolvers)
    from data.folder import dataset_samples

    if not run_cfg:
        raise SystemExit("--val needs a run checkpoint (it names the dataset); pass image paths instead")
    dcfg = dict(run_cfg["data"])
    if data_root:
        dcfg["root"] = data_root
    if str(dcfg["name"]).startswith("digits"):
        from data.digits import materialize, read_meta

        if not data_root and read_meta(os.path.expanduser(str(dcfg["root"]))) is None:
            dcfg["root"] = os.path.join(os.path.expanduser(os.environ.get("FOCALNET_CACHE", "~/.cache/focalnet")),
                                        "digits")
        dcfg["root"] = materialize(dcfg["root"], store_size=int(dcfg.get("store_size", 64)),
                                   val_fraction=float(dcfg.get("val_fraction", 0.2)),
                                   jpeg_quality=int(dcfg.get("jpeg_quality", 95)))
        dcfg["name"] = "digits"
    from omegaconf import OmegaConf

    _, val, _ = dataset_samples(OmegaConf.create(dcfg))
    return [val[i] for i in spread_over_classes(val, count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="our run checkpoint (last.pt/best.pt), an official .pth or a timm file")
    p.add_argument("images", nargs="*", help="image files (any format PIL reads)")
    p.add_argument("--val", type=int, default=0, metavar="N", help="also N validation images of the run's dataset")
    p.add_argument("--data-root", help="where the run's dataset is (default: the root stored in the checkpoint; "
                                       "never written to: the digits are written only here or to the cache)")
    p.add_argument("-o", "--out", type=Path, help="PNG to write (default: modulation.png next to the checkpoint's "
                                                  "run directory)")
    p.add_argument("--model", help="model name when the checkpoint has no run config (e.g. focalnet_tiny_srf)")
    p.add_argument("--num-classes", type=int, help="head size when the checkpoint has no run config")
    p.add_argument("--img-size", type=int, help="input resolution (default: the run's data.img_size, else 224)")
    p.add_argument("--weights", choices=("model", "ema"), default="model", help="which weights of a run checkpoint")
    p.add_argument("--block", type=int, default=-1, help="block index inside each stage (default: the last)")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    model, run_cfg = build_model(args.checkpoint, args.model, args.num_classes, args.weights)
    samples: list[tuple[str, int | None]] = [(path, None) for path in args.images]
    if args.val:
        samples += val_images(run_cfg, args.val, args.data_root)
    if not samples:
        p.error("give image paths and/or --val N")
    size = args.img_size or int(run_cfg.get("data", {}).get("img_size", 224))
    aug = run_cfg.get("aug", {})
    prepare = EvalSampleTransform(size, bool(aug.get("test_crop", True)), aug.get("interpolation") or "bicubic")
    images = torch.stack([prepare(open_image(path)) for path, _ in samples])  # (B, 3, S, S) uint8
    batch = BatchFinisher(train=False)(images, None)  # normalized float, as in validation
    probs, maps = record_maps(model, batch, args.block)
    out = args.out or Path(args.checkpoint).resolve().parent.parent / "modulation.png"
    names = None
    if run_cfg and str(run_cfg.get("data", {}).get("name", "")).startswith("digits"):
        names = [str(i) for i in range(10)]
    draw_modulation([(img, label) for img, (_, label) in zip(images, samples)], maps, probs, out, names)
    for (path, label), pr in zip(samples, probs):
        print(f"{path}: predicted {int(pr.argmax())} ({100 * float(pr.max()):.1f}%)"
              + ("" if label is None else f", true {label}"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
