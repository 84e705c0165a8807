// Attention softmax(q k^T * scale + bias) v (non-causal; optional additive bias): argument checks, schemas,
// and the C++ CPU twin. The CUDA kernels are in attention_kernel.cu; both sit behind
// torch.ops.vitkernels_C.attention_{fwd,bwd} (the contract of vitkernels/ops/attention.py).
//
// Shapes: q (B, H, N, D); k, v (B, H, M, D); any batch/head/row strides, contiguous last dim. bias: absent, or
// (B | 1, H | 1, N | 1, M) in q's dtype or fp32, any strides, broadcast over its size-1 dims. The CUDA
// kernels read it the same way (attention_kernel.cu).
// Forward, for each (b, h) and query row i:
//   s_ij = scale * q_i . k_j + bias_ij,   lse_i = log(sum_j exp(s_ij)),   P_ij = exp(s_ij - lse_i),
//   o_i = sum_j P_ij v_j
// A row whose s_ij are all -inf (the bias masked every key) gets o_i = 0 and lse_i = +inf (so P = 0 on it in
// the backward: no gradient from it), where SDPA returns NaN.
// Returns out (B, H, N, D) as a transposed view of a (B, N, H, D)-contiguous buffer, and lse (B, H, N) fp32.
// Backward, with dO the gradient of out and O the saved out (P recomputed from the saved lse):
//   dP_ij = dO_i . v_j,   delta_i = dO_i . O_i (= sum_j P_ij dP_ij),   dS_ij = P_ij (dP_ij - delta_i)
//   dq_i = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i,
//   dbias = dS summed over bias's size-1 dims (only when needs_dbias; else an empty (0,) tensor)
// Returns dq (B, H, N, D) and dk, dv (B, H, M, D), each a transposed view of a (B, rows, H, D) buffer, and
// dbias in bias's shape and dtype.
//
// The CPU twin is the readable statement of what the kernels compute: one (b, h) at a time (parallel over
// B * H), inputs read once into double, every sum in double, results rounded once to the input dtype.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace vitkernels {

void check_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& bias) {
  VK_CHECK_FLOAT(q);
  VK_CHECK_LIKE(k, q);
  VK_CHECK_LIKE(v, q);
  VK_CHECK_DIM(q, 4);
  VK_CHECK_DIM(k, 4);
  VK_CHECK_DIM(v, 4);
  VK_CHECK(k.sizes() == v.sizes(), "attention: k shape ", k.sizes(), " differs from v shape ", v.sizes());
  VK_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "attention: q ",
           q.sizes(), " and k ", k.sizes(), " disagree on B, H or D (expected (B, H, N, D) and (B, H, M, D))");
  VK_CHECK(q.size(3) > 0, "attention: head dim D must be at least 1, got q shape ", q.sizes());
  VK_CHECK(q.size(2) == 0 || k.size(2) > 0, "attention: needs at least one key (M >= 1), got k shape ",
           k.sizes());
  VK_CHECK_LAST_CONTIGUOUS(q);
  VK_CHECK_LAST_CONTIGUOUS(k);
  VK_CHECK_LAST_CONTIGUOUS(v);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    VK_CHECK(b.device() == q.device(), "attention: bias is on ", b.device(), " but q is on ", q.device());
    VK_CHECK(b.scalar_type() == q.scalar_type() || b.scalar_type() == at::kFloat, "attention: bias has dtype ",
             b.scalar_type(), "; it must be q's dtype (", q.scalar_type(), ") or float32 (a bool mask is not "
             "taken: convert it, True = attend -> 0, False -> -inf)");
    VK_CHECK(b.dim() == 4 && (b.size(0) == q.size(0) || b.size(0) == 1) &&
                 (b.size(1) == q.size(1) || b.size(1) == 1) && (b.size(2) == q.size(2) || b.size(2) == 1) &&
                 b.size(3) == k.size(2),
             "attention: bias shape ", b.sizes(), " does not broadcast to (B, H, N, M) = (", q.size(0), ", ",
             q.size(1), ", ", q.size(2), ", ", k.size(2), ") as (B or 1, H or 1, N or 1, M)");
  }
}

void check_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                         const at::Tensor& lse) {
  check_attention_fwd(q, k, v, bias);
  VK_CHECK_LIKE(grad_out, q);
  VK_CHECK_LIKE(out, q);
  VK_CHECK_SHAPE(grad_out, q.sizes());
  VK_CHECK_SHAPE(out, q.sizes());
  VK_CHECK_LAST_CONTIGUOUS(grad_out);
  VK_CHECK_LAST_CONTIGUOUS(out);
  VK_CHECK(lse.device() == q.device(), "attention: lse is on ", lse.device(), " but q is on ", q.device());
  VK_CHECK(lse.scalar_type() == at::kFloat, "attention: lse must be float32, got ", lse.scalar_type());
  VK_CHECK_SHAPE(lse, {q.size(0), q.size(1), q.size(2)});
  VK_CHECK_CONTIGUOUS(lse);
}

// dS (B, H, N, M) summed over the dims where bias has size 1 (torch.sum: deterministic), in bias's shape and
// dtype: the contract's dbias. Shared by the CPU twin and the CUDA launcher.
at::Tensor dbias_from_scores(const at::Tensor& ds, const at::Tensor& bias) {
  std::vector<int64_t> dims;  // the dims bias broadcasts along
  for (int64_t d = 0; d < 4; ++d)
    if (bias.size(d) == 1 && ds.size(d) != 1) dims.push_back(d);
  return (dims.empty() ? ds : ds.sum(dims, /*keepdim=*/true)).to(bias.scalar_type());
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// CPU twin.

double dot(const double* a, const double* b, int64_t D) {
  double acc = 0.0;
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

// (B, H, rows, D) -> a contiguous double copy (one read of the input, whatever its strides).
at::Tensor to_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

// The bias as a contiguous double (B, H, N, M) tensor (broadcast dims materialised), or an undefined tensor.
at::Tensor bias_double(const c10::optional<at::Tensor>& bias, const at::Tensor& q, int64_t M) {
  if (!bias.has_value()) return at::Tensor();
  return bias->to(at::kDouble).expand({q.size(0), q.size(1), q.size(2), M}).contiguous();
}

// bias_ij of row `row` (= (b * H + h) * N + i) of the (B, H, N, M) double bias; 0 without one.
double bias_at(const double* bias, int64_t row, int64_t M, int64_t j) { return bias ? bias[row * M + j] : 0.0; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                                                     double scale) {
  check_attention_fwd(q, k, v, bias);
  VK_CHECK(q.device().is_cpu(), "attention: the CPU twin got tensors on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  const at::Tensor qd = to_double(q), kd = to_double(k), vd = to_double(v), bd = bias_double(bias, q, M);
  at::Tensor out = at::empty({B, N, H, D}, q.options().dtype(at::kDouble));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  const double* q_ptr = qd.data_ptr<double>();
  const double* k_ptr = kd.data_ptr<double>();
  const double* v_ptr = vd.data_ptr<double>();
  const double* bias_ptr = bd.defined() ? bd.data_ptr<double>() : nullptr;
  double* out_ptr = out.data_ptr<double>();
  float* lse_ptr = lse.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> p(M);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const double* qh = q_ptr + bh * N * D;
      const double* kh = k_ptr + bh * M * D;
      const double* vh = v_ptr + bh * M * D;
      for (int64_t i = 0; i < N; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < M; ++j) {
          p[j] = scale * dot(qh + i * D, kh + j * D, D) + bias_at(bias_ptr, bh * N + i, M, j);
          mx = std::max(mx, p[j]);
        }
        double* o = out_ptr + ((b * N + i) * H + h) * D;  // (B, N, H, D)
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0;
        if (mx == -std::numeric_limits<double>::infinity()) {  // every key masked: out 0, lse +inf
          lse_ptr[bh * N + i] = std::numeric_limits<float>::infinity();
          continue;
        }
        double sum = 0.0;
        for (int64_t j = 0; j < M; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        lse_ptr[bh * N + i] = static_cast<float>(mx + std::log(sum));
        for (int64_t j = 0; j < M; ++j) {
          const double w = p[j] / sum;
          for (int64_t d = 0; d < D; ++d) o[d] += w * vh[j * D + d];
        }
      }
    }
  });
  return {out.to(q.scalar_type()).transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool needs_dbias) {
  check_attention_bwd(grad_out, q, k, v, bias, out, lse);
  VK_CHECK(q.device().is_cpu(), "attention: the CPU twin got tensors on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  const bool store_ds = needs_dbias && bias.has_value();
  const at::Tensor qd = to_double(q), kd = to_double(k), vd = to_double(v), bd = bias_double(bias, q, M);
  const at::Tensor dod = to_double(grad_out), od = to_double(out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::zeros({B, N, H, D}, q.options().dtype(at::kDouble));
  at::Tensor dk = at::zeros({B, M, H, D}, q.options().dtype(at::kDouble));
  at::Tensor dv = at::zeros({B, M, H, D}, q.options().dtype(at::kDouble));
  const double* q_ptr = qd.data_ptr<double>();
  const double* k_ptr = kd.data_ptr<double>();
  const double* v_ptr = vd.data_ptr<double>();
  const double* do_ptr = dod.data_ptr<double>();
  const double* o_ptr = od.data_ptr<double>();
  const float* lse_ptr = lse_c.data_ptr<float>();
  double* dq_ptr = dq.data_ptr<double>();
  double* dk_ptr = dk.data_ptr<double>();
  double* dv_ptr = dv.data_ptr<double>();
  const double* bias_ptr = bd.defined() ? bd.data_ptr<double>() : nullptr;
  // dS (B, H, N, M), reduced to bias's shape afterwards; empty when dbias is not wanted.
  at::Tensor ds_all = at::zeros({store_ds ? B : 0, H, N, M}, q.options().dtype(at::kDouble));
  double* ds_ptr = ds_all.data_ptr<double>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const double* qh = q_ptr + bh * N * D;
      const double* kh = k_ptr + bh * M * D;
      const double* vh = v_ptr + bh * M * D;
      for (int64_t i = 0; i < N; ++i) {
        const double* q_i = qh + i * D;
        const double* do_i = do_ptr + (bh * N + i) * D;
        const double delta = dot(do_i, o_ptr + (bh * N + i) * D, D);
        const double lse_i = lse_ptr[bh * N + i];
        double* dq_i = dq_ptr + ((b * N + i) * H + h) * D;  // (B, N, H, D)
        for (int64_t j = 0; j < M; ++j) {
          // lse_i = +inf on a row the bias masked entirely: p = 0 (no gradient from it).
          const double p = std::exp(scale * dot(q_i, kh + j * D, D) + bias_at(bias_ptr, bh * N + i, M, j) - lse_i);
          const double ds = p * (dot(do_i, vh + j * D, D) - delta);
          if (store_ds) ds_ptr[(bh * N + i) * M + j] = ds;
          double* dk_j = dk_ptr + ((b * M + j) * H + h) * D;  // (B, M, H, D)
          double* dv_j = dv_ptr + ((b * M + j) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            dq_i[d] += scale * ds * kh[j * D + d];
            dk_j[d] += scale * ds * q_i[d];
            dv_j[d] += p * do_i[d];
          }
        }
      }
    }
  });
  const auto dtype = q.scalar_type();
  at::Tensor dbias = at::empty({0}, q.options());
  if (store_ds) dbias = dbias_from_scores(ds_all, *bias);
  return {dq.to(dtype).transpose(1, 2), dk.to(dtype).transpose(1, 2), dv.to(dtype).transpose(1, 2), dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
        "float scale, bool needs_dbias) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("attention_fwd", &vitkernels::attention_fwd_cpu);
  m.impl("attention_bwd", &vitkernels::attention_bwd_cpu);
}
