"""Install vitkernels; optionally build the compiled extension ``vitkernels._C`` from csrc/.

VITKERNELS_BUILD_EXT=0|1|auto (default auto): auto builds when torch is importable in the build environment
and a C++ compiler is present (use ``pip install --no-build-isolation`` so the build sees your torch), and
compiles the .cu sources too when torch is a CUDA build and CUDA_HOME has an nvcc of torch's CUDA major
version (else it builds the CPU twin alone and prints why); 1 makes a failed build an error; 0 skips it (the
``cuda`` backend can then JIT-build the same sources on first use). TORCH_CUDA_ARCH_LIST is honoured (default
"8.0;9.0": sm_80 and sm_90a GPU code plus compute_90 PTX; "9.0a" alone: sm_90a only; vitkernels/cuda/build.py's
``cuda_targets`` says what each entry builds), MAX_JOBS too (torch.utils.cpp_extension reads it).

The extension is a plain libtorch library (``vitkernels/_C.abi3.so``: operators registered with TORCH_LIBRARY,
no Python bindings, ``py_limited_api=True`` so it does not link libtorch_python), loaded with
``torch.ops.load_library`` by vitkernels/cuda/build.py: one build serves any Python with the same torch release.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules_and_cmdclass():
    mode = os.environ.get("VITKERNELS_BUILD_EXT", "auto").lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"VITKERNELS_BUILD_EXT must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        sys.path.insert(0, HERE)
        from vitkernels.cuda.build import cuda_toolkit, extension_kwargs  # shared with the JIT build
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001
        if mode == "1":
            raise
        print(f"vitkernels: not building the extension ({type(exc).__name__}: {exc})")
        return [], {}
    finally:
        sys.path.pop(0)
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if mode == "1":
            sys.exit("VITKERNELS_BUILD_EXT=1 but no C++ compiler found")
        print("vitkernels: no C++ compiler, not building the extension")
        return [], {}
    why_no_cuda = cuda_toolkit()
    if why_no_cuda is not None:
        print(f"vitkernels: building the extension's CPU twin only: {why_no_cuda}")
    kw = extension_kwargs(root=HERE, relative=True, with_cuda=why_no_cuda is None)
    ext_cls = CUDAExtension if kw.pop("with_cuda") else CppExtension
    # py_limited_api: no libtorch_python, the file is named _C.abi3.so; the sources include no Python header.
    ext = ext_cls(name="vitkernels._C", py_limited_api=True, **kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    name="vitkernels",
    version="0.1.0",
    description="Vision Transformers on fused Triton kernels with a CUDA C++ fallback, drop-in for timm",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vitkernels", "vitkernels.*"]),
    # mnist5k, the main job's default data
    package_data={"vitkernels": ["experiments/datasets/*.npz", "experiments/datasets/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm", "transformers", "torchvision"],
        "train": ["scikit-learn", "matplotlib", "pillow"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["vitkernels=vitkernels.__main__:main"]},
)
