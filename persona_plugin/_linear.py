"""A logistic regression over feature vectors: the small classifiers on sentence embeddings.

The reflection cost gate and the injection guard both read a sentence embedding (plus, for
the guard, a few pattern flags) and answer a yes/no question in microseconds. They share
this head: fitted by full-batch gradient descent with the classes balanced, stored as a
few KB of JSON that ships in the package.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin.errors import PersonaConfigError


class LogisticHead:
    """``P(yes) = sigmoid(x · weights + bias)`` for each row ``x`` of a feature matrix."""

    def __init__(self, weights: Sequence[float], bias: float) -> None:
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = float(bias)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        logits = np.asarray(features, dtype=np.float32) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: Sequence[bool],
        *,
        epochs: int = 1500,
        learning_rate: float = 2.0,
        l2: float = 1e-3,
    ) -> LogisticHead:
        """Fit by full-batch gradient descent; each class weighs half, whatever its size."""
        x = np.asarray(features, dtype=np.float32)
        y = np.asarray(labels, dtype=np.float32)
        if len(x) != len(y) or not len(x):
            raise ValueError("fit needs as many labels as rows, and at least one row")
        if y.min() == y.max():
            raise ValueError("fit needs both positive and negative examples")
        sample = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum()).astype(np.float32)
        w = np.zeros(x.shape[1], dtype=np.float32)
        b = 0.0
        for _ in range(epochs):
            p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
            error = (p - y) * sample
            w -= learning_rate * (x.T @ error + l2 * w)
            b -= learning_rate * float(error.sum())
        return cls(w, b)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bias": round(self.bias, 6),
            "weights": [round(float(v), 6) for v in self.weights],
        }


def save_head(path: str | Path, head: LogisticHead, **fields: Any) -> Path:
    """Write ``head`` and ``fields`` (model name, threshold, ...) as one file, atomically:
    JSON for a small head, ``.npz`` (float16 weights, the fields as JSON) for a large one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    if target.suffix == ".npz":
        with tmp.open("wb") as out:
            np.savez_compressed(
                out,
                weights=head.weights.astype(np.float16),
                bias=np.float64(head.bias),
                fields=np.array(json.dumps(fields)),
            )
    else:
        tmp.write_text(json.dumps({**fields, **head.to_dict()}) + "\n")
    tmp.replace(target)
    return target


def _read(file: Path) -> dict[str, Any]:
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as stored:
            data = json.loads(str(stored["fields"]))
            data["weights"] = stored["weights"].astype(np.float32)
            data["bias"] = float(stored["bias"])
        return data
    return json.loads(file.read_text("utf-8"))


def load_head(
    path: str | Path, *, size: int, what: str, rebuild: str
) -> tuple[LogisticHead, dict[str, Any]]:
    """The head stored at ``path`` and the file's other fields; ``size`` weights expected.

    A missing, unreadable or wrong-sized file is a :class:`PersonaConfigError` naming the
    file and the command (``rebuild``) that writes it again.
    """
    file = Path(path)
    try:
        data = _read(file)
        weights, bias = data.pop("weights"), data.pop("bias")
        if len(weights) != size:
            raise ValueError(f"{len(weights)} weights, not {size}")
        head = LogisticHead(weights, bias)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        EOFError,
        zipfile.BadZipFile,
    ) as exc:
        raise PersonaConfigError(
            f"cannot read the {what} {file} ({exc}): rebuild it with `{rebuild}`."
        ) from None
    return head, data
