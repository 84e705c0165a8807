// LayerNorm over the last dim with a fused residual add: argument checks, schemas, and the C++ CPU twin.
// The CUDA kernels are in layer_norm_kernel.cu; both sit behind torch.ops.vitkernels_C.layer_norm_{fwd,bwd}.
//
// Forward, for each row of C values (rows = all leading dims of x):
//   s = x + residual               (rounded to x's dtype, as eager PyTorch does; s = x without residual)
//   mean = sum(s) / C,  rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)          (fp32 statistics)
//   xhat = (s - mean) * rstd,  y = xhat * weight + bias
// Backward, with g = dy * weight (dy when weight is None):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds,    ds: the gradient of the returned s
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
// (the residual's gradient equals dx: s = x + residual).
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

#include "checks.h"

namespace vitkernels {

void check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const std::optional<at::Tensor>& residual) {
  VK_CHECK_FLOAT(x);
  VK_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim, got shape ", x.sizes());
  VK_CHECK_CONTIGUOUS(x);
  const int64_t C = x.size(-1);
  VK_CHECK_OPTIONAL(weight, x, {C});
  VK_CHECK_OPTIONAL(bias, x, {C});
  VK_CHECK_OPTIONAL(residual, x, x.sizes());
  VK_CHECK(eps > 0, "eps must be positive, got ", eps);
}

void check_layer_norm_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s,
                          const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& rstd) {
  VK_CHECK_FLOAT(x);
  VK_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim, got shape ", x.sizes());
  VK_CHECK_CONTIGUOUS(x);
  VK_CHECK_LIKE(grad_y, x);
  VK_CHECK_SHAPE(grad_y, x.sizes());
  VK_CHECK_CONTIGUOUS(grad_y);
  VK_CHECK_OPTIONAL(grad_s, x, x.sizes());
  VK_CHECK_OPTIONAL(weight, x, {x.size(-1)});
  const int64_t rows = x.numel() / x.size(-1);
  for (const at::Tensor* t : {&mean, &rstd}) {
    VK_CHECK(t->device() == x.device(), "mean/rstd must be on ", x.device(), ", got ", t->device());
    VK_CHECK(t->scalar_type() == at::kFloat, "mean/rstd must be float32, got ", t->scalar_type());
    VK_CHECK(t->dim() == 1 && t->size(0) == rows && t->is_contiguous(), "mean/rstd must be contiguous (",
             rows, ",), got shape ", t->sizes());
  }
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// CPU twin: one row at a time, fp32 values, double sums.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, const std::optional<at::Tensor>& residual) {
  check_layer_norm_fwd(x, weight, bias, eps, residual);
  VK_CHECK(x.is_cpu(), "layer_norm_fwd CPU kernel got a tensor on ", x.device());
  const int64_t C = x.size(-1);
  const int64_t R = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  at::Tensor s = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({R}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = rp ? s.mutable_data_ptr<scalar_t>() : nullptr;
    float* meanp = mean.mutable_data_ptr<float>();
    float* rstdp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> v(C);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * C;
        double sum = 0;
        for (int64_t j = 0; j < C; ++j) {
          scalar_t sj = rp ? static_cast<scalar_t>(static_cast<float>(xp[off + j]) + static_cast<float>(rp[off + j]))
                           : xp[off + j];
          if (sp) sp[off + j] = sj;
          v[j] = static_cast<float>(sj);
          sum += v[j];
        }
        const double mu = sum / C;
        double sq = 0;
        for (int64_t j = 0; j < C; ++j) sq += (v[j] - mu) * (v[j] - mu);
        const float m = static_cast<float>(mu);
        const float rs = static_cast<float>(1.0 / std::sqrt(sq / C + eps));
        meanp[r] = m;
        rstdp[r] = rs;
        for (int64_t j = 0; j < C; ++j) {
          float out = (v[j] - m) * rs;
          if (wp) out *= static_cast<float>(wp[j]);
          if (bp) out += static_cast<float>(bp[j]);
          yp[off + j] = static_cast<scalar_t>(out);
        }
      }
    });
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool needs_dw,
    bool needs_db) {
  check_layer_norm_bwd(grad_y, grad_s, x, weight, mean, rstd);
  VK_CHECK(x.is_cpu(), "layer_norm_bwd CPU kernel got a tensor on ", x.device());
  const int64_t C = x.size(-1);
  const int64_t R = x.numel() / C;
  at::Tensor dx = at::empty_like(x);
  // dweight/dbias: per-row contributions summed in double, row blocks first, then over blocks (no races).
  const int64_t nblocks = std::min<int64_t>(R, 64);
  at::Tensor partial = at::zeros({std::max<int64_t>(nblocks, 1), 2, C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* dsp = grad_s.has_value() ? grad_s->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    const float* meanp = mean.const_data_ptr<float>();
    const float* rstdp = rstd.const_data_ptr<float>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    double* pp = partial.mutable_data_ptr<double>();
    at::parallel_for(0, nblocks, 1, [&](int64_t bbegin, int64_t bend) {
      std::vector<float> xhat(C), g(C);
      for (int64_t blk = bbegin; blk < bend; ++blk) {
        double* dw = pp + blk * 2 * C;
        double* db = dw + C;
        for (int64_t r = blk * R / nblocks; r < (blk + 1) * R / nblocks; ++r) {
          const int64_t off = r * C;
          double sum_g = 0, sum_gx = 0;
          for (int64_t j = 0; j < C; ++j) {
            const float dy = static_cast<float>(dyp[off + j]);
            xhat[j] = (static_cast<float>(xp[off + j]) - meanp[r]) * rstdp[r];
            g[j] = wp ? dy * static_cast<float>(wp[j]) : dy;
            sum_g += g[j];
            sum_gx += g[j] * xhat[j];
            dw[j] += dy * xhat[j];
            db[j] += dy;
          }
          const float mean_g = static_cast<float>(sum_g / C);
          const float mean_gx = static_cast<float>(sum_gx / C);
          for (int64_t j = 0; j < C; ++j) {
            float d = rstdp[r] * (g[j] - mean_g - xhat[j] * mean_gx);
            if (dsp) d += static_cast<float>(dsp[off + j]);
            dxp[off + j] = static_cast<scalar_t>(d);
          }
        }
      }
    });
  });
  at::Tensor sums = partial.sum(0);  // (2, C)
  at::Tensor dweight = needs_dw ? sums[0].to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = needs_db ? sums[1].to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  // The contract of vitkernels/ops/layer_norm.py (checked when the cuda backend loads). s is empty (0,)
  // without residual. x: the normalised input (s when a residual was fused); dx includes grad_s; dw / db are
  // empty (0,) unless asked for.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual) "
        "-> (Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor grad_y, Tensor? grad_s, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool needs_dw, bool needs_db) -> (Tensor dx, Tensor dw, Tensor db)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("layer_norm_fwd", &vitkernels::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &vitkernels::layer_norm_bwd_cpu);
}
