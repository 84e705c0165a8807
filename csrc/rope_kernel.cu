// 2-D rotary position embedding on q and k together: the CUDA kernel. The math, the argument checks
// (check_rope) and the CPU twin are in rope.cpp.
//
// Design: memory-bound elementwise work, one thread per column pair (d0, d1) of one row of one (b, h), for q
// and k both (the pair's four table values are read once for the two). A grid-stride loop over the
// B * H * T * D/2 pairs, pair index fastest, so a warp reads 32 consecutive pairs of a row (contiguous for
// the rotate-half pairing, two interleaved 4-byte streams for adjacent pairs) and writes the same columns of
// the (B, T, H, D) output. fp32 arithmetic, rounded once to the storage dtype. q and k are read through their
// batch / head / row strides (views of a (B, T, 3, H, D) qkv): nothing is copied.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace vitkernels {

// Defined in rope.cpp (shared with the CPU twin).
void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin, const at::Tensor& cos,
                int64_t num_prefix);

namespace {

constexpr int kThreads = 256;

struct Strides {
  int64_t b, h, t;  // elements
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(
    const T* __restrict__ q,      // (B, H, T, D) q or grad of q_out, unit last stride
    const T* __restrict__ k,      // (B, H, T, D) k or grad of k_out, unit last stride
    const float* __restrict__ sn, // (T - P, D) sine table, unit last stride
    const float* __restrict__ cs, // (T - P, D) cosine table, unit last stride
    T* __restrict__ qo,           // (B, T, H, D) out, contiguous
    T* __restrict__ ko,           // (B, T, H, D) out, contiguous
    Strides sq,                   // strides of q
    Strides sk,                   // strides of k
    int64_t stride_sn,            // row stride of sn
    int64_t stride_cs,            // row stride of cs
    int64_t H, int64_t n_tok, int64_t P, int64_t D,
    int64_t pairs,                // B * H * T * D / 2
    bool half,                    // pairs (i, i + D/2) instead of (2i, 2i + 1)
    bool backward) {              // the transpose rotation: sines swapped and negated
  const int64_t half_d = D / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < pairs;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx % half_d;
    const int64_t row = idx / half_d;  // (b * H + h) * T + t
    const int64_t t = row % n_tok;
    const int64_t bh = row / n_tok;
    const int64_t b = bh / H, h = bh % H;
    const int64_t d0 = half ? i : 2 * i, d1 = half ? i + half_d : 2 * i + 1;
    const int64_t qoff = b * sq.b + h * sq.h + t * sq.t, koff = b * sk.b + h * sk.h + t * sk.t;
    const int64_t ooff = ((b * n_tok + t) * H + h) * D;
    const float q0 = static_cast<float>(q[qoff + d0]), q1 = static_cast<float>(q[qoff + d1]);
    const float k0 = static_cast<float>(k[koff + d0]), k1 = static_cast<float>(k[koff + d1]);
    if (t < P) {  // class / register tokens: copied
      qo[ooff + d0] = q[qoff + d0];
      qo[ooff + d1] = q[qoff + d1];
      ko[ooff + d0] = k[koff + d0];
      ko[ooff + d1] = k[koff + d1];
      continue;
    }
    const float c0 = cs[(t - P) * stride_cs + d0], c1 = cs[(t - P) * stride_cs + d1];
    float s0 = sn[(t - P) * stride_sn + d0], s1 = sn[(t - P) * stride_sn + d1];
    if (backward) {  // dx0 = dy0 c0 + dy1 s1, dx1 = dy1 c1 - dy0 s0
      const float t0 = s0;
      s0 = -s1;
      s1 = -t0;
    }
    qo[ooff + d0] = static_cast<T>(q0 * c0 - q1 * s0);
    qo[ooff + d1] = static_cast<T>(q1 * c1 + q0 * s1);
    ko[ooff + d0] = static_cast<T>(k0 * c0 - k1 * s0);
    ko[ooff + d1] = static_cast<T>(k1 * c1 + k0 * s1);
  }
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin,
                                             const at::Tensor& cos, int64_t num_prefix, bool half, bool backward) {
  check_rope(q, k, sin, cos, num_prefix);
  VK_CHECK(q.is_cuda(), "rope: the CUDA kernel got tensors on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor qo = at::empty({B, T, H, D}, q.options());
  at::Tensor ko = at::empty({B, T, H, D}, k.options());
  const int64_t pairs = B * H * T * (D / 2);
  if (pairs > 0) {
    const int64_t blocks = std::min<int64_t>((pairs + kThreads - 1) / kThreads, int64_t{1} << 20);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cuda", [&] {
      rope_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), sin.const_data_ptr<float>(),
          cos.const_data_ptr<float>(), qo.mutable_data_ptr<scalar_t>(), ko.mutable_data_ptr<scalar_t>(),
          Strides{q.stride(0), q.stride(1), q.stride(2)}, Strides{k.stride(0), k.stride(1), k.stride(2)},
          sin.stride(0), cos.stride(0),
          H, T, num_prefix, D, pairs, half, backward);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {qo.transpose(1, 2), ko.transpose(1, 2)};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& sin,
                                                 const at::Tensor& cos, int64_t num_prefix, bool half) {
  return rope_cuda(q, k, sin, cos, num_prefix, half, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                 const at::Tensor& sin, const at::Tensor& cos, int64_t num_prefix,
                                                 bool half) {
  return rope_cuda(grad_q, grad_k, sin, cos, num_prefix, half, /*backward=*/true);
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("rope_fwd", &vitkernels::rope_fwd_cuda);
  m.impl("rope_bwd", &vitkernels::rope_bwd_cuda);
}
