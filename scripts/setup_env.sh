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
# Skip the build (2 to 6 minutes with CUDA) when this checkout's extension was built from the
# same sources, build files, torch and CUDA toolkit: the stamp holds their hash.
STAMP=asag/.build-stamp
SOURCES=$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py pyproject.toml;
            "$PY" -c "import torch; print(torch.__version__)"; echo "CUDA_HOME=${CUDA_HOME:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SOURCES" ] && "$PY" - <<'PYCHECK' 2>/dev/null
import os, sys
import asag, asag._C  # noqa: F401  (the compiled kernels load)
sys.exit(os.path.dirname(os.path.abspath(asag.__file__)) != os.path.abspath("asag"))
PYCHECK
then
  echo "asag's extension is up to date with csrc/, setup.py and pyproject.toml: not rebuilt (delete $STAMP to force)"
else
  # Compile against the torch installed above, not one from an isolated build environment.
  "$PY" -m pip install --no-build-isolation -e ".[test]"
  echo "$SOURCES" > "$STAMP"
fi
"$PY" -m asag info
