// Linear + fused epilogue CUDA implementation; the math, checks and CPU twin are in linear.cpp.
//
// Why not cuBLASLt's epilogues: CUBLASLT_EPILOGUE_GELU_AUX_BIAS computes the tanh approximation of GELU only,
// while this op's default (and timm's nn.GELU()) is the exact erf GELU, QuickGELU / SiLU have no cuBLASLt
// epilogue, and cuBLASLt has no epilogue adding a residual after the activation. So the GEMM is cuBLAS through
// at::mm (fp32 accumulation; fp16/bf16 tensor cores on sm80+), and one elementwise kernel of ours applies bias +
// activation (activations.h) + residual. Cost of that choice: the GEMM
// result makes one extra round trip through memory (write, then read by the epilogue) compared with a fused
// epilogue; at ViT-B MLP shapes that is about R*M*4 bytes next to a 2*R*M*K-flop GEMM (K = 768 or 3072).
//
// Backward: one kernel computes dh = dout * act'(h) and the bias gradient together (two-stage column sums:
// fp32 partials per row group, then an ATen sum over groups; no atomics, deterministic), then cuBLAS GEMMs
// dx = dh W and dW = dh^T x.
// c10 CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare CUDA
// toolkit may lack (the GEMMs go through at::mm, which needs none).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "activations.h"
#include "checks.h"

namespace vitkernels {

// Defined in linear.cpp.
void check_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual);
void check_linear_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& preact);
int check_activation(c10::string_view activation);

namespace {

constexpr int kThreads = 256;   // elementwise kernels
constexpr int kColTile = 32;    // bias-gradient stage 1: columns per block
constexpr int kRowThreads = 8;  // bias-gradient stage 1: threads along rows per block

// out = act(h + bias) + residual over (R, M) elements. With an activation the pre-activation h + bias is written back
// into h (saved for the backward); without it, out may be h itself (in place).
template <typename T, bool GELU>
__global__ void linear_epilogue_kernel(T* h,                            // (R, M) GEMM result x W^T
                                       const T* __restrict__ bias,      // (M,) or nullptr
                                       const T* __restrict__ residual,  // (R, M) or nullptr
                                       T* out,                          // (R, M) output
                                       int64_t total,                   // R * M
                                       int64_t M,
                                       int act) {                       // activations.h id (GELU: > 0)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = static_cast<float>(h[i]);
    if (bias != nullptr) v += static_cast<float>(bias[i % M]);
    if (GELU) {
      h[i] = static_cast<T>(v);
      v = act_fwd(v, act);
    }
    if (residual != nullptr) v += static_cast<float>(residual[i]);
    out[i] = static_cast<T>(v);
  }
}

// dh = dout * act'(preact) (GELU: any activation) and stage 1 of dbias: block (kColTile, kRowThreads) sums dh over rows
// [blockIdx.y * rows_per_group, ...) of its columns into partial[blockIdx.y][c] (when partial != nullptr).
template <typename T, bool GELU>
__global__ void linear_bwd_epilogue_kernel(const T* __restrict__ grad_out,  // (R, M)
                                           const T* __restrict__ preact,    // (R, M) when GELU
                                           T* __restrict__ dh,              // (R, M) output when GELU
                                           float* __restrict__ partial,     // (G, M) or nullptr
                                           int64_t R, int64_t M, int64_t rows_per_group,
                                           int act) {  // activations.h id
  __shared__ float sacc[kRowThreads][kColTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < R ? r0 + rows_per_group : R;
  float acc = 0.f;
  if (c < M) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const int64_t i = r * M + c;
      float d = static_cast<float>(grad_out[i]);
      if (GELU) {
        d *= act_grad(static_cast<float>(preact[i]), act);
        dh[i] = static_cast<T>(d);
      }
      acc += d;
    }
  }
  if (partial == nullptr) return;  // uniform over the block: no __syncthreads divergence
  sacc[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < M) {
    for (int i = 1; i < kRowThreads; ++i) acc += sacc[i][threadIdx.x];
    partial[blockIdx.y * M + c] = acc;
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual,
                                                   c10::string_view activation, bool save_z) {
  check_linear_fwd(x, weight, bias, residual);
  const int act = check_activation(activation);
  const bool gelu_act = act != kActNone;
  VK_CHECK(x.is_cuda(), "linear_fwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), M = weight.size(0), R = x.numel() / K;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = M;
  at::Tensor h = at::mm(x.reshape({R, K}), weight.t());  // cuBLAS, (R, M) contiguous
  at::Tensor out = gelu_act || residual.has_value() ? at::empty({R, M}, x.options()) : h;
  const int64_t total = R * M;
  if (total > 0 && (gelu_act || bias.has_value() || residual.has_value())) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_fwd_cuda", [&] {
      const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      if (gelu_act) {
        linear_epilogue_kernel<scalar_t, true><<<elementwise_blocks(total), kThreads, 0, stream>>>(hp, bp, rp, op, total, M, act);
      } else {
        linear_epilogue_kernel<scalar_t, false><<<elementwise_blocks(total), kThreads, 0, stream>>>(hp, bp, rp, op, total, M, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor preact = gelu_act && save_z ? h.view(out_shape) : at::empty({0}, x.options());
  return {out.view(out_shape), preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& preact,
                                                               c10::string_view activation, bool needs_dx,
                                                               bool needs_dw, bool needs_db) {
  check_linear_bwd(grad_out, x, weight, preact);
  const int act = check_activation(activation);
  const bool gelu_act = act != kActNone;
  VK_CHECK(!gelu_act || preact.has_value(), "linear_bwd with an activation needs the saved pre-activation z");
  VK_CHECK(x.is_cuda(), "linear_bwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), M = weight.size(0), R = x.numel() / K;
  at::Tensor g = grad_out.reshape({R, M});
  at::Tensor dh = gelu_act ? at::empty({R, M}, x.options()) : g;
  // Stage 1 row groups: enough blocks to fill the GPU, each summing at least 32 rows.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>((R + 31) / 32, 512));
  const int64_t rows_per_group = (R + G - 1) / G;
  at::Tensor partial = at::zeros({needs_db ? G : 0, M}, x.options().dtype(at::kFloat));
  if (R > 0 && M > 0 && (gelu_act || needs_db)) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const dim3 block(kColTile, kRowThreads);
    const dim3 grid(static_cast<unsigned>((M + kColTile - 1) / kColTile), static_cast<unsigned>(G));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_bwd_cuda", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      float* pp = needs_db ? partial.mutable_data_ptr<float>() : nullptr;
      if (gelu_act) {
        linear_bwd_epilogue_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
            gp, preact->const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), pp, R, M, rows_per_group, act);
      } else {
        linear_bwd_epilogue_kernel<scalar_t, false><<<grid, block, 0, stream>>>(gp, nullptr, nullptr, pp, R, M,
                                                                                rows_per_group, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Outputs not asked for are distinct empty (0,) tensors (a custom op's outputs must not alias).
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = needs_dx ? at::mm(dh, weight).view(x.sizes()) : empty();
  at::Tensor dweight = needs_dw ? at::mm(dh.t(), x.reshape({R, K})) : empty();
  at::Tensor dbias = needs_db ? partial.sum(0).to(x.scalar_type()) : empty();  // stage 2
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("linear_fwd", &vitkernels::linear_fwd_cuda);
  m.impl("linear_bwd", &vitkernels::linear_bwd_cuda);
}
