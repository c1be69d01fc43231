#!/usr/bin/env bash
# vLLM's GPU code path (Model Runner V2 + TRITON_ATTN) end to end on a CPU-only machine:
# `vllm serve` with the test shim in tests/gpu_path/shim/ on PYTHONPATH and every Triton
# kernel (vLLM's and meda's) in Triton's interpreter. Opt-in and slow (a few minutes on
# 2 cores); the default `pytest` run skips these tests. Expects the venv of
# scripts/setup-cpu.sh.
#   usage: scripts/test-gpu-path.sh [extra pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
start=$(date +%s)
status=0
MEDA_GPU_PATH_TESTS=1 .venv/bin/python -m pytest tests/gpu_path -m gpu_path \
  -p no:cacheprovider -q --durations=15 "$@" || status=$?
echo "[test-gpu-path] done in $(($(date +%s) - start)) s (exit $status)"
exit "$status"
