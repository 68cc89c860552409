"""Training of the guard's classifier: instructions to the assistant vs data about the user.

The examples (``data/guard_examples*.yaml``) are written by the project: instructions that
would change the assistant's role, permissions, disclosure, identity or tool execution, in
many phrasings, in the third person as a reflection would record them, and in several
languages; and benign texts, most of them look-alikes (corrections such as "ignore the
above, I mistyped my age", "System: Ubuntu 22.04", "I own a jailbroken iPhone", style
preferences phrased as commands). :func:`main` fits the head on their features (the
embedding, hashed n-grams, the guard's pattern and concept flags), picks the threshold
from out-of-fold probabilities (the lowest that refuses at most ``--max-benign-refused``
of the benign examples), reports the cross-validated figures and writes the classifier file.

``python -m persona_plugin.lab.training.guard`` writes
``persona_plugin/assets/guard/guard-classifier.npz`` (committed; float16 weights). The guard's
own figures are measured on a separate, independently written set by
``benchmarks/bench_guard.py``; nothing here reads that set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from persona_plugin._linear import LogisticHead, save_head
from persona_plugin.guard.classifier import (
    EMBEDDING_SIZE,
    GUARD_FILE,
    InstructionClassifier,
)
from persona_plugin.guard.features import BUCKETS, CONCEPT_NAMES
from persona_plugin.guard.patterns import PATTERN_NAMES

EXAMPLES_DIR = Path(__file__).with_name("data")


def training_set(directory: Path = EXAMPLES_DIR) -> tuple[list[str], list[bool]]:
    """The example texts of every ``guard_examples*.yaml`` in ``directory``, and their
    labels (True: an instruction to the assistant); a text labelled both ways is dropped."""
    instructions: dict[str, None] = {}
    benign: dict[str, None] = {}
    for path in sorted(directory.glob("guard_examples*.yaml")):
        data = yaml.safe_load(path.read_text("utf-8"))
        instructions.update(dict.fromkeys(data["instruction"]))
        benign.update(dict.fromkeys(data["benign"]))
    both = instructions.keys() & benign.keys()
    kept = [t for t in instructions if t not in both]
    safe = [t for t in benign if t not in both]
    return kept + safe, [True] * len(kept) + [False] * len(safe)


#: the feature columns of the guard's pattern flags
PATTERN_COLUMNS = slice(EMBEDDING_SIZE + BUCKETS, EMBEDDING_SIZE + BUCKETS + len(PATTERN_NAMES))
#: full-batch gradient descent; n-gram features are many and small, so steps are long
FIT = {"epochs": 3000, "learning_rate": 8.0, "l2": 1e-4}


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each example's probability from a head fitted without it (``folds``-fold)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    out = np.zeros(len(labels), dtype=np.float32)
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held)
        head = LogisticHead.fit(features[kept], labels[kept], **FIT)
        out[held] = head.probabilities(features[held])
    return out


def pick_thresholds(
    probabilities: np.ndarray, labels: np.ndarray, matched: np.ndarray, max_refused: float
) -> tuple[float, float]:
    """The (threshold, pattern threshold) pair that catches the most instructions while
    refusing at most ``max_refused`` of the benign examples (ties: the higher pair)."""
    grid = np.round(np.arange(0.05, 0.99, 0.01), 2)
    best: tuple[float, float, float] = (-1.0, 0.99, 0.99)
    for threshold in grid:
        for pattern_threshold in grid[grid <= threshold]:
            refused = np.where(
                matched, probabilities >= pattern_threshold, probabilities >= threshold
            )
            if refused[~labels].mean() > max_refused:
                continue
            caught = float(refused[labels].mean())
            if caught > best[0] or (caught == best[0] and threshold > best[1]):
                best = (caught, float(threshold), float(pattern_threshold))
    return best[1], best[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the guard's classifier.")
    parser.add_argument("--out", type=Path, default=GUARD_FILE)
    parser.add_argument("--examples", type=Path, default=EXAMPLES_DIR)
    parser.add_argument("--folds", type=int, default=5)
    # 0.02: on the shipped embedding, the cross-validated figures were 0.756 of instructions
    # caught at 0.01 of benign refused, 0.836 at 0.02 and 0.877 at 0.03 (the issue allows
    # 0.03 on the independent set; the remaining margin is left to the patterns)
    parser.add_argument("--max-benign-refused", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    texts, labels = training_set(args.examples)
    y = np.asarray(labels)
    classifier = InstructionClassifier(LogisticHead(np.zeros(1), 0.0), threshold=0.5)
    x = classifier.features(texts)
    oof = out_of_fold(x, y, args.folds, args.seed)
    matched = x[:, PATTERN_COLUMNS].max(axis=1) > 0
    threshold, pattern_threshold = pick_thresholds(oof, y, matched, args.max_benign_refused)
    refused = np.where(matched, oof >= pattern_threshold, oof >= threshold)
    print(
        f"{int(y.sum())} instructions, {int((~y).sum())} benign; {args.folds}-fold "
        f"cross-validated at thresholds {threshold:.2f} (pattern matched: "
        f"{pattern_threshold:.2f}): instructions caught {refused[y].mean():.3f}, benign "
        f"refused {refused[~y].mean():.3f}"
    )
    for text in [t for t, r, lab in zip(texts, refused, y, strict=True) if r != lab][:40]:
        print(f"  misread: {text[:100]!r}")
    head = LogisticHead.fit(x, y, **FIT)
    target = save_head(
        args.out,
        head,
        model="logistic regression on all-MiniLM-L6-v2 embeddings, hashed n-grams, the "
        "guard's patterns and concepts",
        patterns=list(PATTERN_NAMES),
        concepts=list(CONCEPT_NAMES),
        threshold=threshold,
        pattern_threshold=pattern_threshold,
        examples={"instruction": int(y.sum()), "benign": int((~y).sum())},
    )
    print(f"written to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
