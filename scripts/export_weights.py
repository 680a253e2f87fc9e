"""Write a checkpoint's weights in another ecosystem's format, to publish a trained model.

    python scripts/export_weights.py outputs/run/checkpoints/best.pt --to transformers --out focalnet-tiny-ft
    python scripts/export_weights.py outputs/run/checkpoints/best.pt --to timm --weights ema
    python scripts/export_weights.py hf-hub:microsoft/focalnet-tiny --to official --out focalnet_tiny_srf.pth

CHECKPOINT is any weight SOURCE (our run checkpoints with ``--weights model|ema``, official/timm/transformers
files and directories, ``hf-hub:...``, URLs). The model is the one the run's stored config names (``--model``
overrides; otherwise the registered FocalNet whose parameter shapes the weights have), loaded strictly first.

- ``--to official``: a microsoft/FocalNet ``.pth`` (``{"model": state_dict}``), default ``<stem>_official.pth``;
- ``--to timm``: a directory in timm's hub layout (``config.json`` + ``model.safetensors``), default
  ``<stem>_timm/``: ``timm.create_model("local-dir:DIR", pretrained=True)``, or upload it and use ``hf-hub:``;
- ``--to transformers``: ``config.json`` + ``model.safetensors``, default ``<stem>_transformers/``:
  ``transformers.FocalNetForImageClassification.from_pretrained(DIR)``.

Every output also loads back here (``focalnet.create_model(NAME, pretrained=OUT)``). An existing output is
kept unless ``--force``. Exit 2 with one line on a bad checkpoint, model or output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import focalnet  # noqa: E402
from focalnet.models.checkpoint import CheckpointError, model_config_for, read_weights  # noqa: E402
from focalnet.models.export import FORMATS, export_weights  # noqa: E402

HOW_TO_LOAD = {
    "official": "torch.load('{out}', weights_only=True)['model'] (official names); here: "
                "focalnet.create_model('{name}', pretrained='{out}')",
    "timm": "timm.create_model('local-dir:{out}', pretrained=True)",
    "transformers": "transformers.FocalNetForImageClassification.from_pretrained('{out}')",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a weight SOURCE (our .pt, .pth, dir, hf-hub:...)")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("--weights", default="model", choices=("model", "ema"),
                        help="our run checkpoints: the model or its EMA weights")
    parser.add_argument("--model", help="registered model name (default: the run's config, else detected)")
    parser.add_argument("--out", help="output file (official) or directory (timm, transformers)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    try:
        weights = read_weights(args.checkpoint, args.weights, variant=args.model)
        model_cfg, how = model_config_for(weights, {"name": args.model, "kwargs": {}} if args.model else None)
        if model_cfg.get("library", "focalnet") != "focalnet":
            raise CheckpointError(f"{args.checkpoint}: a {model_cfg['library']} model; export FocalNet/DAT models")
        head = weights.official().get("head.weight")
        num_classes = model_cfg.get("num_classes", head.shape[0] if head is not None else 0)
        model = focalnet.create_model(model_cfg["name"], num_classes=num_classes, **(model_cfg.get("kwargs") or {}))
        report = focalnet.load_checkpoint(model, weights, head="strict")
        stem = Path(str(args.checkpoint).rstrip("/")).stem if not str(args.checkpoint).startswith("hf-hub:") \
            else model_cfg["name"]
        out = Path(args.out or (f"{stem}_official.pth" if args.to == "official" else f"{stem}_{args.to}"))
        export_weights(model.eval(), args.to, out, overwrite=args.force)
    except (CheckpointError, ValueError) as e:
        print(f"export_weights: {e}", file=sys.stderr)
        return 2
    print(f"{model_cfg['name']} ({how}; {report}) -> {out}")
    print("load it with: " + HOW_TO_LOAD[args.to].format(out=out, name=model_cfg["name"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
