// Tiled gathered GEMMs of the LRP (prefill forward and the whole backward), plus the deterministic reductions that
// turn per-sample gradients into pool / shared-row gradients.
//
//   shrink  out[t, k]    = X[t] . rows_k(s)                       M = tokens of s, N = R,  K = row length
//   expand  Y[t, :]     += sum_k scale(s,k) P[t, k] rows_k(s)[:]  M = tokens of s, N = d,  K = R
//   outer   G[s, k, :]   = sum_{t in s} scale(s,k) P[t, k] X[t,:] M = R,           N = d,  K = tokens of s
//           (over one PartialSlice of samples and columns: the backward's workspace is bounded, see pclr_ops.h)
//
// Every tile belongs to ONE sample, so all its tokens use the same gathered rows: that is what lets the inner product
// run on tensor cores. Tokens are visited in sample-grouped order through Segments (perm + seg_start + tile_off);
// the grids are sized by tile_bound(T, B) so they never depend on how the tokens are distributed (graph safe).
//
// Tile geometry (all three kernels): a 64 x 64 output tile per block of 128 threads (4 warps), K in steps of 32.
// Operands are staged in shared memory in one canonical layout, a[k][m] and b[k][n] (row length +8 elements to
// spread banks and keep WMMA's 32-byte pointer alignment), so a single compute step serves every kernel:
//   bf16/fp16: WMMA 16x16x16 with fp32 accumulators, each warp a 32 x 32 quarter (2 x 2 fragments);
//   fp32:      plain FMA, each thread an 8 x 4 micro tile (no TF32: fp32 results must match the reference to 1e-4).
// The accumulators go through shared memory (aliasing the operand tiles) so each kernel's epilogue can scatter
// rows to its own gathered destinations with coalesced accesses.
#include <mma.h>

#include "common.cuh"

namespace pclr {
namespace {

constexpr int BM = kTileM;  // 64
constexpr int BN = kTileN;  // 64
constexpr int BK = 32;
constexpr int kThreads = 128;
constexpr int LDA = BM + 8;
constexpr int LDB = BN + 8;
constexpr int LDC = BN + 4;

template <typename T>
struct TileSmem {
  static constexpr size_t kInBytes = sizeof(T) * (BK * LDA + BK * LDB);
  static constexpr size_t kOutBytes = sizeof(float) * BM * LDC;
  static constexpr size_t kBytes = kInBytes > kOutBytes ? kInBytes : kOutBytes;
};

// ---- compute step ---------------------------------------------------------------------------------------------
template <typename T>
struct TileMma {  // bf16 / fp16: tensor cores
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int wm, wn;

  __device__ void init() {
    const int warp = threadIdx.x >> 5;
    wm = (warp >> 1) * 32;
    wn = (warp & 1) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ void step(const T* a, const T* b) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];  // (m, k) at a[k * LDA + m]
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];  // (k, n) at b[k * LDB + n]
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + kk * LDA + wm + i * 16, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + kk * LDB + wn + j * 16, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ void store(float* c) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(c + (wm + i * 16) * LDC + wn + j * 16, acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <>
struct TileMma<float> {  // fp32: CUDA cores, thread (ty, tx) owns rows ty*8 .. +8 and columns tx*4 .. +4
  float acc[8][4];
  int m0, n0;

  __device__ void init() {
    m0 = (threadIdx.x >> 4) * 8;
    n0 = (threadIdx.x & 15) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ void step(const float* a, const float* b) {
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = a[k * LDA + m0 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b[k * LDB + n0 + j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ void store(float* c) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(m0 + i) * LDC + n0 + j] = acc[i][j];
  }
};

// Resolve tile u of the shape-sized grid to (sample, first sorted position, token count); false for unused tiles.
__device__ __forceinline__ bool token_tile(const Segments& seg, int u, int& s, int& p0, int& count) {
  s = dev::sample_of_tile(seg, u);
  if (s < 0) return false;
  p0 = seg.seg_start[s] + (u - seg.tile_off[s]) * BM;
  count = min(BM, seg.seg_start[s + 1] - p0);
  return true;
}

// dst[k][i] = rows[i][k0 + k] for the BK-wide slice starting at k0 (zero past K or for a null row). This is the long
// K loop of the shrink (K = d_in or d_out), so rows are read in 16-byte vectors (VEC elements) when the host has
// checked that every row start is 16-byte aligned and K % VEC == 0; VEC = 1 is the general fallback.
template <typename T, int VEC>
__device__ __forceinline__ void load_rows_transposed(const T* const* rows, int nrows, int64_t k0, int64_t K, T* dst,
                                                     int ld) {
  constexpr int kVecPerRow = BK / VEC;
  for (int e = threadIdx.x; e < nrows * kVecPerRow; e += kThreads) {
    const int i = e / kVecPerRow, k = (e % kVecPerRow) * VEC;
    const T* row = rows[i];
    if constexpr (VEC == 1) {
      dst[k * ld + i] = (row != nullptr && k0 + k < K) ? row[k0 + k] : dev::zero<T>();
    } else {
      if (row != nullptr && k0 + k < K) {  // K % VEC == 0: a vector is entirely inside or entirely outside
        const uint4 v = *reinterpret_cast<const uint4*>(row + k0 + k);
        const T* ev = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dst[(k + j) * ld + i] = ev[j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dst[(k + j) * ld + i] = dev::zero<T>();
      }
    }
  }
}

// ---- shrink: out[t, k] = X[t] . rows_k(s) ------------------------------------------------------------------------
// grid (tile_bound(T, B), ceil(R / BN)); K = rows.ld.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
gathered_shrink_kernel(const T* __restrict__ X, RowSet rows, GateRows g, Segments seg, float* __restrict__ out) {
  int s, p0, count;
  if (!token_tile(seg, blockIdx.x, s, p0, count)) return;
  const int R = g.n_s + g.r;
  const int n0 = blockIdx.y * BN;
  const int64_t K = rows.ld;
  __shared__ __align__(128) unsigned char smem[TileSmem<T>::kBytes];
  __shared__ const T* s_x[BM];
  __shared__ const T* s_w[BN];
  __shared__ int s_tok[BM];
  T* a = reinterpret_cast<T*>(smem);
  T* b = a + BK * LDA;
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const int t = m < count ? dev::token_at(seg, p0 + m) : -1;
    s_tok[m] = t;
    s_x[m] = t >= 0 ? X + static_cast<int64_t>(t) * K : nullptr;
  }
  for (int n = threadIdx.x; n < BN; n += kThreads) s_w[n] = n0 + n < R ? dev::active_row<T>(rows, g, s, n0 + n) : nullptr;
  __syncthreads();

  TileMma<T> mma;
  mma.init();
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // consecutive threads read consecutive k of one row (coalesced) and write it transposed into a[k][m] / b[k][n]
    load_rows_transposed<T, VEC>(s_x, BM, k0, K, a, LDA);
    load_rows_transposed<T, VEC>(s_w, BN, k0, K, b, LDB);
    __syncthreads();
    mma.step(a, b);
    __syncthreads();  // operands fully consumed before the next load (and before c aliases them)
  }
  float* c = reinterpret_cast<float*>(smem);
  mma.store(c);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = e / BN, n = e % BN;
    if (m < count && n0 + n < R) out[static_cast<int64_t>(s_tok[m]) * R + n0 + n] = c[m * LDC + n];
  }
}

// ---- expand: Y[t, :] += sum_k scale(s,k) P[t, k] rows_k(s)[:] --------------------------------------------------
// grid (tile_bound(T, B), ceil(N / BN)); N = rows.ld; K = R. Each (token, column) has exactly one writer.
template <typename T>
__global__ void __launch_bounds__(kThreads)
gathered_expand_kernel(const float* __restrict__ P, RowSet rows, GateRows g, Segments seg, T* __restrict__ Y) {
  int s, p0, count;
  if (!token_tile(seg, blockIdx.x, s, p0, count)) return;
  const int R = g.n_s + g.r;
  const int64_t N = rows.ld;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  __shared__ __align__(128) unsigned char smem[TileSmem<T>::kBytes];
  __shared__ int s_tok[BM];
  T* a = reinterpret_cast<T*>(smem);
  T* b = a + BK * LDA;
  for (int m = threadIdx.x; m < BM; m += kThreads) s_tok[m] = m < count ? dev::token_at(seg, p0 + m) : -1;
  __syncthreads();

  TileMma<T> mma;
  mma.init();
  for (int k0 = 0; k0 < R; k0 += BK) {
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const int m = e / BK, k = e % BK;
      const int t = s_tok[m];
      float v = 0.0f;
      if (t >= 0 && k0 + k < R) v = P[static_cast<int64_t>(t) * R + k0 + k] * dev::row_scale(g, s, k0 + k);
      a[k * LDA + m] = dev::from_float<T>(v);  // the scaled [T, R] intermediate, in the MMA input dtype
    }
    for (int e = threadIdx.x; e < BK * BN; e += kThreads) {
      const int k = e / BN, n = e % BN;
      T v = dev::zero<T>();
      if (k0 + k < R && n0 + n < N) v = dev::active_row<T>(rows, g, s, k0 + k)[n0 + n];
      b[k * LDB + n] = v;
    }
    __syncthreads();
    mma.step(a, b);
    __syncthreads();
  }
  float* c = reinterpret_cast<float*>(smem);
  mma.store(c);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = e / BN, n = e % BN;
    if (m < count && n0 + n < N) {
      T* o = Y + static_cast<int64_t>(s_tok[m]) * N + n0 + n;
      *o = dev::from_float<T>(dev::to_float(*o) + c[m * LDC + n]);
    }
  }
}

// ---- outer: G[s - s0, k, c - c0] = sum_{t in s} scale(s,k) P[t, k] X[t, c] ------------------------------------
// grid (slice samples, ceil(R / BM), ceil(slice cols / BN)): samples on x, the only dimension allowed more than 65535
// blocks. K = the tokens of sample s (possibly none: the tile is then written as zeros, never skipped). The slice's
// c0 is a multiple of BN, so every element is computed by the same tile position, hence bits, as without slicing.
template <typename T>
__global__ void __launch_bounds__(kThreads)
gathered_outer_kernel(const float* __restrict__ P, const T* __restrict__ X, PartialSlice sl, GateRows g, Segments seg,
                      float* __restrict__ G) {
  const int s = static_cast<int>(sl.s0) + blockIdx.x;
  const int R = g.n_s + g.r;
  const int m0 = blockIdx.y * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * BN;  // column within the slice
  const int64_t N = sl.cols;
  const T* Xs = X + sl.c0;                                    // rows keep their full stride sl.N
  const int p_begin = seg.seg_start[s], p_end = seg.seg_start[s + 1];
  __shared__ __align__(128) unsigned char smem[TileSmem<T>::kBytes];
  __shared__ float s_scale[BM];
  T* a = reinterpret_cast<T*>(smem);
  T* b = a + BK * LDA;
  for (int m = threadIdx.x; m < BM; m += kThreads) s_scale[m] = m0 + m < R ? dev::row_scale(g, s, m0 + m) : 0.0f;
  __syncthreads();

  TileMma<T> mma;
  mma.init();
  for (int p0 = p_begin; p0 < p_end; p0 += BK) {
    for (int e = threadIdx.x; e < BK * BM; e += kThreads) {
      const int kk = e / BM, m = e % BM;
      float v = 0.0f;
      if (p0 + kk < p_end && m0 + m < R)
        v = P[static_cast<int64_t>(dev::token_at(seg, p0 + kk)) * R + m0 + m] * s_scale[m];
      a[kk * LDA + m] = dev::from_float<T>(v);
    }
    for (int e = threadIdx.x; e < BK * BN; e += kThreads) {
      const int kk = e / BN, n = e % BN;
      T v = dev::zero<T>();
      if (p0 + kk < p_end && n0 + n < N) v = Xs[static_cast<int64_t>(dev::token_at(seg, p0 + kk)) * sl.N + n0 + n];
      b[kk * LDB + n] = v;
    }
    __syncthreads();
    mma.step(a, b);
    __syncthreads();
  }
  float* c = reinterpret_cast<float*>(smem);
  mma.store(c);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = e / BN, n = e % BN;
    if (m0 + m < R && n0 + n < N) G[(static_cast<int64_t>(blockIdx.x) * R + m0 + m) * N + n0 + n] = c[m * LDC + n];
  }
}

// ---- reductions into the parameter gradients ---------------------------------------------------------------------
// grid (rows, ceil(N / kRedCols)), 256 threads, each thread 4 columns strided by 256 (coalesced).
constexpr int kRedThreads = 256;
constexpr int kRedPerThread = 4;
constexpr int kRedCols = kRedThreads * kRedPerThread;

// The running fp32 sums of the reductions: the slice's additions continue `acc` (the previous slices' sum) unless
// this is the first slice, and end in `out` (cast to T) on the last one, else back in `acc`. fp32 in registers and
// fp32 in memory hold the same bits, so the sum does not depend on where the chunk boundaries fall.
template <typename T>
struct RunningSum {
  const float* acc_in;  // nullptr on the first slice
  float* acc_out;       // nullptr on the last slice
  T* out;               // nullptr unless the last slice

  __device__ __forceinline__ float load(int64_t o) const { return acc_in ? acc_in[o] : 0.0f; }
  __device__ __forceinline__ void store(int64_t o, float v) const {
    if (out) out[o] = dev::from_float<T>(v); else acc_out[o] = v;
  }
};

// Pool row j: the (s, k) entries of the slice's samples with idx[s, k] == j are found chunk by chunk with an ORDERED
// compaction (ballot + warp offsets), then summed in increasing entry order: same bits every run, no atomics. Frozen
// rows skip the scan and are written as exact zeros on the last slice (and left alone before it).
template <typename T>
__global__ void __launch_bounds__(kRedThreads)
reduce_pool_rows_kernel(const float* __restrict__ G, PartialSlice sl, GateRows g, const bool* __restrict__ trainable,
                        RunningSum<T> sum) {
  const int j = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kRedCols;  // column within the slice
  const int64_t N = sl.cols;
  const int R = g.n_s + g.r;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ int s_list[kRedThreads];
  __shared__ int s_warp[kRedThreads / 32];
  __shared__ int s_count;
  const bool live = trainable == nullptr || trainable[j];  // uniform over the block: the barriers inside are safe
  if (!live && sum.out == nullptr) return;
  const int64_t row0 = static_cast<int64_t>(j) * sl.N + sl.c0;  // (j, c0) of acc / out
  float acc[kRedPerThread];
#pragma unroll
  for (int v = 0; v < kRedPerThread; ++v) {
    const int64_t c = c0 + v * kRedThreads + threadIdx.x;
    acc[v] = live && c < N ? sum.load(row0 + c) : 0.0f;
  }
  if (live) {
    const int e_begin = static_cast<int>(sl.s0) * g.r;
    const int E = static_cast<int>(sl.num_samples) * g.r;
    for (int base = 0; base < E; base += kRedThreads) {
      const int i = base + threadIdx.x;
      const bool hit = i < E && g.idx[e_begin + i] == j;
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) s_warp[warp] = __popc(mask);
      __syncthreads();
      if (threadIdx.x == 0) {
        int run = 0;
        for (int w = 0; w < kRedThreads / 32; ++w) {
          const int cnt = s_warp[w];
          s_warp[w] = run;
          run += cnt;
        }
        s_count = run;
      }
      __syncthreads();
      if (hit) s_list[s_warp[warp] + __popc(mask & ((1u << lane) - 1u))] = i;
      __syncthreads();
      for (int q = 0; q < s_count; ++q) {
        const int e = s_list[q];  // entry within the slice: sample s0 + e / r, pool slot e % r
        const float* row = G + (static_cast<int64_t>(e / g.r) * R + g.n_s + e % g.r) * N;
#pragma unroll
        for (int v = 0; v < kRedPerThread; ++v) {
          const int64_t c = c0 + v * kRedThreads + threadIdx.x;
          if (c < N) acc[v] += row[c];
        }
      }
      __syncthreads();  // s_list / s_warp are rewritten by the next chunk
    }
  }
#pragma unroll
  for (int v = 0; v < kRedPerThread; ++v) {
    const int64_t c = c0 + v * kRedThreads + threadIdx.x;
    if (c < N) sum.store(row0 + c, acc[v]);
  }
}

// Shared row k: sum over the slice's samples in order, continuing the running sum. grid (n_s, ceil(cols / kRedCols)).
template <typename T>
__global__ void __launch_bounds__(kRedThreads)
reduce_shared_rows_kernel(const float* __restrict__ G, PartialSlice sl, GateRows g, RunningSum<T> sum) {
  const int k = blockIdx.x;
  const int R = g.n_s + g.r;
  const int64_t N = sl.cols;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kRedCols;
  const int64_t row0 = static_cast<int64_t>(k) * sl.N + sl.c0;
#pragma unroll
  for (int v = 0; v < kRedPerThread; ++v) {
    const int64_t c = c0 + v * kRedThreads + threadIdx.x;
    if (c >= N) continue;
    float acc = sum.load(row0 + c);
    for (int64_t s = 0; s < sl.num_samples; ++s) acc += G[(s * R + k) * N + c];
    sum.store(row0 + c, acc);
  }
}

// dval[s, k] = beta_m * sum_{t in s} dS[t, n_s+k] * U[t, n_s+k]. grid (B), 8 warps; warp w takes k = w, w+8, ...,
// lanes stride over the sample's tokens, one warp reduction: fixed order, deterministic.
__global__ void __launch_bounds__(256)
dval_kernel(const float* __restrict__ dS, const float* __restrict__ U, GateRows g, Segments seg,
            float* __restrict__ dval) {
  const int s = blockIdx.x;
  const int R = g.n_s + g.r;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int p_begin = seg.seg_start[s], p_end = seg.seg_start[s + 1];
  for (int k = warp; k < g.r; k += 8) {
    float acc = 0.0f;
    for (int p = p_begin + lane; p < p_end; p += 32) {
      const int64_t o = static_cast<int64_t>(dev::token_at(seg, p)) * R + g.n_s + k;
      acc += dS[o] * U[o];
    }
    acc = dev::warp_sum(acc);
    if (lane == 0) dval[static_cast<int64_t>(s) * g.r + k] = acc * g.beta_m;
  }
}

// ---- dtype dispatch ---------------------------------------------------------------------------------------------
template <template <typename> class F, typename... Args>
int dispatch(ScalarKind kind, Args&&... args) {
  switch (kind) {
    case ScalarKind::kFloat: F<float>::run(args...); break;
    case ScalarKind::kHalf: F<__half>::run(args...); break;
    case ScalarKind::kBFloat16: F<__nv_bfloat16>::run(args...); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return last_error();
}

unsigned blocks(int64_t total, int64_t per) { return static_cast<unsigned>((total + per - 1) / per); }

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
struct ShrinkL {
  static void run(const void* X, int64_t T_, RowSet rows, GateRows g, Segments seg, float* out, cudaStream_t st) {
    const dim3 grid(static_cast<unsigned>(tile_bound(T_, seg.num_samples)), blocks(g.n_s + g.r, BN));
    constexpr int kVec = 16 / sizeof(T);
    if (rows.ld % kVec == 0 && aligned16(X) && aligned16(rows.shared) && aligned16(rows.pool)) {
      gathered_shrink_kernel<T, kVec><<<grid, kThreads, 0, st>>>(static_cast<const T*>(X), rows, g, seg, out);
    } else {
      gathered_shrink_kernel<T, 1><<<grid, kThreads, 0, st>>>(static_cast<const T*>(X), rows, g, seg, out);
    }
  }
};
template <typename T>
struct ExpandL {
  static void run(const float* P, int64_t T_, RowSet rows, GateRows g, Segments seg, void* Y, cudaStream_t st) {
    const dim3 grid(static_cast<unsigned>(tile_bound(T_, seg.num_samples)), blocks(rows.ld, BN));
    gathered_expand_kernel<T><<<grid, kThreads, 0, st>>>(P, rows, g, seg, static_cast<T*>(Y));
  }
};
template <typename T>
struct OuterL {
  static void run(const float* P, const void* X, PartialSlice sl, GateRows g, Segments seg, float* G, cudaStream_t st) {
    const dim3 grid(static_cast<unsigned>(sl.num_samples), blocks(g.n_s + g.r, BM), blocks(sl.cols, BN));
    gathered_outer_kernel<T><<<grid, kThreads, 0, st>>>(P, static_cast<const T*>(X), sl, g, seg, G);
  }
};
template <typename T>
RunningSum<T> running_sum(float* acc, bool first, bool last, void* out) {
  return RunningSum<T>{first ? nullptr : acc, last ? nullptr : acc, last ? static_cast<T*>(out) : nullptr};
}
template <typename T>
struct PoolL {
  static void run(const float* G, PartialSlice sl, GateRows g, int64_t n, const bool* tr, float* acc, bool first,
                  bool last, void* out, cudaStream_t st) {
    const dim3 grid(static_cast<unsigned>(n), blocks(sl.cols, kRedCols));
    reduce_pool_rows_kernel<T><<<grid, kRedThreads, 0, st>>>(G, sl, g, tr, running_sum<T>(acc, first, last, out));
  }
};
template <typename T>
struct SharedL {
  static void run(const float* G, PartialSlice sl, GateRows g, float* acc, bool first, bool last, void* out,
                  cudaStream_t st) {
    const dim3 grid(static_cast<unsigned>(g.n_s), blocks(sl.cols, kRedCols));
    reduce_shared_rows_kernel<T><<<grid, kRedThreads, 0, st>>>(G, sl, g, running_sum<T>(acc, first, last, out));
  }
};

// A slice the kernels can take: columns inside the rows, starting on a tile boundary (see gathered_outer_kernel).
bool valid_slice(const PartialSlice& sl) {
  return sl.s0 >= 0 && sl.num_samples >= 0 && sl.c0 >= 0 && sl.cols >= 0 && sl.c0 + sl.cols <= sl.N &&
         sl.c0 % BN == 0;
}

// A running sum exists whenever there is one to continue or to leave (the slice is not both first and last).
bool valid_sum(const float* acc, bool first, bool last) { return acc != nullptr || (first && last); }

}  // namespace

int launch_gathered_shrink(ScalarKind kind, const void* X, int64_t T, RowSet rows, GateRows g, Segments seg,
                           float* out, void* stream) {
  if (T == 0 || g.n_s + g.r == 0) return 0;
  return dispatch<ShrinkL>(kind, X, T, rows, g, seg, out, static_cast<cudaStream_t>(stream));
}

int launch_gathered_expand(ScalarKind kind, const float* P, int64_t T, RowSet rows, GateRows g, Segments seg, void* Y,
                           void* stream) {
  if (T == 0 || g.n_s + g.r == 0 || rows.ld == 0) return 0;
  return dispatch<ExpandL>(kind, P, T, rows, g, seg, Y, static_cast<cudaStream_t>(stream));
}

int launch_gathered_outer(ScalarKind kind, const float* P, const void* X, PartialSlice sl, GateRows g, Segments seg,
                          float* G, void* stream) {
  if (!valid_slice(sl) || sl.s0 + sl.num_samples > seg.num_samples) return static_cast<int>(cudaErrorInvalidValue);
  // samples without tokens still get their (zero) tile written
  if (sl.num_samples == 0 || g.n_s + g.r == 0 || sl.cols == 0) return 0;
  return dispatch<OuterL>(kind, P, X, sl, g, seg, G, static_cast<cudaStream_t>(stream));
}

int launch_reduce_pool_rows(ScalarKind kind, const float* G, PartialSlice sl, GateRows g, int64_t n,
                            const bool* trainable, float* acc, bool first, bool last, void* out, void* stream) {
  if (!valid_slice(sl) || !valid_sum(acc, first, last)) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || sl.cols == 0) return 0;
  return dispatch<PoolL>(kind, G, sl, g, n, trainable, acc, first, last, out, static_cast<cudaStream_t>(stream));
}

int launch_reduce_shared_rows(ScalarKind kind, const float* G, PartialSlice sl, GateRows g, float* acc, bool first,
                              bool last, void* out, void* stream) {
  if (!valid_slice(sl) || !valid_sum(acc, first, last)) return static_cast<int>(cudaErrorInvalidValue);
  if (g.n_s == 0 || sl.cols == 0) return 0;
  return dispatch<SharedL>(kind, G, sl, g, acc, first, last, out, static_cast<cudaStream_t>(stream));
}

int launch_dval(const float* dS, const float* U, GateRows g, Segments seg, float* dval, void* stream) {
  if (seg.num_samples == 0 || g.r == 0) return 0;
  dval_kernel<<<static_cast<unsigned>(seg.num_samples), 256, 0, static_cast<cudaStream_t>(stream)>>>(dS, U, g, seg,
                                                                                                     dval);
  return last_error();
}

}  // namespace pclr
