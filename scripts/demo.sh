#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs asag's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
${PYTHON:-python3} -m asag demo "$@"
