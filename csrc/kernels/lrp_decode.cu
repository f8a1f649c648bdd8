// Decode forward (few tokens, typically one per sample): y[t] += sum_k scale(s,k) * (x[t] . A_k) * B_k, bgmv style,
// shrink and expand fused in ONE launch.
//
// Why not one block per token: at T = 1..64 that leaves most SMs idle, and a block that does both the shrink (R rows
// of d_in) and the expand alone reads ~R * (d_in + d_out) elements through one SM. Why not split over blocks without
// coordination: every expand block would redo the whole shrink. So the launch holds two kinds of work units:
//   shrink units  (T * G of them)  8 warps, one active row each: act[t, k] = scale(s,k) * (x[t] . A_k)
//   expand units  (T * C of them)  256 threads, one output column each: y[t, c] += sum_k act[t, k] * B_k[c]
// An expand unit must wait until the G shrink units of its token have published act[t, :]. Roles are handed out by
// an atomic ticket (not blockIdx): every shrink ticket precedes every expand ticket, and a block holding a ticket is
// already resident, so a waiting expand unit only ever waits on resident or finished blocks — no deadlock whatever
// the scheduler does (the forward-progress argument of decoupled look-back scans). The grid depends only on
// (T, R, d_out), and the zeroed workspace is part of the op, so the launch is CUDA-graph capturable.
//
// An expand unit stages its token's row pointers and activations in shared memory kDecodeRankChunk rows at a time
// (12 bytes per row), so any R runs on a fixed <= 12 KB of dynamic shared memory. The alternative, one pass with all
// R rows staged, needs 12 * R bytes: past 48 KB (R of about 4096 and up) that launch fails unless the kernel
// opts in per device (cudaFuncAttributeMaxDynamicSharedMemorySize), and even the opt-in ends at ~13.9 K rows on sm_80
// and ~19.4 K on sm_90, while the larger allocation cuts the blocks resident per SM. Passes keep the summation order
// (k = 0, 1, ..., R - 1 per output), so the result is the same bits as a single pass.
#include "common.cuh"

namespace pclr {
namespace {

constexpr int kDecThreads = 256;
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kRowsPerShrink = kDecWarps;     // one active row per warp
constexpr int kColsPerExpand = kDecThreads;   // one output column per thread

// VEC elements per load (16-byte loads when the rows allow it, else 1).
template <typename T, int VEC>
__device__ __forceinline__ float dot_row(const T* __restrict__ a, const T* __restrict__ b, int64_t d, int lane) {
  float acc = 0.0f;
  if constexpr (VEC == 1) {
    for (int64_t c = lane; c < d; c += 32) acc += dev::to_float(a[c]) * dev::to_float(b[c]);
  } else {
    const uint4* a4 = reinterpret_cast<const uint4*>(a);
    const uint4* b4 = reinterpret_cast<const uint4*>(b);
    for (int64_t c = lane; c < d / VEC; c += 32) {
      const uint4 ua = a4[c], ub = b4[c];
      const T* ea = reinterpret_cast<const T*>(&ua);
      const T* eb = reinterpret_cast<const T*>(&ub);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc += dev::to_float(ea[i]) * dev::to_float(eb[i]);
    }
  }
  return dev::warp_sum(acc);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kDecThreads)
lrp_decode_kernel(const T* __restrict__ x, T* __restrict__ y, const int* __restrict__ sot, int num_tokens,
                  int64_t d_in, int64_t d_out, RowSet A, RowSet Bm, GateRows g, int* __restrict__ ws, int G, int C) {
  // Workspace: [0] ticket counter, [1, 1 + T) per-token count of finished shrink units, then act fp32 [T, R].
  int* counter = ws;
  int* ready = ws + 1;
  float* act = reinterpret_cast<float*>(ws + 1 + num_tokens);
  const int R = g.n_s + g.r;

  __shared__ int s_ticket;
  if (threadIdx.x == 0) s_ticket = atomicAdd(counter, 1);
  __syncthreads();
  const int ticket = s_ticket;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_shrink = num_tokens * G;

  if (ticket < num_shrink) {
    const int t = ticket / G;
    const int k = (ticket % G) * kRowsPerShrink + warp;
    const int s = sot[t];
    if (k < R) {
      const T* arow = dev::active_row<T>(A, g, s, k);
      const float v = dot_row<T, VEC>(x + static_cast<int64_t>(t) * d_in, arow, d_in, lane);
      if (lane == 0) act[static_cast<int64_t>(t) * R + k] = v * dev::row_scale(g, s, k);
    }
    // Publish: every writer fences, then one thread signals (release pattern of the threadFenceReduction sample).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&ready[t], 1);
    return;
  }

  const int e = ticket - num_shrink;
  const int t = e / C;
  const int64_t c = static_cast<int64_t>(e % C) * kColsPerExpand + threadIdx.x;
  const int s = sot[t];
  const int Rc = R < kDecodeRankChunk ? R : kDecodeRankChunk;                   // rows staged per pass
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const T** s_rows = reinterpret_cast<const T**>(smem_raw);                     // [Rc] row pointers (8-byte aligned)
  float* s_act = reinterpret_cast<float*>(smem_raw + sizeof(const T*) * Rc);    // [Rc] scaled activations
  // Row pointers do not depend on the shrink: gather the first pass's while it may still be running.
  for (int k = threadIdx.x; k < Rc; k += kDecThreads) s_rows[k] = dev::active_row<T>(Bm, g, s, k);
  if (threadIdx.x == 0) {
    while (*reinterpret_cast<volatile int*>(&ready[t]) < G) __nanosleep(64);
    __threadfence();  // acquire side: act[t, :] reads below see the shrink units' writes
  }
  float acc = 0.0f;
  for (int k0 = 0; k0 < R; k0 += Rc) {
    const int kn = R - k0 < Rc ? R - k0 : Rc;
    __syncthreads();  // first pass: the wait above is over; later passes: the previous pass is consumed
    if (k0 > 0) {
      for (int k = threadIdx.x; k < kn; k += kDecThreads) s_rows[k] = dev::active_row<T>(Bm, g, s, k0 + k);
    }
    for (int k = threadIdx.x; k < kn; k += kDecThreads) {
      s_act[k] = __ldcg(&act[static_cast<int64_t>(t) * R + k0 + k]);
    }
    __syncthreads();
    if (c < d_out) {
      for (int k = 0; k < kn; ++k) acc += s_act[k] * dev::to_float(s_rows[k][c]);
    }
  }
  if (c < d_out) {
    T* out = y + static_cast<int64_t>(t) * d_out + c;
    *out = dev::from_float<T>(dev::to_float(*out) + acc);
  }
}

// Dynamic shared memory of an expand unit: one pass's row pointers and activations.
template <typename T>
size_t decode_smem_bytes(int R) {
  const int rows = R < kDecodeRankChunk ? R : kDecodeRankChunk;
  return static_cast<size_t>(rows) * (sizeof(const T*) + sizeof(float));
}
// The largest pass stays within what every launch gets without an opt-in (48 KB, static ticket included).
static_assert(kDecodeRankChunk * (sizeof(void*) + sizeof(float)) + sizeof(int) <= 48 * 1024,
              "kDecodeRankChunk rows must fit the default 48 KB of shared memory per block");

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
int decode_impl(const void* x, void* y, const int* sot, int64_t T_, int64_t d_in, int64_t d_out, RowSet A, RowSet Bm,
                GateRows g, int* ws, cudaStream_t stream) {
  const int R = g.n_s + g.r;
  const int G = (R + kRowsPerShrink - 1) / kRowsPerShrink;
  const int C = static_cast<int>((d_out + kColsPerExpand - 1) / kColsPerExpand);
  const unsigned grid = static_cast<unsigned>(T_ * (G + C));
  const size_t smem = decode_smem_bytes<T>(R);
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads need every row start 16-byte aligned: base pointers aligned and d_in a multiple of kVec.
  const bool vec = d_in % kVec == 0 && aligned16(x) && aligned16(A.shared) && aligned16(A.pool);
  if (vec) {
    lrp_decode_kernel<T, kVec><<<grid, kDecThreads, smem, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), sot, static_cast<int>(T_), d_in, d_out, A, Bm, g, ws, G, C);
  } else {
    lrp_decode_kernel<T, 1><<<grid, kDecThreads, smem, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), sot, static_cast<int>(T_), d_in, d_out, A, Bm, g, ws, G, C);
  }
  return last_error();
}

}  // namespace

int64_t decode_workspace_ints(int64_t T, int64_t R) { return 1 + T + T * R; }

int launch_lrp_decode(ScalarKind kind, const void* x, void* y, const int* sot, int64_t T, int64_t d_in, int64_t d_out,
                      RowSet A, RowSet B, GateRows g, int* workspace, void* stream) {
  const int R = g.n_s + g.r;
  if (T == 0 || R == 0 || d_out == 0) return 0;
  if (T > kDecodeMaxTokens) return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case ScalarKind::kFloat: return decode_impl<float>(x, y, sot, T, d_in, d_out, A, B, g, workspace, s);
    case ScalarKind::kHalf: return decode_impl<__half>(x, y, sot, T, d_in, d_out, A, B, g, workspace, s);
    case ScalarKind::kBFloat16: return decode_impl<__nv_bfloat16>(x, y, sot, T, d_in, d_out, A, B, g, workspace, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace pclr
