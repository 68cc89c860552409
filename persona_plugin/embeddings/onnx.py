"""The MiniLM forward pass on ONNX Runtime: tokenizer, session, mean-pooled unit vectors.

Shared by the embedder (:mod:`~persona_plugin.embeddings.minilm`) and the fast model's
build, which checks what it built with the same code the embedder will run it with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIMENSIONS = 384
MAX_TOKENS = 256  # the model's max_seq_length


def open_tokenizer(path: Path) -> Any:
    """The WordPiece tokenizer at ``path``, padding each batch to its longest input."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # the shipped tokenizer pads every input to 128; pad each batch to its longest, on
    # the right: the fast model's attention reads the mask as lengths
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", direction="right")
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def open_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of the model file at ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def encode(session: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """One batch: mean-pooled, L2-normalised embeddings, one float32 row per text."""
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    hidden = session.run(
        ["last_hidden_state"],
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
    )[0]
    weights = mask[:, :, None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
