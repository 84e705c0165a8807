// Linear with a fused epilogue: out = act(x W^T + b) + residual, act = exact (erf) GELU, tanh-GELU, QuickGELU,
// SiLU (activations.h) or identity.
// Argument checks, schemas and the C++ CPU twin; the CUDA version is in linear_kernel.cu. Both run the GEMM
// through ATen (cuBLAS on CUDA, fp32 at::matmul here) and do the epilogue in their own loop / kernel.
//
// Forward:  h = x W^T + b (the pre-activation, saved in x's dtype for the backward when there is an act),
//           out = act(h) + residual.
// Backward: dh = dout * act'(h)  (dout without an activation; act' in activations.h),
//           dbias = column sums of dh, dx = dh W, dW = dh^T x, dresidual = dout (done in Python).
#include <ATen/Parallel.h>
#include <cmath>

#include "activations.h"
#include "checks.h"

namespace vitkernels {

void check_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual) {
  VK_CHECK_FLOAT(x);
  VK_CHECK(x.dim() >= 1, "x must have at least one dim, got shape ", x.sizes());
  VK_CHECK_CONTIGUOUS(x);
  VK_CHECK_LIKE(weight, x);
  VK_CHECK_DIM(weight, 2);
  VK_CHECK_CONTIGUOUS(weight);
  VK_CHECK(x.size(-1) == weight.size(1), "x has ", x.size(-1), " features but weight (out, in) has shape ",
           weight.sizes());
  VK_CHECK_OPTIONAL(bias, x, {weight.size(0)});
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  VK_CHECK_OPTIONAL(residual, x, out_shape);
}

// The epilogue's activation by name ("none", "gelu" (exact erf), "gelu_tanh", "quick_gelu", "silu") -> its id
// in activations.h (0 for none).
int check_activation(c10::string_view activation) {
  if (activation == "none") return kActNone;
  if (activation == "gelu") return kActGelu;
  if (activation == "gelu_tanh") return kActGeluTanh;
  if (activation == "quick_gelu") return kActQuickGelu;
  if (activation == "silu") return kActSilu;
  VK_CHECK(false, "activation must be 'none', 'gelu', 'gelu_tanh', 'quick_gelu' or 'silu', got ",
           std::string(activation));
  return kActNone;
}

void check_linear_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& preact) {
  check_linear_fwd(x, weight, std::nullopt, std::nullopt);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  VK_CHECK_LIKE(grad_out, x);
  VK_CHECK_SHAPE(grad_out, out_shape);
  VK_CHECK_CONTIGUOUS(grad_out);
  VK_CHECK_OPTIONAL(preact, x, out_shape);
}

namespace {

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& residual,
                                                  c10::string_view activation, bool save_z) {
  check_linear_fwd(x, weight, bias, residual);
  const int act = check_activation(activation);
  const bool gelu_act = act != kActNone;
  VK_CHECK(x.is_cpu(), "linear_fwd CPU kernel got a tensor on ", x.device());
  const int64_t K = x.size(-1), M = weight.size(0), R = x.numel() / K;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = M;
  // The GEMM in fp32 (as cuBLAS accumulates); the epilogue below is what the CUDA epilogue kernel does.
  at::Tensor h = at::matmul(x.reshape({R, K}).to(at::kFloat), weight.to(at::kFloat).t()).contiguous();
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor preact = gelu_act && save_z ? at::empty(out_shape, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_fwd_cpu", [&] {
    const float* hp = h.const_data_ptr<float>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* pp = gelu_act && save_z ? preact.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t j = 0; j < M; ++j) {
          const int64_t i = r * M + j;
          float v = hp[i] + (bp ? static_cast<float>(bp[j]) : 0.0f);
          if (gelu_act) {
            if (pp) pp[i] = static_cast<scalar_t>(v);
            v = act_fwd(v, act);
          }
          if (rp) v += static_cast<float>(rp[i]);
          op[i] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& preact,
                                                              c10::string_view activation, bool needs_dx,
                                                              bool needs_dw, bool needs_db) {
  check_linear_bwd(grad_out, x, weight, preact);
  const int act = check_activation(activation);
  const bool gelu_act = act != kActNone;
  VK_CHECK(!gelu_act || preact.has_value(), "linear_bwd with an activation needs the saved pre-activation z");
  VK_CHECK(x.is_cpu(), "linear_bwd CPU kernel got a tensor on ", x.device());
  const int64_t K = x.size(-1), M = weight.size(0), R = x.numel() / K;
  // dh = dout * act'(h) in fp32, and the bias gradient as column sums (double).
  // A copy even for fp32 input (dh is scaled in place below; grad_out must stay untouched).
  at::Tensor dh = grad_out.reshape({R, M}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor dbias64 = at::zeros({M}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_bwd_cpu", [&] {
    float* dhp = dh.mutable_data_ptr<float>();
    const scalar_t* pp = gelu_act ? preact->const_data_ptr<scalar_t>() : nullptr;
    if (pp) {
      at::parallel_for(0, R * M, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dhp[i] *= act_grad(static_cast<float>(pp[i]), act);
      });
    }
    if (needs_db) {
      double* dbp = dbias64.mutable_data_ptr<double>();
      at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          double acc = 0;
          for (int64_t r = 0; r < R; ++r) acc += dhp[r * M + j];
          dbp[j] = acc;
        }
      });
    }
  });
  std::vector<int64_t> x_shape = x.sizes().vec();
  at::Tensor dx = needs_dx ? at::matmul(dh, weight.to(at::kFloat)).to(x.scalar_type()).reshape(x_shape)
                          : at::empty({0}, x.options());
  at::Tensor dweight = needs_dw ? at::matmul(dh.t(), x.reshape({R, K}).to(at::kFloat)).to(x.scalar_type())
                                    : at::empty({0}, x.options());
  at::Tensor dbias = needs_db ? dbias64.to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  // The contract of vitkernels/ops/linear.py (checked when the cuda backend loads): x (R, K), weight (M, K);
  // z is the pre-activation, returned when activation is "gelu" and save_z, else empty (0,). Gradients not
  // asked for come back empty (0,).
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, bool save_z) "
        "-> (Tensor y, Tensor z)");
  m.def("linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? z, str activation, bool needs_dx, "
        "bool needs_dw, bool needs_db) -> (Tensor dx, Tensor dw, Tensor db)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("linear_fwd", &vitkernels::linear_fwd_cpu);
  m.impl("linear_bwd", &vitkernels::linear_bwd_cpu);
}
