#!/usr/bin/env bash
# The GPU check, sized for a short GPU rental: no installs and no network (it needs torch, a
# CUDA toolkit, ninja, pybind11, pytest and hypothesis, which such machines carry), steps that
# each finish well inside 8 minutes under a timeout, and a report written to the folder given
# as the first argument, never inside the checkout.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [build|test|bench|stream|all]     (default: all)
#
#   build  compile asag in place with every core, CUDA kernels required         (~3 min)
#   test   the CUDA tests and the kernel tests (tests that need diffusers skip),
#          compute-sanitizer memcheck and racecheck on small cases of every path  (~3 min)
#   bench  benchmarks/bench_ops.py --device cuda at sizes that finish             (~3 min)
#   stream the streaming path against the materialised one (bench_streaming.py)   (~3 min)
#
# Each step appends its section to OUT_DIR/<gpu>.md; "all" runs the four in order.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [build|test|bench|stream|all]}
STEP=${2:-all}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
report="$OUT/${gpu}.md"
section() { printf '\n## %s\n\n```\n' "$1" >>"$report"; }
endsection() { printf '```\n' >>"$report"; }
[ -f "$report" ] || printf '# GPU check: %s\n\nMade by `bash benchmarks/gpu_check.sh` on %s.\n' "$gpu" "$(date -u +%Y-%m-%d)" >"$report"

build() {
  section "Build (setup.py build_ext --inplace, CUDA kernels required)"
  # Only the build needs ASAG_FORCE_CUDA: the tests of setup.py's decisions must not see it.
  ASAG_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} \
    timeout 480 "$PY" setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1
  local status=$?
  tail -n 5 "$OUT/build.log" >>"$report"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -m asag info; } >>"$report" 2>&1
  echo "build exit status: $status" | tee -a "$report"
  endsection
  return $status
}

test_step() {
  section "Tests (CUDA and kernel tests)"
  timeout 300 "$PY" -m pytest tests/test_cuda.py tests/test_kernel_accuracy.py tests/test_properties.py \
    tests/test_api.py -q -p no:cacheprovider 2>&1 | tail -n 25 | tee -a "$report"
  endsection
  local sanitizer="$CUDA_HOME/bin/compute-sanitizer"
  command -v compute-sanitizer >/dev/null && sanitizer=$(command -v compute-sanitizer)
  for tool in memcheck racecheck; do
    section "compute-sanitizer --tool $tool"
    if [ -x "$sanitizer" ]; then
      timeout 240 "$sanitizer" --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitizer_cases.py 2>&1 | tail -n 15 | tee -a "$report"
      echo "exit status: ${PIPESTATUS[0]}" | tee -a "$report"
    else
      echo "compute-sanitizer not found under $CUDA_HOME/bin" | tee -a "$report"
    fi
    endsection
  done
}

bench() {
  section "Benchmark (bench_ops.py --device cuda)"
  # The references materialise several N x N fp32 matrices per slice: leave them out where
  # they cannot finish (or fit) within the step.
  timeout 420 "$PY" benchmarks/bench_ops.py --device cuda --n 1024 4096 16384 --bh 8 64 --iters 3 10 \
    --max-eager-n 4096 --max-compiled-n 4096 --repeats 5 --out "$OUT/bench_ops_${gpu}" 2>&1 | tail -n 40 | tee -a "$report"
  endsection
}

stream() {
  section "Streaming against materialised (bench_streaming.py --device cuda, B*H = 8, bf16)"
  timeout 240 "$PY" benchmarks/bench_streaming.py --device cuda --n 4096 16384 --iters 10 --bh 8 --dtype bfloat16 \
    --max-materialized-mb 16384 2>&1 | tail -n 12 | tee -a "$report"
  cp benchmarks/results/streaming_cuda.* "$OUT/" 2>/dev/null
  endsection
}

case "$STEP" in
  build) build ;;
  test) test_step ;;
  bench) bench ;;
  stream) stream ;;
  all) build && test_step && bench && stream ;;
  *) echo "unknown step $STEP (build, test, bench, stream or all)"; exit 2 ;;
esac
echo "wrote $report"
