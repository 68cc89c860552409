"""Multi-LoRA inference backends behind one protocol.

:class:`Backend` takes a :class:`GenerationRequest` (prompt or messages, an adapter
mixture ``[(id, weight), ...]``, sampling) and returns a :class:`GenerationResult` (texts,
token counts, finish reasons, the adapters that actually served it), with ``generate``,
``agenerate`` and ``stream``. Remote servers: :class:`TGIBackend`, :class:`LoRAXBackend`,
:class:`VLLMBackend`; :class:`MultiLoraChatModel` makes any backend a LangChain chat model.
Nothing outside this package knows an HTTP route.

The server classes are imported on first use, so ``import persona_plugin.backends`` does
not pull in ``huggingface_hub`` or LangChain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persona_plugin.backends.base import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    SERVED_PREMERGED,
    SERVED_TOP,
    AdapterNotServedError,
    Backend,
    BackendError,
    BackendRequestError,
    BackendStreamError,
    BackendUnavailableError,
    BaseBackend,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
    RetryPolicy,
    normalize_mixture,
)

if TYPE_CHECKING:
    from persona_plugin.backends.chat_model import MultiLoraChatModel
    from persona_plugin.backends.lorax import LoRAXBackend
    from persona_plugin.backends.tgi import TGIBackend
    from persona_plugin.backends.vllm import VLLMBackend

_LAZY = {
    "TGIBackend": "persona_plugin.backends.tgi",
    "LoRAXBackend": "persona_plugin.backends.lorax",
    "VLLMBackend": "persona_plugin.backends.vllm",
    "MultiLoraChatModel": "persona_plugin.backends.chat_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SERVED_ADAPTER",
    "SERVED_BASE",
    "SERVED_MERGED",
    "SERVED_PREMERGED",
    "SERVED_TOP",
    "AdapterNotServedError",
    "Backend",
    "BackendError",
    "BackendRequestError",
    "BackendStreamError",
    "BackendUnavailableError",
    "BaseBackend",
    "GenerationChunk",
    "GenerationRequest",
    "GenerationResult",
    "LoRAXBackend",
    "Mixture",
    "MultiLoraChatModel",
    "RetryPolicy",
    "TGIBackend",
    "VLLMBackend",
    "normalize_mixture",
]
