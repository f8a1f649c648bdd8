"""pytest-benchmark microbenchmarks of every provider on identical inputs: ``pytest benchmarks/ --benchmark-only``.

Not part of the default test run (pyproject's testpaths is ``tests``). On CPU the shapes are small and the numbers
are a smoke of the code paths, not a performance figure; on a GPU the target point is used.
Compare providers with ``--benchmark-group-by=group`` (the default here: one group per mode and shape).
"""
from __future__ import annotations

import pytest
import torch

from pclr import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":  # the target point of the fused kernels
    POINT = {"dtype": "bf16", "d_in": 4096, "d_out": 4096, "T": 4096, "B": 8, "n": 256, "r": 64, "n_s": 32}
    DECODE_B, ROUNDS = 8, 50
else:
    POINT = {"dtype": "fp32", "d_in": 128, "d_out": 128, "T": 64, "B": 4, "n": 32, "r": 8, "n_s": 8}
    DECODE_B, ROUNDS = 4, 10

MODES = ("gate", "fwd", "fwdbwd", "decode")


def _shape(mode: str) -> bench.Shape:
    point = dict(POINT)
    if mode in ("decode", "gate"):
        point.update(T=DECODE_B, B=DECODE_B)
    return bench.Shape(mode=mode, **point)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(bench.PROVIDERS))
def test_provider(benchmark, name: str, mode: str) -> None:
    provider = bench.PROVIDERS[name]
    why = provider.mode_reason(mode) or provider.unavailable()
    if why:
        pytest.skip(f"{name} in {mode}: {why}")
    shape = _shape(mode)
    problem = bench.make_problem(shape, DEVICE)
    with provider.context():
        try:
            built = provider.build(problem, bench.RunOptions())
        except bench.Skip as exc:
            pytest.skip(str(exc))

        def run() -> None:
            for t in built.grads:
                t.grad = None
            built.fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        run()  # compile / autotune outside the measurement
        benchmark.group = f"{mode} {shape.dtype} d={shape.d_in} T={shape.T} B={shape.B} n={shape.n} r={shape.r} " \
                          f"n_s={shape.n_s}" + (f" ({bench.CPU_LABEL})" if DEVICE.type != "cuda" else "")
        benchmark.extra_info.update(provider=name, device=bench.device_name(DEVICE))
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
