#!/usr/bin/env bash
# Set up a machine for vitkernels, idempotently: a Python with the requirements, and vitkernels installed
# (editable) with its compiled extension built. Prints the python to use on its last line.
#
# - If the current python3 already has torch, triton, timm and pytest (a GPU image with no internet, say) and
#   VITKERNELS_VENV is unset, that python is used as it is and nothing is downloaded.
# - Otherwise a venv at ${VITKERNELS_VENV:-.venv} gets requirements-dev.txt.
# - The extension is built when a compiler is there (VITKERNELS_BUILD_EXT=auto; set 0 to skip, 1 to insist).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

if [ -z "${VITKERNELS_VENV:-}" ] && python3 -c "import torch, triton, timm, pytest" >/dev/null 2>&1; then
  PY=$(command -v python3)
  log "using $PY (torch, triton, timm and pytest already installed)"
else
  VENV=${VITKERNELS_VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  if ! "$PY" -c "import sys; import torch, timm, pytest, mlxtend, sklearn, matplotlib, hypothesis, xdist" >/dev/null 2>&1; then
    log "installing requirements-dev.txt into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  fi
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Skip the (re)install when this checkout is already installed and its built extension is newer than every
# source it was built from: building vitkernels._C takes minutes on a small machine.
so=$(ls vitkernels/_C*.so 2>/dev/null | head -n 1 || true)
here=$("$PY" -c "import os, vitkernels; print(os.path.dirname(os.path.abspath(vitkernels.__file__)))" 2>/dev/null || true)
if [ -n "$so" ] && [ "$here" = "$(pwd)/vitkernels" ] && \
   [ -z "$(find csrc setup.py vitkernels/cuda/build.py -newer "$so" -print -quit)" ]; then
  log "vitkernels is installed from this checkout and $so is up to date"
else
  log "installing vitkernels (editable; extension build: ${VITKERNELS_BUILD_EXT:-auto}, CUDA_HOME=${CUDA_HOME:-unset})"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
fi
echo "$PY"
