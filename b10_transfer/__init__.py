"""b10_transfer: drop-in replacement for the `b10-transfer` package, on a content-addressed store.

    from b10_transfer import load_compile_cache, save_compile_cache, OperationStatus

Same public names as `b10-transfer`, plus `compile` (opt-in Dynamo warm start, b10_transfer/precompile.py);
`b10_transfer.core` holds the directory-parametrised engine for other callers.
"""

from .cache import clear_local_cache, load_compile_cache, save_compile_cache
from .cli import save_vllm_compile_cache
from .errors import CacheError, CacheOperationInterrupted, CacheValidationError
from .file_transfer import transfer
from .info import get_cache_info, list_available_caches
from .precompile import compile
from .report import get_b10_logger
from .status import OperationStatus

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CacheOperationInterrupted",
    "CacheValidationError",
    "OperationStatus",
    "__version__",
    "clear_local_cache",
    "compile",
    "get_b10_logger",
    "get_cache_info",
    "list_available_caches",
    "load_compile_cache",
    "save_compile_cache",
    "save_vllm_compile_cache",
    "transfer",
]
