"""Executed work of the prefill / training paths at a point, against the FLOP floor (CPU, Triton interpreter).

    TRITON_INTERPRET=1 python benchmarks/prefill_work.py [--d 1024] [--T 1024] [--which new,fused,epilogue,split]

``new``: the floor-shaped path (pclr.backends.triton_prefill); the others: the Triton backend's forward variants
through ``pclr.lrp_linear`` (their backward is the backend's one). Prints one JSON line per path. Torch matmuls
inside pclr's custom ops (the epilogue variant's cuBLAS base, its dX = dY·W) are not in ``*_flops``: add
2·T·d_in·d_out for each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from pclr.bench.work import WorkCounter

import pclr  # noqa: E402
from pclr.backends import triton_prefill  # noqa: E402
from pclr.backends.triton.segments import tile_block_m  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--r", type=int, default=24)
    ap.add_argument("--n_s", type=int, default=8)
    ap.add_argument("--which", default="new,fused,epilogue,split")
    a = ap.parse_args()
    torch.manual_seed(0)
    d, T, B, n, r, ns = a.d, a.T, a.B, a.n, a.r, a.n_s
    R = r + ns
    x = torch.randn(T, d)
    W = torch.randn(d, d) / d ** 0.5
    A, Bm = torch.randn(n, d) / d ** 0.5, torch.randn(n, d) / d ** 0.5
    As, Bs = torch.randn(ns, d) / d ** 0.5, torch.randn(ns, d) / d ** 0.5
    sot = torch.arange(B).repeat_interleave(T // B).int()
    idx = torch.stack([torch.randperm(n)[:r] for _ in range(B)]).int()
    val = torch.rand(B, r) + 0.5
    gy = torch.randn(T, d)
    # per-batch metadata (tile map) and the per-route reduction plan are built once and shared by every linear of
    # a layer / forward: build them outside the counted region
    triton_prefill.segment_map(sot, B, 0, tile_block_m(T, B))
    triton_prefill.reduce_plan(idx, None, n, ns, R, True, True)
    fwd_floor = 2 * T * d * d + 2 * T * R * (d + d)
    fb_floor = 4 * T * d * d + 6 * T * R * (d + d)
    for which in a.which.split(","):
        t0 = time.time()
        if which == "new":
            args = (x, W, None, A, Bm, idx, val, As, Bs, sot, None, 2.0, 1.0, 0, True)
            with WorkCounter() as wf:
                y, saved = triton_prefill.prefill_forward(*args)
            bargs = (x, W, A, Bm, idx, val, As, Bs, sot, None, 2.0, 1.0, 0, True)
            with WorkCounter() as wb:
                triton_prefill.prefill_backward(gy, *bargs, saved, (True, True, True, True))
        else:
            pclr.set_forward_variant(which)
            leaves = [t.clone().requires_grad_(True) for t in (x, A, Bm, val, As, Bs)]
            xx, AA, BB, vv, AAs, BBs = leaves
            with WorkCounter() as wf:
                y = pclr.lrp_linear(xx, W, None, AA, BB, idx, vv, A_s=AAs, B_s=BBs, beta_m=2.0, beta_s=1.0,
                                    sample_of_token=sot, backend="triton")
            with WorkCounter() as wb:
                y.backward(gy)
        f, b = wf.work, wb.work
        print(json.dumps({
            "path": which, "seconds": round(time.time() - t0, 1),
            "fwd_flops": f.flops, "fwd_floor": fwd_floor, "fwd_ratio": round(f.flops / fwd_floor, 5),
            "fwdbwd_flops": f.flops + b.flops, "fwdbwd_floor": fb_floor,
            "fwdbwd_ratio": round((f.flops + b.flops) / fb_floor, 5),
            "fwd_bytes": f.bytes, "bwd_bytes": b.bytes, "fwd_launches": f.launches, "bwd_launches": b.launches,
            "fwd_kernels": dict(f.by_kernel), "bwd_kernels": dict(b.by_kernel),
        }), flush=True)


if __name__ == "__main__":
    main()
