#!/usr/bin/env bash
# Set up a machine for vitkernels, idempotently: a Python with the requirements, and vitkernels importable with
# its compiled extension built when it can be. Prints the python to use on its last line. Never stops for
# something the package can run without (it says what it skipped and why).
#
# - If the current python3 already has torch, triton, timm and pytest (the GPU image, offline) and
#   VITKERNELS_VENV is unset, that python is used as it is and nothing is downloaded.
# - Otherwise a venv at ${VITKERNELS_VENV:-.venv} gets requirements-dev.txt.
# - vitkernels is installed editable (pip install --no-build-isolation --no-deps -e ., which also builds
#   vitkernels._C). Where that cannot work (an old setuptools without `wheel` and no internet: "invalid command
#   'bdist_wheel'"), the package runs from this checkout (run.sh, test.sh and gpu_check.sh put it on
#   PYTHONPATH) and the extension is built in place (python setup.py build_ext --inplace); if that fails too,
#   the cuda backend JIT-builds it on first use or reports why not (python -m vitkernels info).
# - VITKERNELS_BUILD_EXT=auto|0|1 as in setup.py (0: build no extension here).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

if [ -z "${VITKERNELS_VENV:-}" ] && python3 -c "import torch, triton, timm, pytest" >/dev/null 2>&1; then
  PY=$(command -v python3)
  log "using $PY (torch, triton, timm and pytest already installed)"
else
  VENV=${VITKERNELS_VENV:-.venv}
  REQS=${VITKERNELS_REQUIREMENTS:-requirements-dev.txt}
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  if ! "$PY" -c "import torch, triton, timm, pytest, sklearn, matplotlib, hypothesis, xdist" >/dev/null 2>&1; then
    log "installing $REQS into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check -r "$REQS"
  fi
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Installed from this checkout? Asked from / so that the checkout in the current directory does not answer.
installed=$(cd / && "$PY" -c "import os, vitkernels; print(os.path.dirname(os.path.abspath(vitkernels.__file__)))" \
            2>/dev/null || true)
so=$(ls -t vitkernels/_C*.so 2>/dev/null | head -n 1 || true)
fresh() {  # the built extension is newer than every source it was built from (a rebuild takes minutes)
  [ -n "$so" ] && [ -z "$(find csrc setup.py vitkernels/cuda/build.py -newer "$so" -print -quit)" ]
}

if [ "$installed" = "$(pwd)/vitkernels" ] && { fresh || [ "${VITKERNELS_BUILD_EXT:-auto}" = 0 ]; }; then
  log "vitkernels is installed from this checkout${so:+ and $so is up to date}"
elif pip_log=$("$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1); then
  log "installed vitkernels (editable; extension build: ${VITKERNELS_BUILD_EXT:-auto}, CUDA_HOME=${CUDA_HOME:-unset})"
else
  # the line that names the cause ("invalid command 'bdist_wheel'"), else pip's first error line
  why=$( { echo "$pip_log" | grep -iE "invalid command|no module named"; echo "$pip_log" | grep -iE "error"; } \
        | head -n 1 | sed 's/^ *//' | cut -c1-200 || true)
  log "pip could not install vitkernels (${why:-see the pip output}); running it from this checkout instead"
  if [ "${VITKERNELS_BUILD_EXT:-auto}" = 0 ]; then
    log "VITKERNELS_BUILD_EXT=0: extension not built here (the cuda backend JIT-builds it on first use)"
  elif fresh; then
    log "$so is up to date"
  elif ext_log=$("$PY" setup.py -q build_ext --inplace 2>&1); then
    log "built the extension in place: $(ls -t vitkernels/_C*.so | head -n 1)"
  elif [ "${VITKERNELS_BUILD_EXT:-auto}" = 1 ]; then
    echo "$ext_log" >&2
    log "VITKERNELS_BUILD_EXT=1 and the extension did not build"
    exit 1
  else
    log "extension not built ($(echo "$ext_log" | grep -iE "error" | head -n 1 | cut -c1-200)); the cuda" \
        "backend JIT-builds it on first use or says why not: python -m vitkernels info"
  fi
fi
echo "$PY"
