// Patch embedding (timm's PatchEmbed + prefix tokens + position embedding): argument checks, schemas, the
// backward shared by both devices, and the C++ CPU twin. The CUDA kernels are in patch_embed_kernel.cu.
//
// Shapes: images (B, C, H, W) with any strides, weight (D, C, P, P), N = (H/P) (W/P) patches, K = C P P,
// prefix_tokens (1, R, D): R prefix tokens (timm's class, register and distillation tokens; the op's
// contract calls R "K", the reduction length here).
// Forward:  patches (B*N, K) = the P x P patches of every image, row-major over the patch grid, each
//             flattened as (c, py, px) like weight.view(D, K);
//           tokens[b, R + n, :] = patches[b*N + n] W^T + bias + pos[pos_off + n]
//           tokens[b, r, :]     = prefix_tokens[r] + pos[r]      (r < R; pos[r] only if T = N + R)
//           with pos_off = R when pos_embed has T = N + R rows, 0 when T = N (timm's no_embed_class).
// Backward (G = grad of the patch rows R.., (B*N, D)):
//           dweight = G^T patches,  dimages = scatter(G W) (patches do not overlap, so the scatter writes
//           each pixel once). dbias, dpos and dprefix_tokens are batch sums of grad, taken by the shared
//           Python backward (vitkernels/ops/patch_embed.py).
#include <ATen/Parallel.h>

#include <functional>

#include "checks.h"

namespace vitkernels {

void check_patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed,
                           const std::optional<at::Tensor>& prefix_tokens) {
  VK_CHECK_FLOAT(images);
  VK_CHECK_DIM(images, 4);
  VK_CHECK_LIKE(weight, images);
  VK_CHECK_DIM(weight, 4);
  VK_CHECK_CONTIGUOUS(weight);
  const int64_t C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t D = weight.size(0), P = weight.size(2);
  VK_CHECK(weight.size(1) == C && weight.size(3) == P && P > 0, "weight must be (D, ", C,
           ", P, P) for images with ", C, " channels, got shape ", weight.sizes());
  VK_CHECK(H % P == 0 && W % P == 0, "image size ", H, "x", W, " is not divisible by the patch size ", P);
  const int64_t N = (H / P) * (W / P);
  VK_CHECK_OPTIONAL(bias, images, {D});
  VK_CHECK(!prefix_tokens.has_value() || prefix_tokens->dim() == 3, "prefix_tokens must be (1, R, ", D,
           "), got shape ", prefix_tokens->sizes());
  const int64_t R = prefix_tokens.has_value() ? prefix_tokens->size(1) : 0;
  VK_CHECK_OPTIONAL(prefix_tokens, images, {1, R, D});
  if (pos_embed.has_value()) {
    const int64_t T = pos_embed->dim() == 3 ? pos_embed->size(1) : -1;
    if (R > 0) {
      VK_CHECK(T == N || T == N + R, "pos_embed must be (1, ", N, " or ", N + R, ", ", D, ") for ", N,
               " patches and ", R, " prefix tokens, got shape ", pos_embed->sizes());
    } else {
      VK_CHECK(T == N, "pos_embed must be (1, ", N, ", ", D, ") for ", N, " patches, got shape ",
               pos_embed->sizes());
    }
    VK_CHECK_OPTIONAL(pos_embed, images, {1, T, D});
  }
}

void check_patch_embed_bwd(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                           int64_t num_prefix) {
  check_patch_embed_fwd(images, weight, std::nullopt, std::nullopt, std::nullopt);
  VK_CHECK(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
  const int64_t B = images.size(0), P = weight.size(2), D = weight.size(0);
  const int64_t N = (images.size(2) / P) * (images.size(3) / P);
  const int64_t T_out = num_prefix + N;
  VK_CHECK_LIKE(grad_out, images);
  VK_CHECK_SHAPE(grad_out, {B, T_out, D});
  VK_CHECK_CONTIGUOUS(grad_out);
}

using PatchGather = std::function<at::Tensor(const at::Tensor& images, int64_t P, at::ScalarType dtype)>;
using PatchScatter = std::function<at::Tensor(const at::Tensor& dpatches, const at::Tensor& images, int64_t P)>;

// The backward of both devices: device-specific gather (images -> (B*N, K) patches in `dtype`) and scatter
// ((B*N, K) -> (B, C, H, W) gradient), the GEMMs and batch sums through ATen in `compute` dtype / fp32.
std::tuple<at::Tensor, at::Tensor> patch_embed_bwd_common(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, int64_t num_prefix,
    bool needs_dimages, bool needs_dw, at::ScalarType compute,
    const PatchGather& gather, const PatchScatter& scatter) {
  const int64_t B = images.size(0), D = weight.size(0), P = weight.size(2);
  const int64_t N = (images.size(2) / P) * (images.size(3) / P);
  const auto dtype = images.scalar_type();
  at::Tensor g_patch = grad_out.narrow(1, num_prefix, N);  // (B, N, D), a view
  at::Tensor g_rows = g_patch.reshape({B * N, D}).to(compute);  // (B*N, D)
  // Outputs not asked for are distinct empty (0,) tensors (a custom op's outputs must not alias).
  auto empty = [&] { return at::empty({0}, images.options()); };
  at::Tensor dweight = empty(), dimages = empty();
  if (needs_dw) {
    at::Tensor patches = gather(images, P, compute);  // (B*N, K), recomputed rather than saved
    dweight = at::mm(g_rows.t(), patches).to(dtype).view(weight.sizes());
  }
  if (needs_dimages) {
    at::Tensor dpatches = at::mm(g_rows, weight.view({D, -1}).to(compute));  // (B*N, K)
    dimages = scatter(dpatches, images, P);
  }
  return {dimages, dweight};
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// CPU twin.

// images (B, C, H, W), any strides -> patches (B*N, C*P*P) in fp32.
at::Tensor gather_patches_cpu(const at::Tensor& images, int64_t P, at::ScalarType /*dtype: fp32 here*/) {
  const int64_t B = images.size(0), C = images.size(1), Hp = images.size(2) / P, Wp = images.size(3) / P;
  const int64_t N = Hp * Wp, K = C * P * P;
  at::Tensor patches = at::empty({B * N, K}, images.options().dtype(at::kFloat));
  const auto st = images.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "gather_patches_cpu", [&] {
    const scalar_t* ip = images.const_data_ptr<scalar_t>();
    float* pp = patches.mutable_data_ptr<float>();
    at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / N, ph = (row % N) / Wp, pw = (row % N) % Wp;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t py = 0; py < P; ++py)
            for (int64_t px = 0; px < P; ++px)
              pp[row * K + (c * P + py) * P + px] = static_cast<float>(
                  ip[b * st[0] + c * st[1] + (ph * P + py) * st[2] + (pw * P + px) * st[3]]);
      }
    });
  });
  return patches;
}

// dpatches (B*N, C*P*P) fp32 -> dimages (B, C, H, W) contiguous in the images' dtype.
at::Tensor scatter_patches_cpu(const at::Tensor& dpatches, const at::Tensor& images, int64_t P) {
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Wp = W / P, N = (H / P) * Wp, K = C * P * P;
  at::Tensor dimages = at::empty({B, C, H, W}, images.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor src = dpatches.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "scatter_patches_cpu", [&] {
    const float* sp = src.const_data_ptr<float>();
    scalar_t* dp = dimages.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bcy = begin; bcy < end; ++bcy) {
        const int64_t b = bcy / (C * H), c = (bcy / H) % C, y = bcy % H;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t row = b * N + (y / P) * Wp + x / P;
          dp[bcy * W + x] = static_cast<scalar_t>(sp[row * K + (c * P + y % P) * P + x % P]);
        }
      }
    });
  });
  return dimages;
}

at::Tensor patch_embed_fwd_cpu(const at::Tensor& images, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& prefix_tokens) {
  check_patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens);
  VK_CHECK(images.is_cpu(), "patch_embed_fwd CPU kernel got a tensor on ", images.device());
  const int64_t B = images.size(0), D = weight.size(0), P = weight.size(2);
  const int64_t N = (images.size(2) / P) * (images.size(3) / P);
  const int64_t R = prefix_tokens.has_value() ? prefix_tokens->size(1) : 0, T_out = R + N;
  // pos_embed covers the prefix rows too (T = R + N), or only the patches (T = N); with R = 0 the same.
  const int64_t pos_off = (pos_embed.has_value() && pos_embed->size(1) == T_out) ? R : 0;
  at::Tensor h = at::mm(gather_patches_cpu(images, P, at::kFloat), weight.view({D, -1}).to(at::kFloat).t());
  at::Tensor out = at::empty({B, T_out, D}, images.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_embed_fwd_cpu", [&] {
    const float* hp = h.const_data_ptr<float>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* posp = pos_embed.has_value() ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* prep = prefix_tokens.has_value() ? prefix_tokens->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * T_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T_out, t = bt % T_out;
        for (int64_t d = 0; d < D; ++d) {
          float v;
          if (t < R) {  // prefix token row t (its position embedding is pos row t when pos covers it)
            v = static_cast<float>(prep[t * D + d]);
            if (posp && pos_off) v += static_cast<float>(posp[t * D + d]);
          } else {
            const int64_t n = t - R;
            v = hp[(b * N + n) * D + d];
            if (bp) v += static_cast<float>(bp[d]);
            if (posp) v += static_cast<float>(posp[(pos_off + n) * D + d]);
          }
          op[bt * D + d] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> patch_embed_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, int64_t num_prefix,
    bool needs_dimages, bool needs_dw) {
  check_patch_embed_bwd(grad_out, images, weight, num_prefix);
  VK_CHECK(images.is_cpu(), "patch_embed_bwd CPU kernel got a tensor on ", images.device());
  return patch_embed_bwd_common(grad_out, images, weight, num_prefix, needs_dimages, needs_dw, at::kFloat,
                                gather_patches_cpu, scatter_patches_cpu);
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  // The contract of vitkernels/ops/patch_embed.py (checked when the cuda backend loads). The backward returns
  // the two GEMM gradients, each empty (0,) unless asked for; bias, pos_embed and prefix_tokens gradients
  // are batch sums of grad_out, taken by the shared autograd code.
  m.def("patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens) "
        "-> Tensor");
  m.def("patch_embed_bwd(Tensor grad_out, Tensor images, Tensor weight, int num_prefix, bool needs_dimages, "
        "bool needs_dw) -> (Tensor dimages, Tensor dw)");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CPU, m) {
  m.impl("patch_embed_fwd", &vitkernels::patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &vitkernels::patch_embed_bwd_cpu);
}
