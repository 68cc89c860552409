"""The feedback reader: what a comment on a reply asks of the next ones, without an LLM call.

A user's feedback on a reply ("too long", "can you use bullets", "thanks") mostly says one
of a few things about how they want replies. :class:`FeedbackReader` maps a feedback event
onto one edit of the closed vocabulary :data:`FEEDBACK_OPS` (``preference.style`` concise,
detailed, casual, formal, plain language; ``preference.format`` bullet points) or onto
nothing to learn. It is what the local model's reflector reads feedback with: one
embedding and a product with a small matrix, milliseconds on CPU.

How it reads:

* the **comment** (of a rating, a regenerate, an edit): a softmax regression over the
  local sentence embedding (all-MiniLM-L6-v2) and a few cheap text features. The
  embedding knows the topic (length, tone, jargon, layout) but hardly which way a comment
  points: "too formal" and "more formal please" embed almost alike. So two flags, whether
  the comment holds a word that complains of the quality it names ("too", "less", "no",
  "trop", ...) or asks for it ("more", "please", "love", ...), each also multiply the
  embedding, which lets the linear head flip a direction; hashed word and character
  n-grams add the words themselves. A reading below the threshold is nothing: the
  threshold was chosen by cross-validation for few false edits.
* an **edit** without a telling comment: its length against the reply's, as code measured
  it (:attr:`~persona_plugin.reflection.types.FeedbackNote.length_change`): much shorter
  is concise, much longer detailed. Code measures this; nothing is learned for it.

Neither a bare rating nor a choice says what to change: nothing is read from them. A
comment the guard reads as instructions to the assistant (or one the reflection was shown
as withheld) is not read.

``python -m persona_plugin.lab.training.feedback_reader`` trains it on the project's own
feedback examples and writes ``persona_plugin/assets/feedback/feedback-reader.npz``
(committed; its cross-validated figures are stored in it).
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from persona_plugin._linear import SoftmaxHead, load_head, save_head
from persona_plugin.config import ASSETS_DIR
from persona_plugin.guard import WITHHELD, instruction_reason
from persona_plugin.reflection.types import FeedbackNote

#: the edits feedback may make without the user's own words for them: a closed vocabulary.
#: "too long" names what the user wants by its opposite, so no value need appear in it
FEEDBACK_PATHS: dict[str, str] = {
    "concise": "preference.style",
    "detailed": "preference.style",
    "casual": "preference.style",
    "formal": "preference.style",
    "plain language": "preference.style",
    "bullet points": "preference.format",
}
FEEDBACK_OPS: frozenset[tuple[str, str]] = frozenset(
    (path, value) for value, path in FEEDBACK_PATHS.items()
)
#: the answers of the reader: nothing to learn, or one value of :data:`FEEDBACK_PATHS`
NOTHING = "nothing"
LABELS: tuple[str, ...] = (NOTHING, *FEEDBACK_PATHS)
#: values that contradict each other: a new one replaces the other in the persona
OPPOSITES: dict[str, str] = {
    "concise": "detailed",
    "detailed": "concise",
    "casual": "formal",
    "formal": "casual",
}

READER_FILE = ASSETS_DIR / "feedback" / "feedback-reader.npz"
#: an edit is read from a comment when the top answer's probability is at least this (the
#: shipped file stores the threshold its training chose)
DEFAULT_THRESHOLD = 0.5
_REBUILD = "python -m persona_plugin.lab.training.feedback_reader"

EMBEDDING_SIZE = 384
NGRAM_BUCKETS = 2048
#: embedding, the embedding times each cue flag, the two flags, the hashed n-grams
FEATURE_SIZE = 3 * EMBEDDING_SIZE + 2 + NGRAM_BUCKETS

# words that complain of the quality they come with ("too long", "less jargon", "no
# emojis", "trop long") and words that ask for it ("more detail", "shorter please", "love
# the bullets", "plus court"): a closed class of small words, in the few languages the
# training examples have
COMPLAINS = re.compile(
    r"\b(too|overly|excessively|less|fewer|no|without|stop|cut|drop|skip|avoid|very|trop"
    r"|demasiado|demasiada|zu|troppo|muito|muy|sehr|molto|très|moins|menos|weniger|meno"
    r"|sans|sin|sem|ohne|senza)\b"
)
ASKS = re.compile(
    r"\b(more|keep|be|please|enough|need|needs|needed|want|wanted|prefer|love|loved|nice"
    r"|great|perfect|make it|shorter|longer|simpler|briefer|clearer|easier|plus|más|mehr"
    r"|più|mais|assez|genug)\b"
)
_WORDS = re.compile(r"[\w'-]+|[^\w\s]")


def cue_flags(text: str) -> tuple[float, float]:
    """Whether the text holds a word that complains of a quality, and one that asks for it."""
    folded = text.casefold()
    return float(bool(COMPLAINS.search(folded))), float(bool(ASKS.search(folded)))


def ngram_vector(text: str, buckets: int = NGRAM_BUCKETS) -> np.ndarray:
    """Words, word pairs and 4-character pieces of words, hashed into ``buckets``
    (crc32: the same on every machine), L2-normalised."""
    words = _WORDS.findall(text.casefold())
    bounded = ["<s>", *words, "</s>"]
    pieces = [*words, *(f"{a} {b}" for a, b in itertools.pairwise(bounded))]
    for word in words:
        marked = f"<{word}>"
        pieces.extend(marked[i : i + 4] for i in range(len(marked) - 3))
    vector = np.zeros(buckets, dtype=np.float32)
    for piece in pieces:
        vector[zlib.crc32(piece.encode()) % buckets] += 1.0
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


def features(texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
    """The reader's feature rows for ``texts`` and their sentence embeddings."""
    if not len(texts):
        return np.zeros((0, FEATURE_SIZE), dtype=np.float32)
    e = np.asarray(embeddings, dtype=np.float32)
    cues = np.array([cue_flags(t) for t in texts], dtype=np.float32)
    grams = np.stack([ngram_vector(t) for t in texts])
    return np.hstack([e, cues[:, :1] * e, cues[:, 1:] * e, cues, grams])


@dataclass(frozen=True)
class FeedbackReading:
    """The edit one feedback event asks for."""

    path: str
    value: str
    #: the reader's probability for it (1.0 for an edit's length, which code measured)
    probability: float
    #: what it was read from: the comment, or an edit's length against the reply's
    source: Literal["comment", "length"]
    #: the words it was read from: the comment, or the measured length change
    read_from: str


class FeedbackReader:
    """Reads a feedback event (``read(note)``) or a comment (``read_comment(text)``)."""

    def __init__(
        self,
        head: SoftmaxHead,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        embedder: Any = None,
        figures: dict[str, Any] | None = None,
    ) -> None:
        self.head = head
        self.threshold = threshold
        self._embedder = embedder
        #: what training measured (cross-validation), as stored with the head
        self.figures = figures or {}

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

            self._embedder = MiniLMEmbeddingFunction()
        return self._embedder

    def probabilities(self, comments: Sequence[str]) -> np.ndarray:
        """One row per comment, one column per :data:`LABELS` entry."""
        texts = [" ".join(c.split()) for c in comments]
        if not texts:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        return self.head.probabilities(features(texts, self.embedder.embed(texts)))

    def read_comments(self, comments: Sequence[str]) -> list[tuple[str, float]]:
        """Per comment, the label it reads as (:data:`NOTHING` below the threshold) and the
        top probability."""
        rows = self.probabilities(comments)
        out = []
        for row in rows:
            best = int(row.argmax())
            label = LABELS[best] if row[best] >= self.threshold else NOTHING
            out.append((label, float(row[best])))
        return out

    def read_comment(self, comment: str) -> tuple[str, float]:
        return self.read_comments([comment])[0]

    def read(self, note: FeedbackNote) -> FeedbackReading | None:
        """The edit a feedback event asks for, or None: the comment first (the user's own
        words), else an edit's length."""
        comment = " ".join((note.comment or "").split())
        if comment and comment != WITHHELD and not instruction_reason(comment):
            label, probability = self.read_comment(comment)
            if label != NOTHING:
                return FeedbackReading(
                    FEEDBACK_PATHS[label], label, probability, "comment", comment
                )
        change = note.length_change if note.kind == "edit" and note.text != WITHHELD else None
        if change:
            value = "concise" if change == "shorter" else "detailed"
            return FeedbackReading(
                FEEDBACK_PATHS[value], value, 1.0, "length", f"an edit much {change}"
            )
        return None

    # -- training and storage -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        embedder: Any = None,
        threshold: float = DEFAULT_THRESHOLD,
        **fit: Any,
    ) -> FeedbackReader:
        """Fit the head on the comments (classes balanced); ``labels`` from :data:`LABELS`."""
        if len(texts) != len(labels) or not texts:
            raise ValueError("train needs as many labels as texts, and at least one text")
        unknown = set(labels) - set(LABELS)
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}: use those of LABELS")
        reader = cls(SoftmaxHead(np.zeros((1, 1)), [0.0]), threshold=threshold, embedder=embedder)
        rows = features(texts, reader.embedder.embed(list(texts)))
        reader.head = SoftmaxHead.fit(rows, [LABELS.index(x) for x in labels], len(LABELS), **fit)
        return reader

    def save(self, path: str | Path = READER_FILE) -> Path:
        return save_head(
            path,
            self.head,
            model="softmax regression on all-MiniLM-L6-v2 embeddings, cue flags, n-grams",
            labels=list(LABELS),
            threshold=self.threshold,
            figures=self.figures,
        )

    @classmethod
    def load(
        cls, path: str | Path = READER_FILE, *, threshold: float | None = None, embedder: Any = None
    ) -> FeedbackReader:
        """The stored reader (default: the one that ships in the package)."""
        head, data = load_head(
            path, size=FEATURE_SIZE, classes=len(LABELS), what="feedback reader", rebuild=_REBUILD
        )
        if data.get("labels", list(LABELS)) != list(LABELS):
            from persona_plugin.errors import PersonaConfigError

            raise PersonaConfigError(
                f"the feedback reader {path} answers {data['labels']}, not {list(LABELS)}: "
                f"rebuild it with `{_REBUILD}`."
            )
        chosen = data.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
        return cls(head, threshold=chosen, embedder=embedder, figures=data.get("figures"))
