"""Download weights into the standard caches now, so later runs (offline compute nodes) find them.

    python scripts/fetch_weights.py focalnet_tiny_srf                 # a variant's published weights (true)
    python scripts/fetch_weights.py focalnet_large_fl3:in22k dat_tiny # MODEL:TAG
    python scripts/fetch_weights.py hf-hub:microsoft/focalnet-tiny https://host/file.pth

Each SOURCE is one that ``model.pretrained``, ``trainer.init_from``, ``eval.py checkpoint=`` and
``focalnet.create_model(name, pretrained=...)`` accept; a registered model name (optionally ``:TAG``) stands for
its published weights. Hub repositories go to huggingface_hub's cache (``HF_HOME``/``HF_HUB_CACHE``), URLs to
torch.hub's (``TORCH_HOME``): run the training with the same variables (on a shared file system) and
``HF_HUB_OFFLINE=1`` to keep it off the network. Prints where each source went; exit 2 (one line per
source that failed) when any cannot be fetched.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import focalnet  # noqa: E402
from focalnet.models.sources import CheckpointError, hub_cache_dir, resolve, torch_hub_dir  # noqa: E402


def parse_source(arg: str) -> tuple[object, str | None]:
    """``MODEL[:TAG]`` -> (tag or True, MODEL); anything else is a SOURCE as it is."""
    name, _, tag = arg.partition(":")
    if name in focalnet.list_models():
        return (tag or True), name
    return arg, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="MODEL[:TAG], hf-hub:ORG/REPO[/FILE][@REV], URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    failed = 0
    for arg in args.sources:
        source, variant = parse_source(arg)
        try:
            found = resolve(source, variant=variant)
        except CheckpointError as e:
            print(f"fetch_weights: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{arg}: {found.source} -> {found.weights}" + (" (+ config.json)" if found.config else ""))
    print(f"caches: hub {hub_cache_dir()}, urls {torch_hub_dir()}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
