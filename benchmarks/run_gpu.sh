#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, run the GPU tests, run the CUDA-kernel tests
# under compute-sanitizer (memcheck + racecheck), then the benchmark suites. Logs and tables go to OUTDIR.
#
#   benchmarks/run_gpu.sh OUTDIR [STAGES]
#
# STAGES (default "build test sanitize bench model serving") picks a subset, e.g. "build bench";
# "pytest-bench" runs the suites as users do (`pytest --benchmark`, with pytest-benchmark's own rounds too).
# STEP_TIMEOUT (seconds, default 1800) bounds each step; PYTEST_ARGS are added to the test and pytest-bench runs;
# JOBS (default 14) pytest-xdist workers for the tests when xdist is installed; SANITIZE_K the sanitizer's -k;
# SUITES (default "moe varlen_attention beam_search") the bench stage's suites, one step each;
# BENCH (default "benchmarks") names the benchmark files of pytest-bench.
# Needs: CUDA torch, triton, nvcc, ninja, pytest, pytest-benchmark (all on the H200 image).
set -uo pipefail
OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR [STAGES]}
STAGES=${2:-build test sanitize bench model serving}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
stage() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
# step NAME LOG CMD...: run CMD with its output in LOG, print the tail, remember a failure.
step() { local name=$1 log=$2; shift 2; local t0=$(date +%s); echo "=== $name: $*"; timeout "${STEP_TIMEOUT:-1800}" "$@" >"$log" 2>&1; local rc=$?;
         tail -n "${TAIL:-25}" "$log"; echo "=== $name: rc=$rc in $(( $(date +%s) - t0 )) s"; [ $rc -eq 0 ] || status=1; }

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"

if stage build; then
  TAIL=3 step build "$OUT/build.log" $PY -m pip install -v --no-build-isolation --no-deps -e .
  grep -E "onerec_fast setup|error|spill|registers" "$OUT/build.log" | tail -40
  $PY -c "from onerec_fast.backends import describe; print(describe())" 2>&1 | tee -a "$OUT/env.txt"
fi
if stage test; then
  # CUDA cases in parallel (Triton compilation dominates: 1715 tests in 156 s with -n 14 on the H200); the
  # CPU-tensor cases belong to CI (they need the Triton interpreter, which conftest.py sets only without CUDA).
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${JOBS:-14}")
  step tests "$OUT/tests.log" $PY -m pytest -q -p no:cacheprovider $XDIST -rfE --durations=15 \
    -k "not timing and not cpu" --junitxml="$OUT/tests.xml" ${PYTEST_ARGS:-} tests
  step timing "$OUT/timing.log" $PY -m pytest -q -s -p no:cacheprovider -k "timing and not cpu" ${PYTEST_ARGS:-} tests
fi
if stage sanitize; then
  # Edge cases of the two CUDA kernels (ties, all-equal logits, misaligned/strided inputs, dead rows, small tries):
  # memcheck takes ~35 s over these 75 tests; racecheck is several times slower.
  K=${SANITIZE_K:-"exact_ties or all_equal or misaligned or fewer_candidates or strided or (every_token and not 65536) or 16-64-500"}
  for tool in memcheck racecheck; do
    TAIL=6 step "sanitize-$tool" "$OUT/sanitize_$tool.log" compute-sanitizer --tool $tool --error-exitcode 1 \
      --target-processes all $PY -m pytest -q -p no:cacheprovider -k "$K" \
      ${SANITIZE_TESTS:-tests/test_moe_routing_cuda.py tests/test_beam_step_cuda.py}
  done
fi
if stage bench; then
  # One step per suite through `onerec-fast bench` (the harness alone, no pytest-benchmark re-timing), each with
  # its own time limit and its rows saved after every case: on the H100 (session 11) the three suites under one
  # pytest run passed a 330 s limit and lost every row; the MoE suite alone took about 200 s.
  for suite in ${SUITES:-moe varlen_attention beam_search}; do
    step "bench-$suite" "$OUT/bench_$suite.log" $PY -m onerec_fast.cli bench --suite "$suite" --out "$OUT/bench_$suite"
  done
fi
if stage pytest-bench; then
  TAIL=0 step pytest-bench "$OUT/pytest_bench.log" $PY -m pytest -q --benchmark -p no:cacheprovider --bench-dir "$OUT" \
    --benchmark-json "$OUT/pytest_benchmark.json" ${PYTEST_ARGS:-} ${BENCH:-benchmarks}
  sed -n '/onerec_fast benchmarks/,$p' "$OUT/pytest_bench.log"
fi
if stage model; then
  step model "$OUT/model.log" $PY benchmarks/bench_model.py
fi
if stage serving; then
  step serving "$OUT/serving.log" $PY benchmarks/bench_serving.py --out "$OUT/serving"
fi
exit $status
