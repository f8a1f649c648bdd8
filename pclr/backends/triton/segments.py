"""Token segmentation (punica-style token → sample mapping): tokens grouped by sample and cut into tiles, on device,
sized by shapes only (no host sync, so CUDA-graph capturable).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pclr.backends.triton.configs import INTERPRET, next_pow2
from pclr.options import DECODE_MAX_TOKENS


def decode_block_m(T: int, B: int) -> int:
    """BLOCK_M of the single-launch decode path, or 0 when that path would waste too much (many samples)."""
    if T == 0 or T > DECODE_MAX_TOKENS:
        return 0
    bm = max(16, next_pow2(T))
    return bm if B * bm <= 512 else 0


@dataclass
class Tiles:
    """Tokens grouped by sample and cut into tiles of BLOCK_M tokens of one sample.

    tok: int32 [T] token row of each sorted position (None: positions are token rows, x was [B, L]);
    seg_start, seg_count: int32 [B] each sample's range of sorted positions;
    tile_sample, tile_start, tile_end: int32 [num_tiles] (unused slots have start == end);
    """

    tok: Tensor | None
    seg_start: Tensor
    seg_count: Tensor
    tile_sample: Tensor
    tile_start: Tensor
    tile_end: Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_sample.shape[0]


def tile_block_m(T: int, B: int) -> int:
    """Tokens per tile: the mean tokens per sample, a power of two in [16, 128] (64 under the interpreter)."""
    per_sample = -(-T // max(1, min(B, T)))
    return min(64 if INTERPRET else 128, max(16, next_pow2(per_sample)))



# (id(sot), version, B, padded_len, block_m) -> (sot, tiles); the sot object is kept so its id cannot be reused
_TILE_CACHE: dict[tuple[int, int, int, int, int], tuple[Tensor, Tiles]] = {}



def segment_tokens(sot: Tensor, num_samples: int, padded_len: int, block_m: int) -> Tiles:
    """Group tokens by sample and build the tile map without a host sync (CUDA-graph capturable).

    sot: int32 [T]. The number of tile slots is a bound from shapes: Σ_b ceil(c_b / M) ≤ ceil(T / M) + min(B, T).
    The result is cached per ``sot`` object (the same mapping serves every linear of a forward).
    """
    capturing = sot.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (id(sot), sot._version, num_samples, padded_len, block_m)
    hit = None if capturing else _TILE_CACHE.get(key)
    if hit is not None and hit[0] is sot:
        return hit[1]
    T, B, dev = sot.shape[0], num_samples, sot.device
    if padded_len:
        tok = None
        counts = torch.full((B,), padded_len, dtype=torch.int64, device=dev)
        max_tiles = B * -(-padded_len // block_m)
    else:
        s64 = sot.long()
        tok = torch.argsort(s64, stable=True).to(torch.int32)
        # scatter_add, not bincount: bincount on CUDA reads the max back to the host
        counts = torch.zeros(B, dtype=torch.int64, device=dev).scatter_add_(0, s64, torch.ones_like(s64))
        max_tiles = -(-T // block_m) + min(B, T)
    starts = counts.cumsum(0) - counts
    tiles = (counts + block_m - 1) // block_m
    tcum = tiles.cumsum(0)
    slot = torch.arange(max_tiles, device=dev)
    samp = torch.searchsorted(tcum, slot, right=True)
    valid = samp < B
    sc = samp.clamp(max=max(B - 1, 0))
    t_start = starts[sc] + (slot - (tcum[sc] - tiles[sc])) * block_m
    t_end = torch.minimum(t_start + block_m, starts[sc] + counts[sc])
    zero = torch.zeros_like(t_start)
    tiles_ = Tiles(
        tok=tok, seg_start=starts.to(torch.int32), seg_count=counts.to(torch.int32),
        tile_sample=sc.to(torch.int32), tile_start=torch.where(valid, t_start, zero).to(torch.int32),
        tile_end=torch.where(valid, t_end, zero).to(torch.int32), block_m=block_m,
    )
    if not capturing:
        if len(_TILE_CACHE) >= 8:
            _TILE_CACHE.clear()
        _TILE_CACHE[key] = (sot, tiles_)
    return tiles_



def partial_row_targets(idx: Tensor, trainable: Tensor | None, n: int, n_s: int, width: int, need_pool: bool,
                        need_shared: bool) -> Tensor:
    """Output row of each per-sample partial rank row, int64 [B * width]: lane k < n_s is shared row k (written to
    n + k), lane n_s + i is pool row idx[s, i]; lanes not needed, frozen pool rows (exactly zero gradient), indices
    outside [0, n) and padding lanes go to the dropped row n + n_s."""
    B, r = idx.shape
    drop = n + n_s
    tgt = torch.full((B, width), drop, dtype=torch.int64, device=idx.device)
    if need_shared and n_s:
        tgt[:, :n_s] = torch.arange(n, n + n_s, device=idx.device)
    if need_pool:
        rows = idx.long()
        inside = (rows >= 0) & (rows < n)  # an idx outside the pool contributes nothing (as in the kernels)
        rows = torch.where(inside, rows, torch.full_like(rows, drop))
        if trainable is not None:  # frozen rows: no contribution at all, their gradient stays exactly zero
            keep = inside & trainable[rows.clamp(max=max(n - 1, 0))] if n else inside
            rows = torch.where(keep, rows, torch.full_like(rows, drop))
        tgt[:, n_s:n_s + r] = rows
    return tgt.reshape(-1)
