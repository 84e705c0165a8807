// Attention CUDA kernels: softmax(q k^T * scale + bias) v, non-causal, an optional additive bias, any
// sequence length, head dim D <= 128 (tiles padded to 32, 64, 80, 96 or 128 columns), fp32 / fp16 / bf16.
// The readable statement of what they compute is the CPU twin in attention.cpp; the argument checks live
// there too (check_attention_fwd / check_attention_bwd) and run before any launch here.
//
// Design (flash-attention 2, written for clarity over peak speed):
//   * A block of 4 warps owns a tile of rows; tiles live in shared memory; every matrix product is a
//     block-wide "GEMM" on shared-memory tiles (block_gemm below): nvcuda::wmma 16x16x16 fragments with fp32
//     accumulators for fp16/bf16 on sm80+ (tensor cores), plain fp32 FMA loops for fp32 inputs (and for
//     any arch below sm80 the file might be compiled for).
//   * Forward: per query tile, loop over key tiles with an online softmax (fp32 running max m and sum l,
//     base-2 exponentials); the N x M score matrix never reaches global memory. Saves lse = m + log(l)
//     (natural log, fp32, (B, H, N)).
//   * Backward: delta_i = sum_d dO_id O_id (preprocessing kernel), then two kernels, neither with atomics,
//     so reruns are bit-identical:
//       dK/dV kernel: one key tile per block, looping over all query tiles;
//       dQ kernel:    one query tile per block, looping over all key tiles.
//     Both recompute P_ij = exp(s_ij * scale - lse_i) and dS_ij = P_ij (dP_ij - delta_i), dP = dO V^T, then
//       dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.
//   * Ragged tiles: rows past N (queries) or M (keys) and head-dim columns past D are loaded as zeros;
//     scores of keys past M are -inf before the row max (probability 0); nothing is stored past the ends.
//   * Bias (optional, BiasView): (B | 1, H | 1, N | 1, M) in T or fp32, read element by element through its
//     strides (0 along broadcast dims) where the scores are scaled, times log2(e). A row the bias masks
//     entirely (-inf everywhere) gets out 0 and lse +inf, so its P is 0 in the backward. dbias: the dK/dV
//     kernel (which visits each (query tile, key tile) pair once) writes dS into an fp32 (B, H, N, M) buffer,
//     which the launcher sums over the broadcast dims (dbias_from_scores, attention.cpp): no atomics.
//   * Inputs: q (B, H, N, D) and k, v (B, H, M, D) with arbitrary batch/head/row strides and a contiguous
//     last dim (checked; the Python wrapper copies a tensor whose last dim is strided, once). grad_out and
//     out likewise. Outputs are written (B, N, H, D)-contiguous (dk, dv: (B, M, H, D)), returned as
//     (B, H, N, D) views, so the caller's transpose(1, 2).reshape(B, N, H * D) is free.
//     Global loads move 16-byte vectors where the tensor allows it (aligned base, strides and D multiples of
//     16 bytes: the usual (B, N, 3, H, D) qkv buffer with D = 64 or 80), else one element at a time.
//   * Tiles (queries x keys): forward 64 x 64 for fp16/bf16 (64 x 32 at D_PAD = 128), 32 x 32 for fp32;
//     backward 32 x 32 (fp32 with D_PAD > 64: 16 x 16). Shared memory per block: 29 to 91 KB, which every
//     sm80+ GPU offers (checked at launch against the device's opt-in limit). 128 threads per block.
//   * Limits: B * H <= 65535 (grid y).
//   * Not done (speed, not correctness): S and the output accumulator round-trip through shared memory
//     between wmma steps (FA2 keeps them in registers with mma.sync), no cp.async double buffering, and
//     1-2 blocks per SM from the shared-memory footprint.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace vitkernels {

// Defined in attention.cpp (shared with the CPU twin).
void check_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& bias);
void check_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                         const at::Tensor& lse);
at::Tensor dbias_from_scores(const at::Tensor& ds, const at::Tensor& bias);

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------------
// Element conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__: explicit intrinsics only).

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Batch, head and row strides (in elements) of a (B, H, rows, D) tensor whose last dim is contiguous.
struct RowStrides {
  int64_t b, h, n;
};

// The additive bias read as (B, H, N, M) through its strides (elements; 0 along the dims it broadcasts), in
// the inputs' dtype T or fp32; ptr is nullptr when there is none.
struct BiasView {
  const void* ptr;
  bool fp32;
  int64_t b, h, n, m;
};

// bias(b, h, i, j) in log2 units (times log2(e), like the scores); 0 without a bias.
template <typename T>
__device__ __forceinline__ float bias_log2(const BiasView& bias, int b, int h, int i, int j) {
  if (bias.ptr == nullptr) return 0.0f;
  const int64_t at = b * bias.b + h * bias.h + i * bias.n + j * bias.m;
  const float x = bias.fp32 ? static_cast<const float*>(bias.ptr)[at] : to_float(static_cast<const T*>(bias.ptr)[at]);
  return x * kLog2e;
}

// ---------------------------------------------------------------------------------------------------------
// Block-wide GEMM on shared-memory tiles: C[M x N] (fp32, row-major, ldc) (+)= A[M x K] * B[K x N].
// A_ROW: A(r, k) = A[r * lda + k], else A(r, k) = A[k * lda + r] (A stored transposed).
// B_ROW: B(k, c) = B[k * ldb + c], else B(k, c) = B[c * ldb + k] (B stored transposed).
// M, N, K are multiples of 16. All threads of the block call it; it does not synchronise.

template <typename T, int M, int N, int K, bool A_ROW, bool B_ROW>
__device__ void scalar_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accumulate) {
  for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
    const int r = idx / N, c = idx % N;
    float acc = accumulate ? C[r * ldc + c] : 0.0f;
#pragma unroll 8
    for (int k = 0; k < K; ++k) {
      const float a = to_float(A_ROW ? A[r * lda + k] : A[k * lda + r]);
      const float b = to_float(B_ROW ? B[k * ldb + c] : B[c * ldb + k]);
      acc = fmaf(a, b, acc);
    }
    C[r * ldc + c] = acc;
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Tensor-core version: each warp owns 16x16 tiles of C (round robin) and sweeps K in steps of 16.
// Pointers are 32-byte aligned and leading dims multiples of 16 bytes (see the smem layouts below).
template <typename T, int M, int N, int K, bool A_ROW, bool B_ROW>
__device__ void wmma_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accumulate) {
  namespace wmma = nvcuda::wmma;
  using ALayout = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  constexpr int kTilesN = N / 16;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < (M / 16) * kTilesN; t += kWarps) {
    const int r0 = (t / kTilesN) * 16, c0 = (t % kTilesN) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, C + r0 * ldc + c0, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
      wmma::load_matrix_sync(a, A_ROW ? A + r0 * lda + k0 : A + k0 * lda + r0, lda);
      wmma::load_matrix_sync(b, B_ROW ? B + k0 * ldb + c0 : B + c0 * ldb + k0, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + r0 * ldc + c0, acc, ldc, wmma::mem_row_major);
  }
}
#endif

template <typename T, int M, int N, int K, bool A_ROW, bool B_ROW>
__device__ __forceinline__ void block_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc,
                                           bool accumulate) {
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "GEMM tiles are multiples of 16");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, float>) {
    scalar_gemm<T, M, N, K, A_ROW, B_ROW>(A, lda, B, ldb, C, ldc, accumulate);
  } else {
    wmma_gemm<T, M, N, K, A_ROW, B_ROW>(A, lda, B, ldb, C, ldc, accumulate);
  }
#else
  scalar_gemm<T, M, N, K, A_ROW, B_ROW>(A, lda, B, ldb, C, ldc, accumulate);
#endif
}

// Copy rows [0, ROWS) x cols [0, D_PAD) of a (rows, D) global tile (row stride `stride`, contiguous last
// dim) into shared memory (leading dim ld); rows >= rows_valid and cols >= D are zero. With `vec` (the
// launcher checked: src and stride 16-byte aligned, D a multiple of 16 bytes) it moves 16-byte vectors.
template <typename T, int ROWS, int D_PAD>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t stride, int rows_valid, int D, bool vec) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector; D_PAD and ld are multiples of V
  static_assert(D_PAD % V == 0, "tile width is a whole number of vectors");
  if (vec) {
    constexpr int kVecPerRow = D_PAD / V;
    for (int idx = threadIdx.x; idx < ROWS * kVecPerRow; idx += kThreads) {
      const int r = idx / kVecPerRow, d = (idx % kVecPerRow) * V;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0.0 in fp32, fp16 and bf16
      if (r < rows_valid && d < D) x = *reinterpret_cast<const uint4*>(src + r * stride + d);
      *reinterpret_cast<uint4*>(dst + r * ld + d) = x;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * D_PAD; idx += kThreads) {
      const int r = idx / D_PAD, d = idx % D_PAD;
      dst[r * ld + d] = (r < rows_valid && d < D) ? src[r * stride + d] : from_float<T>(0.0f);
    }
  }
}

// Bits of the kernels' `vec` argument: which inputs allow 16-byte vector loads.
constexpr int kVecQ = 1, kVecK = 2, kVecV = 4, kVecDout = 8;

template <int ROWS, int COLS>
__device__ void zero_fp32(float* dst, int ld) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) dst[(idx / COLS) * ld + idx % COLS] = 0.0f;
}

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// Blocks of `smem_bytes` dynamic shared memory that fit on one SM (1 KB per block is reserved), at most 16
// blocks of 128 threads: the occupancy shared memory allows. The tile kernels give it to __launch_bounds__
// as their minimum blocks per SM, which caps registers at what that occupancy leaves (65536 / (128 * blocks))
// and tells ptxas no higher occupancy is to be had. Without it ptxas kept registers at 48-80 for an
// occupancy shared memory rules out and spilled 4-16 bytes per thread to stay there (sm_90a: fp32 backward
// D_PAD >= 64, fp16 forward D_PAD 32, bf16 dQ D_PAD 32; sm_80: fp32 dK/dV, fp16 forward D_PAD 32 and 80).
// With it nothing spills and no kernel's occupancy drops (tests/test_cuda_ptxas.py checks the spills).
// Shared memory per SM: 228 KB on sm_90 (H100/H200), 164 KB on sm_80 (A100; the same sm_80 code runs on
// 8.6/8.9, 100 KB, where fewer blocks fit than the bound says: the register cap is then tighter than needed).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kSmemPerSM = 228 * 1024;
#else
constexpr int kSmemPerSM = 164 * 1024;
#endif
constexpr int blocks_per_sm(int smem_bytes) {
  const int blocks = kSmemPerSM / (smem_bytes + 1024);
  return blocks < 1 ? 1 : (blocks > 16 ? 16 : blocks);
}

// ---------------------------------------------------------------------------------------------------------
// Forward. Tiles: fp16/bf16 BM = 64 queries x BN = 64 keys (BN = 32 for D_PAD = 128); fp32 32 x 32.
// Leading dims are padded (+8 elements for T tiles, +4 for fp32 tiles) against bank conflicts; they stay
// multiples of 16 bytes and every 16-row / 16-column sub-tile starts on a 32-byte boundary (wmma's rule).

template <typename T, int D_PAD>
struct FwdLayout {
  static constexpr bool kHalf = !std::is_same_v<T, float>;
  static constexpr int BM = kHalf ? 64 : 32;
  static constexpr int BN = kHalf ? (D_PAD <= 96 ? 64 : 32) : 32;
  static constexpr int LDT = D_PAD + 8;  // Q, K, V tiles (T)
  static constexpr int LDS = BN + 4;     // scores (fp32)
  static constexpr int LDP = BN + 8;     // probabilities (T)
  static constexpr int LDO = D_PAD + 4;  // output accumulator (fp32)
  static constexpr int q = 0;
  static constexpr int k = q + align128(BM * LDT * sizeof(T));
  static constexpr int v = k + align128(BN * LDT * sizeof(T));
  static constexpr int s = v + align128(BN * LDT * sizeof(T));
  static constexpr int p = s + align128(BM * LDS * sizeof(float));
  static constexpr int o = p + align128(BM * LDP * sizeof(T));
  static constexpr int m = o + align128(BM * LDO * sizeof(float));  // running max (log2 units)
  static constexpr int l = m + align128(BM * sizeof(float));        // running sum
  static constexpr int alpha = l + align128(BM * sizeof(float));    // rescale factor of this step
  static constexpr int bytes = alpha + align128(BM * sizeof(float));
  static constexpr int min_blocks = blocks_per_sm(bytes);
};

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads, FwdLayout<T, D_PAD>::min_blocks) attention_fwd_kernel(
    const T* __restrict__ q,   // (B, H, N, D), strides sq
    const T* __restrict__ k,   // (B, H, M, D), strides sk
    const T* __restrict__ v,   // (B, H, M, D), strides sv
    T* __restrict__ out,       // (B, N, H, D) contiguous
    float* __restrict__ lse,   // (B, H, N) contiguous, natural log
    BiasView bias,             // (B, H, N, M) additive bias, or none
    RowStrides sq, RowStrides sk, RowStrides sv,
    int H, int N, int M, int D,
    int vec,                   // kVec* bits: inputs that allow 16-byte loads
    float scale_log2) {        // scale * log2(e): scores in base-2 units
  using L = FwdLayout<T, D_PAD>;
  constexpr int BM = L::BM, BN = L::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  T* P = reinterpret_cast<T*>(smem + L::p);
  float* O = reinterpret_cast<float*>(smem + L::o);
  float* row_m = reinterpret_cast<float*>(smem + L::m);
  float* row_l = reinterpret_cast<float*>(smem + L::l);
  float* row_alpha = reinterpret_cast<float*>(smem + L::alpha);

  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int i0 = blockIdx.x * BM;
  const int rows_q = min(BM, N - i0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* k_bh = k + b * sk.b + h * sk.h;
  const T* v_bh = v + b * sv.b + h * sv.h;

  load_tile<T, BM, D_PAD>(Qs, L::LDT, q + b * sq.b + h * sq.h + i0 * sq.n, sq.n, rows_q, D, vec & kVecQ);
  zero_fp32<BM, D_PAD>(O, L::LDO);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.0f;
  }

  for (int j0 = 0; j0 < M; j0 += BN) {
    const int rows_k = min(BN, M - j0);  // >= 1: without a bias every row max is finite
    __syncthreads();  // previous step's reads of Ks, Vs, P are done (and the initialisation above)
    load_tile<T, BN, D_PAD>(Ks, L::LDT, k_bh + j0 * sk.n, sk.n, rows_k, D, vec & kVecK);
    load_tile<T, BN, D_PAD>(Vs, L::LDT, v_bh + j0 * sv.n, sv.n, rows_k, D, vec & kVecV);
    __syncthreads();
    block_gemm<T, BM, BN, D_PAD, true, false>(Qs, L::LDT, Ks, L::LDT, S, L::LDS, false);  // S = Q K^T
    __syncthreads();
    // Online softmax, one warp per row: new max, P = exp2(s - m_new) (0 for keys past M), rescale factor.
    for (int r = warp; r < BM; r += kWarps) {
      float mx = -INFINITY;
      for (int c = lane; c < BN; c += 32) {
        if (c < rows_k) {
          // The score in log2 units with the bias (none read for rows past N), stored back for the
          // exponentials below (read by this same lane).
          const float s = S[r * L::LDS + c] * scale_log2 +
                          (r < rows_q ? bias_log2<T>(bias, b, h, i0 + r, j0 + c) : 0.0f);
          S[r * L::LDS + c] = s;
          mx = fmaxf(mx, s);
        }
      }
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, warp_max(mx));
      // A bias can mask every key so far (m_new = -inf): subtract 0 then, so that p and alpha are 0, not
      // exp2(-inf - -inf) = NaN. row_m keeps the true max.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
      for (int c = lane; c < BN; c += 32) {
        const float p = c < rows_k ? exp2f(S[r * L::LDS + c] - m_use) : 0.0f;
        P[r * L::LDP + c] = from_float<T>(p);
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);  // 0 on the first tile (m_old = -inf)
        row_alpha[r] = alpha;
        row_l[r] = row_l[r] * alpha + sum;
        row_m[r] = m_new;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * D_PAD; idx += kThreads) {
      const int r = idx / D_PAD, d = idx % D_PAD;
      O[r * L::LDO + d] *= row_alpha[r];
    }
    __syncthreads();
    block_gemm<T, BM, D_PAD, BN, true, true>(P, L::LDP, Vs, L::LDT, O, L::LDO, true);  // O += P V
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * D_PAD; idx += kThreads) {
    const int r = idx / D_PAD, d = idx % D_PAD;
    if (r < rows_q && d < D) {
      const int64_t row = (static_cast<int64_t>(b) * N + i0 + r) * H + h;
      // row_l = 0 only on a row the bias masked entirely: out 0 there.
      out[row * D + d] = from_float<T>(row_l[r] > 0.0f ? O[r * L::LDO + d] / row_l[r] : 0.0f);
    }
  }
  for (int r = threadIdx.x; r < rows_q; r += kThreads) {
    // +inf on a fully masked row: the backward's P = exp2(s - lse) is 0 there.
    lse[static_cast<int64_t>(bh) * N + i0 + r] = row_l[r] > 0.0f ? (row_m[r] + log2f(row_l[r])) * kLn2 : INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.
//
// With s = q k^T * scale + bias, P = softmax_rows(s), O = P V and dO the incoming gradient:
//   dV = P^T dO
//   dP = dO V^T
//   dS_ij = P_ij (dP_ij - sum_l P_il dP_il) = P_ij (dP_ij - delta_i),  delta_i = sum_l P_il dP_il = dO_i . O_i
//   dQ = scale * dS K,   dK = scale * dS^T Q,   dbias = dS summed over the bias's broadcast dims
// P is recomputed from the saved lse: P_ij = exp(s_ij - lse_i).

// delta_i = sum_d dO_id O_id in fp32, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(
    const T* __restrict__ dout,  // (B, H, N, D), strides sdo
    const T* __restrict__ out,   // (B, H, N, D), strides so
    float* __restrict__ delta,   // (B, H, N) contiguous
    RowStrides sdo, RowStrides so,
    int H, int N, int D, int64_t rows) {  // rows = B * H * N
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together; no block-level sync follows
  const int64_t n = row % N, bh = row / N, h = bh % H, b = bh / H;
  const T* dout_row = dout + b * sdo.b + h * sdo.h + n * sdo.n;
  const T* out_row = out + b * so.b + h * so.h + n * so.n;
  float acc = 0.0f;
  for (int d = lane; d < D; d += 32) acc = fmaf(to_float(dout_row[d]), to_float(out_row[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

// Tiles of both backward kernels: fp16/bf16 32 x 32; fp32 32 x 32 for D_PAD <= 64, else 16 x 16.
template <typename T, int D_PAD>
struct BwdLayout {
  static constexpr bool kHalf = !std::is_same_v<T, float>;
  static constexpr int BM = kHalf ? 32 : (D_PAD <= 64 ? 32 : 16);  // queries
  static constexpr int BN = BM;                                     // keys
  static constexpr int LDT = D_PAD + 8;  // Q, dO, K, V tiles (T)
  static constexpr int LDS = BN + 4;     // S, dP (fp32)
  static constexpr int LDP = BN + 8;     // P, dS (T)
  static constexpr int LDA = D_PAD + 4;  // accumulators dK, dV or dQ (fp32)
  static constexpr int q = 0;
  static constexpr int dout = q + align128(BM * LDT * sizeof(T));
  static constexpr int k = dout + align128(BM * LDT * sizeof(T));
  static constexpr int v = k + align128(BN * LDT * sizeof(T));
  static constexpr int s = v + align128(BN * LDT * sizeof(T));
  static constexpr int dp = s + align128(BM * LDS * sizeof(float));
  static constexpr int p = dp + align128(BM * LDS * sizeof(float));
  static constexpr int ds = p + align128(BM * LDP * sizeof(T));
  static constexpr int acc0 = ds + align128(BM * LDP * sizeof(T));           // dK (dK/dV kernel) or dQ
  static constexpr int acc1 = acc0 + align128((BM > BN ? BM : BN) * LDA * sizeof(float));  // dV
  static constexpr int lse = acc1 + align128(BN * LDA * sizeof(float));     // lse_i * log2(e)
  static constexpr int delta = lse + align128(BM * sizeof(float));
  static constexpr int bytes = delta + align128(BM * sizeof(float));
  static constexpr int min_blocks = blocks_per_sm(bytes);
};

// Query-tile rows [i0, i0 + BM) of lse (to log2 units) and delta into shared memory; 0 past N.
template <int BM>
__device__ void load_row_stats(float* lse2_s, float* delta_s, const float* lse_bh, const float* delta_bh,
                               int i0, int rows_q) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    lse2_s[r] = r < rows_q ? lse_bh[i0 + r] * kLog2e : 0.0f;
    delta_s[r] = r < rows_q ? delta_bh[i0 + r] : 0.0f;
  }
}

// P and dS of one (query tile, key tile) pair (rows i0.., keys j0.. of head (b, h)) from S = Q K^T, the bias
// and dP = dO V^T; both 0 outside the valid rows_q x rows_k corner (padding rows and keys contribute nothing
// to any gradient). With ds_bh (this head's (N, M) slice of an fp32 buffer) dS is also stored there in fp32.
template <typename T, int BM, int BN, int LDS, int LDP>
__device__ void softmax_grad_tile(const float* S, const float* dP, const float* lse2_s, const float* delta_s,
                                  T* P, T* dS, int rows_q, int rows_k, float scale_log2, const BiasView& bias,
                                  int b, int h, int i0, int j0, float* ds_bh, int M) {
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    const bool valid = r < rows_q && c < rows_k;
    // lse = +inf on a row the bias masked entirely: p = 0 there.
    const float p = valid ? exp2f(S[r * LDS + c] * scale_log2 + bias_log2<T>(bias, b, h, i0 + r, j0 + c) -
                                  lse2_s[r])
                          : 0.0f;
    const float ds = p * (dP[r * LDS + c] - delta_s[r]);
    P[r * LDP + c] = from_float<T>(p);
    dS[r * LDP + c] = from_float<T>(ds);
    if (ds_bh != nullptr && valid) ds_bh[static_cast<int64_t>(i0 + r) * M + j0 + c] = ds;
  }
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads, BwdLayout<T, D_PAD>::min_blocks) attention_bwd_dkdv_kernel(
    const T* __restrict__ q,       // (B, H, N, D), strides sq
    const T* __restrict__ k,       // (B, H, M, D), strides sk
    const T* __restrict__ v,       // (B, H, M, D), strides sv
    const T* __restrict__ dout,    // (B, H, N, D), strides sdo
    const float* __restrict__ lse,    // (B, H, N) contiguous, natural log
    const float* __restrict__ delta,  // (B, H, N) contiguous
    T* __restrict__ dk,            // (B, M, H, D) contiguous
    T* __restrict__ dv,            // (B, M, H, D) contiguous
    BiasView bias,                 // (B, H, N, M) additive bias, or none
    float* __restrict__ ds_out,    // (B, H, N, M) fp32 contiguous: dS out, or nullptr (no dbias wanted)
    RowStrides sq, RowStrides sk, RowStrides sv, RowStrides sdo,
    int H, int N, int M, int D,
    int vec,                   // kVec* bits: inputs that allow 16-byte loads
    float scale, float scale_log2) {
  using L = BwdLayout<T, D_PAD>;
  constexpr int BM = L::BM, BN = L::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* dOs = reinterpret_cast<T*>(smem + L::dout);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  float* dP = reinterpret_cast<float*>(smem + L::dp);
  T* P = reinterpret_cast<T*>(smem + L::p);
  T* dS = reinterpret_cast<T*>(smem + L::ds);
  float* dK = reinterpret_cast<float*>(smem + L::acc0);
  float* dV = reinterpret_cast<float*>(smem + L::acc1);
  float* lse2_s = reinterpret_cast<float*>(smem + L::lse);
  float* delta_s = reinterpret_cast<float*>(smem + L::delta);

  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int j0 = blockIdx.x * BN;
  const int rows_k = min(BN, M - j0);
  const T* q_bh = q + b * sq.b + h * sq.h;
  const T* dout_bh = dout + b * sdo.b + h * sdo.h;
  const float* lse_bh = lse + static_cast<int64_t>(bh) * N;
  const float* delta_bh = delta + static_cast<int64_t>(bh) * N;
  float* ds_bh = ds_out == nullptr ? nullptr : ds_out + static_cast<int64_t>(bh) * N * M;

  load_tile<T, BN, D_PAD>(Ks, L::LDT, k + b * sk.b + h * sk.h + j0 * sk.n, sk.n, rows_k, D, vec & kVecK);
  load_tile<T, BN, D_PAD>(Vs, L::LDT, v + b * sv.b + h * sv.h + j0 * sv.n, sv.n, rows_k, D, vec & kVecV);
  zero_fp32<BN, D_PAD>(dK, L::LDA);
  zero_fp32<BN, D_PAD>(dV, L::LDA);

  for (int i0 = 0; i0 < N; i0 += BM) {
    const int rows_q = min(BM, N - i0);
    __syncthreads();  // previous step's reads of Qs, dOs, P, dS are done (and the loads above)
    load_tile<T, BM, D_PAD>(Qs, L::LDT, q_bh + i0 * sq.n, sq.n, rows_q, D, vec & kVecQ);
    load_tile<T, BM, D_PAD>(dOs, L::LDT, dout_bh + i0 * sdo.n, sdo.n, rows_q, D, vec & kVecDout);
    load_row_stats<BM>(lse2_s, delta_s, lse_bh, delta_bh, i0, rows_q);
    __syncthreads();
    block_gemm<T, BM, BN, D_PAD, true, false>(Qs, L::LDT, Ks, L::LDT, S, L::LDS, false);    // S = Q K^T
    block_gemm<T, BM, BN, D_PAD, true, false>(dOs, L::LDT, Vs, L::LDT, dP, L::LDS, false);  // dP = dO V^T
    __syncthreads();
    softmax_grad_tile<T, BM, BN, L::LDS, L::LDP>(S, dP, lse2_s, delta_s, P, dS, rows_q, rows_k, scale_log2, bias,
                                                 b, h, i0, j0, ds_bh, M);
    __syncthreads();
    block_gemm<T, BN, D_PAD, BM, false, true>(P, L::LDP, dOs, L::LDT, dV, L::LDA, true);  // dV += P^T dO
    block_gemm<T, BN, D_PAD, BM, false, true>(dS, L::LDP, Qs, L::LDT, dK, L::LDA, true);  // dK += dS^T Q
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < BN * D_PAD; idx += kThreads) {
    const int r = idx / D_PAD, d = idx % D_PAD;
    if (r < rows_k && d < D) {
      const int64_t row = (static_cast<int64_t>(b) * M + j0 + r) * H + h;
      dk[row * D + d] = from_float<T>(dK[r * L::LDA + d] * scale);
      dv[row * D + d] = from_float<T>(dV[r * L::LDA + d]);
    }
  }
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads, BwdLayout<T, D_PAD>::min_blocks) attention_bwd_dq_kernel(
    const T* __restrict__ q,       // (B, H, N, D), strides sq
    const T* __restrict__ k,       // (B, H, M, D), strides sk
    const T* __restrict__ v,       // (B, H, M, D), strides sv
    const T* __restrict__ dout,    // (B, H, N, D), strides sdo
    const float* __restrict__ lse,    // (B, H, N) contiguous, natural log
    const float* __restrict__ delta,  // (B, H, N) contiguous
    T* __restrict__ dq,            // (B, N, H, D) contiguous
    BiasView bias,                 // (B, H, N, M) additive bias, or none
    RowStrides sq, RowStrides sk, RowStrides sv, RowStrides sdo,
    int H, int N, int M, int D,
    int vec,                   // kVec* bits: inputs that allow 16-byte loads
    float scale, float scale_log2) {
  using L = BwdLayout<T, D_PAD>;
  constexpr int BM = L::BM, BN = L::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* dOs = reinterpret_cast<T*>(smem + L::dout);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  float* dP = reinterpret_cast<float*>(smem + L::dp);
  T* P = reinterpret_cast<T*>(smem + L::p);
  T* dS = reinterpret_cast<T*>(smem + L::ds);
  float* dQ = reinterpret_cast<float*>(smem + L::acc0);
  float* lse2_s = reinterpret_cast<float*>(smem + L::lse);
  float* delta_s = reinterpret_cast<float*>(smem + L::delta);

  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int i0 = blockIdx.x * BM;
  const int rows_q = min(BM, N - i0);
  const T* k_bh = k + b * sk.b + h * sk.h;
  const T* v_bh = v + b * sv.b + h * sv.h;

  load_tile<T, BM, D_PAD>(Qs, L::LDT, q + b * sq.b + h * sq.h + i0 * sq.n, sq.n, rows_q, D, vec & kVecQ);
  load_tile<T, BM, D_PAD>(dOs, L::LDT, dout + b * sdo.b + h * sdo.h + i0 * sdo.n, sdo.n, rows_q, D,
                          vec & kVecDout);
  load_row_stats<BM>(lse2_s, delta_s, lse + static_cast<int64_t>(bh) * N, delta + static_cast<int64_t>(bh) * N,
                     i0, rows_q);
  zero_fp32<BM, D_PAD>(dQ, L::LDA);

  for (int j0 = 0; j0 < M; j0 += BN) {
    const int rows_k = min(BN, M - j0);
    __syncthreads();  // previous step's reads of Ks, dS are done (and the loads above)
    load_tile<T, BN, D_PAD>(Ks, L::LDT, k_bh + j0 * sk.n, sk.n, rows_k, D, vec & kVecK);
    load_tile<T, BN, D_PAD>(Vs, L::LDT, v_bh + j0 * sv.n, sv.n, rows_k, D, vec & kVecV);
    __syncthreads();
    block_gemm<T, BM, BN, D_PAD, true, false>(Qs, L::LDT, Ks, L::LDT, S, L::LDS, false);    // S = Q K^T
    block_gemm<T, BM, BN, D_PAD, true, false>(dOs, L::LDT, Vs, L::LDT, dP, L::LDS, false);  // dP = dO V^T
    __syncthreads();
    softmax_grad_tile<T, BM, BN, L::LDS, L::LDP>(S, dP, lse2_s, delta_s, P, dS, rows_q, rows_k, scale_log2, bias,
                                                 b, h, i0, j0, nullptr, M);
    __syncthreads();
    block_gemm<T, BM, D_PAD, BN, true, true>(dS, L::LDP, Ks, L::LDT, dQ, L::LDA, true);  // dQ += dS K
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * D_PAD; idx += kThreads) {
    const int r = idx / D_PAD, d = idx % D_PAD;
    if (r < rows_q && d < D) {
      const int64_t row = (static_cast<int64_t>(b) * N + i0 + r) * H + h;
      dq[row * D + d] = from_float<T>(dQ[r * L::LDA + d] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// How the kernels read the bias (checked by check_attention_fwd): its strides, 0 along its size-1 dims.
BiasView bias_view(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return {nullptr, false, 0, 0, 0, 0};
  const at::Tensor& t = *bias;
  const auto stride = [&](int d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  return {t.data_ptr(), t.scalar_type() == at::kFloat, stride(0), stride(1), stride(2), stride(3)};
}

// Whether `t` (B, H, rows, D) allows 16-byte loads: aligned base, strides and D multiples of 16 bytes.
bool vec_ok(const at::Tensor& t) {
  const int64_t V = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(3) % V == 0 && t.stride(0) % V == 0 &&
         t.stride(1) % V == 0 && t.stride(2) % V == 0;
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Opt a kernel into `bytes` of dynamic shared memory, with a readable error where the GPU has less.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  int device = 0, available = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&available, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  VK_CHECK(bytes <= available, "attention kernel needs ", bytes, " bytes of shared memory per block, this GPU ",
           "offers ", available);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Calls f(std::integral_constant<int, D_PAD>{}) for the smallest tile width that holds head dim D.
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 80) {
    f(std::integral_constant<int, 80>{});
  } else if (D <= 96) {
    f(std::integral_constant<int, 96>{});
  } else {
    f(std::integral_constant<int, 128>{});  // D <= 128 is checked before
  }
}

// Calls f(T{}) with T the CUDA element type of `dtype` (float, __half or __nv_bfloat16).
template <typename F>
void with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: VK_CHECK(false, "attention: unsupported dtype ", dtype);
  }
}

template <typename T>
const T* data(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mutable_data(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_cuda_limits(const at::Tensor& q, const at::Tensor& k) {
  VK_CHECK(q.is_cuda(), "attention: expected CUDA tensors, got ", q.device());
  VK_CHECK(q.size(3) <= 128, "attention: CUDA kernels support head dim D <= 128, got ", q.size(3));
  VK_CHECK(q.size(0) * q.size(1) <= 65535, "attention: CUDA kernels support B * H <= 65535, got ",
           q.size(0) * q.size(1));
  VK_CHECK(q.size(2) < (int64_t{1} << 30) && k.size(2) < (int64_t{1} << 30),
           "attention: sequence lengths must be below 2^30, got N = ", q.size(2), ", M = ", k.size(2));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                                                      double scale) {
  check_attention_fwd(q, k, v, bias);
  check_cuda_limits(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out.transpose(1, 2), lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const int vec = (vec_ok(q) ? kVecQ : 0) | (vec_ok(k) ? kVecK : 0) | (vec_ok(v) ? kVecV : 0);
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_head_dim(D, [&](auto d_pad) {
      constexpr int D_PAD = decltype(d_pad)::value;
      using L = FwdLayout<T, D_PAD>;
      auto kernel = attention_fwd_kernel<T, D_PAD>;
      set_smem(kernel, L::bytes);
      const dim3 grid(ceil_div(N, L::BM), static_cast<unsigned>(B * H));
      kernel<<<grid, kThreads, L::bytes, stream>>>(
          data<T>(q), data<T>(k), data<T>(v), mutable_data<T>(out), lse.data_ptr<float>(), bias_view(bias),
          row_strides(q), row_strides(k), row_strides(v), static_cast<int>(H), static_cast<int>(N),
          static_cast<int>(M), static_cast<int>(D), vec, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool needs_dbias) {
  check_attention_bwd(grad_out, q, k, v, bias, out, lse);
  check_cuda_limits(q, k);
  const bool store_ds = needs_dbias && bias.has_value();
  at::Tensor dbias = at::empty({0}, q.options());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  at::Tensor dq = at::empty({B, N, H, D}, q.options());
  at::Tensor dk = at::empty({B, M, H, D}, q.options());
  at::Tensor dv = at::empty({B, M, H, D}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0) {
    // An empty side: no scores, so every gradient is zero (and nothing to launch).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    if (store_ds) dbias = at::zeros(bias->sizes(), bias->options());
    return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dbias};
  }
  at::Tensor delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  // dS for dbias: every valid element is written once by the dK/dV kernel.
  at::Tensor ds = store_ds ? at::empty({B, H, N, M}, q.options().dtype(at::kFloat)) : at::Tensor();
  const BiasView bias_v = bias_view(bias);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float scale_f = static_cast<float>(scale);
  const float scale_log2 = scale_f * kLog2e;
  const int vec =
      (vec_ok(q) ? kVecQ : 0) | (vec_ok(k) ? kVecK : 0) | (vec_ok(v) ? kVecV : 0) | (vec_ok(grad_out) ? kVecDout : 0);
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = B * H * N;
    attention_bwd_delta_kernel<T><<<ceil_div(rows, kWarps), kThreads, 0, stream>>>(
        data<T>(grad_out), data<T>(out), delta.data_ptr<float>(), row_strides(grad_out), row_strides(out),
        static_cast<int>(H), static_cast<int>(N), static_cast<int>(D), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_head_dim(D, [&](auto d_pad) {
      constexpr int D_PAD = decltype(d_pad)::value;
      using L = BwdLayout<T, D_PAD>;
      auto dkdv_kernel = attention_bwd_dkdv_kernel<T, D_PAD>;
      set_smem(dkdv_kernel, L::bytes);
      dkdv_kernel<<<dim3(ceil_div(M, L::BN), static_cast<unsigned>(B * H)), kThreads, L::bytes, stream>>>(
          data<T>(q), data<T>(k), data<T>(v), data<T>(grad_out), lse.data_ptr<float>(), delta.data_ptr<float>(),
          mutable_data<T>(dk), mutable_data<T>(dv), bias_v, store_ds ? ds.data_ptr<float>() : nullptr,
          row_strides(q), row_strides(k), row_strides(v),
          row_strides(grad_out), static_cast<int>(H), static_cast<int>(N), static_cast<int>(M),
          static_cast<int>(D), vec, scale_f, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto dq_kernel = attention_bwd_dq_kernel<T, D_PAD>;
      set_smem(dq_kernel, L::bytes);
      dq_kernel<<<dim3(ceil_div(N, L::BM), static_cast<unsigned>(B * H)), kThreads, L::bytes, stream>>>(
          data<T>(q), data<T>(k), data<T>(v), data<T>(grad_out), lse.data_ptr<float>(), delta.data_ptr<float>(),
          mutable_data<T>(dq), bias_v, row_strides(q), row_strides(k), row_strides(v), row_strides(grad_out),
          static_cast<int>(H), static_cast<int>(N), static_cast<int>(M), static_cast<int>(D), vec, scale_f,
          scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (store_ds) dbias = dbias_from_scores(ds, *bias);
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dbias};
}

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("attention_fwd", &vitkernels::attention_fwd_cuda);
  m.impl("attention_bwd", &vitkernels::attention_bwd_cuda);
}
