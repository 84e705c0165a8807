// The epilogue activations of the linear op (the same set and ids as vitkernels/triton/linear.py's ACT_IDS),
// value and derivative in fp32, shared by the C++ CPU twins (linear.cpp) and the CUDA kernels
// (linear_kernel.cu): one definition, so the two backends cannot drift apart.
//
//   1 gelu        0.5 h (1 + erf(h / sqrt 2))               d = Phi(h) + h phi(h)
//   2 gelu_tanh   0.5 h (1 + tanh(u)), u = k (h + c h^3)    d = 0.5 (1 + t) + 0.5 h (1 - t^2) k (1 + 3 c h^2)
//   3 quick_gelu  h s, s = sigmoid(1.702 h)                 d = s + 1.702 h s (1 - s)
//   4 silu        h s, s = sigmoid(h)                       d = s (1 + h (1 - s))
// with k = sqrt(2 / pi), c = 0.044715 (torch.nn.GELU(approximate="tanh")), Phi / phi the normal cdf / pdf.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define VK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VK_HOST_DEVICE inline
#endif

namespace vitkernels {

enum Activation : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActQuickGelu = 3, kActSilu = 4 };

VK_HOST_DEVICE float vk_sigmoid(float h) { return 1.0f / (1.0f + expf(-h)); }

VK_HOST_DEVICE float act_fwd(float h, int act) {
  switch (act) {
    case kActGelu:
      return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
    case kActGeluTanh:
      return 0.5f * h * (1.0f + tanhf(0.79788456080286536f * (h + 0.044715f * h * h * h)));
    case kActQuickGelu:
      return h * vk_sigmoid(1.702f * h);
    case kActSilu:
      return h * vk_sigmoid(h);
    default:
      return h;
  }
}

VK_HOST_DEVICE float act_grad(float h, int act) {
  switch (act) {
    case kActGelu: {
      const float cdf = 0.5f * (1.0f + erff(h * 0.70710678118654752f));
      const float pdf = expf(-0.5f * h * h) * 0.39894228040143268f;  // exp(-h^2/2) / sqrt(2 pi)
      return cdf + h * pdf;
    }
    case kActGeluTanh: {
      const float t = tanhf(0.79788456080286536f * (h + 0.044715f * h * h * h));
      return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.134145f * h * h);
    }
    case kActQuickGelu: {
      const float s = vk_sigmoid(1.702f * h);
      return s + 1.702f * h * s * (1.0f - s);
    }
    case kActSilu: {
      const float s = vk_sigmoid(h);
      return s * (1.0f + h * (1.0f - s));
    }
    default:
      return 1.0f;
  }
}

}  // namespace vitkernels
