#!/usr/bin/env bash
# Every GPU check of the kernels in one call, for a lent H100/H200 (device tool):
#   here:  bash benchmarks/kernels/device_wheels.sh      # pydantic wheels -> .whl/
#   then:  run(command="bash benchmarks/kernels/gpu_session.sh", carry=[".whl"], timeout_s=590)
# 1. the kernel tests marked `gpu` (compiled kernels vs torch references, real sizes);
# 2. bench_kernels.py: copy bandwidth + GEMM baseline, correctness and timings per op at
#    N = 2K/8K/32K for LLaVA-1.5-7B and Qwen2-VL-7B geometry, tile sweep at 8K;
# 3. bench_step.py: the worker's whole compression step (all layers, Python and launches
#    included) vs the same model's prefill, per policy (needs pydantic from .whl/).
# No vLLM and no install: the package (with kernels/ as meda_vllm/kernels) is copied into
# a temporary site folder. Logs, JSON and markdown tables land in $OUT (default
# ./gpu_out). Each step has its own timeout, so a hang in one leaves the others' output.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SITE=$(mktemp -d)
cp -r "$ROOT/meda_vllm" "$SITE/meda_vllm"
rm -rf "$SITE/meda_vllm/vllm_adapter"  # needs vLLM; nothing below imports it
cp -r "$ROOT/kernels" "$SITE/meda_vllm/kernels"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$ROOT"/.whl/*.whl || echo "wheel install failed: bench_step will be skipped"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== kernel tests on the GPU"
# from outside the checkout, so that its meda_vllm/ (without kernels/) does not shadow $SITE
(cd "$SITE" && MEDA_TEST_REAL_GPU=1 timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest \
  "$ROOT/tests/kernels" -m gpu -q -p no:cacheprovider -o addopts="" -rA) 2>&1 \
  | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}

echo "== benchmark"
timeout "${BENCH_TIMEOUT:-270}" "$PY" "$ROOT/benchmarks/kernels/bench_kernels.py" \
  --out "$OUT" --tune "${TUNE_N:-8192}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

echo "== whole compression step vs prefill"
if (cd "$SITE" && "$PY" -c "import pydantic, meda_vllm.paged_view"); then
  (cd "$SITE" && timeout "${STEP_TIMEOUT:-150}" "$PY" "$ROOT/benchmarks/kernels/bench_step.py" \
    --out "$OUT" ${STEP_ARGS:-}) 2>&1 | tee "$OUT/bench_step.log"
  step=${PIPESTATUS[0]}
else
  echo "meda_vllm core not importable (no pydantic? run device_wheels.sh, carry .whl)"
  step=1
fi
echo "== done in $(($(date +%s) - start)) s: tests $tests, bench $bench, step $step"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$step" -eq 0 ]
