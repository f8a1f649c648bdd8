"""The phase barrier inside one launch (pclr.kernels.phases) and its launcher side, through the CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pclr import dispatch
from pclr.kernels.phases import phase_end, phase_publish, phase_wait

pytestmark = pytest.mark.skipif(bool(dispatch.reasons("triton", "info", None)),
                                reason="triton backend unavailable here")
phases = pytest.importorskip("pclr.backends.triton.phases")
INTERPRETED = pytest.importorskip("pclr.backends.triton.configs").INTERPRET
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _copy_then_add_kernel(SRC, MID, OUT, COUNTERS, producers, CONSUMERS_FIRST: tl.constexpr,
                          INTERPRET: tl.constexpr):
    """Producers p: MID[p] = SRC[p]; then consumers c: OUT[c] = MID[c] + 1 (MID is written in this launch)."""
    pid = tl.program_id(0)
    if CONSUMERS_FIRST:  # the wrong layout: consumers on the lowest ids
        producer = pid >= tl.num_programs(0) - producers
        slot = tl.where(producer, pid - (tl.num_programs(0) - producers), pid)
    else:
        producer = pid < producers
        slot = tl.where(producer, pid, pid - producers)
    if producer:
        tl.store(MID + slot, tl.load(SRC + slot))
        phase_publish(COUNTERS)
    else:
        phase_wait(COUNTERS, producers, INTERPRET)
        tl.store(OUT + slot, tl.load(MID + slot, cache_modifier=".cg") + 1)
    phase_end(COUNTERS, COUNTERS + 1)


def test_consumers_read_what_the_producers_wrote_and_the_counters_reset() -> None:
    counters = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    src = torch.arange(5, dtype=torch.int32, device=DEVICE) * 7
    for _ in range(3):  # the same counters serve launch after launch: each leaves them at zero
        mid, out = torch.zeros_like(src), torch.zeros_like(src)
        _copy_then_add_kernel[phases.phase_grid(5, 5)](src, mid, out, counters, 5, CONSUMERS_FIRST=False,
                                                       INTERPRET=INTERPRETED)
        assert torch.equal(out, src + 1)
        assert counters.tolist() == [0, 0]


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the wrong layout would spin, not raise")
def test_consumers_before_producers_fail_loudly_in_the_interpreter() -> None:
    counters = torch.zeros(2, dtype=torch.int32)
    src = torch.arange(3, dtype=torch.int32)
    with pytest.raises(Exception, match="consumer ran before its producers"):
        _copy_then_add_kernel[(6,)](src, torch.zeros_like(src), torch.zeros_like(src), counters, 3,
                                    CONSUMERS_FIRST=True, INTERPRET=True)


def test_counters_are_cached_per_device_and_stream() -> None:
    dev = torch.device(DEVICE)
    first = phases.phase_counters(dev)
    assert first is phases.phase_counters(dev)
    assert first.dtype == torch.int32 and first.shape == (2,)


def test_phase_grid_puts_producers_first_and_checks_its_arguments() -> None:
    assert phases.phase_grid(3, 10) == (13,)
    assert phases.phase_grid(2, 0) == (2,)
    with pytest.raises(ValueError, match="producers"):
        phases.phase_grid(0, 4)
    with pytest.raises(ValueError, match="consumers"):
        phases.phase_grid(1, -1)
