// The gate: per-sample weighted multi-part cosine against every key, then top-r.
//
// Two kernels per call, both with grids sized by (B, n, d) only, no host synchronisation (CUDA-graph safe):
//   gate_scores_kernel  once per query part, adds w_p * cos(q_p[b], K_p[j]) into an fp32 score [B, n];
//   gate_topk_kernel    one block per sample (one block in total for batch scope) sorts all n scores.
#include "common.cuh"

namespace pclr {
namespace {

// ---- scores -------------------------------------------------------------------------------------------------------
// Launch geometry: 256 threads = 8 warps; warp w of block (x, y) owns key j = x * 8 + w and the kScoreQ queries
// b = y * kScoreQ + i. Lanes stride over d (coalesced), each lane keeps kScoreQ dot products and the squared norms,
// then one warp reduction. The key row is read once per query tile; the 8 warps of a block read the same queries,
// which stay in L1. Norms are computed in the same pass (no separate normalisation kernel).
constexpr int kScoreWarps = 8;
constexpr int kScoreQ = 8;

template <typename T>
__global__ void __launch_bounds__(kScoreWarps * 32)
gate_scores_kernel(const T* __restrict__ q, const T* __restrict__ k, int B, int n, int64_t d, float w, bool accumulate,
                   float* __restrict__ score) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kScoreWarps + (threadIdx.x >> 5);
  const int b0 = blockIdx.y * kScoreQ;
  if (j >= n) return;  // whole warp exits together: no later block-level barrier
  const int nq = min(kScoreQ, B - b0);
  const T* krow = k + static_cast<int64_t>(j) * d;
  float dot[kScoreQ], qq[kScoreQ], kk = 0.0f;
#pragma unroll
  for (int i = 0; i < kScoreQ; ++i) dot[i] = qq[i] = 0.0f;
  for (int64_t c = lane; c < d; c += 32) {
    const float kv = dev::to_float(krow[c]);
    kk += kv * kv;
#pragma unroll
    for (int i = 0; i < kScoreQ; ++i) {
      if (i < nq) {
        const float qv = dev::to_float(q[static_cast<int64_t>(b0 + i) * d + c]);
        dot[i] += qv * kv;
        qq[i] += qv * qv;
      }
    }
  }
  kk = dev::warp_sum(kk);
  // F.normalize semantics: v / max(||v||, eps), so an all-zero query contributes exactly 0.
  const float kn = fmaxf(sqrtf(kk), 1e-12f);
#pragma unroll
  for (int i = 0; i < kScoreQ; ++i) {
    if (i < nq) {
      const float dt = dev::warp_sum(dot[i]);
      const float qn = fmaxf(sqrtf(dev::warp_sum(qq[i])), 1e-12f);
      if (lane == 0) {
        float* out = score + static_cast<int64_t>(b0 + i) * n + j;
        const float v = w * (dt / (qn * kn));
        *out = accumulate ? *out + v : v;
      }
    }
  }
}

// ---- top-r ----------------------------------------------------------------------------------------------------
// Launch geometry: one block of 512 threads per sample (grid = B) or one block for batch scope. The block builds a
// 64-bit key per expert, (order-preserving bits of the score) << 32 | (~j), so a descending sort orders by score
// and, among equal scores, by lower index first: exactly the reference's stable descending sort. The score bits
// come in three tiers, as in the Triton gate: candidates with a number (finite or +-inf) by value, then candidates
// whose score is NaN (any sign or payload), then non-candidates; so the top r are never a NaN or a non-candidate
// while a number remains. The padding up to a power of two gets key 0, below every real key. A bitonic sort of
// <= 4096 keys in shared memory (32 KB) is ~80 barrier-separated passes: simple, deterministic, never data-dependent.
constexpr int kTopkThreads = 512;
constexpr uint32_t kNaNTier = 1u;       // below order_bits(-inf) = 0x007fffff, above kNotCandidate
constexpr uint32_t kNotCandidate = 0u;  // (key 0 overall stays free for the padding: the index half is ~j != 0)

// Order-preserving bits of a number: a > b (as floats) <=> order_bits(a) > order_bits(b); -0 ties +0. Never
// called with NaN (see rank_bits): NaN's raw bits would land above +inf or below -inf depending on its sign.
__device__ __forceinline__ uint32_t order_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) == 0u) u = 0u;  // -0 == +0: must tie, not order
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint32_t rank_bits(float s, bool candidate) {
  if (!candidate) return kNotCandidate;
  return isnan(s) ? kNaNTier : order_bits(s);
}

__global__ void __launch_bounds__(kTopkThreads)
gate_topk_kernel(const float* __restrict__ score, int B, int n, int n_pad, int r, const bool* __restrict__ cand,
                 int64_t cand_stride, bool batch, bool soft, int* __restrict__ idx, float* __restrict__ val) {
  __shared__ unsigned long long keys[kGateMaxExperts];
  const int b = blockIdx.x;  // sample (sample scope) or 0 (batch scope)
  for (int j = threadIdx.x; j < n_pad; j += blockDim.x) {
    unsigned long long key = 0ull;
    if (j < n) {
      float s = 0.0f;
      bool ok = true;
      if (batch) {  // the batch-summed score; a candidate only if it is one for every sample (the intersection)
        for (int bb = 0; bb < B; ++bb) {
          ok = ok && (cand == nullptr || cand[bb * cand_stride + j]);
          s += score[static_cast<int64_t>(bb) * n + j];
        }
      } else {
        ok = cand == nullptr || cand[b * cand_stride + j];
        s = score[static_cast<int64_t>(b) * n + j];
      }
      key = (static_cast<unsigned long long>(rank_bits(s, ok)) << 32) |
            static_cast<uint32_t>(~static_cast<uint32_t>(j));
    }
    keys[j] = key;
  }
  __syncthreads();
  for (int size = 2; size <= n_pad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n_pad; i += blockDim.x) {
        const int p = i ^ stride;
        if (p > i) {
          const unsigned long long a = keys[i], c = keys[p];
          const bool descending = (i & size) == 0;  // the final merge (size == n_pad) is descending
          if (descending ? (a < c) : (a > c)) {
            keys[i] = c;
            keys[p] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  const int rows_out = batch ? B : 1;
  for (int e = threadIdx.x; e < rows_out * r; e += blockDim.x) {
    const int bb = batch ? e / r : b;
    const int kk = batch ? e % r : e;
    const int j = static_cast<int>(~static_cast<uint32_t>(keys[kk] & 0xffffffffull));
    idx[static_cast<int64_t>(bb) * r + kk] = j;
    val[static_cast<int64_t>(bb) * r + kk] = soft ? score[static_cast<int64_t>(bb) * n + j] : 1.0f;
  }
}

template <typename T>
int scores_impl(const void* q, const void* k, int64_t B, int64_t n, int64_t d, float w, bool accumulate, float* score,
                cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kScoreWarps - 1) / kScoreWarps),
                  static_cast<unsigned>((B + kScoreQ - 1) / kScoreQ));
  gate_scores_kernel<T><<<grid, kScoreWarps * 32, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                                static_cast<int>(B), static_cast<int>(n), d, w,
                                                                accumulate, score);
  return last_error();
}

}  // namespace

int launch_gate_scores(ScalarKind kind, const void* q, const void* k, int64_t B, int64_t n, int64_t d, float w,
                       bool accumulate, float* score, void* stream) {
  if (B == 0 || n == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case ScalarKind::kFloat: return scores_impl<float>(q, k, B, n, d, w, accumulate, score, s);
    case ScalarKind::kHalf: return scores_impl<__half>(q, k, B, n, d, w, accumulate, score, s);
    case ScalarKind::kBFloat16: return scores_impl<__nv_bfloat16>(q, k, B, n, d, w, accumulate, score, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_gate_topk(const float* score, int64_t B, int64_t n, int r, const bool* cand, int64_t cand_row_stride,
                     bool batch, bool soft, int* idx, float* val, void* stream) {
  if (B == 0 || r == 0) return 0;
  if (n > kGateMaxExperts || r > n) return static_cast<int>(cudaErrorInvalidValue);
  int n_pad = 1;
  while (n_pad < n) n_pad <<= 1;
  const unsigned grid = batch ? 1u : static_cast<unsigned>(B);
  gate_topk_kernel<<<grid, kTopkThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      score, static_cast<int>(B), static_cast<int>(n), n_pad, r, cand, cand_row_stride, batch, soft, idx, val);
  return last_error();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace pclr
