"""How the extension ``vitkernels._C`` is built: one description shared by setup.py and the JIT build.

``extension_kwargs(root, relative)`` lists the sources and flags; setup.py turns it into a CppExtension or
CUDAExtension. ``load_extension()`` returns the loaded extension module: ``vitkernels._C`` when setup.py built
it, else the same sources JIT-built with ``torch.utils.cpp_extension.load`` (ninja, cached in torch's
extensions directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), else a RuntimeError naming
what is missing.

Sources: every ``csrc/*.cpp`` (argument checks, C++ CPU twins, op schemas; they compile without CUDA) and,
only when building with CUDA, every ``csrc/*.cu`` (CUDA kernels). Where csrc/ is found, in order:
``$VITKERNELS_CSRC``; ``<repo>/csrc`` next to the package (a source checkout or ``pip install -e .``);
``vitkernels/csrc`` inside the installed package (when packaging ships it there). A regular (non-editable)
install normally carries the prebuilt ``vitkernels._C`` and needs no sources.

CUDA: built when torch is a CUDA build and CUDA_HOME (nvcc) exists. setup.py builds the .cu files even with
no GPU present (CI compiles and links them); the JIT build compiles them only when a GPU is visible (or
``VITKERNELS_JIT_CUDA=1``), so a CPU-only machine JIT-builds just the CPU twin in seconds rather than minutes.
``TORCH_CUDA_ARCH_LIST`` picks the GPU archs (default "8.0;9.0"; "+PTX" adds PTX); ``MAX_JOBS`` limits
ninja's parallel jobs (torch.utils.cpp_extension reads it).

This module must stay importable with only torch installed: setup.py imports it from the source tree.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shutil
import sys
import warnings

DEFAULT_ARCH_LIST = "8.0;9.0"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../vitkernels

# torch.utils.cpp_extension locates the toolkit when first imported: CUDA_HOME, else the directory above the
# first `nvcc` on PATH, else /usr/local/cuda. A wrapper such as /usr/local/bin/nvcc makes it guess /usr/local
# (and warn); prefer the standard toolkit location when it exists and the user chose nothing.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# The loaded extension module (vitkernels._C or the JIT-built one), and the last failure to load it.
_EXTENSION = None
_LOAD_ERROR: str | None = None


def csrc_dir() -> str | None:
    """The directory holding the C++/CUDA sources, or None when none is found (see the module docstring)."""
    candidates = [
        os.environ.get("VITKERNELS_CSRC", ""),
        os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"),
        os.path.join(_PACKAGE_DIR, "csrc"),
    ]
    for path in candidates:
        if path and glob.glob(os.path.join(path, "*.cpp")):
            return path
    return None


def cuda_arch_list() -> list[str]:
    """TORCH_CUDA_ARCH_LIST (default "8.0;9.0") split into entries such as "8.0", "9.0+PTX"."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "") or DEFAULT_ARCH_LIST
    return [a for a in re.split(r"[;\s]+", raw.strip()) if a]


def _arch_number(arch: str) -> str:
    """"8.0" -> "80", "9.0a+PTX" -> "90a" (the suffix letter selects arch-specific features)."""
    major, _, minor = arch.split("+")[0].partition(".")
    return major + minor


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        num = _arch_number(arch)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_toolkit() -> str | None:
    """Why CUDA sources cannot be compiled here (None when torch is a CUDA build and nvcc is found)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "CUDA_HOME is not set and nvcc was not found"
    return None


def extension_kwargs(root: str | None = None, relative: bool = False, with_cuda: bool | None = None) -> dict:
    """Sources and flags of the extension: dict(sources=[...], extra_compile_args={...}, with_cuda=bool).

    Args:
        root: the repository root holding csrc/ (default: found by ``csrc_dir()``).
        relative: give source paths relative to ``root`` (setup.py wants them so).
        with_cuda: force the CUDA sources on or off (default: on when ``cuda_toolkit()`` finds no problem).
    """
    src = os.path.join(root, "csrc") if root is not None else csrc_dir()
    if src is None or not os.path.isdir(src):
        raise RuntimeError("vitkernels: the C++ sources (csrc/) were not found; set VITKERNELS_CSRC")
    if with_cuda is None:
        with_cuda = cuda_toolkit() is None
    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src, "*.cu")))
    if relative:
        sources = [os.path.relpath(s, root) for s in sources]
    cxx = ["-O3"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if with_cuda:
        archs = cuda_arch_list()
        # module.cpp reports these (vitkernels._C.compiled_archs()); digits and commas only, safe in any shell.
        cxx.append("-DVK_CUDA_ARCHS=" + ",".join(re.sub(r"\D", "", _arch_number(a)) for a in archs))
        # Explicit -gencode flags: torch then adds no arch flags of its own (with no GPU visible it would
        # otherwise build for every arch it knows).
        nvcc += _gencode_flags(archs)
    return dict(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, with_cuda=bool(with_cuda))


def _jit_with_cuda() -> bool:
    import torch

    if cuda_toolkit() is not None:
        return False
    return torch.cuda.is_available() or os.environ.get("VITKERNELS_JIT_CUDA", "0") not in ("", "0")


def jit_name(with_cuda: bool) -> str:
    """Name (and cache subdirectory) of the JIT-built module."""
    return "vitkernels_C" if with_cuda else "vitkernels_C_cpu"


def why_no_jit() -> str | None:
    """Why a JIT build is impossible here (None when sources, a C++ compiler and ninja are all present)."""
    missing = []
    if csrc_dir() is None:
        missing.append("the C++ sources (csrc/; set VITKERNELS_CSRC)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append(f"a C++ compiler ({os.environ.get('CXX', 'c++')})")
    # shutil.which rather than cpp_extension.is_ninja_available: importing cpp_extension just to probe logs
    # a toolkit warning on every GPU-less `import`; the ninja pip package puts `ninja` on the venv's PATH.
    if shutil.which("ninja") is None and shutil.which("ninja", path=os.path.dirname(sys.executable)) is None:
        missing.append("ninja (pip install ninja)")
    return ", ".join(missing) + " not found" if missing else None


def prebuilt_available() -> bool:
    """True when setup.py built vitkernels._C (found without importing it)."""
    try:
        return importlib.util.find_spec("vitkernels._C") is not None
    except (ImportError, ValueError):
        return False


def load_extension():
    """The extension module: vitkernels._C if built, else JIT-built from csrc/ (cached); raises if neither.

    Loading registers the ``vitkernels_C::*`` operators with the dispatcher; it happens once per process.
    """
    global _EXTENSION, _LOAD_ERROR
    if _EXTENSION is not None:
        return _EXTENSION
    if prebuilt_available():
        _EXTENSION = importlib.import_module("vitkernels._C")
        _warn_if_stale(_EXTENSION.__file__)
        return _EXTENSION
    why = why_no_jit()
    if why is not None:
        _LOAD_ERROR = (f"vitkernels._C is not built (pip install --no-build-isolation . builds it) and a JIT "
                       f"build is impossible: {why}")
        raise RuntimeError(_LOAD_ERROR)
    from torch.utils.cpp_extension import load

    with_cuda = _jit_with_cuda()
    kw = extension_kwargs(with_cuda=with_cuda)
    try:
        _EXTENSION = load(
            name=jit_name(with_cuda),
            sources=kw["sources"],
            extra_cflags=kw["extra_compile_args"]["cxx"],
            extra_cuda_cflags=kw["extra_compile_args"]["nvcc"],
            with_cuda=with_cuda,
            verbose=os.environ.get("VITKERNELS_JIT_VERBOSE", "0") not in ("", "0"),
        )
    except Exception as exc:
        _LOAD_ERROR = (f"JIT build of the vitkernels extension failed ({type(exc).__name__}: {exc}); "
                       f"VITKERNELS_JIT_VERBOSE=1 shows the compiler output")
        raise RuntimeError(_LOAD_ERROR) from exc
    return _EXTENSION


def _warn_if_stale(library: str) -> None:
    """Warn when a source checkout's csrc/ is newer than the built vitkernels._C (rebuild with pip install)."""
    src = csrc_dir()
    if src is None:
        return
    newest = max((os.path.getmtime(f) for f in glob.glob(os.path.join(src, "*.*"))), default=0.0)
    if newest > os.path.getmtime(library):
        warnings.warn(f"vitkernels._C ({library}) is older than the sources in {src}; rebuild it "
                      f"(pip install --no-build-isolation -e .) or delete it to JIT-build the current sources",
                      stacklevel=3)


def load_error() -> str | None:
    """The message of the last failed ``load_extension()``, or None."""
    return _LOAD_ERROR
