"""The bundled demo preference models: their cards, their pairs, and the script that
rebuilds them.

The demo models (``brevity``, ``formality``, ``warmth``) are trained from pairs built out of
the project-written material in ``persona_plugin/assets/prefs/pairs/demo.yaml``;
``python -m persona_plugin.lab.training.preferences`` rebuilds the bundled ones, and
``persona prefs train --demo`` trains them into the user's hub. The training itself is
:mod:`persona_plugin.preferences.training`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from persona_plugin.preferences.cards import BUNDLED_DIR, PreferenceCard
from persona_plugin.preferences.scorers import CandidateEmbeddings
from persona_plugin.preferences.training import (
    HeadType,
    PreferencePair,
    TrainingReport,
    train_model,
)

DEMO_DATA = BUNDLED_DIR / "pairs" / "demo.yaml"

#: the demo models' cards, less scorer and location (filled in by training)
DEMO_CARDS: dict[str, dict[str, Any]] = {
    "brevity": {
        "description": "Brief, concise, short, to-the-point answers without padding.",
        "opposite": "Detailed, thorough, in-depth, long answers with complete explanations.",
        "kind": "style",
        "tags": ["concise", "short", "brief"],
    },
    "formality": {
        "description": "Formal, professional, polite register; precise wording, no slang.",
        "opposite": "Casual, informal, relaxed register with slang and contractions.",
        "kind": "style",
        "tags": ["formal", "professional"],
    },
    "warmth": {
        "description": "Warm, friendly, encouraging, empathetic tone that cares about the user.",
        "opposite": "Cold, neutral, impersonal, matter-of-fact tone without pleasantries.",
        "kind": "behaviour",
        "tags": ["warm", "friendly", "kind"],
    },
}


def demo_pairs(data_file: str | os.PathLike[str] = DEMO_DATA) -> dict[str, list[PreferencePair]]:
    """The demo models' pairs, built from the project-written material (deterministic)."""
    data = yaml.safe_load(Path(data_file).read_text(encoding="utf-8"))
    topics, warmth = data["topics"], data["warmth"]
    brevity, formality, warm = [], [], []
    for i, t in enumerate(topics):
        q, formal, casual = t["question"], t["formal"], t["casual"]
        one, both = t["details"][0], " ".join(t["details"])
        long_formal, long_casual = f"{formal} {both}", f"{casual} {both}"
        brevity += [
            PreferencePair(q, formal, long_formal),
            PreferencePair(q, casual, long_casual),
            PreferencePair(q, casual, f"{formal} {one}"),
        ]
        formality += [
            PreferencePair(q, formal, casual),
            PreferencePair(q, long_formal, long_casual),
            PreferencePair(q, formal, f"{casual} {one}"),
            PreferencePair(q, long_formal, casual),
        ]
        k = len(warmth["warm_openers"])
        for j, core in enumerate((formal, casual)):
            w, c = (i + j) % k, (i + 2 * j + 1) % k
            warm += [
                PreferencePair(
                    q, f"{warmth['warm_openers'][w]} {core}", f"{warmth['cold_openers'][c]} {core}"
                ),
                PreferencePair(
                    q, f"{core} {warmth['warm_closers'][w]}", f"{core} {warmth['cold_closers'][c]}"
                ),
            ]
    return {"brevity": brevity, "formality": formality, "warmth": warm}


def train_demo_models(
    out_dir: str | os.PathLike[str] = BUNDLED_DIR,
    embeddings: CandidateEmbeddings | None = None,
    *,
    head: HeadType = "linear",
) -> list[tuple[PreferenceCard, TrainingReport]]:
    """Train brevity, formality and warmth from the demo pairs into ``out_dir``."""
    embeddings = embeddings or CandidateEmbeddings()
    pairs = demo_pairs()
    return [
        train_model(
            {"id": model_id, **DEMO_CARDS[model_id]},
            pairs[model_id],
            out_dir,
            embeddings,
            head=head,
        )
        for model_id in DEMO_CARDS
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo preference models.")
    parser.add_argument("--out", default=str(BUNDLED_DIR), help="where to write heads and cards")
    parser.add_argument("--head", choices=["linear", "mlp"], default="linear")
    args = parser.parse_args(argv)
    for card, report in train_demo_models(args.out, head=args.head):
        held = "-" if report.heldout_accuracy is None else f"{report.heldout_accuracy:.2f}"
        print(
            f"{card.id:10s} {report.pairs:3d} pairs  train acc {report.train_accuracy:.2f}  "
            f"held-out acc {held}  {report.seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
