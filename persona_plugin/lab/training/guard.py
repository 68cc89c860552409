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

from persona_plugin._linear import HiddenLayerHead, LogisticHead, save_head
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
    texts, labels, _ = training_examples(directory)
    return texts, labels


def training_examples(directory: Path = EXAMPLES_DIR) -> tuple[list[str], list[bool], list[str]]:
    """:func:`training_set`, and the name of the file each example comes from."""
    instructions: dict[str, str] = {}
    benign: dict[str, str] = {}
    for path in sorted(directory.glob("guard_examples*.yaml")):
        data = yaml.safe_load(path.read_text("utf-8"))
        instructions.update(dict.fromkeys(data["instruction"] or [], path.stem))
        benign.update(dict.fromkeys(data["benign"] or [], path.stem))
    both = instructions.keys() & benign.keys()
    kept = [t for t in instructions if t not in both]
    safe = [t for t in benign if t not in both]
    sources = [instructions[t] for t in kept] + [benign[t] for t in safe]
    return kept + safe, [True] * len(kept) + [False] * len(safe), sources


#: the feature columns of the guard's pattern flags
PATTERN_COLUMNS = slice(EMBEDDING_SIZE + BUCKETS, EMBEDDING_SIZE + BUCKETS + len(PATTERN_NAMES))
#: the head: a logistic part and a tanh layer of this many units over the same features,
#: fitted together by full-batch Adam. Measured by 5-fold cross-validation on the examples
#: (at most 3% of benign refused): 0.837 of instructions caught by the logistic head alone,
#: 0.844 with the layer, 0.768 with the layer on the embedding and flags only (no n-grams)
FIT = {"units": 32, "epochs": 200, "learning_rate": 3e-3, "l2": 1e-4}


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    units: int,
    epochs: int,
    learning_rate: float,
    l2: float,
    seed: int = 0,
) -> HiddenLayerHead:
    """A :class:`HiddenLayerHead` fitted on ``features`` (torch, on the CPU)."""
    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    linear = torch.nn.Linear(x.shape[1], 1)
    hidden = torch.nn.Linear(x.shape[1], units)
    out = torch.nn.Linear(units, 1)
    parameters = [*linear.parameters(), *hidden.parameters(), *out.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = (linear(x) + out(torch.tanh(hidden(x)))).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 * sum((p**2).sum() for p in parameters if p.dim() > 1)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return HiddenLayerHead(
            linear.weight[0].numpy(),
            float(linear.bias[0]),
            hidden.weight.T.numpy(),
            hidden.bias.numpy(),
            out.weight[0].numpy(),
            float(out.bias[0]),
        )


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each example's probability from a head fitted without it (``folds``-fold)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    out = np.zeros(len(labels), dtype=np.float32)
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held)
        head = fit_head(features[kept], labels[kept], **FIT, seed=seed)
        out[held] = head.probabilities(features[held])
    return out


#: the examples file of plain conversation: held to its own, lower refusal budget
ORDINARY = "guard_examples_ordinary"


def pick_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    matched: np.ndarray,
    max_refused: float,
    groups: np.ndarray | None = None,
    budgets: dict[str, float] | None = None,
) -> tuple[float, float]:
    """The (threshold, pattern threshold) pair that catches the most instructions while
    refusing at most ``max_refused`` of the benign examples, ties going to the higher pair.
    With ``groups`` (one name per example), each group of benign examples is held to its
    own budget (``budgets``, else ``max_refused``): easy benign examples (plain chat) must
    not buy room for refusing more of the hard ones (look-alikes), nor the other way."""
    groups = np.zeros(len(labels), dtype=str) if groups is None else np.asarray(groups)
    budgets = budgets or {}
    benign_groups = [
        ((groups == g) & ~labels, budgets.get(str(g), max_refused))
        for g in np.unique(groups[~labels])
    ]
    grid = np.round(np.arange(0.05, 0.99, 0.01), 2)
    best: tuple[float, float, float] = (-1.0, 0.99, 0.99)
    for threshold in grid:
        for pattern_threshold in grid[grid <= threshold]:
            refused = np.where(
                matched, probabilities >= pattern_threshold, probabilities >= threshold
            )
            if any(refused[rows].mean() > budget for rows, budget in benign_groups):
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
    # 0.03, what the guard may refuse of benign texts: cross-validated on the examples, the
    # head caught 0.797 of instructions at 0.02, 0.819 at 0.025 and 0.844 at 0.03
    parser.add_argument(
        "--max-benign-refused",
        type=float,
        default=0.03,
        help="at most this share of the look-alike benign examples refused (out of fold)",
    )
    parser.add_argument(
        "--max-ordinary-refused",
        type=float,
        default=0.01,
        help=f"at most this share of plain conversation ({ORDINARY}.yaml) refused",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    texts, labels, sources = training_examples(args.examples)
    y = np.asarray(labels)
    classifier = InstructionClassifier(LogisticHead(np.zeros(1), 0.0), threshold=0.5)
    x = classifier.features(texts)
    oof = out_of_fold(x, y, args.folds, args.seed)
    matched = x[:, PATTERN_COLUMNS].max(axis=1) > 0
    kinds = np.asarray(["ordinary" if s == ORDINARY else "look-alike" for s in sources])
    threshold, pattern_threshold = pick_thresholds(
        oof, y, matched, args.max_benign_refused, kinds, {"ordinary": args.max_ordinary_refused}
    )
    refused = np.where(matched, oof >= pattern_threshold, oof >= threshold)
    print(
        f"{int(y.sum())} instructions, {int((~y).sum())} benign; {args.folds}-fold "
        f"cross-validated at thresholds {threshold:.2f} (pattern matched: "
        f"{pattern_threshold:.2f}): instructions caught {refused[y].mean():.3f}, benign "
        f"refused {refused[~y].mean():.3f}"
    )
    for source in sorted(set(sources)):
        rows = np.asarray(sources) == source
        shares = [refused[rows & y], refused[rows & ~y]]
        caught, benign_refused = (f"{r.mean():.3f}" if len(r) else "-" for r in shares)
        print(f"  {source}: instructions caught {caught}, benign refused {benign_refused}")
    for text in [t for t, r, lab in zip(texts, refused, y, strict=True) if r != lab][:40]:
        print(f"  misread: {text[:100]!r}")
    head = fit_head(x, y, **FIT, seed=args.seed)
    target = save_head(
        args.out,
        head,
        model=f"logistic regression with a tanh layer of {FIT['units']} units on "
        "all-MiniLM-L6-v2 embeddings, hashed n-grams, the guard's patterns and concepts",
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
