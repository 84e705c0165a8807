// glu_linear CUDA implementation: h = act(x Wg^T + bg) * (x Wv^T + bv); the math, checks and CPU twin are in
// glu_linear.cpp, the activations in glu_act.h.
//
// The two GEMMs are cuBLAS through at::mm (fp32 accumulation; fp16/bf16 tensor cores), writing x Wg^T and
// x Wv^T; one elementwise kernel of ours adds the biases in place (those buffers become the saved g and v)
// and writes h = act(g) * v. cuBLASLt has no GLU epilogue (nothing that multiplies two GEMM outputs), so this
// costs one read of g and v after the GEMMs compared with the triton backend's fused epilogue.
//
// Backward: one kernel reads dh, g and v once and writes dg = dh * v * act'(g) and dv = dh * act(g) (each when
// a gradient needs it) with the bias gradients' stage 1 (fp32 partial column sums per row group; stage 2 an
// ATen sum over the groups: no atomics, deterministic); then cuBLAS dx = dg Wg + dv Wv (mm, then addmm_
// into the same buffer), dWg = dg^T x, dWv = dv^T x.
// c10 CUDA headers only (as linear_kernel.cu): the GEMMs go through at::mm, which needs no cuBLAS header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "glu_act.h"

namespace vitkernels {

// Defined in glu_linear.cpp.
void check_glu_linear_fwd(const at::Tensor& x, const at::Tensor& gate_weight,
                          const std::optional<at::Tensor>& gate_bias, const at::Tensor& value_weight,
                          const std::optional<at::Tensor>& value_bias);
void check_glu_linear_bwd(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& gate_weight,
                          const at::Tensor& value_weight, const at::Tensor& g, const at::Tensor& v,
                          const c10::List<bool>& output_mask);
int check_glu_activation(c10::string_view activation);

namespace {

constexpr int kThreads = 256;   // forward epilogue
constexpr int kColTile = 32;    // backward: columns per block
constexpr int kRowThreads = 8;  // backward: threads along rows per block

// g += bg, v += bv (in place: they are the saved pre-activations), h = act(g) * v, over (R, H) elements.
template <typename T, int ACT>
__global__ void glu_epilogue_kernel(T* __restrict__ g,                 // (R, H) x Wg^T in, g out
                                    T* __restrict__ v,                 // (R, H) x Wv^T in, v out
                                    const T* __restrict__ gate_bias,   // (H,) or nullptr
                                    const T* __restrict__ value_bias,  // (H,) or nullptr
                                    T* __restrict__ h,                 // (R, H) output
                                    int64_t total,                     // R * H
                                    int64_t H) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float gi = static_cast<float>(g[i]), vi = static_cast<float>(v[i]);
    if (gate_bias != nullptr) gi += static_cast<float>(gate_bias[i % H]);
    if (value_bias != nullptr) vi += static_cast<float>(value_bias[i % H]);
    g[i] = static_cast<T>(gi);
    v[i] = static_cast<T>(vi);
    h[i] = static_cast<T>(glu_act<ACT>(gi) * vi);
  }
}

// dg = dh * v * act'(g) and dv = dh * act(g) (each written when its pointer is set), and stage 1 of the bias
// gradients: block (kColTile, kRowThreads) sums its columns of dg / dv (as stored) over rows
// [blockIdx.y * rows_per_group, ...) into partial_g / partial_v[blockIdx.y][c] (when set).
template <typename T, int ACT>
__global__ void glu_bwd_kernel(const T* __restrict__ grad_h,  // (R, H)
                               const T* __restrict__ g,       // (R, H) saved gate pre-activation
                               const T* __restrict__ v,       // (R, H) saved value pre-activation
                               T* __restrict__ dg,            // (R, H) or nullptr
                               T* __restrict__ dv,            // (R, H) or nullptr
                               float* __restrict__ partial_g,  // (G, H) or nullptr
                               float* __restrict__ partial_v,  // (G, H) or nullptr
                               int64_t R, int64_t H, int64_t rows_per_group) {
  __shared__ float sacc_g[kRowThreads][kColTile + 1];
  __shared__ float sacc_v[kRowThreads][kColTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < R ? r0 + rows_per_group : R;
  float acc_g = 0.f, acc_v = 0.f;
  if (c < H) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const int64_t i = r * H + c;
      const float d = static_cast<float>(grad_h[i]), z = static_cast<float>(g[i]);
      if (dg != nullptr) {
        const T dgi = static_cast<T>(d * static_cast<float>(v[i]) * glu_act_grad<ACT>(z));
        dg[i] = dgi;
        acc_g += static_cast<float>(dgi);
      }
      if (dv != nullptr) {
        const T dvi = static_cast<T>(d * glu_act<ACT>(z));
        dv[i] = dvi;
        acc_v += static_cast<float>(dvi);
      }
    }
  }
  // Pointer tests are uniform over the block: no __syncthreads divergence.
  if (partial_g == nullptr && partial_v == nullptr) return;
  sacc_g[threadIdx.y][threadIdx.x] = acc_g;
  sacc_v[threadIdx.y][threadIdx.x] = acc_v;
  __syncthreads();
  if (threadIdx.y == 0 && c < H) {
    for (int i = 1; i < kRowThreads; ++i) {
      acc_g += sacc_g[i][threadIdx.x];
      acc_v += sacc_v[i][threadIdx.x];
    }
    if (partial_g != nullptr) partial_g[blockIdx.y * H + c] = acc_g;
    if (partial_v != nullptr) partial_v[blockIdx.y * H + c] = acc_v;
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_linear_fwd_cuda(const at::Tensor& x,
                                                                   const at::Tensor& gate_weight,
                                                                   const std::optional<at::Tensor>& gate_bias,
                                                                   const at::Tensor& value_weight,
                                                                   const std::optional<at::Tensor>& value_bias,
                                                                   c10::string_view activation) {
  check_glu_linear_fwd(x, gate_weight, gate_bias, value_weight, value_bias);
  const int act = check_glu_activation(activation);
  VK_CHECK(x.is_cuda(), "glu_linear_fwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0), H = gate_weight.size(0);
  at::Tensor g = at::mm(x, gate_weight.t());  // cuBLAS, (R, H) contiguous
  at::Tensor v = at::mm(x, value_weight.t());
  at::Tensor h = at::empty({R, H}, x.options());
  const int64_t total = R * H;
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_linear_fwd_cuda", [&] {
      const scalar_t* bgp = gate_bias.has_value() ? gate_bias->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* bvp = value_bias.has_value() ? value_bias->const_data_ptr<scalar_t>() : nullptr;
      glu_dispatch_act(act, [&](auto ACT) {
        glu_epilogue_kernel<scalar_t, decltype(ACT)::value><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            g.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), bgp, bvp, h.mutable_data_ptr<scalar_t>(),
            total, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {h, g, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_linear_bwd_cuda(
    const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& value_weight,
    const at::Tensor& g, const at::Tensor& v, c10::string_view activation, const c10::List<bool>& output_mask) {
  check_glu_linear_bwd(grad_h, x, gate_weight, value_weight, g, v, output_mask);
  const int act = check_glu_activation(activation);
  VK_CHECK(x.is_cuda(), "glu_linear_bwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool needs_dx = output_mask[0], needs_dgw = output_mask[1], needs_dgb = output_mask[2],
             needs_dvw = output_mask[3], needs_dvb = output_mask[4];
  const bool need_dg = needs_dx || needs_dgw || needs_dgb, need_dv = needs_dx || needs_dvw || needs_dvb;
  const int64_t R = x.size(0), H = gate_weight.size(0);
  at::Tensor dg = at::empty({need_dg ? R : 0, H}, x.options());
  at::Tensor dv = at::empty({need_dv ? R : 0, H}, x.options());
  // Stage 1 row groups: enough blocks to fill the GPU, each summing at least 32 rows.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>((R + 31) / 32, 512));
  const int64_t rows_per_group = (R + G - 1) / G;
  at::Tensor partial_g = at::zeros({needs_dgb ? G : 0, H}, x.options().dtype(at::kFloat));
  at::Tensor partial_v = at::zeros({needs_dvb ? G : 0, H}, x.options().dtype(at::kFloat));
  if (R > 0 && H > 0 && (need_dg || need_dv)) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 block(kColTile, kRowThreads);
    const dim3 grid(static_cast<unsigned>((H + kColTile - 1) / kColTile), static_cast<unsigned>(G));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_linear_bwd_cuda", [&] {
      glu_dispatch_act(act, [&](auto ACT) {
        glu_bwd_kernel<scalar_t, decltype(ACT)::value><<<grid, block, 0, stream>>>(
            grad_h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            need_dg ? dg.mutable_data_ptr<scalar_t>() : nullptr, need_dv ? dv.mutable_data_ptr<scalar_t>() : nullptr,
            needs_dgb ? partial_g.mutable_data_ptr<float>() : nullptr,
            needs_dvb ? partial_v.mutable_data_ptr<float>() : nullptr, R, H, rows_per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // Outputs not asked for are distinct empty (0,) tensors (a custom op's outputs must not alias).
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = empty();
  if (needs_dx) {
    dx = at::mm(dg, gate_weight);
    dx.addmm_(dv, value_weight);
  }
  at::Tensor dgw = needs_dgw ? at::mm(dg.t(), x) : empty();
  at::Tensor dvw = needs_dvw ? at::mm(dv.t(), x) : empty();
  at::Tensor dgb = needs_dgb ? partial_g.sum(0).to(x.scalar_type()) : empty();  // stage 2
  at::Tensor dvb = needs_dvb ? partial_v.sum(0).to(x.scalar_type()) : empty();
  return {dx, dgw, dgb, dvw, dvb};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("glu_linear_fwd", &vitkernels::glu_linear_fwd_cuda);
  m.impl("glu_linear_bwd", &vitkernels::glu_linear_bwd_cuda);
}
