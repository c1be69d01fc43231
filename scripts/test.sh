#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on a CPU-only machine:
# lint, unit tests, Triton kernels under the interpreter, end-to-end tests against a
# real `vllm serve` on a tiny locally built model, then (full runs only) vLLM's GPU code
# path on CPU under the Triton interpreter (scripts/test-gpu-path.sh).
#   usage: scripts/test.sh [pytest args]   (with args: that pytest run only)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup-cpu.sh
PY=.venv/bin/python
echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] pytest"
# -p no:cacheprovider: CI clones are read-mostly; no .pytest_cache needed.
# The GPU-code-path tests (tests/gpu_path) are skipped here and run separately below:
# they need a shim on PYTHONPATH and Triton's interpreter, never the production path.
"$PY" -m pytest -p no:cacheprovider --durations=25 "$@"
if [ $# -eq 0 ]; then
  echo "[test] GPU code path (Model Runner V2 + TRITON_ATTN) on CPU"
  bash scripts/test-gpu-path.sh
fi
