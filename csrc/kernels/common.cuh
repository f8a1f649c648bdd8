// Device helpers shared by the pclr kernels: dtype conversion, the active-row mapping, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pclr_ops.h"

namespace pclr {
namespace dev {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T zero() { return from_float<T>(0.0f); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the sum (xor butterfly: same order on every lane, deterministic)
}

// Row k of sample s's active rank rows (shared rows first, then the chosen pool rows).
template <typename T>
__device__ __forceinline__ const T* active_row(const RowSet& rs, const GateRows& g, int s, int k) {
  if (k < g.n_s) return static_cast<const T*>(rs.shared) + static_cast<int64_t>(k) * rs.ld;
  const int j = g.idx[static_cast<int64_t>(s) * g.r + (k - g.n_s)];
  return static_cast<const T*>(rs.pool) + static_cast<int64_t>(j) * rs.ld;
}

// scale(s, k): beta_s for shared rows, val * beta_m for pool rows.
__device__ __forceinline__ float row_scale(const GateRows& g, int s, int k) {
  return k < g.n_s ? g.beta_s : g.val[static_cast<int64_t>(s) * g.r + (k - g.n_s)] * g.beta_m;
}

// Token at sorted position p (identity when tokens are already grouped by sample).
__device__ __forceinline__ int token_at(const Segments& seg, int p) { return seg.perm ? seg.perm[p] : p; }

// Which sample owns tile u (binary search in tile_off); -1 for the unused tail of the shape-sized grid.
__device__ __forceinline__ int sample_of_tile(const Segments& seg, int u) {
  if (u >= seg.tile_off[seg.num_samples]) return -1;
  int lo = 0, hi = seg.num_samples - 1;  // find the last s with tile_off[s] <= u
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (seg.tile_off[mid] <= u) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace dev

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace pclr
