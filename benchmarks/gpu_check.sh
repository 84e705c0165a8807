#!/usr/bin/env bash
# On a GPU machine: build, test (bf16 too), memcheck, benchmark; one dated JSON in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(VITKERNELS_BUILD_EXT=0 bash scripts/setup.sh | tail -n 1)
exec "$PY" benchmarks/gpu_check.py "$@"
