"""meda-vllm: multimodal KV-cache compression for vLLM serving."""

__version__ = "0.1.0"
