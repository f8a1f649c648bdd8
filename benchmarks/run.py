"""``python -m benchmarks.run``: the same command as ``pclr bench`` (the harness is the package :mod:`pclr.bench`).

Examples::

    python -m benchmarks.run --preset smoke            # CPU, seconds: exercises every code path, measures nothing
    python -m benchmarks.run                           # GPU: the default sweep, a few minutes
    python -m benchmarks.run --preset gpu-check        # GPU: only the target point and the decode sweep
    python -m benchmarks.run --preset full --modes fwd,fwdbwd --providers base,pclr-triton-fused,paper
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from pclr.bench.cli import main as _main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the sweep with ``argv`` (default: the command line); returns the exit code."""
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
