#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on a CPU-only machine:
# lint, unit tests, Triton kernels under the interpreter, and end-to-end tests
# against a real `vllm serve` on a tiny locally built model.
#   usage: scripts/test.sh [extra pytest args]
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
"$PY" -m pytest -p no:cacheprovider "$@"
