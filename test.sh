#!/usr/bin/env bash
# The test command: sets up what is missing (scripts/setup.sh), then runs the whole suite with pytest.
# Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) and the cuda backend on
# the extension's C++ CPU twin; with a GPU everything runs on CUDA (bf16 included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/setup.sh | tail -n 1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also where pip could not install it
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-2}"); fi  # else one process
exec "$PY" -m pytest tests "${workers[@]}" -q -ra "$@"
