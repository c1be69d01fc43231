#!/usr/bin/env bash
# Compile every kernel launch for sm_90a/sm_80 with another Triton release (no GPU needed),
# e.g. the one the GPU machines have:  bash scripts/compile-check-triton.sh 3.6.0
# Also runs the kernels' interpreter tests with that release (set TESTS=0 to skip them).
# The venv is cached in .cache/triton-<version>/; the package is copied, not installed.
set -euo pipefail
VERSION=${1:?usage: compile-check-triton.sh TRITON_VERSION [compile_check args]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.cache/triton-$VERSION"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # numpy < 2.3: older Triton interpreters call int() on 1-element arrays
  "$VENV/bin/pip" install -q "torch==2.13.0" "triton==$VERSION" "numpy<2.3" pytest pydantic
fi
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
cp -r "$ROOT/meda_vllm" "$SITE/meda_vllm"
rm -rf "$SITE/meda_vllm/vllm_adapter"
cp -r "$ROOT/kernels" "$SITE/meda_vllm/kernels"
cd "$SITE"
echo "[compile-check] triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
env -u TRITON_INTERPRET PYTHONPATH="$SITE" "$VENV/bin/python" -m meda_vllm.testing.compile_check "$@"
if [ "${TESTS:-1}" = "1" ]; then
  PYTHONPATH="$SITE" "$VENV/bin/python" -m pytest "$ROOT/tests/kernels" -q -p no:cacheprovider \
    -o addopts="" -k "not bench and not compile"
fi
