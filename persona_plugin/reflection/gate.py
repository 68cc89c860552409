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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin.config import ASSETS_DIR
from persona_plugin.errors import PersonaConfigError

GATE_FILE = ASSETS_DIR / "gate" / "reflection-gate.json"
#: send a turn when P(discloses) is at least this (leans toward sending)
DEFAULT_THRESHOLD = 0.3


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
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.threshold = threshold
        self._embedder = embedder

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
        logits = self.embedder.embed(list(texts)) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

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
        epochs: int = 1500,
        learning_rate: float = 2.0,
        l2: float = 1e-3,
    ) -> ReflectionGate:
        """Fit a logistic regression by full-batch gradient descent (classes balanced)."""
        if len(texts) != len(labels) or not texts:
            raise ValueError("train needs as many labels as texts, and at least one of each")
        y = np.asarray(labels, dtype=np.float32)
        if y.min() == y.max():
            raise ValueError("train needs both positive and negative examples")
        gate = cls(np.zeros(1), 0.0, threshold=threshold, embedder=embedder)
        x = gate.embedder.embed(list(texts))
        # balanced: each class weighs half, however many examples it has
        sample = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum()).astype(np.float32)
        w = np.zeros(x.shape[1], dtype=np.float32)
        b = 0.0
        for _ in range(epochs):
            p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
            error = (p - y) * sample
            w -= learning_rate * (x.T @ error + l2 * w)
            b -= learning_rate * float(error.sum())
        gate.weights, gate.bias = w, b
        return gate

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "logistic regression on all-MiniLM-L6-v2 embeddings",
            "threshold": self.threshold,
            "bias": round(self.bias, 6),
            "weights": [round(float(v), 6) for v in self.weights],
        }

    def save(self, path: str | Path = GATE_FILE) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        tmp.replace(target)
        return target

    @classmethod
    def load(
        cls, path: str | Path = GATE_FILE, *, threshold: float | None = None, embedder: Any = None
    ) -> ReflectionGate:
        """The stored gate (default: the one that ships in the package)."""
        file = Path(path)
        try:
            data = json.loads(file.read_text("utf-8"))
            weights, bias = data["weights"], data["bias"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PersonaConfigError(
                f"cannot read the reflection gate {file} ({exc}): rebuild it with "
                "`python -m persona_plugin.lab.training.gate`."
            ) from None
        if len(weights) != 384:
            raise PersonaConfigError(
                f"the reflection gate {file} has {len(weights)} weights, not 384: rebuild it "
                "with `python -m persona_plugin.lab.training.gate`."
            )
        chosen = data.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
        return cls(weights, bias, threshold=chosen, embedder=embedder)
