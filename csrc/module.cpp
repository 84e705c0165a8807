// Introspection ops of the extension library (vitkernels/_C.abi3.so, or vitkernels_C_* when JIT-built).
// The library is a plain libtorch library, not a Python module: it has no PYBIND11_MODULE and includes no
// Python header, so one build serves every Python version of the torch it was built against; Python loads
// it with torch.ops.load_library (vitkernels/cuda/build.py). Each csrc/<op>.cpp registers its operators with
// TORCH_LIBRARY_FRAGMENT(vitkernels_C, ...) when the library loads; this file adds what
// `python -m vitkernels info` and benchmarks/gpu_check.py ask of a build:
//   torch.ops.vitkernels_C.compiled_archs() -> [80, 90]   compute capabilities with GPU code; [] without CUDA
//   torch.ops.vitkernels_C.compiled_targets() -> ["sm_80", "sm_90a", "compute_90"]   what nvcc emitted:
//                                                          GPU code (sm_*) and PTX (compute_*); [] without CUDA
//   torch.ops.vitkernels_C.has_cuda()       -> True       whether the CUDA kernels were compiled in
//   torch.ops.vitkernels_C.torch_version()  -> "2.11.0"   the torch whose headers it was compiled against
//                                                          (libtorch's C++ ABI changes between releases)
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

// VK_CUDA_ARCHS and VK_CUDA_TARGETS are set by vitkernels/cuda/build.py from TORCH_CUDA_ARCH_LIST, e.g.
// 80,90 and sm_80,sm_90a,compute_90 (build.py's cuda_targets: "9.0" builds sm_90a code plus compute_90 PTX).
std::vector<int64_t> compiled_archs() {
#ifdef VK_CUDA_ARCHS
  return {VK_CUDA_ARCHS};
#else
  return {};
#endif
}

#define VK_STRINGIFY_(...) #__VA_ARGS__
#define VK_STRINGIFY(...) VK_STRINGIFY_(__VA_ARGS__)

std::vector<std::string> compiled_targets() {
  std::vector<std::string> targets;
#ifdef VK_CUDA_TARGETS
  const std::string list = VK_STRINGIFY(VK_CUDA_TARGETS);  // "sm_80,sm_90a,compute_90"
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    std::string target = list.substr(start, end - start);
    target.erase(std::remove(target.begin(), target.end(), ' '), target.end());
    if (!target.empty()) targets.push_back(target);
    start = end + 1;
  }
#endif
  return targets;
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
  m.def("compiled_targets() -> str[]", &compiled_targets);
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("torch_version() -> str", &torch_version);
}
