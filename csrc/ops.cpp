// Torch-facing side of pclr._C: argument validation, the ATen glue around the kernels, and the op registrations
// (`torch.ops.pclr.cuda_gate`, `torch.ops.pclr.cuda_lrp_forward`, `torch.ops.pclr.cuda_lrp_backward`).
//
// The base products x.W^T (+ bias) and dY.W stay on cuBLAS through ATen; the kernels add the LRP terms in place on
// those fresh outputs. All metadata (sample segments, workspaces) is built with asynchronous ATen ops: nothing here
// reads a device value on the host, so every op is CUDA-graph capturable and its launch grids depend on shapes only.
//
// The ops are registered as a FRAGMENT of the `pclr` namespace: the Python side registers its own `pclr::*` custom
// ops (one per backend) in the same namespace.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

// A CUDA build of torch ships the complete c10/cuda headers; a CPU-only torch (used to syntax-check this file in
// CI) does not, and then the current stream is taken through the device-generic guard interface instead.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define PCLR_HAVE_C10_CUDA 1
#endif

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pclr_ops.h"

namespace pclr {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- validation ----------------------------------------------------------------------------------------------
std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// `expected` spells the wanted shape for the message, e.g. "[n, d_in=4096]"; -1 in `sizes` accepts any size.
void check_arg(const Tensor& t, const char* name, const std::vector<int64_t>& sizes, const std::string& expected,
               const c10::Device& device) {
  TORCH_CHECK(t.device() == device, "pclr: ", name, " is on ", t.device(), " but the inputs are on ", device);
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), "pclr: ", name, " must be ", sizes.size(), "-D ",
              expected, ", got shape ", shape_str(t));
  for (size_t i = 0; i < sizes.size(); ++i) {
    TORCH_CHECK(sizes[i] < 0 || t.size(static_cast<int64_t>(i)) == sizes[i], "pclr: ", name, " must have shape ",
                expected, ", got ", shape_str(t));
  }
  TORCH_CHECK(t.is_contiguous(), "pclr: ", name, " must be contiguous (call .contiguous()), got strides ",
              t.strides());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "pclr: ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

ScalarKind kind_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kHalf: return ScalarKind::kHalf;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "pclr: ", name, " must be float32, float16 or bfloat16 for the cuda backend, got ",
                  t.scalar_type());
  }
  return ScalarKind::kFloat;  // unreachable
}

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "pclr: CUDA launch of ", what, " failed: ", error_string(code));
}

// The current CUDA stream of t's device, as a cudaStream_t: kernels run on it, ordered after the cuBLAS calls.
void* stream_of(const Tensor& t) {
#ifdef PCLR_HAVE_C10_CUDA
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStreamNativeHandle(impl.getStream(t.device()));
#endif
}

// ---- lrp_linear arguments ------------------------------------------------------------------------------------
struct Lrp {
  int64_t T, d_in, d_out, n, B, r, n_s, R;
  ScalarKind kind;
  RowSet A, Bm;
  GateRows g;
};

// Validates the packed-layout arguments shared by forward and backward (see pclr.backends.base.LinearInputs).
Lrp check_lrp(const Tensor& x, const Tensor& weight, const Tensor& A_m, const Tensor& B_m, const Tensor& idx,
              const Tensor& val, const OptTensor& A_s, const OptTensor& B_s, const Tensor& sot, double beta_m,
              double beta_s, int64_t padded_len) {
  TORCH_CHECK(x.is_cuda(), "pclr: x must be a CUDA tensor for the cuda backend, got device ", x.device());
  const auto dev = x.device();
  Lrp p{};
  p.kind = kind_of(x, "x");
  TORCH_CHECK(x.dim() == 2, "pclr: x must be 2-D [T, d_in] (packed tokens), got shape ", shape_str(x));
  p.T = x.size(0);
  p.d_in = x.size(1);
  check_arg(x, "x", {-1, -1}, "[T, d_in]", dev);
  const std::string din = std::to_string(p.d_in);
  check_arg(weight, "weight", {-1, p.d_in}, "[d_out, " + din + "]", dev);
  check_dtype(weight, "weight", x.scalar_type());
  p.d_out = weight.size(0);
  const std::string dout = std::to_string(p.d_out);
  check_arg(A_m, "A_m", {-1, p.d_in}, "[n, " + din + "]", dev);
  check_dtype(A_m, "A_m", x.scalar_type());
  p.n = A_m.size(0);
  check_arg(B_m, "B_m", {p.n, p.d_out}, "[" + std::to_string(p.n) + ", " + dout + "] (n of A_m)", dev);
  check_dtype(B_m, "B_m", x.scalar_type());
  check_arg(idx, "idx", {-1, -1}, "[B, r]", dev);
  check_dtype(idx, "idx", at::kInt);
  p.B = idx.size(0);
  p.r = idx.size(1);
  const std::string br = "[" + std::to_string(p.B) + ", " + std::to_string(p.r) + "] (shape of idx)";
  check_arg(val, "val", {p.B, p.r}, br, dev);
  check_dtype(val, "val", at::kFloat);
  TORCH_CHECK(A_s.has_value() == B_s.has_value(), "pclr: A_s and B_s must be given together or both be None");
  p.n_s = 0;
  if (A_s.has_value()) {
    check_arg(*A_s, "A_s", {-1, p.d_in}, "[n_s, " + din + "]", dev);
    check_dtype(*A_s, "A_s", x.scalar_type());
    p.n_s = A_s->size(0);
    check_arg(*B_s, "B_s", {p.n_s, p.d_out}, "[" + std::to_string(p.n_s) + ", " + dout + "] (n_s of A_s)", dev);
    check_dtype(*B_s, "B_s", x.scalar_type());
  }
  check_arg(sot, "sample_of_token", {p.T}, "[" + std::to_string(p.T) + "] (T of x)", dev);
  check_dtype(sot, "sample_of_token", at::kInt);
  TORCH_CHECK(padded_len >= 0, "pclr: padded_len must be >= 0, got ", padded_len);
  TORCH_CHECK(padded_len == 0 || padded_len * p.B == p.T, "pclr: padded_len (", padded_len, ") * B (", p.B,
              ") must equal T (", p.T, ") for the padded [B, L] layout");
  TORCH_CHECK(p.r == 0 || p.n > 0, "pclr: idx selects r=", p.r, " experts per sample but the pool A_m is empty");
  TORCH_CHECK(p.T < (int64_t{1} << 31) && p.B < (int64_t{1} << 31) && p.n < (int64_t{1} << 31),
              "pclr: T, B and n must each be < 2^31 (int32 indices)");
  p.R = p.n_s + p.r;
  p.A = RowSet{p.n_s ? A_s->data_ptr() : nullptr, A_m.data_ptr(), p.d_in};
  p.Bm = RowSet{p.n_s ? B_s->data_ptr() : nullptr, B_m.data_ptr(), p.d_out};
  p.g = GateRows{idx.data_ptr<int>(), val.data_ptr<float>(), static_cast<int>(p.n_s), static_cast<int>(p.r),
                 static_cast<float>(beta_m), static_cast<float>(beta_s)};
  return p;
}

// Tokens grouped by sample, built on the device (stable sort: a fixed order, hence reproducible reductions).
struct SegmentTensors {
  Tensor perm, seg_start, tile_off;
  Segments view;
};

SegmentTensors make_segments(const Tensor& sot, int64_t B, int64_t padded_len) {
  SegmentTensors s;
  const auto opts = sot.options().dtype(at::kLong);
  Tensor counts;
  if (padded_len > 0) {  // [B, L] layout: tokens already grouped, no permutation
    counts = at::full({B}, padded_len, opts);
  } else {
    const Tensor sot64 = sot.to(at::kLong);
    counts = at::zeros({B}, opts).index_add_(0, sot64, at::ones_like(sot64));
    s.perm = std::get<1>(at::sort(sot, /*stable=*/true, /*dim=*/0, /*descending=*/false)).to(at::kInt);
  }
  const Tensor zero = at::zeros({1}, opts);
  s.seg_start = at::cat({zero, counts.cumsum(0)}).to(at::kInt);
  const Tensor tiles = at::div(counts + (kTileM - 1), kTileM, "floor");
  s.tile_off = at::cat({zero, tiles.cumsum(0)}).to(at::kInt);
  s.view = Segments{s.perm.defined() ? s.perm.data_ptr<int>() : nullptr, s.seg_start.data_ptr<int>(),
                    s.tile_off.data_ptr<int>(), static_cast<int>(B)};
  return s;
}

// ---- bounded gradient workspace ------------------------------------------------------------------------------
// One side of the row gradients: the partials are (P * scale)^T X per sample (P = dS and X = x for A, P = U and X = dY
// for B), summed into the pool rows `pool` and the shared rows `shared` (undefined when not requested).
struct SideGrads {
  const float* P;
  const void* X;
  int64_t N;  // row length: d_in for A, d_out for B
  Tensor pool, shared;
  const char* what;
};

// Walks `plan`: for each side, each sample chunk in order and each column slice, the chunk's partials go into one
// reused fp32 workspace and are added onto the row gradients' running fp32 sums (the outputs themselves when they are
// fp32, else scratch), so memory stays at plan.bytes + the gradients whatever B is. Shapes alone decide every launch:
// no host sync, graph capturable.
void reduce_row_grads(const Lrp& p, const Segments& seg, const GradWorkspacePlan& plan,
                      std::initializer_list<SideGrads> sides, bool need_pool, bool shared, const bool* trainable,
                      const at::TensorOptions& opts, void* st) {
  const auto f32 = opts.dtype(at::kFloat);
  Tensor ws = at::empty({plan.bytes / static_cast<int64_t>(sizeof(float))}, f32);
  const bool chunked = plan.num_chunks > 1;
  for (const SideGrads& side : sides) {
    const auto running = [&](const Tensor& out) -> Tensor {
      if (!chunked || !out.defined()) return Tensor();
      return p.kind == ScalarKind::kFloat ? out : at::empty(out.sizes(), f32);
    };
    const Tensor pool_acc = need_pool ? running(side.pool) : Tensor();
    const Tensor shared_acc = shared ? running(side.shared) : Tensor();
    const std::string what = side.what;
    for (int64_t c = 0; c < plan.num_chunks; ++c) {
      const int64_t s0 = c * plan.samples_per_chunk;
      const int64_t ns = std::min(plan.samples_per_chunk, p.B - s0);
      const bool first = c == 0, last = c == plan.num_chunks - 1;
      for (int64_t c0 = 0; c0 < side.N; c0 += plan.cols_per_chunk) {
        const PartialSlice sl{s0, ns, c0, std::min(plan.cols_per_chunk, side.N - c0), side.N};
        check_launch(launch_gathered_outer(p.kind, side.P, side.X, sl, p.g, seg, ws.data_ptr<float>(), st),
                     ("gathered_outer(" + what + ")").c_str());
        if (need_pool) {
          check_launch(launch_reduce_pool_rows(p.kind, ws.data_ptr<float>(), sl, p.g, p.n, trainable,
                                               pool_acc.defined() ? pool_acc.data_ptr<float>() : nullptr, first, last,
                                               side.pool.data_ptr(), st),
                       ("reduce_pool_rows(" + what + ")").c_str());
        }
        if (shared) {
          check_launch(launch_reduce_shared_rows(p.kind, ws.data_ptr<float>(), sl, p.g,
                                                 shared_acc.defined() ? shared_acc.data_ptr<float>() : nullptr, first,
                                                 last, side.shared.data_ptr(), st),
                       ("reduce_shared_rows(" + what + "_s)").c_str());
        }
      }
    }
  }
}

// ---- ops -----------------------------------------------------------------------------------------------------
Tensor lrp_forward_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A_m,
                        const Tensor& B_m, const Tensor& idx, const Tensor& val, const OptTensor& A_s,
                        const OptTensor& B_s, const Tensor& sot, double beta_m, double beta_s, int64_t padded_len) {
  const Lrp p = check_lrp(x, weight, A_m, B_m, idx, val, A_s, B_s, sot, beta_m, beta_s, padded_len);
  if (bias.has_value()) {
    check_arg(*bias, "bias", {p.d_out}, "[" + std::to_string(p.d_out) + "]", x.device());
    check_dtype(*bias, "bias", x.scalar_type());
  }
  const c10::DeviceGuard guard(x.device());
  Tensor y = at::linear(x, weight, bias).contiguous();  // cuBLAS
  if (p.T == 0 || p.R == 0 || p.d_out == 0) return y;
  void* st = stream_of(x);
  if (p.T <= kDecodeMaxTokens) {  // any R: the decode kernel stages rank rows in bounded passes
    Tensor ws = at::zeros({decode_workspace_ints(p.T, p.R)}, x.options().dtype(at::kInt));
    check_launch(launch_lrp_decode(p.kind, x.data_ptr(), y.data_ptr(), sot.data_ptr<int>(), p.T, p.d_in, p.d_out,
                                   p.A, p.Bm, p.g, ws.data_ptr<int>(), st),
                 "lrp_decode");
    return y;
  }
  const SegmentTensors seg = make_segments(sot, p.B, padded_len);
  Tensor u = at::empty({p.T, p.R}, x.options().dtype(at::kFloat));
  check_launch(launch_gathered_shrink(p.kind, x.data_ptr(), p.T, p.A, p.g, seg.view, u.data_ptr<float>(), st),
               "gathered_shrink");
  check_launch(launch_gathered_expand(p.kind, u.data_ptr<float>(), p.T, p.Bm, p.g, seg.view, y.data_ptr(), st),
               "gathered_expand");
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lrp_backward_cuda(
    const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& A_m, const Tensor& B_m, const Tensor& idx,
    const Tensor& val, const OptTensor& A_s, const OptTensor& B_s, const Tensor& sot, const OptTensor& trainable,
    double beta_m, double beta_s, int64_t padded_len, bool need_x, bool need_pool, bool need_val, bool need_shared,
    int64_t workspace_cap_bytes) {
  const Lrp p = check_lrp(x, weight, A_m, B_m, idx, val, A_s, B_s, sot, beta_m, beta_s, padded_len);
  check_arg(grad, "grad", {p.T, p.d_out}, "[" + std::to_string(p.T) + ", " + std::to_string(p.d_out) + "] (y)",
            x.device());
  check_dtype(grad, "grad", x.scalar_type());
  if (trainable.has_value()) {
    check_arg(*trainable, "trainable", {p.n}, "[" + std::to_string(p.n) + "]", x.device());
    check_dtype(*trainable, "trainable", at::kBool);
  }
  TORCH_CHECK(workspace_cap_bytes >= 0, "pclr: workspace_cap_bytes must be >= 0 (0 = the default of ",
              kGradWorkspaceCapBytes, " bytes), got ", workspace_cap_bytes);
  const c10::DeviceGuard guard(x.device());
  const bool shared = need_shared && p.n_s > 0;
  const Tensor none = x.new_empty({0});
  Tensor dx = none, dA = none, dB = none, dval = none, dAs = none, dBs = none;
  if (p.T == 0 || p.R == 0 || p.B == 0) {  // no LRP term: only the base gradient, parameter grads are zero
    if (need_x) dx = at::matmul(grad, weight);
    if (need_pool) dA = at::zeros_like(A_m), dB = at::zeros_like(B_m);
    if (need_val) dval = at::zeros_like(val);
    if (shared) dAs = at::zeros_like(*A_s), dBs = at::zeros_like(*B_s);
    return {dx, dA, dB, dval, dAs, dBs};
  }
  void* st = stream_of(x);
  const SegmentTensors seg = make_segments(sot, p.B, padded_len);
  const auto f32 = x.options().dtype(at::kFloat);
  // dS = dY . B_eff^T (unscaled); every requested gradient needs it.
  Tensor dS = at::empty({p.T, p.R}, f32);
  check_launch(launch_gathered_shrink(p.kind, grad.data_ptr(), p.T, p.Bm, p.g, seg.view, dS.data_ptr<float>(), st),
               "gathered_shrink(dY)");
  if (need_x) {  // dX = dY . W (cuBLAS) + (dS * scale) . A_eff
    dx = at::matmul(grad, weight).contiguous();
    check_launch(launch_gathered_expand(p.kind, dS.data_ptr<float>(), p.T, p.A, p.g, seg.view, dx.data_ptr(), st),
                 "gathered_expand(dX)");
  }
  Tensor U;
  if (need_pool || shared || need_val) {  // U = x . A_eff^T (unscaled), recomputed rather than saved
    U = at::empty({p.T, p.R}, f32);
    check_launch(launch_gathered_shrink(p.kind, x.data_ptr(), p.T, p.A, p.g, seg.view, U.data_ptr<float>(), st),
                 "gathered_shrink(x)");
  }
  if (need_pool || shared) {
    if (need_pool) dA = at::empty_like(A_m), dB = at::empty_like(B_m);
    if (shared) dAs = at::empty_like(*A_s), dBs = at::empty_like(*B_s);
    const int64_t cap = workspace_cap_bytes > 0 ? workspace_cap_bytes : kGradWorkspaceCapBytes;
    const bool* tr = trainable.has_value() ? trainable->data_ptr<bool>() : nullptr;
    const SideGrads a{dS.data_ptr<float>(), x.data_ptr(), p.A.ld, dA, dAs, "dA"};
    const SideGrads b{U.data_ptr<float>(), grad.data_ptr(), p.Bm.ld, dB, dBs, "dB"};
    reduce_row_grads(p, seg.view, grad_workspace_plan(p.B, p.R, p.d_in, p.d_out, cap), {a, b}, need_pool, shared, tr,
                     x.options(), st);
  }
  if (need_val) {
    dval = at::empty({p.B, p.r}, f32);
    check_launch(launch_dval(dS.data_ptr<float>(), U.data_ptr<float>(), p.g, seg.view, dval.data_ptr<float>(), st),
                 "dval");
  }
  return {dx, dA, dB, dval, dAs, dBs};
}

std::tuple<Tensor, Tensor> gate_cuda(at::TensorList query, at::TensorList keys, c10::ArrayRef<double> weights,
                                     int64_t r, const OptTensor& candidates, bool batch_scope, bool soft) {
  TORCH_CHECK(!query.empty() && query.size() == keys.size(), "pclr: query and keys must be non-empty lists with the "
              "same number of parts, got ", query.size(), " and ", keys.size());
  TORCH_CHECK(weights.size() == query.size(), "pclr: weights must have one entry per part (", query.size(),
              "), got ", weights.size());
  TORCH_CHECK(keys[0].is_cuda(), "pclr: keys[0] must be a CUDA tensor for the cuda backend, got ", keys[0].device());
  const auto dev = keys[0].device();
  TORCH_CHECK(query[0].dim() == 2 && keys[0].dim() == 2, "pclr: query[0] must be [B, d] and keys[0] [n, d], got ",
              shape_str(query[0]), " and ", shape_str(keys[0]));
  const int64_t B = query[0].size(0), n = keys[0].size(0);
  TORCH_CHECK(n <= kGateMaxExperts, "pclr: the cuda gate supports n <= ", kGateMaxExperts, " experts, got ", n);
  TORCH_CHECK(r >= 1 && r <= n, "pclr: r must be in [1, n=", n, "], got ", r);
  for (size_t i = 0; i < query.size(); ++i) {
    const std::string qn = "query[" + std::to_string(i) + "]", kn = "keys[" + std::to_string(i) + "]";
    const int64_t d = keys[i].dim() == 2 ? keys[i].size(1) : -1;
    check_arg(keys[i], kn.c_str(), {n, -1}, "[" + std::to_string(n) + ", d_p]", dev);
    check_arg(query[i], qn.c_str(), {B, d}, "[" + std::to_string(B) + ", " + std::to_string(d) + "] (d of " + kn + ")",
              dev);
    kind_of(keys[i], kn.c_str());
    check_dtype(query[i], qn.c_str(), keys[i].scalar_type());
  }
  int64_t cand_stride = 0;
  if (candidates.has_value()) {
    const Tensor& c = *candidates;
    check_dtype(c, "candidates", at::kBool);
    if (c.dim() == 1) {
      check_arg(c, "candidates", {n}, "[n] or [B, n]", dev);
    } else {
      check_arg(c, "candidates", {B, n}, "[n] or [B, n]", dev);
      cand_stride = n;
    }
  }
  const c10::DeviceGuard guard(dev);
  void* st = stream_of(keys[0]);
  const auto f32 = keys[0].options().dtype(at::kFloat);
  Tensor score = at::empty({B, n}, f32);
  for (size_t i = 0; i < query.size(); ++i) {
    check_launch(launch_gate_scores(kind_of(keys[i], "keys"), query[i].data_ptr(), keys[i].data_ptr(), B, n,
                                    keys[i].size(1), static_cast<float>(weights[i]), i > 0, score.data_ptr<float>(),
                                    st),
                 "gate_scores");
  }
  Tensor idx = at::empty({B, r}, keys[0].options().dtype(at::kInt));
  Tensor val = at::empty({B, r}, f32);
  const bool* cand = candidates.has_value() ? candidates->data_ptr<bool>() : nullptr;
  check_launch(launch_gate_topk(score.data_ptr<float>(), B, n, static_cast<int>(r), cand, cand_stride, batch_scope,
                                soft, idx.data_ptr<int>(), val.data_ptr<float>(), st),
               "gate_topk");
  return {idx, val};
}

// ---- meta (fake) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing -------------------
Tensor lrp_forward_meta(const Tensor& x, const Tensor& weight, const OptTensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, double, double,
                        int64_t) {
  return x.new_empty({x.size(0), weight.size(0)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lrp_backward_meta(
    const Tensor&, const Tensor& x, const Tensor&, const Tensor& A_m, const Tensor& B_m, const Tensor&,
    const Tensor& val, const OptTensor& A_s, const OptTensor& B_s, const Tensor&, const OptTensor&, double, double,
    int64_t, bool need_x, bool need_pool, bool need_val, bool need_shared, int64_t) {
  const bool shared = need_shared && A_s.has_value() && A_s->size(0) > 0;
  const Tensor none = x.new_empty({0});
  return {need_x ? at::empty_like(x) : none,
          need_pool ? at::empty_like(A_m) : none,
          need_pool ? at::empty_like(B_m) : none,
          need_val ? at::empty_like(val) : none,
          shared ? at::empty_like(*A_s) : none,
          shared ? at::empty_like(*B_s) : none};
}

std::tuple<Tensor, Tensor> gate_meta(at::TensorList query, at::TensorList keys, c10::ArrayRef<double>, int64_t r,
                                     const OptTensor&, bool, bool) {
  const int64_t B = query[0].size(0);
  return {keys[0].new_empty({B, r}, keys[0].options().dtype(at::kInt)),
          keys[0].new_empty({B, r}, keys[0].options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace pclr

TORCH_LIBRARY_FRAGMENT(pclr, m) {
  m.def("cuda_gate(Tensor[] query, Tensor[] keys, float[] weights, int r, Tensor? candidates, bool batch_scope, "
        "bool soft) -> (Tensor, Tensor)");
  m.def("cuda_lrp_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A_m, Tensor B_m, Tensor idx, Tensor val, "
        "Tensor? A_s, Tensor? B_s, Tensor sample_of_token, float beta_m, float beta_s, int padded_len) -> Tensor");
  m.def("cuda_lrp_backward(Tensor grad, Tensor x, Tensor weight, Tensor A_m, Tensor B_m, Tensor idx, Tensor val, "
        "Tensor? A_s, Tensor? B_s, Tensor sample_of_token, Tensor? trainable, float beta_m, float beta_s, "
        "int padded_len, bool need_x, bool need_pool, bool need_val, bool need_shared, int workspace_cap_bytes=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pclr, CUDA, m) {
  m.impl("cuda_gate", &pclr::gate_cuda);
  m.impl("cuda_lrp_forward", &pclr::lrp_forward_cuda);
  m.impl("cuda_lrp_backward", &pclr::lrp_backward_cuda);
}

TORCH_LIBRARY_IMPL(pclr, Meta, m) {
  m.impl("cuda_gate", &pclr::gate_meta);
  m.impl("cuda_lrp_forward", &pclr::lrp_forward_meta);
  m.impl("cuda_lrp_backward", &pclr::lrp_backward_meta);
}
