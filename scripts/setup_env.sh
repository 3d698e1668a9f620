#!/usr/bin/env bash
# Sets up a fresh machine for asag from this checkout: torch, the build tools, and asag itself
# (its C++ kernels, plus the CUDA kernels where the CUDA toolkit is found), with test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=2.14.1
TORCHVISION=0.29.1

if ! "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  "$PY" -m pip install "torch==$TORCH" "torchvision==$TORCHVISION"
fi
"$PY" -m pip install ninja pybind11 "setuptools>=77" wheel
# torch otherwise guesses /usr/local and the CUDA link fails on -lcudart.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# Compile against the torch installed above, not one from an isolated build environment.
"$PY" -m pip install --no-build-isolation -e ".[test]"
"$PY" -m asag info
