// The gated fc1 of a GLU MLP: h = act(x Wg^T + bg) * (x Wv^T + bv) (vitkernels/ops/glu_linear.py's contract).
// Argument checks, schemas and the C++ CPU twin; the CUDA version is in glu_linear_kernel.cu, the activations
// in glu_act.h. Both run the GEMMs through ATen (cuBLAS on CUDA, fp32 at::matmul here) and the GLU epilogue
// and the backward's elementwise pass in their own loop / kernel.
//
// Forward:  g = x Wg^T + bg, v = x Wv^T + bv (the pre-activations, saved for the backward), h = act(g) * v.
// Backward: dg = dh * v * act'(g), dv = dh * act(g);  dbg, dbv = column sums of dg, dv;
//           dx = dg Wg + dv Wv,  dWg = dg^T x,  dWv = dv^T x.
#include <ATen/Parallel.h>

#include "checks.h"
#include "glu_act.h"

namespace vitkernels {

void check_glu_linear_fwd(const at::Tensor& x, const at::Tensor& gate_weight,
                          const std::optional<at::Tensor>& gate_bias, const at::Tensor& value_weight,
                          const std::optional<at::Tensor>& value_bias) {
  VK_CHECK_FLOAT(x);
  VK_CHECK_DIM(x, 2);
  VK_CHECK_CONTIGUOUS(x);
  VK_CHECK_LIKE(gate_weight, x);
  VK_CHECK_DIM(gate_weight, 2);
  VK_CHECK_CONTIGUOUS(gate_weight);
  VK_CHECK(x.size(1) == gate_weight.size(1), "x has ", x.size(1), " features but gate_weight (hidden, in) has "
           "shape ", gate_weight.sizes());
  VK_CHECK_LIKE(value_weight, x);
  VK_CHECK_SHAPE(value_weight, gate_weight.sizes());
  VK_CHECK_CONTIGUOUS(value_weight);
  VK_CHECK_OPTIONAL(gate_bias, x, {gate_weight.size(0)});
  VK_CHECK_OPTIONAL(value_bias, x, {gate_weight.size(0)});
}

// The gate activation's id (glu_act.h): "silu", "gelu" (exact erf), "gelu_tanh" or "sigmoid".
int check_glu_activation(c10::string_view activation) {
  if (activation == "silu") return kGluSilu;
  if (activation == "gelu") return kGluGelu;
  if (activation == "gelu_tanh") return kGluGeluTanh;
  VK_CHECK(activation == "sigmoid", "activation must be 'silu', 'gelu', 'gelu_tanh' or 'sigmoid', got ",
           std::string(activation));
  return kGluSigmoid;
}

void check_glu_linear_bwd(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& gate_weight,
                          const at::Tensor& value_weight, const at::Tensor& g, const at::Tensor& v,
                          const c10::List<bool>& output_mask) {
  check_glu_linear_fwd(x, gate_weight, std::nullopt, value_weight, std::nullopt);
  const std::vector<int64_t> shape{x.size(0), gate_weight.size(0)};
  for (const at::Tensor* t : {&grad_h, &g, &v}) {
    VK_CHECK_LIKE(*t, x);
    VK_CHECK((*t).sizes() == at::IntArrayRef(shape), "grad_h, g and v must have shape ", at::IntArrayRef(shape),
             ", got ", (*t).sizes());
    VK_CHECK((*t).is_contiguous(), "grad_h, g and v must be contiguous, got strides ", (*t).strides());
  }
  VK_CHECK(output_mask.size() == 5, "output_mask must have 5 entries (dx, dgate_weight, dgate_bias, "
           "dvalue_weight, dvalue_bias), got ", output_mask.size());
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& gate_weight,
                                                                  const std::optional<at::Tensor>& gate_bias,
                                                                  const at::Tensor& value_weight,
                                                                  const std::optional<at::Tensor>& value_bias,
                                                                  c10::string_view activation) {
  check_glu_linear_fwd(x, gate_weight, gate_bias, value_weight, value_bias);
  const int act = check_glu_activation(activation);
  VK_CHECK(x.is_cpu(), "glu_linear_fwd CPU kernel got a tensor on ", x.device());
  const int64_t R = x.size(0), H = gate_weight.size(0);
  // The GEMMs in fp32 (as cuBLAS accumulates); the loop below is what the CUDA epilogue kernel does.
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor gf = at::matmul(xf, gate_weight.to(at::kFloat).t()).contiguous();
  const at::Tensor vf = at::matmul(xf, value_weight.to(at::kFloat).t()).contiguous();
  at::Tensor h = at::empty({R, H}, x.options()), g = at::empty_like(h), v = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_linear_fwd_cpu", [&] {
    const float* gfp = gf.const_data_ptr<float>();
    const float* vfp = vf.const_data_ptr<float>();
    const scalar_t* bgp = gate_bias.has_value() ? gate_bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bvp = value_bias.has_value() ? value_bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    glu_dispatch_act(act, [&](auto ACT) {
      at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t j = 0; j < H; ++j) {
            const int64_t i = r * H + j;
            const float gi = gfp[i] + (bgp ? static_cast<float>(bgp[j]) : 0.f);
            const float vi = vfp[i] + (bvp ? static_cast<float>(bvp[j]) : 0.f);
            gp[i] = static_cast<scalar_t>(gi);
            vp[i] = static_cast<scalar_t>(vi);
            hp[i] = static_cast<scalar_t>(glu_act<decltype(ACT)::value>(gi) * vi);
          }
        }
      });
    });
  });
  return {h, g, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_linear_bwd_cpu(
    const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& value_weight,
    const at::Tensor& g, const at::Tensor& v, c10::string_view activation, const c10::List<bool>& output_mask) {
  check_glu_linear_bwd(grad_h, x, gate_weight, value_weight, g, v, output_mask);
  const int act = check_glu_activation(activation);
  VK_CHECK(x.is_cpu(), "glu_linear_bwd CPU kernel got a tensor on ", x.device());
  const bool needs_dx = output_mask[0], needs_dgw = output_mask[1], needs_dgb = output_mask[2],
             needs_dvw = output_mask[3], needs_dvb = output_mask[4];
  const int64_t R = x.size(0), H = gate_weight.size(0);
  // dg, dv in fp32, and the bias gradients as column sums (double).
  at::Tensor dg = at::empty({R, H}, x.options().dtype(at::kFloat)), dv = at::empty_like(dg);
  at::Tensor dbg64 = at::zeros({H}, x.options().dtype(at::kDouble)), dbv64 = at::zeros_like(dbg64);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_linear_bwd_cpu", [&] {
    const scalar_t* dhp = grad_h.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    float* dgp = dg.mutable_data_ptr<float>();
    float* dvp = dv.mutable_data_ptr<float>();
    glu_dispatch_act(act, [&](auto ACT) {
      at::parallel_for(0, R * H, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const float d = static_cast<float>(dhp[i]), z = static_cast<float>(gp[i]);
          dgp[i] = d * static_cast<float>(vp[i]) * glu_act_grad<decltype(ACT)::value>(z);
          dvp[i] = d * glu_act<decltype(ACT)::value>(z);
        }
      });
    });
    for (auto [src, dst, wanted] : {std::tuple<const float*, at::Tensor*, bool>{dgp, &dbg64, needs_dgb},
                                    std::tuple<const float*, at::Tensor*, bool>{dvp, &dbv64, needs_dvb}}) {
      if (!wanted) continue;
      double* dbp = dst->mutable_data_ptr<double>();
      at::parallel_for(0, H, 64, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          double acc = 0;
          for (int64_t r = 0; r < R; ++r) acc += src[r * H + j];
          dbp[j] = acc;
        }
      });
    }
  });
  auto empty = [&] { return at::empty({0}, x.options()); };
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor dx = needs_dx ? (at::matmul(dg, gate_weight.to(at::kFloat)) + at::matmul(dv, value_weight.to(at::kFloat)))
                                 .to(x.scalar_type())
                           : empty();
  at::Tensor dgw = needs_dgw ? at::matmul(dg.t(), xf).to(x.scalar_type()) : empty();
  at::Tensor dvw = needs_dvw ? at::matmul(dv.t(), xf).to(x.scalar_type()) : empty();
  at::Tensor dgb = needs_dgb ? dbg64.to(x.scalar_type()) : empty();
  at::Tensor dvb = needs_dvb ? dbv64.to(x.scalar_type()) : empty();
  return {dx, dgw, dgb, dvw, dvb};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  // The contract of vitkernels/ops/glu_linear.py (checked when the cuda backend loads): x (R, C), weights
  // (H, C), biases (H,); h, g, v (R, H). Gradients not in output_mask come back empty (0,).
  m.def("glu_linear_fwd(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor value_weight, Tensor? value_bias, "
        "str activation) -> (Tensor h, Tensor g, Tensor v)");
  m.def("glu_linear_bwd(Tensor grad_h, Tensor x, Tensor gate_weight, Tensor value_weight, Tensor g, Tensor v, "
        "str activation, bool[] output_mask) "
        "-> (Tensor dx, Tensor dgate_weight, Tensor dgate_bias, Tensor dvalue_weight, Tensor dvalue_bias)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("glu_linear_fwd", &vitkernels::glu_linear_fwd_cpu);
  m.impl("glu_linear_bwd", &vitkernels::glu_linear_bwd_cpu);
}
