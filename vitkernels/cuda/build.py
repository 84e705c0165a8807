"""How the extension library is built and loaded: one description shared by setup.py, the JIT build and
``build_library`` (a build for one GPU arch, to carry to another machine: ``python benchmarks/gpu_check.py
--build-library 9.0a``, see docs/gpu_day.md).

The library is plain libtorch, not a Python module: the operators are ``TORCH_LIBRARY`` registrations
(``torch.ops.vitkernels_C.*``), ``csrc/module.cpp`` adds the introspection ops ``compiled_archs() -> int[]``,
``has_cuda() -> bool`` and ``torch_version() -> str``, no source includes a Python header, and setup.py builds
it with ``py_limited_api=True`` (no libtorch_python; the file is ``vitkernels/_C.abi3.so``). Python loads it
with ``torch.ops.load_library``, so one build serves every Python version of the torch it was compiled against
(only that torch release: libtorch's C++ ABI changes between releases, and loading checks it).

``extension_kwargs(root, relative)`` lists the sources and flags; setup.py turns it into a CppExtension or
CUDAExtension. ``load_extension()`` loads, in order: ``$VITKERNELS_LIBRARY`` (a path to a built library, e.g.
one carried from another machine); the newest ``vitkernels/_C*.so`` (built by setup.py); else the same
sources JIT-built with ``torch.utils.cpp_extension.load``; else it raises a RuntimeError naming what is
missing. It returns an object with ``__file__``, ``has_cuda()``, ``compiled_archs()`` and
``torch_version()``.

JIT build (``VITKERNELS_JIT=0`` forbids it): cached in ``$TORCH_EXTENSIONS_DIR`` (or torch's default, ``~/.cache/torch_extensions/...``) under a
directory named after the torch version and a hash of the flags (``vitkernels_C_cpu_2_11_0_cu130_<hash>``),
so two environments never share a build. torch guards a build with ``<build dir>/lock``; torch releases up
to 2.11 hold it by the file's mere existence, so a build that was killed leaves it behind and every later
build waits on it forever. Before building, ``wait_for_build_lock`` breaks a lock older than
``$VITKERNELS_JIT_LOCK_STALE_S`` (default 900 s) with a warning, and otherwise prints what it waits for and
raises a RuntimeError (``rm <lock>``) after ``$VITKERNELS_JIT_LOCK_WAIT_S`` (default 900 s).

Sources: every ``csrc/*.cpp`` (argument checks, C++ CPU twins, op schemas; they compile without CUDA) and,
only when building with CUDA, every ``csrc/*.cu`` (CUDA kernels). Where csrc/ is found, in order:
``$VITKERNELS_CSRC``; ``<repo>/csrc`` next to the package (a source checkout or ``pip install -e .``);
``vitkernels/csrc`` inside the installed package (when packaging ships it there).

CUDA: built when torch is a CUDA build, CUDA_HOME (nvcc) exists and nvcc's major version equals torch's CUDA
major (torch refuses to build otherwise); ``cuda_toolkit()`` says why not, and the CPU twin is built alone.
setup.py builds the .cu files even with no GPU present (CI compiles and links them); the JIT build compiles
them only when a GPU is visible (or ``VITKERNELS_JIT_CUDA=1``), so a CPU-only machine JIT-builds just the CPU
twin. ``TORCH_CUDA_ARCH_LIST`` picks the GPU archs (default "8.0;9.0": sm_80 and sm_90a code plus compute_90
PTX, see ``cuda_targets``; "9.0a" alone gives sm_90a code only, "+PTX" adds PTX); ``MAX_JOBS`` limits ninja's
parallel jobs (torch.utils.cpp_extension reads it). The library reports what it holds: ``compiled_archs()``
(the compute capabilities it has GPU code for, [80, 90]) and ``compiled_targets()`` (["sm_80", "sm_90a",
"compute_90"]); ``why_not_for_gpu`` says whether those run on a given GPU.

This module must stay importable with only torch installed: setup.py imports it from the source tree.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

DEFAULT_ARCH_LIST = "8.0;9.0"
LIBRARY_ENV = "VITKERNELS_LIBRARY"  # path to a built library; loaded before anything else
LOCK_STALE_S = 900.0  # a JIT build lock older than this (VITKERNELS_JIT_LOCK_STALE_S) is broken
LOCK_WAIT_S = 900.0  # the longest wait on a held lock (VITKERNELS_JIT_LOCK_WAIT_S) before giving up
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../vitkernels
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)

# torch.utils.cpp_extension locates the toolkit when first imported: CUDA_HOME, else the directory above the
# first `nvcc` on PATH, else /usr/local/cuda. A wrapper such as /usr/local/bin/nvcc makes it guess /usr/local
# (and warn); prefer the standard toolkit location when it exists and the user chose nothing.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# The loaded library (an Extension), and the last failure to load it.
_EXTENSION = None
_LOAD_ERROR: str | None = None


def csrc_dir() -> str | None:
    """The directory holding the C++/CUDA sources, or None when none is found (see the module docstring)."""
    candidates = [
        os.environ.get("VITKERNELS_CSRC", ""),
        os.path.join(_REPO_DIR, "csrc"),
        os.path.join(_PACKAGE_DIR, "csrc"),
    ]
    for path in candidates:
        if path and glob.glob(os.path.join(path, "*.cpp")):
            return path
    return None


def cuda_arch_list() -> list[str]:
    """TORCH_CUDA_ARCH_LIST (default "8.0;9.0") split into entries such as "8.0", "9.0a", "9.0+PTX"."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "") or DEFAULT_ARCH_LIST
    return [a for a in re.split(r"[;\s]+", raw.strip()) if a]


def _arch_number(arch: str) -> str:
    """"8.0" -> "80", "9.0a+PTX" -> "90a" (the suffix letter selects arch-specific features)."""
    major, _, minor = arch.split("+")[0].partition(".")
    return major + minor


# "9.0" builds sm_90a GPU code, not sm_90: both load on exactly the same GPUs (compute capability 9.0: H100,
# H200, GH200), and only sm_90a may use Hopper's arch-specific instructions (wgmma, setmaxnreg, TMA
# multicast). Neither loads on anything newer, so "9.0" also adds compute_90 PTX, which the driver compiles
# for a later GPU (Blackwell: sm_100, sm_120) at first use; compute_90a PTX could not serve there (it, too, is
# for 9.0 only). An explicit "9.0a" is taken literally: sm_90a code only, the smallest library for an H100/H200
# (``benchmarks/gpu_check.py --build-library 9.0a``). torch's own reading of "9.0" (sm_90 code only) never
# applies: the -gencode flags given here make torch.utils.cpp_extension add none of its own.
ARCH_SPECIFIC = {"9.0": "90a"}


def cuda_targets(archs: list[str] | None = None) -> list[str]:
    """What nvcc emits for TORCH_CUDA_ARCH_LIST entries (default ``cuda_arch_list()``): "sm_XY" / "sm_XYa" GPU
    code, "compute_XY" PTX. "8.0" -> sm_80; "9.0" -> sm_90a + compute_90 (see ``ARCH_SPECIFIC``); "9.0a" ->
    sm_90a; "+PTX" adds compute_XY PTX ("9.0a+PTX" too: arch-specific PTX would run on 9.0 only)."""
    targets: list[str] = []
    for arch in cuda_arch_list() if archs is None else archs:
        base = arch.split("+")[0]
        num = _arch_number(arch)
        plain = num.rstrip("abcdefghijklmnopqrstuvwxyz")
        if base in ARCH_SPECIFIC:
            new = [f"sm_{ARCH_SPECIFIC[base]}", f"compute_{plain}"]
        else:
            new = [f"sm_{num}"] + ([f"compute_{plain}"] if arch.endswith("+PTX") else [])
        targets += [t for t in new if t not in targets]
    return targets


def gencode_flags(targets: list[str]) -> list[str]:
    """nvcc's -gencode flags for ``cuda_targets()``: "sm_90a" -> -gencode=arch=compute_90a,code=sm_90a,
    "compute_90" -> -gencode=arch=compute_90,code=compute_90."""
    flags = []
    for target in targets:
        kind, _, num = target.partition("_")
        flags.append(f"-gencode=arch=compute_{num},code={kind}_{num}")
    return flags


def why_not_for_gpu(targets: list[str], capability: tuple[int, int]) -> str | None:
    """Why a library holding ``targets`` (``compiled_targets()``) cannot run on a GPU of compute capability
    ``capability`` (major, minor); None when it can.

    CUDA's rules: sm_XY code runs on X.Z for Z >= Y (same major: sm_80 code on 8.0, 8.6, 8.9); sm_XYa code on
    X.Y only (sm_90a: H100 / H200); compute_XY PTX on X.Y and every later GPU (the driver compiles it at first
    use); compute_XYa PTX on X.Y only.
    """
    major, minor = capability

    def runs(target: str) -> bool:
        kind, _, num = target.partition("_")
        m = re.fullmatch(r"(\d+?)(\d)([a-z]?)", num)
        if m is None:
            return False
        t_major, t_minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        if suffix:
            return (major, minor) == (t_major, t_minor)
        if kind == "sm":
            return major == t_major and minor >= t_minor
        return (major, minor) >= (t_major, t_minor)

    if any(runs(t) for t in targets):
        return None
    held = ", ".join(targets) or "no GPU code"
    return f"it holds {held}, none of which runs on a GPU of compute capability {major}.{minor} (sm_{major}{minor})"


def nvcc_flags(targets: list[str] | None = None) -> list[str]:
    """The flags torch's BuildExtension (setup.py) gives nvcc for each csrc/*.cu, besides -c, -o and the
    dependency file: torch's COMMON_NVCC_FLAGS, -fPIC, this extension's nvcc flags with -gencode for
    ``targets`` (default ``cuda_targets()``), the defines torch adds, torch's default -std (c++17 up to torch
    2.11, c++20 from the torch whose headers require it) and the include directories. tests/test_cuda_ptxas.py
    compiles the kernels with them, so its ptxas report is the build's."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = _nvcc_extension_flags(cuda_targets() if targets is None else targets)
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", *nvcc, "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", f"-std={_torch_cxx_standard()}"]
    if os.environ.get("CC"):
        flags += ["-ccbin", os.environ["CC"]]
    includes = cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
    return flags + [f"-I{path}" for path in includes]


def _torch_cxx_standard() -> str:
    """The -std torch's BuildExtension adds when a build gives none ("c++17" up to torch 2.11, "c++20" later)."""
    from torch.utils import cpp_extension

    try:
        found = re.findall(r"'(c\+\+\d+)'", inspect.getsource(cpp_extension.BuildExtension.build_extensions))
    except (OSError, TypeError):
        found = []
    return found[0] if found else "c++17"


def _nvcc_extension_flags(targets: list[str]) -> list[str]:
    # Explicit -gencode flags: torch then adds no arch flags of its own (with no GPU visible it would otherwise
    # build for every arch it knows; it also reads "9.0" as sm_90 code only).
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *gencode_flags(targets)]


@functools.lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("... release 13.0, V13.0.88"), or None when it cannot tell."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_toolkit() -> str | None:
    """Why CUDA sources cannot be compiled here (None when torch is a CUDA build and a matching nvcc is found).

    torch.utils.cpp_extension refuses to compile .cu files with an nvcc whose major version differs from the
    CUDA torch was built with (torch.version.cuda); checked here up front, so the build can fall back to the
    CPU twin and say why instead of failing.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    if CUDA_HOME is None or not os.path.exists(nvcc):
        return "CUDA_HOME is not set and nvcc was not found"
    found = nvcc_version(nvcc)
    if found is None:
        return f"`{nvcc} --version` did not say its CUDA release"
    torch_major = int(torch.version.cuda.split(".")[0])
    if found[0] != torch_major:
        return (f"nvcc {found[0]}.{found[1]} ({nvcc}) and torch {torch.__version__} (CUDA {torch.version.cuda}) "
                f"differ in CUDA major version, which torch refuses to build with; set CUDA_HOME to a CUDA "
                f"{torch_major}.x toolkit")
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
    nvcc = _nvcc_extension_flags([])
    if with_cuda:
        archs = cuda_arch_list()
        targets = cuda_targets(archs)
        # module.cpp reports these (compiled_archs(), compiled_targets()): letters, digits, underscores and
        # commas only, safe in any shell.
        cxx.append("-DVK_CUDA_ARCHS=" + ",".join(dict.fromkeys(re.sub(r"\D", "", _arch_number(a)) for a in archs)))
        cxx.append("-DVK_CUDA_TARGETS=" + ",".join(targets))
        nvcc = _nvcc_extension_flags(targets)
    return dict(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, with_cuda=bool(with_cuda))


def _jit_with_cuda() -> bool:
    import torch

    if cuda_toolkit() is not None:
        return False
    return torch.cuda.is_available() or os.environ.get("VITKERNELS_JIT_CUDA", "0") not in ("", "0")


def jit_name(with_cuda: bool, kwargs: dict | None = None) -> str:
    """Name (and cache subdirectory) of the JIT-built library, specific to torch and the build flags.

    E.g. ``vitkernels_C_cpu_2_14_1_cu130_1a2b3c4d``: the torch version, then a hash of everything that
    changes the binary (torch and its CUDA, the Python the JIT links against, nvcc's version, the flags).
    """
    import torch

    kwargs = kwargs if kwargs is not None else extension_kwargs(with_cuda=with_cuda)
    key = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": list(sys.version_info[:2]),
        "with_cuda": bool(with_cuda),
        "flags": kwargs["extra_compile_args"],
        "cuda_home": os.environ.get("CUDA_HOME") if with_cuda else None,
    }
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        key["nvcc"] = nvcc_version(os.path.join(CUDA_HOME or "", "bin", "nvcc"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    torch_tag = re.sub(r"\W", "_", torch.__version__)
    return f"vitkernels_C_{'cuda' if with_cuda else 'cpu'}_{torch_tag}_{digest}"


def jit_build_dir(name: str) -> str:
    """``$TORCH_EXTENSIONS_DIR/<name>`` (default root: torch's, ``~/.cache/torch_extensions``), created."""
    from torch.utils.cpp_extension import get_default_build_root

    path = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
    os.makedirs(path, exist_ok=True)
    return path


def why_no_jit() -> str | None:
    """Why a JIT build is impossible here (None when sources, a C++ compiler and ninja are all present and
    ``VITKERNELS_JIT`` is not 0)."""
    if os.environ.get("VITKERNELS_JIT", "1") == "0":
        return "VITKERNELS_JIT unset (it is 0)"
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


# ---------------------------------------------------------------------------------------------------------
# The JIT build lock


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise RuntimeError(f"{name} must be a number of seconds, got {raw!r}") from None


def torch_lock_kind() -> str:
    """How torch's JIT build holds ``<build dir>/lock``: "baton" (torch <= 2.11's FileBaton: the file's
    existence is the lock, and a killed build leaves it behind) or "flock" (an OS lock on the file, released
    when its holder dies; the file itself stays)."""
    from torch.utils import cpp_extension

    try:
        source = inspect.getsource(cpp_extension._jit_compile)
    except (AttributeError, OSError, TypeError):
        source = ""
    if "FileBaton(" not in source and "FileLock(" in source:
        return "flock"
    return "baton"  # the cautious reading: a lock file that exists is held


def lock_held(path: str, kind: str) -> bool:
    """Whether the lock file ``path`` holds back a build (see ``torch_lock_kind``)."""
    if not os.path.exists(path):
        return False
    if kind == "baton":
        return True
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _age_s(path: str) -> float:
    try:
        return max(0.0, time.time() - os.path.getmtime(path))
    except FileNotFoundError:
        return 0.0


def wait_for_build_lock(build_dir: str, *, stale_s: float | None = None, timeout_s: float | None = None,
                        kind: str | None = None, poll_s: float = 1.0) -> None:
    """Return once no other build holds ``<build_dir>/lock``; never wait silently or forever.

    A "baton" lock (see ``torch_lock_kind``) older than ``stale_s`` (default ``$VITKERNELS_JIT_LOCK_STALE_S``
    or 900 s; no build takes that long) is left by a killed build: it is removed with a warning. Otherwise
    one line on stderr says what is waited for (the path, its age, how to clear it), and after ``timeout_s``
    (default ``$VITKERNELS_JIT_LOCK_WAIT_S`` or 900 s) a RuntimeError says ``rm <path>``. An "flock" lock is
    held by a live process (the OS drops it when its holder dies), so it is waited on, never broken.
    """
    stale_s = _env_seconds("VITKERNELS_JIT_LOCK_STALE_S", LOCK_STALE_S) if stale_s is None else stale_s
    timeout_s = _env_seconds("VITKERNELS_JIT_LOCK_WAIT_S", LOCK_WAIT_S) if timeout_s is None else timeout_s
    kind = torch_lock_kind() if kind is None else kind
    path = os.path.join(build_dir, "lock")
    start = time.monotonic()
    announced = False
    while lock_held(path, kind):
        age = _age_s(path)
        if kind == "baton" and age > stale_s:
            warnings.warn(f"vitkernels: removing the stale JIT build lock {path} ({age:.0f} s old, over "
                          f"VITKERNELS_JIT_LOCK_STALE_S={stale_s:.0f} s: its build was interrupted)",
                          RuntimeWarning, stacklevel=2)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise RuntimeError(f"vitkernels: waited {waited:.0f} s for the JIT build lock {path} ({age:.0f} s "
                               f"old); if no other build of the extension is running: rm {path}")
        if not announced:
            print(f"vitkernels: waiting up to {timeout_s:.0f} s for another build of the extension to release "
                  f"{path} ({age:.0f} s old); if none is running: rm {path}", file=sys.stderr, flush=True)
            announced = True
        time.sleep(max(0.0, min(poll_s, timeout_s - waited)))


# ---------------------------------------------------------------------------------------------------------
# Loading


class Extension:
    """The loaded library: its path and its introspection ops (``torch.ops.vitkernels_C.*``)."""

    def __init__(self, path: str):
        self.__file__ = path

    def has_cuda(self) -> bool:
        import torch

        return bool(torch.ops.vitkernels_C.has_cuda())

    def compiled_archs(self) -> list[int]:
        """Compute capabilities the library has GPU code for, as 80, 90 ([] without CUDA kernels); an sm_90a
        build reports 90."""
        import torch

        return list(torch.ops.vitkernels_C.compiled_archs())

    def compiled_targets(self) -> list[str]:
        """What nvcc emitted (``cuda_targets``): e.g. ["sm_80", "sm_90a", "compute_90"]. A library built before
        this op existed reports its archs as "sm_XY"."""
        import torch

        try:
            return list(torch.ops.vitkernels_C.compiled_targets())
        except (AttributeError, RuntimeError):
            return [f"sm_{a}" for a in self.compiled_archs()]

    def torch_version(self) -> str:
        import torch

        return str(torch.ops.vitkernels_C.torch_version())

    def __repr__(self) -> str:
        return f"<vitkernels extension {self.__file__}>"


def _release(version: str) -> str:
    """"2.11.0+cu130" -> "2.11.0"."""
    m = re.match(r"\d+\.\d+\.\d+", version)
    return m.group(0) if m else version


class LibraryNotLoaded(RuntimeError):
    """The dynamic loader refused the library (e.g. built against another torch): no op was registered."""


def library_candidates() -> list[str]:
    """Built libraries to load, best first: ``$VITKERNELS_LIBRARY`` if set, else every ``vitkernels/_C*.so``
    (setup.py's build; e.g. ``_C.abi3.so``), newest first."""
    chosen = os.environ.get(LIBRARY_ENV, "")
    if chosen:
        return [os.path.abspath(chosen)]
    found = glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd"))
    return sorted(found, key=os.path.getmtime, reverse=True)


def prebuilt_available() -> bool:
    """True when a built library is there to load (``library_candidates()``), without loading it."""
    return bool(library_candidates())


def load_library(path: str) -> Extension:
    """Load the library at ``path`` (registers ``torch.ops.vitkernels_C.*``) and check what it was built for."""
    import torch

    if not os.path.exists(path):
        raise RuntimeError(f"vitkernels: no extension library at {path}" +
                           (f" (from ${LIBRARY_ENV})" if os.environ.get(LIBRARY_ENV) else ""))
    try:
        torch.ops.load_library(path)
    except OSError as exc:  # nothing was registered: the caller may still JIT-build
        raise LibraryNotLoaded(f"vitkernels: {path} does not load with torch {torch.__version__} (built against "
                               f"another torch release? rebuild it): {exc}") from exc
    try:
        torch.ops.vitkernels_C.compiled_archs
    except (AttributeError, RuntimeError):
        raise RuntimeError(f"vitkernels: {path} has no vitkernels_C::compiled_archs op: it was built by an older "
                           f"vitkernels (a Python module); rebuild it (pip install --no-build-isolation -e .) or "
                           f"delete it") from None
    ext = Extension(path)
    built = ext.torch_version()
    if built != _release(torch.__version__):
        raise RuntimeError(f"vitkernels: {path} was built against torch {built} but this is torch "
                           f"{torch.__version__} (libtorch's C++ ABI differs between releases); rebuild it or "
                           f"delete it to JIT-build")
    return ext


def load_extension() -> Extension:
    """The extension: a built library if present (see ``library_candidates``), else JIT-built from csrc/
    (cached); raises a RuntimeError saying why if neither works.

    Loading registers the ``vitkernels_C::*`` operators with the dispatcher; it happens once per process.
    """
    global _EXTENSION, _LOAD_ERROR
    if _EXTENSION is not None:
        return _EXTENSION
    candidates = library_candidates()
    chosen = bool(os.environ.get(LIBRARY_ENV))
    if candidates:
        try:
            _EXTENSION = load_library(candidates[0])
        except LibraryNotLoaded as exc:
            # e.g. vitkernels/_C.abi3.so built by another environment sharing this checkout: nothing was
            # registered, so the JIT build (specific to this torch) can still serve, unless a library was chosen.
            if chosen or why_no_jit() is not None:
                _LOAD_ERROR = str(exc)
                raise
            warnings.warn(f"{exc}; JIT-building the extension instead", stacklevel=2)
        except Exception as exc:
            _LOAD_ERROR = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
            raise RuntimeError(_LOAD_ERROR) from exc
        else:
            if not chosen:
                _warn_if_stale(candidates[0])
            return _EXTENSION
    why = why_no_jit()
    if why is not None:
        _LOAD_ERROR = (f"vitkernels._C is not built (pip install --no-build-isolation . builds it) and a JIT "
                       f"build is impossible: {why}")
        raise RuntimeError(_LOAD_ERROR)
    _EXTENSION = _jit_build()
    return _EXTENSION


def _jit_build() -> Extension:
    global _LOAD_ERROR
    from torch.utils.cpp_extension import load

    with_cuda = _jit_with_cuda()
    kw = extension_kwargs(with_cuda=with_cuda)
    name = jit_name(with_cuda, kw)
    build_dir = jit_build_dir(name)
    try:
        wait_for_build_lock(build_dir)
    except RuntimeError as exc:
        _LOAD_ERROR = str(exc)
        raise
    if not glob.glob(os.path.join(build_dir, f"{name}*.so")):
        why_cpu = cuda_toolkit()
        what = (f"CUDA kernels for {';'.join(cuda_arch_list())} + CPU twin" if with_cuda else
                "CPU twin only" + (f": {why_cpu}" if why_cpu else ""))
        print(f"vitkernels: JIT-building the extension ({what}) in {build_dir}; this takes minutes once",
              file=sys.stderr, flush=True)
    try:
        path = load(
            name=name,
            sources=kw["sources"],
            extra_cflags=kw["extra_compile_args"]["cxx"],
            extra_cuda_cflags=kw["extra_compile_args"]["nvcc"],
            with_cuda=with_cuda,
            build_directory=build_dir,
            is_python_module=False,  # a plain library: torch.ops.load_library
            verbose=os.environ.get("VITKERNELS_JIT_VERBOSE", "0") not in ("", "0"),
        )
        ext = Extension(path)
        ext.compiled_archs()  # the introspection ops are there
    except Exception as exc:
        _LOAD_ERROR = (f"JIT build of the vitkernels extension in {build_dir} failed ({type(exc).__name__}: "
                       f"{exc}); VITKERNELS_JIT_VERBOSE=1 shows the compiler output")
        raise RuntimeError(_LOAD_ERROR) from exc
    return ext


def _warn_if_stale(library: str) -> None:
    """Warn when a source checkout's csrc/ is newer than the built library (rebuild with pip install)."""
    src = csrc_dir()
    if src is None:
        return
    newest = max((os.path.getmtime(f) for f in glob.glob(os.path.join(src, "*.*"))), default=0.0)
    if newest > os.path.getmtime(library):
        warnings.warn(f"vitkernels: {library} is older than the sources in {src}; rebuild it "
                      f"(pip install --no-build-isolation -e .) or delete it to JIT-build the current sources",
                      stacklevel=3)


def load_error() -> str | None:
    """The message of the last failed ``load_extension()``, or None."""
    return _LOAD_ERROR


# ---------------------------------------------------------------------------------------------------------
# A build for one GPU arch, to carry to another machine


def build_library(out_dir: str, arch_list: str, jobs: int | None = None, timeout_s: float | None = None) -> str:
    """Build the library for ``arch_list`` (e.g. "9.0a") with setup.py into ``out_dir``/_C.abi3.so.

    Runs ``python setup.py build_ext`` with this Python and its torch (no pip, no wheel needed), objects in
    ``<out_dir>-tmp``. The result runs under any Python with the same torch release (see the module
    docstring). Raises a RuntimeError when the build fails or has no CUDA kernels.
    """
    why = cuda_toolkit()
    if why is not None:
        raise RuntimeError(f"vitkernels: cannot build CUDA kernels here: {why}")
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir.rstrip(os.sep) + "-tmp"
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch_list, "VITKERNELS_BUILD_EXT": "1",
           "MAX_JOBS": str(jobs or os.cpu_count() or 1)}
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", os.path.join(tmp, "lib"),
           "--build-temp", os.path.join(tmp, "obj")]
    print(f"vitkernels: building for {arch_list} with {env['MAX_JOBS']} jobs: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=_REPO_DIR, env=env, check=True, timeout=timeout_s)
    built = glob.glob(os.path.join(tmp, "lib", "vitkernels", "_C*.so"))
    if len(built) != 1:
        raise RuntimeError(f"vitkernels: expected one library under {tmp}/lib/vitkernels, found {built}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "_C.abi3.so")
    shutil.copy2(built[0], path)
    return path


def describe_library(path: str) -> dict:
    """Load ``path`` in a fresh Python process and report what it holds (it must not join this process)."""
    code = ("import json, sys\nfrom vitkernels.cuda.build import load_library\n"
            "try:\n    e = load_library(sys.argv[1])\n"
            "except Exception as exc:\n    print(json.dumps(dict(error=str(exc))))\n    sys.exit(1)\n"
            "print(json.dumps(dict(archs=e.compiled_archs(), targets=e.compiled_targets(), has_cuda=e.has_cuda(),\n"
            "                      torch=e.torch_version())))")
    p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=_REPO_DIR,
                       timeout=120)
    try:
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"vitkernels: loading {path} failed (rc {p.returncode}): {tail}") from None
    if "error" in info:
        raise RuntimeError(info["error"])
    info.update(path=path, size_mib=round(os.path.getsize(path) / 2**20, 1))
    return info


def build_and_describe(out_dir: str, arch_list: str, jobs: int | None = None, timeout_s: float | None = None) -> int:
    """``build_library`` then ``describe_library``; prints progress, and the description as JSON on the last
    line; returns 0, or 1 with the reason on stderr. benchmarks/gpu_check.py --build-library runs this."""
    t0 = time.time()
    try:
        path = build_library(out_dir, arch_list, jobs, timeout_s)
        info = describe_library(path)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"vitkernels: build failed: {exc}", file=sys.stderr)
        return 1
    info["build_s"] = round(time.time() - t0, 1)
    print(json.dumps(info), flush=True)
    return 0
