#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
${PYTHON:-python3} -m pytest tests "$@"
