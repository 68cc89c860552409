"""Multi-LoRA inference backends behind one protocol.

:class:`Backend` takes a :class:`GenerationRequest` (prompt or messages, an adapter
mixture ``[(id, weight), ...]``, sampling) and returns a :class:`GenerationResult` (texts,
token counts, finish reasons, the adapters that actually served it), with ``generate``,
``agenerate`` and ``stream``. Remote servers: :class:`TGIBackend`, :class:`LoRAXBackend`,
:class:`VLLMBackend`; the embedded one is :class:`~persona_plugin.backends.local.LocalBackend`
(transformers + peft). :class:`~persona_plugin.chat_models.MultiLoraChatModel` makes any
backend a LangChain chat model. Nothing outside this package knows an HTTP route, and
nothing here imports a chat model, graph, server or CLI.

The server classes and the local backend are imported on first use, so ``import
persona_plugin.backends`` pulls in neither ``huggingface_hub`` nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persona_plugin.backends._retry import RetryPolicy
from persona_plugin.backends.base import Backend, BaseBackend
from persona_plugin.backends.types import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    SERVED_PREMERGED,
    SERVED_TOP,
    AdapterNotServedError,
    BackendError,
    BackendProtocolError,
    BackendRequestError,
    BackendStreamError,
    BackendUnavailableError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
    normalize_mixture,
)

if TYPE_CHECKING:
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.backends.lorax import LoRAXBackend
    from persona_plugin.backends.tgi import TGIBackend
    from persona_plugin.backends.vllm import VLLMBackend

_LAZY = {
    "TGIBackend": "persona_plugin.backends.tgi",
    "LoRAXBackend": "persona_plugin.backends.lorax",
    "VLLMBackend": "persona_plugin.backends.vllm",
    "LocalBackend": "persona_plugin.backends.local",
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
    "BackendProtocolError",
    "BackendRequestError",
    "BackendStreamError",
    "BackendUnavailableError",
    "BaseBackend",
    "GenerationChunk",
    "GenerationRequest",
    "GenerationResult",
    "LoRAXBackend",
    "LocalBackend",
    "Mixture",
    "RetryPolicy",
    "TGIBackend",
    "VLLMBackend",
    "normalize_mixture",
]
