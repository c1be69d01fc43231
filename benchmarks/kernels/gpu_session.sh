#!/usr/bin/env bash
# Every GPU check of the kernels in one call, for a lent H100/H200 (device tool):
#   run(command="bash benchmarks/kernels/gpu_session.sh", timeout_s=580)
# 1. the kernel tests marked `gpu` (compiled kernels vs torch references, real sizes);
# 2. bench_kernels.py: copy bandwidth + GEMM baseline, correctness and timings at
#    N = 2K/8K/32K for LLaVA-1.5-7B and Qwen2-VL-7B geometry, tile sweep at 8K.
# Needs only torch + triton + pytest (no vLLM, no pydantic, package not installed: the
# kernels are copied into a temporary site folder as meda_vllm.kernels). Logs, JSON and
# the markdown table land in $OUT (default ./gpu_out). Each step has its own timeout so
# that a hang in one still leaves the other's output.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SITE=$(mktemp -d)
mkdir -p "$SITE/meda_vllm"
cp "$ROOT/meda_vllm/__init__.py" "$SITE/meda_vllm/"
cp -r "$ROOT/kernels" "$SITE/meda_vllm/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== kernel tests on the GPU"
# from outside the checkout, so that its meda_vllm/ (without kernels/) does not shadow $SITE
(cd "$SITE" && MEDA_TEST_REAL_GPU=1 timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest \
  "$ROOT/tests/kernels" -m gpu -q -p no:cacheprovider -o addopts="" -rA) 2>&1 \
  | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}

echo "== benchmark"
timeout "${BENCH_TIMEOUT:-330}" "$PY" "$ROOT/benchmarks/kernels/bench_kernels.py" \
  --out "$OUT" --tune "${TUNE_N:-8192}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "== done in $(($(date +%s) - start)) s: tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
