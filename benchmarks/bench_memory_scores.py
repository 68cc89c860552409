"""Benchmark: what ``LongTermMemory.search``'s score (a cosine similarity) means.

Run with ``python benchmarks/bench_memory_scores.py [files...]`` (default: the LoCoMo dev
conversations in ``../shared/data/locomo-dev``). For every question of categories 1-4,
the cosine similarity of the question to its evidence turns and to every other turn of the
conversation (``speaker: text``, the default embedder), and for a few thresholds the share
of each that a ``min_score`` of that value keeps. The figures behind
:data:`persona_plugin.memory.long_term.SCORE` and the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from persona_plugin.embeddings.minilm import as_embedding_function
from persona_plugin.lab.eval.locomo import load_conversation

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "locomo-dev"


def _unit(rows: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=sorted(DATA.glob("*.json")))
    args = parser.parse_args()
    embed = as_embedding_function(None)
    evidence, others = [], []
    for file in args.files:
        conversation = load_conversation(file)
        ids = [turn.turn_id for turn in conversation.turns]
        turns = _unit(embed([f"{t.speaker}: {t.text}" for t in conversation.turns]))
        questions = [q for q in conversation.questions if q.category in (1, 2, 3, 4)]
        similarity = _unit(embed([q.text for q in questions])) @ turns.T
        position = {turn_id: n for n, turn_id in enumerate(ids)}
        for row, question in zip(similarity, questions, strict=True):
            marked = np.zeros(len(ids), dtype=bool)
            marked[[position[e] for e in question.evidence if e in position]] = True
            evidence.extend(row[marked])
            others.extend(row[~marked])
    hit, rest = np.asarray(evidence), np.asarray(others)
    print(
        f"evidence turns: {hit.size}, median {np.median(hit):.2f}, p10 {np.percentile(hit, 10):.2f}"
    )
    print(
        f"other turns: {rest.size}, median {np.median(rest):.2f}, p99 {np.percentile(rest, 99):.2f}"
    )
    for threshold in (0.2, 0.3, 0.4, 0.5):
        print(
            f"min_score {threshold}: keeps {np.mean(hit >= threshold):.0%} of evidence, "
            f"{np.mean(rest >= threshold):.0%} of other turns"
        )


if __name__ == "__main__":
    main()
