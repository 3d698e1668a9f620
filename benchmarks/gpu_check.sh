#!/usr/bin/env bash
# One command for a GPU machine: build asag with all cores, run the tests (CUDA ones
# included), compute-sanitizer (memcheck, racecheck) on small cases, the GPU benchmark, and
# write benchmarks/results/<gpu>.md with the device, versions and tables.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export NVCC_THREADS=${NVCC_THREADS:-4}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export ASAG_FORCE_CUDA=1
export PYTHONUNBUFFERED=1

"$PY" -m pip install -q ninja pybind11 "setuptools>=77" wheel hypothesis pytest || exit 1
"$PY" setup.py build_ext --inplace -q || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
mkdir -p benchmarks/results
report="benchmarks/results/${gpu}.md"
section() { printf '\n## %s\n\n```\n' "$1" >>"$report"; }
endsection() { printf '```\n' >>"$report"; }

{
  echo "# GPU check: ${gpu}"
  echo
  echo "Made by \`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%d)."
} >"$report"
section "Device and build"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -m asag info; } >>"$report" 2>&1
endsection

section "Tests (pytest tests/)"
"$PY" -m pytest tests -q -p no:cacheprovider 2>&1 | tail -n 25 | tee -a "$report"
endsection

sanitizer="$CUDA_HOME/bin/compute-sanitizer"
command -v compute-sanitizer >/dev/null && sanitizer=$(command -v compute-sanitizer)
for tool in memcheck racecheck; do
  section "compute-sanitizer --tool $tool"
  if [ -x "$sanitizer" ]; then
    "$sanitizer" --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitizer_cases.py 2>&1 | tail -n 15 | tee -a "$report"
    echo "exit status: ${PIPESTATUS[0]}" | tee -a "$report"
  else
    echo "compute-sanitizer not found under $CUDA_HOME/bin" | tee -a "$report"
  fi
  endsection
done

section "Benchmark (python benchmarks/bench_ops.py --device cuda)"
"$PY" benchmarks/bench_ops.py --device cuda --out "benchmarks/results/bench_ops_${gpu}" 2>&1 | tail -n 60 | tee -a "$report"
endsection
echo "wrote $report"
