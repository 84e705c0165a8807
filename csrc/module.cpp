// Introspection ops of the extension library (vitkernels/_C.abi3.so, or vitkernels_C_* when JIT-built).
// The library is a plain libtorch library, not a Python module: it has no PYBIND11_MODULE and includes no
// Python header, so one build serves every Python version of the torch it was built against; Python loads
// it with torch.ops.load_library (vitkernels/cuda/build.py). Each csrc/<op>.cpp registers its operators with
// TORCH_LIBRARY_FRAGMENT(vitkernels_C, ...) when the library loads; this file adds what
// `python -m vitkernels info` and benchmarks/gpu_check.py ask of a build:
//   torch.ops.vitkernels_C.compiled_archs() -> [80, 90]   GPU archs of the CUDA kernels; [] without CUDA
//   torch.ops.vitkernels_C.has_cuda()       -> True       whether the CUDA kernels were compiled in
//   torch.ops.vitkernels_C.torch_version()  -> "2.11.0"   the torch whose headers it was compiled against
//                                                          (libtorch's C++ ABI changes between releases)
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

namespace {

// VK_CUDA_ARCHS is set by vitkernels/cuda/build.py from TORCH_CUDA_ARCH_LIST, e.g. 80,90 ("9.0a" -> 90).
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

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace

// Ops without tensor arguments: one catch-all kernel each (as torchvision's _cuda_version).
TORCH_LIBRARY_FRAGMENT(vitkernels_C, m) {
  m.def("compiled_archs() -> int[]", &compiled_archs);
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("torch_version() -> str", &torch_version);
}
