"""Training of the reflection cost gate: which turns are worth a reflection call.

The gate (:class:`~persona_plugin.reflection.gate.ReflectionGate`) is trained on the project's
own synthetic turns (:mod:`persona_plugin.lab.training.reflection_data`: disclosures are
positive; small talk, questions and instruction injections negative) plus
:data:`SMALL_TALK`: reactions, questions back, requests for information and sign-offs, the
shapes most chat turns take. :func:`training_set` builds the texts and labels. :func:`main`
trains the gate, reports how many held-out disclosures it sends and how many silent turns it
skips, and writes the gate file.

``python -m persona_plugin.lab.training.gate`` retrains it and writes
``persona_plugin/assets/gate/reflection-gate.json`` (committed; a few KB). Training lives in
the lab, apart from the gate, so loading the gate at serve time never imports the
training data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from persona_plugin.lab.training.reflection_data import build_examples
from persona_plugin.reflection.gate import DEFAULT_THRESHOLD, GATE_FILE, ReflectionGate

# more turns that teach nothing, beyond the reflection data's: reactions, questions back,
# requests for information, sign-offs (the shapes most chat turns take)
SMALL_TALK = (
    "Wow, that's awesome!",
    "Congrats, you must be so proud!",
    "That sounds like so much fun.",
    "Haha, no way!",
    "What did you do after that?",
    "How did that make you feel?",
    "That's really inspiring, thanks for sharing.",
    "I'm so happy for you!",
    "Oh wow, where was that?",
    "Did you enjoy it?",
    "That's a beautiful photo!",
    "Good luck with everything!",
    "I totally get that.",
    "Same here, honestly.",
    "Let me know how it goes!",
    "Take care, talk to you later.",
    "What are your plans for the weekend?",
    "How's your family doing?",
    "Sounds tough, hang in there.",
    "That's so sweet of them.",
    "Can you recommend a good book?",
    "What's a quick recipe for dinner?",
    "How do I reset my password?",
    "Translate 'good morning' into Spanish.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
    "Okay, thanks!",
    "Cool, got it.",
    "Yes, please continue.",
    "Can you make it shorter?",
    "Nice, keep going.",
    "Hmm, interesting point.",
)


def training_set(
    count: int = 800, *, split: str = "train", seed: int = 0
) -> tuple[list[str], list[bool]]:
    """Texts and labels (discloses or not): the synthetic reflection data of ``split``, and
    for training also :data:`SMALL_TALK`."""
    examples = build_examples(
        count,
        split=split,  # type: ignore[arg-type]
        seed=seed,
        nothing_share=0.3,
        injection_share=0.1,
    )
    texts = [e.text for e in examples]
    labels = [e.discloses for e in examples]
    if split == "train":
        texts += SMALL_TALK
        labels += [False] * len(SMALL_TALK)
    return texts, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the reflection cost gate.")
    parser.add_argument("--out", type=Path, default=GATE_FILE)
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args(argv)
    texts, labels = training_set(args.examples)
    gate = ReflectionGate.train(texts, labels, threshold=args.threshold)
    held_texts, held_labels = training_set(200, split="eval")
    sent = gate.probabilities(held_texts) >= gate.threshold
    truth = np.asarray(held_labels)
    print(
        f"held out: disclosures sent {sent[truth].mean():.3f}, "
        f"silent turns skipped {(~sent[~truth]).mean():.3f}"
    )
    print(f"written to {gate.save(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
