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
// G[s, k, :] = sum_{t in s} scale(s,k) * P[t, k] * X[t, :], G fp32 [B, R, N]; X [T, N].
int launch_gathered_outer(ScalarKind kind, const float* P, const void* X, int64_t T, int64_t N, GateRows g,
                          Segments seg, float* G, void* stream);
// out[j, :] = trainable[j] ? sum over (s, k) with idx[s, k] == j of G[s, n_s + k, :] : 0, out [n, N] (dtype kind).
// Summed in increasing (s, k) order: bit-reproducible without atomics. trainable may be nullptr (all rows).
int launch_reduce_pool_rows(ScalarKind kind, const float* G, int64_t B, int64_t N, GateRows g, int64_t n,
                            const bool* trainable, void* out, void* stream);
// out[k, :] = sum_s G[s, k, :] for the n_s shared rows, out [n_s, N] (dtype kind).
int launch_reduce_shared_rows(ScalarKind kind, const float* G, int64_t B, int64_t N, GateRows g, void* out,
                              void* stream);
// dval[s, k] = beta_m * sum_{t in s} dS[t, n_s + k] * U[t, n_s + k]; dS, U fp32 [T, R]; dval fp32 [B, r].
int launch_dval(const float* dS, const float* U, GateRows g, Segments seg, float* dval, void* stream);

// Human-readable text of a launcher's return code.
const char* error_string(int code);

}  // namespace pclr
