"""Benchmarks of pclr: ``python -m benchmarks.run`` (the sweep) and ``pytest benchmarks/ --benchmark-only``."""
