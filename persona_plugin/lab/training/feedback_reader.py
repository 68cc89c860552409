"""Training of the feedback reader: which edit a comment on a reply asks for, if any.

The reader (:class:`~persona_plugin.reflection.feedback_reader.FeedbackReader`) is trained
on the project's own feedback comments: the written examples of
``data/feedback_examples.yaml`` (many phrasings per edit, a few in other languages, and
comments that teach nothing: thanks, a wrong fact, a correction, a bare "no"), plus
comments composed from :data:`QUALITIES` and the templates below ("way too wordy", "be
more formal", "not detailed enough", "too expensive"), so that the direction a comment
points is seen for many words.

:func:`cross_validate` measures it the way it will be used: five folds, each holding out a
fifth of the written examples and every composed comment built on a fifth of the quality
words; only written examples are scored. :func:`choose_threshold` takes the lowest
threshold at which, across the folds, at most ``max_false_edits`` of the comments that
teach nothing become an edit and at most ``max_wrong_edits`` of the others become the
wrong edit: a missed preference costs one more complaint, a false one changes every reply.

``python -m persona_plugin.lab.training.feedback_reader`` trains it, prints the figures
(and those on ``--held-out FILE``, a YAML of the same form), and writes
``persona_plugin/assets/feedback/feedback-reader.npz`` with the figures inside (committed).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from persona_plugin._linear import SoftmaxHead
from persona_plugin.reflection.feedback_reader import (
    LABELS,
    NOTHING,
    READER_FILE,
    FeedbackReader,
    features,
)

DATA_FILE = Path(__file__).parent / "data" / "feedback_examples.yaml"

#: per quality: its words, the edit a complaint of too much of it asks for ("too wordy" ->
#: concise), and the edit asking for it means ("be more formal" -> formal); None: no edit
QUALITIES: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "long": (
        (
            "long",
            "wordy",
            "verbose",
            "lengthy",
            "rambling",
            "drawn out",
            "padded",
            "bloated",
            "detailed",
            "dense",
            "repetitive",
            "exhaustive",
        ),
        "concise",
        None,  # "more long" is not said: see ASKED_LONG
    ),
    "short": (
        (
            "short",
            "brief",
            "terse",
            "thin",
            "shallow",
            "vague",
            "sparse",
            "superficial",
            "curt",
            "sketchy",
            "basic",
            "skimpy",
        ),
        "detailed",
        "concise",
    ),
    "formal": (
        (
            "formal",
            "stiff",
            "stuffy",
            "corporate",
            "robotic",
            "uptight",
            "proper",
            "serious",
            "businesslike",
            "polite",
            "official",
            "cold",
        ),
        "casual",
        "formal",
    ),
    "casual": (
        (
            "casual",
            "chatty",
            "informal",
            "jokey",
            "flippant",
            "cheeky",
            "silly",
            "familiar",
            "laid-back",
            "relaxed",
            "playful",
            "slangy",
        ),
        "formal",
        "casual",
    ),
    "technical": (
        (
            "technical",
            "complicated",
            "complex",
            "academic",
            "jargony",
            "advanced",
            "convoluted",
            "specialised",
            "nerdy",
            "abstract",
        ),
        "plain language",
        None,  # "more technical" asks for none of the vocabulary
    ),
    "simple": (
        (
            "simple",
            "plain",
            "clear",
            "easy",
            "accessible",
            "straightforward",
            "beginner-friendly",
            "jargon-free",
        ),
        None,  # "too simple" asks for none of the vocabulary
        "plain language",
    ),
}
#: how asking for a long answer sounds
ASKED_LONG = (
    "detailed",
    "thorough",
    "in-depth",
    "complete",
    "comprehensive",
    "elaborate",
    "expansive",
    "extensive",
)
COMPLAINTS = (
    "too {q}",
    "way too {q}",
    "far too {q}",
    "a bit too {q}",
    "overly {q}",
    "much too {q}",
    "less {q} please",
    "not so {q}",
    "don't be so {q}",
    "it's too {q}",
    "this was too {q}",
    "bad, too {q}",
    "too {q}, sorry",
)
REQUESTS = (
    "more {q} please",
    "be more {q}",
    "make it more {q}",
    "could you be more {q}",
    "I'd like it more {q}",
    "a more {q} answer please",
    "keep it {q}",
    "needs to be more {q}",
    "not {q} enough",
    "I prefer {q} answers",
    "{q} answers please",
    "please be {q}",
)
PRAISE = (
    "nice and {q}",
    "love how {q} this is",
    "{q}, thanks",
    "perfectly {q}",
    "good, {q} like I like it",
)
# the same shapes about things that are not how a reply is written: nothing to learn
NOT_STYLE_TOO = (
    "expensive",
    "late",
    "slow",
    "early",
    "risky",
    "buggy",
    "old",
    "hot",
    "cold outside",
    "hard to install",
    "many ads",
)
NOT_STYLE_TOO_SHAPES = ("too {q}", "way too {q}", "it's too {q}")
NOT_STYLE_MORE_SHAPES = ("more {q} please", "give me more {q}")
NOT_STYLE_MORE = ("options", "recipes", "names", "ideas for gifts", "hotels", "flights")


def read_examples(path: Path = DATA_FILE) -> list[tuple[str, str]]:
    """(comment, label) pairs of a YAML file whose keys are :data:`LABELS`."""
    data = yaml.safe_load(path.read_text("utf-8"))
    unknown = set(data) - set(LABELS)
    if unknown:
        raise ValueError(f"{path}: unknown labels {sorted(unknown)}; use {list(LABELS)}")
    return [(str(text), label) for label, texts in data.items() for text in texts]


def composed_examples(seed: int = 0, *, without: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """(comment, label, quality word) triples from :data:`QUALITIES` and the templates,
    leaving out the words in ``without``; comments that teach nothing have word ''."""
    rng = random.Random(f"feedback-{seed}")
    skip = set(without)
    out: list[tuple[str, str, str]] = []

    def add(words: Iterable[str], templates: Sequence[str], count: int, label: str) -> None:
        for word in words:
            if word not in skip:
                for template in rng.sample(list(templates), count):
                    out.append((template.format(q=word), label, word))

    for words, complained, asked in QUALITIES.values():
        if complained:
            add(words, COMPLAINTS, 4, complained)
        if asked:
            add(words, REQUESTS, 3, asked)
            add(words, PRAISE, 1, asked)
    add(ASKED_LONG, REQUESTS, 3, "detailed")
    add(ASKED_LONG, PRAISE, 1, "detailed")
    for thing in NOT_STYLE_TOO:
        out += [(t.format(q=thing), NOTHING, "") for t in NOT_STYLE_TOO_SHAPES]
    for thing in NOT_STYLE_MORE:
        out += [(t.format(q=thing), NOTHING, "") for t in NOT_STYLE_MORE_SHAPES]
    return out


def quality_words() -> list[str]:
    return sorted({w for words, _, _ in QUALITIES.values() for w in words} | set(ASKED_LONG))


class _Embedded:
    """Embeds each text once, however many folds it is in."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.cache: dict[str, np.ndarray] = {}

    def rows(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            self.cache.update(zip(new, self.embedder.embed(new), strict=True))
        return features(texts, np.stack([self.cache[t] for t in texts]))


def _fit(embedded: _Embedded, pairs: Sequence[tuple[str, str]], **fit: Any) -> SoftmaxHead:
    return SoftmaxHead.fit(
        embedded.rows([t for t, _ in pairs]),
        [LABELS.index(label) for _, label in pairs],
        len(LABELS),
        **fit,
    )


def cross_validate(
    written: Sequence[tuple[str, str]], embedder: Any, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Held-out probabilities (one row per written example, one column per label): each
    fold trains without its fifth of the written examples and of the quality words."""
    embedded = _Embedded(embedder)
    order = list(range(len(written)))
    random.Random(seed).shuffle(order)
    words = quality_words()
    random.Random(seed + 1).shuffle(words)
    out = np.zeros((len(written), len(LABELS)), dtype=np.float32)
    for k in range(folds):
        held = set(order[k::folds])
        train = [pair for i, pair in enumerate(written) if i not in held]
        train += [(t, x) for t, x, _ in composed_examples(seed, without=words[k::folds])]
        head = _fit(embedded, train)
        rows = sorted(held)
        out[rows] = head.probabilities(embedded.rows([written[i][0] for i in rows]))
    return out


def measure(probabilities: np.ndarray, labels: Sequence[str], threshold: float) -> dict[str, Any]:
    """Accuracy; how many comments that teach nothing became an edit (false edits); how many
    of the others became their edit (recall) or another one (wrong edits)."""
    truth = np.array([LABELS.index(x) for x in labels])
    best = probabilities.argmax(axis=1)
    read = np.where((best != 0) & (probabilities.max(axis=1) >= threshold), best, 0)
    silent, asks = truth == 0, truth != 0
    wrong = (read[asks] != 0) & (read[asks] != truth[asks])
    return {
        "examples": len(truth),
        "accuracy": round(float((read == truth).mean()), 3),
        "false_edit_rate": round(float((read[silent] != 0).mean()), 3),
        "edit_recall": round(float((read[asks] == truth[asks]).mean()), 3),
        "wrong_edit_rate": round(float(wrong.mean()), 3),
    }


def choose_threshold(
    probabilities: np.ndarray,
    labels: Sequence[str],
    *,
    max_false_edits: float = 0.02,
    max_wrong_edits: float = 0.05,
) -> float:
    """The lowest threshold (0.30 to 0.95, by 0.05) within both bounds (the highest if none)."""
    grid = [round(0.30 + 0.05 * i, 2) for i in range(14)]
    for threshold in grid:
        figures = measure(probabilities, labels, threshold)
        if (
            figures["false_edit_rate"] <= max_false_edits
            and figures["wrong_edit_rate"] <= max_wrong_edits
        ):
            return threshold
    return grid[-1]


def train_reader(
    embedder: Any = None,
    *,
    max_false_edits: float = 0.02,
    max_wrong_edits: float = 0.05,
    seed: int = 0,
) -> FeedbackReader:
    """The reader trained on every example, at the threshold cross-validation chose, with
    the cross-validated figures in ``figures``."""
    if embedder is None:
        from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

        embedder = MiniLMEmbeddingFunction()
    written = read_examples()
    labels = [label for _, label in written]
    held_out = cross_validate(written, embedder, seed=seed)
    threshold = choose_threshold(
        held_out, labels, max_false_edits=max_false_edits, max_wrong_edits=max_wrong_edits
    )
    examples = written + [(t, x) for t, x, _ in composed_examples(seed)]
    reader = FeedbackReader.train(
        [t for t, _ in examples], [x for _, x in examples], embedder=embedder, threshold=threshold
    )
    reader.figures = {"cross_validation": measure(held_out, labels, threshold)}
    reader.figures["training_examples"] = len(examples)
    return reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the feedback reader.")
    parser.add_argument("--out", type=Path, default=READER_FILE)
    parser.add_argument("--max-false-edits", type=float, default=0.02)
    parser.add_argument("--max-wrong-edits", type=float, default=0.05)
    parser.add_argument("--held-out", type=Path, help="a YAML of comments by label to measure on")
    args = parser.parse_args(argv)
    reader = train_reader(
        max_false_edits=args.max_false_edits, max_wrong_edits=args.max_wrong_edits
    )
    print(f"threshold {reader.threshold} (chosen by 5-fold cross-validation)")
    print("cross-validation:", json.dumps(reader.figures["cross_validation"]))
    if args.held_out:
        pairs = read_examples(args.held_out)
        rows = reader.probabilities([t for t, _ in pairs])
        print("held out:", json.dumps(measure(rows, [x for _, x in pairs], reader.threshold)))
    print(f"written to {reader.save(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
