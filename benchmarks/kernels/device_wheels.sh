#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for
# benchmarks/kernels/gpu_session.sh: the device image has torch, triton and pytest but no
# pydantic, which the core (meda_vllm.config) needs for bench_step.py. Run here (PyPI is
# reachable), then call the device tool with carry=[".whl"].
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -la .whl
