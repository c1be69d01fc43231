"""Helpers for tests, demos and benchmarks (no vLLM import at module level)."""
