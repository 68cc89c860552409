"""The cost gate in front of reflection: skip turns with nothing to learn, before any LLM call.

Most chat turns ("Wow, congrats!", "What about you?") say nothing about the user, and a
reflection call on them spends tokens to learn nothing. :class:`ReflectionGate` is a
logistic regression on the local sentence embeddings (all-MiniLM-L6-v2, 384 numbers per
turn): one embedding and a dot product per turn, milliseconds on CPU. It is trained on
the project's own synthetic turns (:mod:`persona_plugin.lab.training.reflection_data`:
disclosures are positive; small talk, questions and instruction injections negative), and
its threshold
leans toward sending, since a skipped disclosure is a fact lost while a needless call only
costs time.

``python -m persona_plugin.lab.training.gate`` retrains it and writes
``persona_plugin/assets/gate/reflection-gate.json`` (committed; a few KB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin._linear import LogisticHead, load_head, save_head
from persona_plugin.config import ASSETS_DIR

GATE_FILE = ASSETS_DIR / "gate" / "reflection-gate.json"
#: send a turn when P(discloses) is at least this (leans toward sending)
DEFAULT_THRESHOLD = 0.3
_REBUILD = "python -m persona_plugin.lab.training.gate"


class ReflectionGate:
    """Says whether a turn is worth a reflection call (``should_reflect(text)``)."""

    def __init__(
        self,
        weights: Sequence[float],
        bias: float,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        embedder: Any = None,
    ) -> None:
        self.head = LogisticHead(weights, bias)
        self.threshold = threshold
        self._embedder = embedder

    @property
    def weights(self) -> np.ndarray:
        return self.head.weights

    @property
    def bias(self) -> float:
        return self.head.bias

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

            self._embedder = MiniLMEmbeddingFunction()
        return self._embedder

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """P(the turn discloses something about its speaker), one per text."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return self.head.probabilities(self.embedder.embed(list(texts)))

    def should_reflect(self, text: str) -> bool:
        return bool(self.probabilities([text])[0] >= self.threshold)

    # -- training and storage -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        labels: Sequence[bool],
        *,
        embedder: Any = None,
        threshold: float = DEFAULT_THRESHOLD,
        **fit: Any,
    ) -> ReflectionGate:
        """Fit the logistic head on the texts' embeddings (classes balanced)."""
        if len(texts) != len(labels) or not texts:
            raise ValueError("train needs as many labels as texts, and at least one of each")
        gate = cls(np.zeros(1), 0.0, threshold=threshold, embedder=embedder)
        gate.head = LogisticHead.fit(gate.embedder.embed(list(texts)), labels, **fit)
        return gate

    def save(self, path: str | Path = GATE_FILE) -> Path:
        return save_head(
            path,
            self.head,
            model="logistic regression on all-MiniLM-L6-v2 embeddings",
            threshold=self.threshold,
        )

    @classmethod
    def load(
        cls, path: str | Path = GATE_FILE, *, threshold: float | None = None, embedder: Any = None
    ) -> ReflectionGate:
        """The stored gate (default: the one that ships in the package)."""
        head, data = load_head(path, size=384, what="reflection gate", rebuild=_REBUILD)
        chosen = data.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
        return cls(head.weights, head.bias, threshold=chosen, embedder=embedder)
