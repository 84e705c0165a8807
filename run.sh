#!/usr/bin/env bash
# The main job: sets up what is missing (scripts/setup.sh), prints the backends, benchmarks the training step
# against timm eager / timm + torch.compile on whatever hardware is here, then trains a ViT on mnist5k (5,000
# real MNIST digits shipped inside the package, vitkernels/experiments/datasets/). Works offline. Results go to
# ${OUT:-runs/main}; extra arguments go to `vitkernels train`.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/setup.sh | tail -n 1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also where pip could not install it
OUT=${OUT:-runs/main}
mkdir -p "$OUT"
"$PY" -m vitkernels info
"$PY" -m vitkernels bench --out "$OUT/bench.json"
"$PY" -m vitkernels train --dataset mnist5k --out "$OUT/train" "$@"
