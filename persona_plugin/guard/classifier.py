"""The guard's classifier: P(a text instructs the assistant), from what it reads in it.

A logistic regression over the text's sentence embedding (all-MiniLM-L6-v2, the model
memory already runs), its hashed n-grams, the guard's pattern flags and its concept flags
(:mod:`persona_plugin.guard.features`), trained on project-written examples by
``python -m persona_plugin.lab.training.guard``. The file it writes ships in the package.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin._linear import LogisticHead, load_head
from persona_plugin.config import ASSETS_DIR
from persona_plugin.errors import PersonaConfigError
from persona_plugin.guard.features import (
    BUCKETS,
    CONCEPT_NAMES,
    concept_flags,
    ngram_vector,
    windows,
)
from persona_plugin.guard.patterns import PATTERN_NAMES, as_read, pattern_flags

GUARD_FILE = ASSETS_DIR / "guard" / "guard-classifier.npz"
EMBEDDING_SIZE = 384
FEATURE_SIZE = EMBEDDING_SIZE + BUCKETS + len(PATTERN_NAMES) + len(CONCEPT_NAMES)
REBUILD = "python -m persona_plugin.lab.training.guard"


class InstructionClassifier:
    """P(instruction) for texts; :meth:`probability` reads a long text window by window."""

    def __init__(
        self,
        head: LogisticHead,
        *,
        threshold: float,
        pattern_threshold: float | None = None,
        embedder: Any = None,
    ) -> None:
        self.head = head
        #: refuse a text at this P(instruction) ...
        self.threshold = threshold
        #: ... or at this lower one when one of the guard's patterns matches it too
        self.pattern_threshold = threshold if pattern_threshold is None else pattern_threshold
        self._embedder = embedder
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Any:
        with self._lock:
            if self._embedder is None:
                from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

                # the shipped file (int8 weights, float32 arithmetic), not the fast
                # variant: the fast one's int8 x int8 products (MatMulIntegerToFloat) come
                # out differently on CPUs with and without VNNI (u8s8 saturates on AVX2),
                # which moved this classifier's probabilities across its thresholds from one
                # machine to the next. The same verdict everywhere matters more here than 2x.
                self._embedder = MiniLMEmbeddingFunction(variant="shipped")
        return self._embedder

    def features(self, texts: list[str]) -> np.ndarray:
        """One row per text: embedding, n-grams, pattern flags, concept flags."""
        read = [as_read(t) for t in texts]
        rows = np.zeros((len(texts), FEATURE_SIZE), dtype=np.float32)
        if not texts:
            return rows
        rows[:, :EMBEDDING_SIZE] = self.embedder.embed(read)
        end = EMBEDDING_SIZE + BUCKETS
        for i, (text, clean) in enumerate(zip(texts, read, strict=True)):
            rows[i, EMBEDDING_SIZE:end] = ngram_vector(clean)
            rows[i, end:] = pattern_flags(text)[0] + concept_flags(clean)
        return rows

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """P(instruction) per text, each read as one window."""
        return self.head.probabilities(self.features(texts))

    def probability(self, text: str) -> float:
        """The highest P(instruction) over the text's windows."""
        return float(self.probabilities(windows(text)).max())

    @classmethod
    def load(cls, path: str | Path = GUARD_FILE, *, embedder: Any = None) -> InstructionClassifier:
        """The stored classifier (default: the one that ships in the package)."""
        head, data = load_head(path, size=FEATURE_SIZE, what="guard classifier", rebuild=REBUILD)
        if data.get("patterns") != list(PATTERN_NAMES) or data.get("concepts") != list(
            CONCEPT_NAMES
        ):
            raise PersonaConfigError(
                f"the guard classifier {path} was trained on other patterns or concepts than "
                f"the guard has now: rebuild it with `{REBUILD}`."
            )
        return cls(
            head,
            threshold=float(data["threshold"]),
            pattern_threshold=float(data.get("pattern_threshold", data["threshold"])),
            embedder=embedder,
        )


_default: InstructionClassifier | None = None
_default_lock = threading.Lock()


def default_classifier() -> InstructionClassifier:
    """The classifier that ships in the package, loaded once per process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = InstructionClassifier.load()
    return _default
