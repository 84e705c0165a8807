#!/usr/bin/env bash
# On a GPU machine: build (or use a carried build), test in bf16, benchmark, run the whole suite and
# compute-sanitizer, within --budget seconds (default 540) counted from here; one dated JSON in
# benchmarks/results/ (and in $OUT when set). --help and --dry-run take seconds and install nothing.
# All options go to benchmarks/gpu_check.py (see its --help, and docs/gpu_day.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export VK_GPU_CHECK_T0=${VK_GPU_CHECK_T0:-$(date +%s)}

# The python scripts/setup.sh would pick, found without installing anything: python3 when it already has
# torch, triton, timm and pytest (a GPU image) and VITKERNELS_VENV is unset, else the venv's python.
quick_python() {
  if [ -z "${VITKERNELS_VENV:-}" ] && python3 -c "import torch, triton, timm, pytest" >/dev/null 2>&1; then
    command -v python3
  elif [ -x "${VITKERNELS_VENV:-.venv}/bin/python" ]; then
    echo "${VITKERNELS_VENV:-.venv}/bin/python"
  else
    command -v python3
  fi
}

light=0
for arg in "$@"; do
  case "$arg" in -h|--help|--dry-run|--build-library|--build-library=*) light=1 ;; esac
done

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$light" = 1 ]; then
  PY=$(quick_python)
elif PY=$(VITKERNELS_BUILD_EXT=0 timeout 180 bash scripts/setup.sh | tail -n 1) && [ -x "$PY" ]; then
  :  # setup.sh made sure the requirements are there (gpu_check builds the extension itself)
else
  PY=$(quick_python)
  echo "[gpu_check] scripts/setup.sh failed or took over 180 s; going on with $PY" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also where pip could not install it
exec "$PY" benchmarks/gpu_check.py "$@"
