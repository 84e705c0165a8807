// Argument checks shared by every op of vitkernels._C: readable messages, raised before any kernel launch.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#define VK_CHECK(cond, ...) TORCH_CHECK(cond, "vitkernels._C: ", __VA_ARGS__)

// Same device and dtype as a reference tensor.
#define VK_CHECK_LIKE(t, ref)                                                                          \
  do {                                                                                                 \
    VK_CHECK((t).device() == (ref).device(), #t " is on ", (t).device(), " but " #ref " is on ",       \
             (ref).device());                                                                          \
    VK_CHECK((t).scalar_type() == (ref).scalar_type(), #t " has dtype ", (t).scalar_type(),            \
             " but " #ref " has dtype ", (ref).scalar_type());                                         \
  } while (0)

#define VK_CHECK_DIM(t, n) VK_CHECK((t).dim() == (n), #t " must have ", n, " dims, got shape ", (t).sizes())

#define VK_CHECK_FLOAT(t)                                                                              \
  VK_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||                        \
               (t).scalar_type() == at::kBFloat16,                                                     \
           #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

#define VK_CHECK_LAST_CONTIGUOUS(t) \
  VK_CHECK((t).stride(-1) == 1, #t " must be contiguous in its last dim, got strides ", (t).strides())

#define VK_CHECK_CONTIGUOUS(t) \
  VK_CHECK((t).is_contiguous(), #t " must be contiguous, got shape ", (t).sizes(), " strides ", (t).strides())

// Exact shape, e.g. VK_CHECK_SHAPE(bias, {D}).
#define VK_CHECK_SHAPE(t, ...)                                                                         \
  VK_CHECK((t).sizes() == at::IntArrayRef(__VA_ARGS__), #t " must have shape ", at::IntArrayRef(__VA_ARGS__), \
           ", got ", (t).sizes())

// An optional tensor, when present, matches ref's device and dtype, has the given shape and is contiguous.
#define VK_CHECK_OPTIONAL(opt, ref, ...)                                                               \
  do {                                                                                                 \
    if ((opt).has_value()) {                                                                           \
      const at::Tensor& vk_opt_ = *(opt);                                                              \
      VK_CHECK(vk_opt_.device() == (ref).device(), #opt " is on ", vk_opt_.device(), " but " #ref      \
               " is on ", (ref).device());                                                             \
      VK_CHECK(vk_opt_.scalar_type() == (ref).scalar_type(), #opt " has dtype ", vk_opt_.scalar_type(), \
               " but " #ref " has dtype ", (ref).scalar_type());                                       \
      VK_CHECK(vk_opt_.sizes() == at::IntArrayRef(__VA_ARGS__), #opt " must have shape ",              \
               at::IntArrayRef(__VA_ARGS__), ", got ", vk_opt_.sizes());                               \
      VK_CHECK(vk_opt_.is_contiguous(), #opt " must be contiguous, got strides ", vk_opt_.strides());  \
    }                                                                                                  \
  } while (0)
