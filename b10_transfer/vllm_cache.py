"""The peer's module path of the vLLM command (`b10_transfer.vllm_cache:main` in b10-transfer 0.4), kept so imports and
entry points written against the peer keep working. The command lives in `b10_transfer.cli`."""

from .cli import main, save_vllm_compile_cache

__all__ = ["main", "save_vllm_compile_cache"]
