// 2-D rotary position embedding on q and k together (EVA-02 / timm rope ViTs): argument checks, schemas, and
// the C++ CPU twin. The CUDA kernel is in rope_kernel.cu; both sit behind torch.ops.vitkernels_C.rope_{fwd,bwd}.
//
// Shapes: q, k (B, H, T, D), any batch/head/row strides, contiguous last dim; sin, cos (T - P, D) float32, any
// row stride, contiguous last dim (the halves of timm's (T - P, 2 D) table); P = num_prefix class / register
// tokens, copied unrotated.
// Per column pair (d0, d1) = (2i, 2i + 1), or (i, i + D/2) with half (timm's rotate-half), and row t >= P,
// with c = cos[t - P], s = sin[t - P] at the pair's columns:
//   forward   y0 = x0 c0 - x1 s0          y1 = x1 c1 + x0 s1           (x * cos + rot(x) * sin)
//   backward  dx0 = dy0 c0 + dy1 s1       dx1 = dy1 c1 - dy0 s0        (dy * cos - rot(dy * sin): rot^T = -rot)
// Returns (q_out, k_out), or (dq, dk), each (B, H, T, D) as a transposed view of a (B, T, H, D) buffer.
//
// The CPU twin is the readable statement of what the kernel computes: one (b, h) at a time (parallel over
// B * H), each product in double, rounded once to the input dtype (the kernel computes in fp32).
#include <ATen/Parallel.h>

#include <tuple>

#include "checks.h"

namespace vitkernels {

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin, const at::Tensor& cos,
                int64_t num_prefix) {
  VK_CHECK_FLOAT(q);
  VK_CHECK_DIM(q, 4);
  VK_CHECK_LIKE(k, q);
  VK_CHECK_SHAPE(k, q.sizes());
  VK_CHECK_LAST_CONTIGUOUS(q);
  VK_CHECK_LAST_CONTIGUOUS(k);
  const int64_t T = q.size(2), D = q.size(3);
  VK_CHECK(D % 2 == 0, "rope: head dim D must be even, got ", D);
  VK_CHECK(num_prefix >= 0 && num_prefix <= T, "rope: num_prefix must be in [0, ", T, "], got ", num_prefix);
  for (const at::Tensor* t : {&sin, &cos}) {
    VK_CHECK(t->device() == q.device(), "rope: sin/cos must be on ", q.device(), ", got ", t->device());
    VK_CHECK(t->scalar_type() == at::kFloat, "rope: sin/cos must be float32, got ", t->scalar_type());
    VK_CHECK(t->dim() == 2 && t->size(0) == T - num_prefix && t->size(1) == D && t->stride(1) == 1,
             "rope: sin/cos must be (", T - num_prefix, ", ", D, ") with a unit last stride, got shape ",
             t->sizes(), " strides ", t->strides());
  }
}

namespace {

// One function for both directions: the backward is the forward with the sine columns swapped and negated.
std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin,
                                            const at::Tensor& cos, int64_t num_prefix, bool half, bool backward) {
  check_rope(q, k, sin, cos, num_prefix);
  VK_CHECK(q.device().is_cpu(), "rope: the CPU twin got tensors on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), half_d = D / 2;
  at::Tensor qo = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  at::Tensor ko = at::empty({B, T, H, D}, k.options()).transpose(1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cpu", [&] {
    const float* sp = sin.const_data_ptr<float>();
    const float* cp = cos.const_data_ptr<float>();
    // Rows of one (b, h) of x into out: prefix rows copied, patch rows rotated pair by pair.
    auto rotate = [&](const at::Tensor& x, at::Tensor& out, int64_t b, int64_t h) {
      const scalar_t* xp = x.const_data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(1);
      scalar_t* op = out.mutable_data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1);
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xr = xp + t * x.stride(2);
        scalar_t* orow = op + t * out.stride(2);
        if (t < num_prefix) {
          for (int64_t d = 0; d < D; ++d) orow[d] = xr[d];
          continue;
        }
        const float* s = sp + (t - num_prefix) * sin.stride(0);
        const float* c = cp + (t - num_prefix) * cos.stride(0);
        for (int64_t i = 0; i < half_d; ++i) {
          const int64_t d0 = half ? i : 2 * i, d1 = half ? i + half_d : 2 * i + 1;
          const double x0 = static_cast<double>(xr[d0]), x1 = static_cast<double>(xr[d1]);
          const double s0 = backward ? -s[d1] : s[d0], s1 = backward ? -s[d0] : s[d1];
          orow[d0] = static_cast<scalar_t>(x0 * c[d0] - x1 * s0);
          orow[d1] = static_cast<scalar_t>(x1 * c[d1] + x0 * s1);
        }
      }
    };
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        rotate(q, qo, bh / H, bh % H);
        rotate(k, ko, bh / H, bh % H);
      }
    });
  });
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin,
                                                const at::Tensor& cos, int64_t num_prefix, bool half) {
  return rope_cpu(q, k, sin, cos, num_prefix, half, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                const at::Tensor& sin, const at::Tensor& cos, int64_t num_prefix,
                                                bool half) {
  return rope_cpu(grad_q, grad_k, sin, cos, num_prefix, half, /*backward=*/true);
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  // The contract of vitkernels/ops/rope.py (checked when the cuda backend loads).
  m.def("rope_fwd(Tensor q, Tensor k, Tensor sin, Tensor cos, int num_prefix, bool half) "
        "-> (Tensor q_out, Tensor k_out)");
  m.def("rope_bwd(Tensor grad_q, Tensor grad_k, Tensor sin, Tensor cos, int num_prefix, bool half) "
        "-> (Tensor dq, Tensor dk)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("rope_fwd", &vitkernels::rope_fwd_cpu);
  m.impl("rope_bwd", &vitkernels::rope_bwd_cpu);
}
