// Launch functions of the pclr CUDA kernels (csrc/kernels/*.cu).
//
// This header is plain C++ on purpose: no CUDA and no torch types. ops.cpp (the torch-facing side: validation,
// schemas, ATen glue) includes it and can be syntax-checked against a CPU-only torch; the .cu files include it
// and compile without torch headers. Streams travel as `void*` (a cudaStream_t), dtypes as ScalarKind, and every
// launcher returns the cudaError_t of its launch as an int (0 = success).
//
// Vocabulary shared by all launchers (packed token layout of pclr.backends.base.LinearInputs):
//   T tokens, B samples, sample_of_token sot[T] in [0, B).
//   R = n_s + r active rank rows per sample: row k < n_s is shared row k, row k >= n_s is pool row idx[s, k - n_s].
//   scale(s, k) = beta_s for shared rows, val[s, k - n_s] * beta_m for pool rows (folded into the [T, R]
//   intermediate, never into the weights).
#pragma once

#include <cstdint>

namespace pclr {

enum class ScalarKind : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// Tokens of one sample processed together by the tiled kernels.
constexpr int kTileM = 64;
// Output columns per tile of the tiled kernels: the gradient workspace splits rows at multiples of it, so a split never
// changes how a row is tiled (nor, hence, a single bit of its partials).
constexpr int kTileN = 64;
// Up to this many tokens the forward takes the single-launch decode kernel. The value is pclr.options.DECODE_MAX_TOKENS,
// which setup.py passes as -DPCLR_DECODE_MAX_TOKENS so that Python dispatch and the kernels agree; the fallback only
// serves tools that compile a file on their own (editors, linters).
#ifndef PCLR_DECODE_MAX_TOKENS
#define PCLR_DECODE_MAX_TOKENS 64
#endif
constexpr int kDecodeMaxTokens = PCLR_DECODE_MAX_TOKENS;
// The decode workspace holds T * R ints per call and its grid is T * (G + C) blocks: keep T small.
static_assert(kDecodeMaxTokens >= 1 && kDecodeMaxTokens <= 1024, "PCLR_DECODE_MAX_TOKENS must be in [1, 1024]");
// The decode kernel stages a token's scaled activations (+ row pointers, 12 bytes per row) in shared memory in
// passes of at most this many rank rows, so every R runs with <= 12 KB of dynamic shared memory: far below the 48 KB
// a launch gets without the per-kernel opt-in, and R <= 1024 (every practical n_s + r) takes a single pass.
constexpr int kDecodeRankChunk = 1024;
// The gate sorts all n scores of a sample in shared memory (8 bytes each).
constexpr int kGateMaxExperts = 4096;

// One side (A: rows of length d_in, or B: rows of length d_out) of the active rank rows.
struct RowSet {
  const void* shared;  // [n_s, ld] or nullptr when n_s == 0
  const void* pool;    // [n, ld]
  int64_t ld;          // row length (rows are contiguous)
};

// The gate of every sample: which pool rows are active and how they are scaled.
struct GateRows {
  const int* idx;    // int32 [B, r]
  const float* val;  // fp32 [B, r]
  int n_s;
  int r;
  float beta_m;
  float beta_s;
};

// Tokens grouped by sample: sorted position p in [seg_start[s], seg_start[s+1]) holds token perm[p] of sample s.
// tile_off[s] = number of kTileM-token tiles of the samples before s (tile_off[B] = total tiles).
struct Segments {
  const int* perm;       // int32 [T]; nullptr = identity (tokens already grouped, the padded [B, L] layout)
  const int* seg_start;  // int32 [B + 1]
  const int* tile_off;   // int32 [B + 1]
  int num_samples;
};

// Upper bound on tiles for T tokens in B samples (each sample wastes at most one partial tile). The grids are sized
// by it so they depend on shapes only, never on the token distribution (CUDA-graph safe).
inline int64_t tile_bound(int64_t T, int64_t B) { return (T + kTileM - 1) / kTileM + B; }

// ---- bounded gradient workspace of the backward ------------------------------------------------------------------
// The pool / shared-row gradients are sums over samples of per-sample fp32 partials [R, d] (d = d_in for A, d_out
// for B). Holding all of them at once costs B * R * (d_in + d_out) * 4 bytes (0.8 GB at B = 256, R = 96, d = 4096),
// so the backward holds at most this many bytes of partials at a time: one side after the other, samples in chunks
// (and, when even one sample's [R, d] exceeds it, its rows in column slices of a multiple of kTileN). 64 MiB keeps each chunk's
// outer-product launch thousands of tiles wide (42 samples at R = 96, d = 4096: ~5400 blocks, many waves on any
// GPU), so chunking costs only a few launches and one fp32 accumulator pass over the n x d gradient per chunk, while
// staying small next to the activations of a training step.
constexpr int64_t kGradWorkspaceCapBytes = int64_t{64} << 20;

// How one backward walks its partials: sample chunks [c * samples_per_chunk, ...) in increasing order, each over the
// column slices [c0, c0 + cols_per_chunk) of a side's rows. Both sides (A, then B) reuse one workspace of `bytes`.
struct GradWorkspacePlan {
  int64_t samples_per_chunk;  // samples whose partials are held at once (>= 1 when B >= 1)
  int64_t num_chunks;         // ceil(B / samples_per_chunk)
  int64_t cols_per_chunk;     // max(d_in, d_out) when no column split, else a multiple of kTileN
  int64_t bytes;              // workspace bytes: samples_per_chunk * R * cols_per_chunk * 4
};

// Pure function of the shapes and the cap >= 1 (never of the data: the backward's launches stay graph capturable).
// bytes <= max(cap, R * kTileN * 4); every sample lands in exactly one chunk, chunks in sample order.
inline GradWorkspacePlan grad_workspace_plan(int64_t B, int64_t R, int64_t d_in, int64_t d_out, int64_t cap) {
  const int64_t d = d_in > d_out ? d_in : d_out;
  if (B <= 0 || R <= 0 || d <= 0) return GradWorkspacePlan{0, 0, 0, 0};
  const int64_t col_bytes = R * static_cast<int64_t>(sizeof(float));  // one column of one sample's partial
  int64_t samples = 1, cols = d;
  if (col_bytes * d <= cap) {
    samples = cap / (col_bytes * d);
    if (samples > B) samples = B;
  } else {
    cols = cap / col_bytes / kTileN * kTileN;
    if (cols < kTileN) cols = kTileN;
    if (cols > d) cols = d;
  }
  return GradWorkspacePlan{samples, (B + samples - 1) / samples, cols, samples * R * cols * 4};
}

// ---- gate --------------------------------------------------------------------------------------------------------
// score[b, j] (+)= w * cos(q[b], k[j]) for one query part; q [B, d], k [n, d] contiguous, same dtype.
// accumulate = false overwrites (first part), true adds (later parts, same stream so ordered).
int launch_gate_scores(ScalarKind kind, const void* q, const void* k, int64_t B, int64_t n, int64_t d, float w,
                       bool accumulate, float* score, void* stream);
// Top-r of score [B, n] (n <= kGateMaxExperts) with ties going to the lower index; cand is bool [B, n] (row stride
// n) or [n] (row stride 0) or nullptr. batch = rank by the batch-summed score (same experts for every sample).
// soft = val is the sample's own score, else 1.
int launch_gate_topk(const float* score, int64_t B, int64_t n, int r, const bool* cand, int64_t cand_row_stride,
                     bool batch, bool soft, int* idx, float* val, void* stream);

// ---- forward -----------------------------------------------------------------------------------------------------
// Ints of zero-initialised workspace the decode kernel needs (ticket, per-token readiness, [T, R] activations).
int64_t decode_workspace_ints(int64_t T, int64_t R);
// y[t] += sum_k scale(s,k) * (x[t] . A_k) * B_k for every token, s = sot[t]; one launch (shrink + expand).
int launch_lrp_decode(ScalarKind kind, const void* x, void* y, const int* sot, int64_t T, int64_t d_in,
                      int64_t d_out, RowSet A, RowSet B, GateRows g, int* workspace, void* stream);

// ---- tiled (prefill and backward) --------------------------------------------------------------------------------
// out[t, k] = X[t] . rows_k(s)   (unscaled), out fp32 [T, R]; X [T, K] with K = rows.ld.
int launch_gathered_shrink(ScalarKind kind, const void* X, int64_t T, RowSet rows, GateRows g, Segments seg,
                           float* out, void* stream);
// Y[t, :] += sum_k scale(s,k) * P[t, k] * rows_k(s)[:], P fp32 [T, R]; Y [T, N] with N = rows.ld.
int launch_gathered_expand(ScalarKind kind, const float* P, int64_t T, RowSet rows, GateRows g, Segments seg,
                           void* Y, void* stream);
// A slice of the per-sample partials: samples [s0, s0 + num_samples), columns [c0, c0 + cols) of rows of length N.
// The workspace G holds it as fp32 [num_samples, R, cols] (row stride cols).
struct PartialSlice {
  int64_t s0, num_samples;
  int64_t c0, cols;
  int64_t N;
};

// G[s - s0, k, c - c0] = sum_{t in s} scale(s,k) * P[t, k] * X[t, c] over the slice; X [T, N].
// A sample without tokens gets zero partials (written, never skipped).
int launch_gathered_outer(ScalarKind kind, const float* P, const void* X, PartialSlice sl, GateRows g, Segments seg,
                          float* G, void* stream);
// Pool rows j in [0, n), columns of the slice: sum over (s, k) of the slice's samples with idx[s, k] == j of
// G[s - s0, n_s + k, :], added in increasing (s, k) order onto the running fp32 sum acc [n, N] (read unless `first`,
// written unless `last`), and on the `last` slice written to out [n, N] (dtype kind); acc may be nullptr when the
// slice is both first and last. Frozen rows (trainable[j] false; trainable may be nullptr = all rows) are exact zeros.
// The order of additions is the order of the whole batch whatever the chunking: bit-identical for every plan.
int launch_reduce_pool_rows(ScalarKind kind, const float* G, PartialSlice sl, GateRows g, int64_t n,
                            const bool* trainable, float* acc, bool first, bool last, void* out, void* stream);
// Shared rows k < n_s: sum over the slice's samples, in sample order, of G[s - s0, k, :], carried in acc [n_s, N] and
// written to out [n_s, N] (dtype kind) on the last slice, as for the pool rows.
int launch_reduce_shared_rows(ScalarKind kind, const float* G, PartialSlice sl, GateRows g, float* acc, bool first,
                              bool last, void* out, void* stream);
// dval[s, k] = beta_m * sum_{t in s} dS[t, n_s + k] * U[t, n_s + k]; dS, U fp32 [T, R]; dval fp32 [B, r].
int launch_dval(const float* dS, const float* U, GateRows g, Segments seg, float* dval, void* stream);

// Human-readable text of a launcher's return code.
const char* error_string(int code);

}  // namespace pclr
