"""``python -m benchmarks.run``: the same sweep as ``pclr bench`` (the logic lives in :mod:`pclr.bench`).

Examples::

    python -m benchmarks.run --preset smoke            # CPU, seconds: exercises every code path, measures nothing
    python -m benchmarks.run                           # GPU: the default sweep, a few minutes
    python -m benchmarks.run --preset full --modes fwd,fwdbwd --providers base,pclr-triton-fused,paper
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from pclr.bench import main as _main


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
