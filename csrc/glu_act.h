// The gate activations of glu_linear (csrc/glu_linear.cpp, csrc/glu_linear_kernel.cu) and their derivatives,
// in fp32, one definition for the C++ CPU twin and the CUDA kernels (host and device).
#pragma once

#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define VK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VK_HOST_DEVICE inline
#endif

namespace vitkernels {

// The activation ids of glu_linear's `activation` argument (check_glu_activation in glu_linear.cpp).
enum GluAct : int { kGluSilu = 0, kGluGelu = 1, kGluGeluTanh = 2, kGluSigmoid = 3 };

VK_HOST_DEVICE float glu_sigmoid(float z) { return 1.f / (1.f + ::expf(-z)); }

// tanh-GELU's u = sqrt(2/pi) (z + 0.044715 z^3).
VK_HOST_DEVICE float glu_tanh_u(float z) { return 0.7978845608028654f * (z + 0.044715f * z * z * z); }

// act(z): SiLU z sigmoid(z); exact GELU 0.5 z (1 + erf(z / sqrt 2)); tanh-GELU 0.5 z (1 + tanh(u)); sigmoid.
template <int ACT>
VK_HOST_DEVICE float glu_act(float z) {
  if (ACT == kGluSilu) return z * glu_sigmoid(z);
  if (ACT == kGluGelu) return 0.5f * z * (1.f + ::erff(z * 0.70710678118654752f));
  if (ACT == kGluGeluTanh) return 0.5f * z * (1.f + ::tanhf(glu_tanh_u(z)));
  return glu_sigmoid(z);
}

// act'(z): SiLU s (1 + z (1 - s)); exact GELU Phi(z) + z phi(z); tanh-GELU
// 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2); sigmoid s (1 - s).
template <int ACT>
VK_HOST_DEVICE float glu_act_grad(float z) {
  if (ACT == kGluSilu) {
    const float s = glu_sigmoid(z);
    return s * (1.f + z * (1.f - s));
  }
  if (ACT == kGluGelu) {
    const float cdf = 0.5f * (1.f + ::erff(z * 0.70710678118654752f));
    return cdf + z * ::expf(-0.5f * z * z) * 0.39894228040143268f;  // 1/sqrt(2 pi)
  }
  if (ACT == kGluGeluTanh) {
    const float t = ::tanhf(glu_tanh_u(z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.7978845608028654f * (1.f + 0.134145f * z * z);
  }
  const float s = glu_sigmoid(z);
  return s * (1.f - s);
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime id `act`: one template instance per activation.
template <typename F>
void glu_dispatch_act(int act, F&& f) {
  switch (act) {
    case kGluSilu: f(std::integral_constant<int, kGluSilu>{}); break;
    case kGluGelu: f(std::integral_constant<int, kGluGelu>{}); break;
    case kGluGeluTanh: f(std::integral_constant<int, kGluGeluTanh>{}); break;
    default: f(std::integral_constant<int, kGluSigmoid>{}); break;
  }
}

}  // namespace vitkernels
