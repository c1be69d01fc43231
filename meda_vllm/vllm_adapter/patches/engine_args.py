"""``vllm.engine.arg_utils.EngineArgs``: ``add_cli_args``, ``from_cli_args``,
``create_engine_config``.

Why: ``vllm serve`` needs ``--kv-policy``, ``--kv-budget``, ``--kv-window`` and
``--kv-policy-config``, and vLLM has no plugin hook for engine flags. Bad values and
engine features compression cannot run with must stop the start with one line, before any
weight loads.

How:
- ``add_cli_args`` (staticmethod), after the original: adds the flag group
  (``cli.add_cli_args``).
- ``from_cli_args`` (classmethod), after the original: folds the flags into
  ``additional_config`` (which reaches every vLLM process) and validates them
  (``cli.resolve_engine_settings``); a bad value is ``SystemExit("vllm: error: ...")``.
- ``create_engine_config``: before the original, validates settings given through
  ``--additional-config`` / ``LLM(additional_config=...)`` and settles feature interplay
  (prefix caching and async scheduling off; spec decode, TP/PP > 1, DCP/PCP > 1, DBO, KV
  connectors and quantized KV cache dtypes refused; TRITON_ATTN on CUDA unless a backend
  is chosen); after it, once the model's config is read, refuses a checkpoint's fp8 KV
  cache and models with several KV cache groups (``cli.check_engine_config``).

Remove when: vLLM grows a plugin hook for engine CLI arguments and engine-config checks.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from meda_vllm.config import ConfigError
    from meda_vllm.vllm_adapter import cli

    if getattr(EngineArgs, "_meda_patched", False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser):
        parser = orig_add(parser)
        cli.add_cli_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        engine_args._meda_cli = True  # `vllm serve`: later refusals exit with one line too
        try:
            if any(getattr(args, d, None) is not None for d in cli.FLAG_DESTS):
                additional = cli.fold_cli_args(args, engine_args.additional_config)
                engine_args.additional_config = additional
            cli.resolve_engine_settings(engine_args)
        except ConfigError as e:
            raise cli.startup_error(str(e)) from None
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        try:
            cli.resolve_engine_settings(self)
            vllm_config = orig_create(self, *args, **kwargs)
            # The model's config is read now; its weights load later, in the EngineCore.
            cli.check_engine_config(vllm_config)
        except ConfigError as e:
            if getattr(self, "_meda_cli", False):
                raise cli.startup_error(str(e)) from None
            raise
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._meda_patched = True
