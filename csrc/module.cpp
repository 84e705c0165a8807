// The Python module of the extension (vitkernels._C, or vitkernels_C[_cpu] when JIT-built): the operators
// themselves are registered by each csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT(vitkernels_C, ...)) when the
// library loads; this file adds only introspection used by `python -m vitkernels info`.
#include <torch/extension.h>

#include <vector>

namespace {

// GPU archs the .cu files were compiled for (e.g. {80, 90}); empty when built without CUDA. VK_CUDA_ARCHS is
// set by vitkernels/cuda/build.py from TORCH_CUDA_ARCH_LIST.
std::vector<int64_t> compiled_archs() {
#ifdef VK_CUDA_ARCHS
  return {VK_CUDA_ARCHS};
#else
  return {};
#endif
}

bool has_cuda() {
#ifdef VK_CUDA_ARCHS
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkernels compiled ops: torch.ops.vitkernels_C.* (CUDA kernels and a C++ CPU twin)";
  m.def("compiled_archs", &compiled_archs, "GPU archs of the CUDA kernels, e.g. [80, 90]; [] without CUDA");
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.attr("version") = "0.1.0";
}
