#!/usr/bin/env bash
# Set up (idempotent), build the tiny random Qwen2-VL locally (no download) and
# serve it with MEDA KV compression on http://127.0.0.1:${PORT:-8000}.
#   usage: scripts/serve-tiny.sh [extra `vllm serve` flags]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup-cpu.sh
MODEL_DIR=${MODEL_DIR:-$ROOT/.cache/tiny-qwen2vl}
.venv/bin/python -c "from meda_vllm.testing.tiny_qwen2vl import ensure; ensure('$MODEL_DIR')"
export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1} HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec .venv/bin/vllm serve "$MODEL_DIR" \
  --host 127.0.0.1 --port "${PORT:-8000}" \
  --enforce-eager --dtype float32 --max-model-len 4096 --block-size 32 \
  --kv-cache-memory-bytes 67108864 --limit-mm-per-prompt '{"image": 4, "video": 1}' \
  --kv-policy meda --kv-budget 0.2 "$@"
