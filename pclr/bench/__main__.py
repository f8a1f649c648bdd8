"""``python -m pclr.bench``: the same command as ``pclr bench``."""
from __future__ import annotations

import sys

from pclr.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
