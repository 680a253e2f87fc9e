"""Where the package's parts live, installed or in a source checkout.

pip installs the repository's top-level ``data/`` folder as ``focalnet/data`` and ``conf/`` as
``focalnet/conf`` (``package-dir`` in pyproject.toml), so no top-level module named ``data`` lands in
site-packages, where a user's own ``data/`` folder would shadow it. In a source checkout the two folders
stay where they are: :func:`use_checkout_data` makes ``import focalnet.data`` load this checkout's ``data/``,
ahead of any installed copy (e.g. another checkout installed in editable mode in the same environment).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent
IN_CHECKOUT = not (PACKAGE_DIR / "data").is_dir() and (_CHECKOUT / "data" / "__init__.py").is_file()
# The Hydra config tree: conf/ of the checkout, or the copy packaged inside focalnet/.
CONF_DIR = _CHECKOUT / "conf" if IN_CHECKOUT else PACKAGE_DIR / "conf"


class _CheckoutDataFinder:
    """Meta-path finder for exactly one name, ``focalnet.data``: the checkout's ``data/`` package."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name != "focalnet.data":
            return None
        data_dir = _CHECKOUT / "data"
        return importlib.util.spec_from_file_location(name, data_dir / "__init__.py",
                                                      submodule_search_locations=[str(data_dir)])


def use_checkout_data() -> None:
    """Install the finder (idempotent); a no-op for an installed package, which has ``focalnet/data``."""
    if IN_CHECKOUT and _CheckoutDataFinder not in sys.meta_path:
        sys.meta_path.insert(0, _CheckoutDataFinder)
