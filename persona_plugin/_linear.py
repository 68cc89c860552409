"""Linear heads over feature vectors: the small classifiers on sentence embeddings.

The reflection cost gate and the injection guard both read a sentence embedding (plus, for
the guard, a few pattern flags) and answer a yes/no question in microseconds. They share
:class:`LogisticHead`: fitted by full-batch gradient descent with the classes balanced,
stored as a few KB of JSON that ships in the package. The feedback reader picks one of
several answers: :class:`SoftmaxHead`, the same fit with one weight column per class.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin.errors import PersonaConfigError


def _rows(
    features: np.ndarray, labels: Sequence[Any], label_type: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A fit's feature rows and labels as arrays, one label per row and at least one row."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=label_type)
    if len(x) != len(y) or not len(x):
        raise ValueError("fit needs as many labels as rows, and at least one row")
    return x, y


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
        x, y = _rows(features, labels, np.float32)
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


class SoftmaxHead:
    """``P(class) = softmax(x @ weights + bias)`` for each row ``x``: one column per class."""

    def __init__(self, weights: np.ndarray, bias: Sequence[float]) -> None:
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """One row per feature row, one column per class, each row summing to 1."""
        if len(features) == 0:
            return np.zeros((0, len(self.bias)), dtype=np.float32)
        logits = np.asarray(features, dtype=np.float32) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: Sequence[int],
        classes: int,
        *,
        epochs: int = 1500,
        learning_rate: float = 2.0,
        l2: float = 3e-4,
    ) -> SoftmaxHead:
        """Fit by full-batch gradient descent; each class weighs the same, whatever its size."""
        x, y = _rows(features, labels, np.int64)
        counts = np.bincount(y, minlength=classes)
        if len(counts) != classes or counts.min() == 0:
            raise ValueError(f"fit needs examples of each of the {classes} classes")
        sample = (1.0 / (classes * counts[y])).astype(np.float32)
        target = np.eye(classes, dtype=np.float32)[y]
        head = cls(np.zeros((x.shape[1], classes), dtype=np.float32), np.zeros(classes))
        for _ in range(epochs):
            error = (head.probabilities(x) - target) * sample[:, None]
            head.weights -= learning_rate * (x.T @ error + l2 * head.weights)
            head.bias -= learning_rate * error.sum(axis=0)
        return head


def save_head(path: str | Path, head: LogisticHead | SoftmaxHead, **fields: Any) -> Path:
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
                bias=np.asarray(head.bias, dtype=np.float64),
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
            bias = stored["bias"]
            data["bias"] = float(bias) if bias.ndim == 0 else bias.astype(np.float32)
        return data
    return json.loads(file.read_text("utf-8"))


def load_head(
    path: str | Path, *, size: int, what: str, rebuild: str, classes: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The head stored at ``path`` and the file's other fields; ``size`` weights expected
    (a :class:`LogisticHead`), or ``size`` rows of ``classes`` columns (a
    :class:`SoftmaxHead`).

    A missing, unreadable or wrong-sized file is a :class:`PersonaConfigError` naming the
    file and the command (``rebuild``) that writes it again.
    """
    file = Path(path)
    try:
        data = _read(file)
        weights, bias = data.pop("weights"), data.pop("bias")
        head: LogisticHead | SoftmaxHead
        if classes is None:
            if len(weights) != size:
                raise ValueError(f"{len(weights)} weights, not {size}")
            head = LogisticHead(weights, bias)
        else:
            shape = np.shape(weights)
            if shape != (size, classes) or np.shape(bias) != (classes,):
                raise ValueError(f"weights of shape {shape}, not {(size, classes)}")
            head = SoftmaxHead(weights, bias)
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
