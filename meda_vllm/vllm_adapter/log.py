"""Our log lines go through vLLM's logger tree so they share its format and level."""

import logging

logger = logging.getLogger("vllm.meda_vllm")
