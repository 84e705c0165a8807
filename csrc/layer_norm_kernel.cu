// LayerNorm (+ fused residual add) CUDA kernels; the math, checks and CPU twin are in layer_norm.cpp.
//
// Design: one warp per row (4 rows per 128-thread block), fp32 statistics by a two-pass mean / variance
// (no cancellation as in E[x^2] - E[x]^2). Each pass re-reads the row from global memory; a row (C <= a few
// thousand) stays in L1/L2 between passes, so the extra passes cost cache bandwidth, not DRAM traffic.
// (Holding the row in registers would need one instantiation per maximum width; this keeps any C.)
// Loads and stores are 16-byte vectors when C and every pointer allow it, scalar otherwise.
// Backward: dx per row (warp per row, the same layout); dweight/dbias in two stages without atomics: a
// (32 columns x 8 rows) block sums a group of rows per column into fp32 partials (2, G, C), then ATen sums
// the G groups (deterministic).
// c10 CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare CUDA
// toolkit may lack (the GEMMs go through at::mm, which needs none).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"

namespace vitkernels {

// Defined in layer_norm.cpp.
void check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const std::optional<at::Tensor>& residual);
void check_layer_norm_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s,
                          const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& rstd);

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // warps per block, one row each
constexpr int kColTile = 32;      // dweight/dbias stage 1: columns per block
constexpr int kRowThreads = 8;    // dweight/dbias stage 1: threads along rows per block

// VEC consecutive elements moved as one 16-byte (or smaller) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// s = x + residual rounded to T (what eager PyTorch materialises), as floats; s = x without residual.
template <typename T, int VEC>
__device__ __forceinline__ void load_s(const T* x, const T* res, int64_t j, float (&s)[VEC], Pack<T, VEC>& packed) {
  packed = load<T, VEC>(x + j);
  if (res != nullptr) {
    const Pack<T, VEC> r = load<T, VEC>(res + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) packed.v[k] = static_cast<T>(static_cast<float>(packed.v[k]) + static_cast<float>(r.v[k]));
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) s[k] = static_cast<float>(packed.v[k]);
}

template <typename T, int VEC>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x,         // (R, C)
                                      const T* __restrict__ residual,  // (R, C) or nullptr
                                      const T* __restrict__ weight,    // (C,) or nullptr
                                      const T* __restrict__ bias,      // (C,) or nullptr
                                      T* __restrict__ y,               // (R, C) output
                                      T* __restrict__ s,               // (R, C) x + residual, when residual
                                      float* __restrict__ mean,        // (R,)
                                      float* __restrict__ rstd,        // (R,)
                                      int64_t R,                       // rows
                                      int64_t C,                       // normalised width
                                      float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= R) return;
  const int64_t off = row * C;
  const T* xr = x + off;
  const T* rr = residual != nullptr ? residual + off : nullptr;
  float v[VEC];
  Pack<T, VEC> packed;

  // Pass 1: the mean (and s written out).
  float sum = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < C; j += kWarp * VEC) {
    load_s<T, VEC>(xr, rr, j, v, packed);
    if (rr != nullptr) store<T, VEC>(s + off + j, packed);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[k];
  }
  const float mu = warp_sum(sum) / static_cast<float>(C);

  // Pass 2: the variance around the mean.
  float sq = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < C; j += kWarp * VEC) {
    load_s<T, VEC>(xr, rr, j, v, packed);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sq += (v[k] - mu) * (v[k] - mu);
  }
  const float rs = rsqrtf(warp_sum(sq) / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }

  // Pass 3: normalise, scale, shift.
  for (int64_t j = threadIdx.x * VEC; j < C; j += kWarp * VEC) {
    load_s<T, VEC>(xr, rr, j, v, packed);
    Pack<T, VEC> w, b, out;
    if (weight != nullptr) w = load<T, VEC>(weight + j);
    if (bias != nullptr) b = load<T, VEC>(bias + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float o = (v[k] - mu) * rs;
      if (weight != nullptr) o *= static_cast<float>(w.v[k]);
      if (bias != nullptr) o += static_cast<float>(b.v[k]);
      out.v[k] = static_cast<T>(o);
    }
    store<T, VEC>(y + off + j, out);
  }
}

template <typename T, int VEC>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ grad_y,  // (R, C)
                                         const T* __restrict__ grad_s,  // (R, C) or nullptr
                                         const T* __restrict__ x,       // (R, C) normalised input
                                         const T* __restrict__ weight,  // (C,) or nullptr
                                         const float* __restrict__ mean,  // (R,)
                                         const float* __restrict__ rstd,  // (R,)
                                         T* __restrict__ dx,            // (R, C) output
                                         int64_t R, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= R) return;
  const int64_t off = row * C;
  const float mu = mean[row], rs = rstd[row];

  // g = dy * weight; pass 1 sums g and g * xhat over the row.
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < C; j += kWarp * VEC) {
    const Pack<T, VEC> dy = load<T, VEC>(grad_y + off + j), xv = load<T, VEC>(x + off + j);
    Pack<T, VEC> w;
    if (weight != nullptr) w = load<T, VEC>(weight + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = static_cast<float>(dy.v[k]) * (weight != nullptr ? static_cast<float>(w.v[k]) : 1.f);
      sum_g += g;
      sum_gx += g * (static_cast<float>(xv.v[k]) - mu) * rs;
    }
  }
  const float mean_g = warp_sum(sum_g) / static_cast<float>(C);
  const float mean_gx = warp_sum(sum_gx) / static_cast<float>(C);

  // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds.
  for (int64_t j = threadIdx.x * VEC; j < C; j += kWarp * VEC) {
    const Pack<T, VEC> dy = load<T, VEC>(grad_y + off + j), xv = load<T, VEC>(x + off + j);
    Pack<T, VEC> w, ds, out;
    if (weight != nullptr) w = load<T, VEC>(weight + j);
    if (grad_s != nullptr) ds = load<T, VEC>(grad_s + off + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = static_cast<float>(dy.v[k]) * (weight != nullptr ? static_cast<float>(w.v[k]) : 1.f);
      const float xhat = (static_cast<float>(xv.v[k]) - mu) * rs;
      float d = rs * (g - mean_g - xhat * mean_gx);
      if (grad_s != nullptr) d += static_cast<float>(ds.v[k]);
      out.v[k] = static_cast<T>(d);
    }
    store<T, VEC>(dx + off + j, out);
  }
}

// Stage 1 of dweight / dbias: block (kColTile, kRowThreads) sums rows [g * rows_per_group, ...) of its
// kColTile columns; partial[0][g][c] = sum dy * xhat, partial[1][g][c] = sum dy.
template <typename T>
__global__ void layer_norm_bwd_params_kernel(const T* __restrict__ grad_y,    // (R, C)
                                             const T* __restrict__ x,         // (R, C) normalised input
                                             const float* __restrict__ mean,  // (R,)
                                             const float* __restrict__ rstd,  // (R,)
                                             float* __restrict__ partial,     // (2, G, C), G = gridDim.y
                                             int64_t R, int64_t C, int64_t rows_per_group) {
  __shared__ float sw[kRowThreads][kColTile + 1];
  __shared__ float sb[kRowThreads][kColTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r1 = r0 + rows_per_group < R ? r0 + rows_per_group : R;
  float acc_w = 0.f, acc_b = 0.f;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const float dy = static_cast<float>(grad_y[r * C + c]);
      acc_w += dy * (static_cast<float>(x[r * C + c]) - mean[r]) * rstd[r];
      acc_b += dy;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int i = 1; i < kRowThreads; ++i) {
      acc_w += sw[i][threadIdx.x];
      acc_b += sb[i][threadIdx.x];
    }
    const int64_t G = gridDim.y;
    partial[blockIdx.y * C + c] = acc_w;
    partial[(G + blockIdx.y) * C + c] = acc_b;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 16-byte vector when C and every pointer allow it, else 1.
template <typename T>
int pick_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(T);
  if (C % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return vec;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, const std::optional<at::Tensor>& residual) {
  check_layer_norm_fwd(x, weight, bias, eps, residual);
  VK_CHECK(x.is_cuda(), "layer_norm_fwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1);
  const int64_t R = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  at::Tensor s = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {y, s, mean, rstd};
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((R + kRowsPerBlock - 1) / kRowsPerBlock));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(residual);
    const scalar_t* wp = ptr_or_null<scalar_t>(weight);
    const scalar_t* bp = ptr_or_null<scalar_t>(bias);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = rp != nullptr ? s.mutable_data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (pick_vec<scalar_t>(C, {xp, rp, wp, bp, yp, sp}) == kVec) {
      layer_norm_fwd_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(
          xp, rp, wp, bp, yp, sp, mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), R, C,
          static_cast<float>(eps));
    } else {
      layer_norm_fwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
          xp, rp, wp, bp, yp, sp, mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), R, C,
          static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool needs_dw,
    bool needs_db) {
  check_layer_norm_bwd(grad_y, grad_s, x, weight, mean, rstd);
  VK_CHECK(x.is_cuda(), "layer_norm_bwd CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1);
  const int64_t R = x.numel() / C;
  at::Tensor dx = at::empty_like(x);
  const bool need_params = needs_dw || needs_db;
  // Row groups of stage 1: enough blocks to fill the GPU, each summing at least 32 rows.
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>((R + 31) / 32, 512));
  const int64_t rows_per_group = (R + G - 1) / G;
  at::Tensor partial = at::zeros({2, G, C}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cuda", [&] {
      const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
      const scalar_t* dsp = ptr_or_null<scalar_t>(grad_s);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = ptr_or_null<scalar_t>(weight);
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      const float* mp = mean.const_data_ptr<float>();
      const float* rp = rstd.const_data_ptr<float>();
      const dim3 block(kWarp, kRowsPerBlock);
      const dim3 grid(static_cast<unsigned>((R + kRowsPerBlock - 1) / kRowsPerBlock));
      constexpr int kVec = 16 / sizeof(scalar_t);
      if (pick_vec<scalar_t>(C, {dyp, dsp, xp, wp, dxp}) == kVec) {
        layer_norm_bwd_dx_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(dyp, dsp, xp, wp, mp, rp, dxp, R, C);
      } else {
        layer_norm_bwd_dx_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(dyp, dsp, xp, wp, mp, rp, dxp, R, C);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_params) {
        const dim3 pblock(kColTile, kRowThreads);
        const dim3 pgrid(static_cast<unsigned>((C + kColTile - 1) / kColTile), static_cast<unsigned>(G));
        layer_norm_bwd_params_kernel<scalar_t><<<pgrid, pblock, 0, stream>>>(
            dyp, xp, mp, rp, partial.mutable_data_ptr<float>(), R, C, rows_per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::Tensor sums = partial.sum(1);  // stage 2: (2, C)
  at::Tensor dweight = needs_dw ? sums[0].to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = needs_db ? sums[1].to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("layer_norm_fwd", &vitkernels::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &vitkernels::layer_norm_bwd_cuda);
}
