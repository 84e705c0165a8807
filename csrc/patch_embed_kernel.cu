// Patch embedding CUDA implementation; the math, checks, shared backward and CPU twin are in patch_embed.cpp.
//
// Design (the simple correct one, stated honestly): a gather kernel copies the P x P patches of the NCHW
// images (any strides) into a (B*N, C*P*P) buffer in the compute dtype, cuBLAS multiplies it by W^T, and an
// epilogue kernel writes the tokens with bias, position embedding and the prefix-token rows. The ideal design
// gathers a tile of patches straight into shared memory inside the GEMM and never materialises the buffer;
// the price of ours is the buffer's round trip through memory: B*N*C*P*P elements written and read once,
// the same size as the images themselves (about 1/4 of the GEMM's operand traffic at ViT-B/16), which is
// small next to the rest of a ViT step, and it lets cuBLAS pick its best GEMM kernel.
// Backward (patch_embed_bwd_common in patch_embed.cpp): G^T gather(images) for dweight (the buffer is
// gathered again rather than saved), scatter(G W) for dimages only when asked for, ATen batch sums for
// nothing else (dbias / dpos / dprefix_tokens are batch sums taken by vitkernels/ops/patch_embed.py).
// c10 CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare CUDA
// toolkit may lack (the GEMMs go through at::mm, which needs none).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <functional>

#include "checks.h"

namespace vitkernels {

// Defined in patch_embed.cpp.
void check_patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed,
                           const std::optional<at::Tensor>& prefix_tokens);
void check_patch_embed_bwd(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                           int64_t num_prefix);
using PatchGather = std::function<at::Tensor(const at::Tensor& images, int64_t P, at::ScalarType dtype)>;
using PatchScatter = std::function<at::Tensor(const at::Tensor& dpatches, const at::Tensor& images, int64_t P)>;
std::tuple<at::Tensor, at::Tensor> patch_embed_bwd_common(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, int64_t num_prefix,
    bool needs_dimages, bool needs_dw, at::ScalarType compute,
    const PatchGather& gather, const PatchScatter& scatter);

namespace {

constexpr int kThreads = 256;

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// patches[row, k] = images[b, c, ph*P + py, pw*P + px], row = b*N + ph*Wp + pw, k = (c*P + py)*P + px.
// One thread per output element: the writes are coalesced, the reads contiguous along px.
template <typename T>
__global__ void gather_patches_kernel(const T* __restrict__ images,  // (B, C, H, W), strides below
                                      T* __restrict__ patches,       // (B*N, C*P*P) output
                                      int64_t total,                 // B*N*C*P*P
                                      int64_t C, int64_t P, int64_t Wp, int64_t N,
                                      int64_t sb, int64_t sc, int64_t sh, int64_t sw) {  // images' strides
  const int64_t K = C * P * P;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / K, k = i % K;
    const int64_t b = row / N, ph = (row % N) / Wp, pw = (row % N) % Wp;
    const int64_t c = k / (P * P), py = (k / P) % P, px = k % P;
    patches[i] = images[b * sb + c * sc + (ph * P + py) * sh + (pw * P + px) * sw];
  }
}

// The inverse permutation: dimages (B, C, H, W) contiguous from dpatches (B*N, C*P*P); every pixel is in
// exactly one patch (H, W divisible by P), so each is written once.
template <typename T>
__global__ void scatter_patches_kernel(const T* __restrict__ dpatches,  // (B*N, C*P*P)
                                       T* __restrict__ dimages,         // (B, C, H, W) output
                                       int64_t total,                   // B*C*H*W
                                       int64_t C, int64_t H, int64_t W, int64_t P) {
  const int64_t Wp = W / P, N = (H / P) * Wp, K = C * P * P;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W, y = (i / W) % H, c = (i / (W * H)) % C, b = i / (W * H * C);
    const int64_t row = b * N + (y / P) * Wp + x / P;
    dimages[i] = dpatches[row * K + (c * P + y % P) * P + x % P];
  }
}

// tokens[b, t, d]: prefix token row t (t < R) or patch row n = t - R of the GEMM result + bias + pos. The
// prefix rows are B*R*D of the B*(R + N)*D outputs: one branch of this elementwise pass, no launch of their own.
template <typename T>
__global__ void patch_embed_epilogue_kernel(const T* __restrict__ h,    // (B*N, D) GEMM result
                                            const T* __restrict__ bias,  // (D,) or nullptr
                                            const T* __restrict__ pos,   // (T_pos, D) or nullptr
                                            const T* __restrict__ prefix,  // (R, D) prefix tokens, or nullptr
                                            T* __restrict__ out,         // (B, R + N, D) output
                                            int64_t total,               // B * (R + N) * D
                                            int64_t N, int64_t D,
                                            int64_t R,         // prefix tokens (0 without)
                                            int64_t pos_off) {  // R when pos has R + N rows (rows 0..R-1: prefix)
  const int64_t T_out = R + N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, t = (i / D) % T_out, b = i / (D * T_out);
    float v;
    if (t < R) {
      v = static_cast<float>(prefix[t * D + d]) +
          (pos != nullptr && pos_off ? static_cast<float>(pos[t * D + d]) : 0.f);
    } else {
      const int64_t n = t - R;
      v = static_cast<float>(h[(b * N + n) * D + d]);
      if (bias != nullptr) v += static_cast<float>(bias[d]);
      if (pos != nullptr) v += static_cast<float>(pos[(pos_off + n) * D + d]);
    }
    out[i] = static_cast<T>(v);
  }
}

// images (B, C, H, W) any strides -> (B*N, C*P*P) in the images' dtype (the compute dtype on CUDA).
at::Tensor gather_patches_cuda(const at::Tensor& images, int64_t P, at::ScalarType /*dtype: images' own*/) {
  const int64_t B = images.size(0), C = images.size(1), Wp = images.size(3) / P;
  const int64_t N = (images.size(2) / P) * Wp;
  at::Tensor patches = at::empty({B * N, C * P * P}, images.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = patches.numel();
  if (total == 0) return patches;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "gather_patches_cuda", [&] {
    gather_patches_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        images.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), total, C, P, Wp, N,
        images.stride(0), images.stride(1), images.stride(2), images.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return patches;
}

at::Tensor scatter_patches_cuda(const at::Tensor& dpatches, const at::Tensor& images, int64_t P) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  at::Tensor dimages = at::empty({B, C, H, W}, images.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor src = dpatches.to(images.scalar_type()).contiguous();
  const int64_t total = dimages.numel();
  if (total == 0) return dimages;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "scatter_patches_cuda", [&] {
    scatter_patches_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), dimages.mutable_data_ptr<scalar_t>(), total, C, H, W, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dimages;
}

at::Tensor patch_embed_fwd_cuda(const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& prefix_tokens) {
  check_patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens);
  VK_CHECK(images.is_cuda(), "patch_embed_fwd CUDA kernel got a tensor on ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), D = weight.size(0), P = weight.size(2);
  const int64_t N = (images.size(2) / P) * (images.size(3) / P);
  const int64_t R = prefix_tokens.has_value() ? prefix_tokens->size(1) : 0;
  // pos_embed covers the prefix rows too (T = R + N), or only the patches (T = N); with R = 0 the same.
  const int64_t pos_off = (pos_embed.has_value() && pos_embed->size(1) == R + N) ? R : 0;
  at::Tensor h = at::mm(gather_patches_cuda(images, P, images.scalar_type()), weight.view({D, -1}).t());
  at::Tensor out = at::empty({B, R + N, D}, images.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_embed_fwd_cuda", [&] {
    patch_embed_epilogue_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        h.const_data_ptr<scalar_t>(), bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
        pos_embed.has_value() ? pos_embed->const_data_ptr<scalar_t>() : nullptr,
        prefix_tokens.has_value() ? prefix_tokens->const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), total, N, D, R, pos_off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> patch_embed_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, int64_t num_prefix,
    bool needs_dimages, bool needs_dw) {
  check_patch_embed_bwd(grad_out, images, weight, num_prefix);
  VK_CHECK(images.is_cuda(), "patch_embed_bwd CUDA kernel got a tensor on ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  return patch_embed_bwd_common(grad_out, images, weight, num_prefix, needs_dimages, needs_dw,
                                images.scalar_type(), gather_patches_cuda, scatter_patches_cuda);
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("patch_embed_fwd", &vitkernels::patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &vitkernels::patch_embed_bwd_cuda);
}
