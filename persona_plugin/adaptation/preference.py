"""A user's own preference model, trained from their feedback, gated, versioned.

Once a user's log gives at least ``min_pairs`` preference pairs (default 8,
:mod:`persona_plugin.adaptation.data`), a Bradley-Terry embedding head
(:func:`~persona_plugin.preferences.training.train_head`) is trained on the older 80% of
them. The gate holds out the newest 20% (at least 2) and compares, pair by pair, which reply
MBR decoding would pick between the two:

* **serving**: the mixture that serves the user now (retrieved from their persona, with
  their current own model, if any, at its share);
* **candidate**: the same mixture with the candidate in the own model's place (it takes
  :data:`~persona_plugin.preferences.retrieval.OWN_WEIGHT` of it; all of it when nothing
  else is retrieved).

Accuracy is the share of held-out pairs where the user's reply wins (a tie counts half).
The candidate is promoted only if its accuracy is strictly higher; either way it becomes a
version (:class:`~persona_plugin.cards.owned.OwnedCards`) whose card records both figures,
the candidate alone, the counts and the span of data it was trained on, so a rejected
candidate is auditable too (its model file is not kept). The promoted model is the one
evaluated (trained on the older 80%); the next run trains on what was held out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persona_plugin.adaptation.data import (
    HOLDOUT,
    LoggedPair,
    TrainingData,
    persona_of,
    split,
    training_data,
)
from persona_plugin.cards.owned import OwnedCards, owned_id
from persona_plugin.cards.retrieval import mix_in_own
from persona_plugin.persona import Persona
from persona_plugin.preferences.cards import parse_card
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.mbr import MBRSelector
from persona_plugin.preferences.retrieval import (
    PreferenceMixture,
    PreferenceRetriever,
    RetrievedPreference,
)
from persona_plugin.preferences.scorers import EmbeddingHeadScorer, PreferenceScorer
from persona_plugin.preferences.training import train_head

#: a user needs this many preference pairs before a model of their own is trained
MIN_PAIRS = 8
#: what a Bradley-Terry head needs to train on, after the held-out pairs
MIN_TRAIN_PAIRS = 4
KIND = "preference"


@dataclass
class AdaptationResult:
    """What one adaptation run did for one user and kind."""

    user_id: str
    kind: str
    status: str  # promoted, rejected, skipped (not enough data) or planned (a dry run)
    reason: str
    version: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "figures": self.figures,
        }


def _span(pairs: list[LoggedPair]) -> list[str] | None:
    return [pairs[0].created_at, pairs[-1].created_at] if pairs else None


def adapt_preference_model(
    user_id: str,
    *,
    log: Any,
    hub: PreferenceHub,
    store: Any = None,
    owned: OwnedCards | None = None,
    min_pairs: int = MIN_PAIRS,
    holdout: float = HOLDOUT,
    dry_run: bool = False,
    data: TrainingData | None = None,
) -> AdaptationResult:
    """Train, gate and version ``user_id``'s own preference model (see the module).

    ``store``: where the user's persona is (what retrieval reads for the serving mixture);
    ``owned``: where versions go (default: the hub's). ``dry_run`` says what would train
    and why, touching nothing.
    """
    owned = owned or hub.owned
    data = data or training_data(log, user_id, embeddings=hub.embeddings)
    pairs = data.pairs
    counts = {
        "pairs": len(pairs),
        "min_pairs": min_pairs,
        "sources": data.sources(),
        "left_out": dict(data.left_out),
    }
    if len(pairs) < min_pairs:
        return AdaptationResult(
            user_id,
            KIND,
            "skipped",
            f"{len(pairs)} preference pairs, fewer than {min_pairs}",
            figures=counts,
        )
    train, held = split(pairs, holdout)
    counts |= {"train_pairs": len(train), "heldout_pairs": len(held)}
    if len(train) < MIN_TRAIN_PAIRS:
        return AdaptationResult(
            user_id,
            KIND,
            "skipped",
            f"{len(pairs)} preference pairs leave {len(train)} to train on after the newest "
            f"{len(held)} are held out, fewer than {MIN_TRAIN_PAIRS}",
            figures=counts,
        )
    if dry_run:
        return AdaptationResult(
            user_id,
            KIND,
            "planned",
            f"{len(pairs)} preference pairs (at least {min_pairs}): would train on "
            f"{len(train)} and judge on the newest {len(held)}",
            figures=counts,
        )
    started = time.monotonic()
    head, report = train_head([p.pair() for p in train], hub.embeddings, holdout=0)
    model_id = owned_id(user_id, KIND)
    card = parse_card(
        {
            "id": model_id,
            "description": f"What user {user_id} preferred in their own feedback.",
            "kind": "other",
            "scorer": "embedding_head",
            "location": f"{model_id}.npz",
            "owner": user_id,
        },
        source=f"own preference model of {user_id!r}",
    )
    candidate = EmbeddingHeadScorer(card, head, hub.embeddings)
    persona = persona_of(store, user_id)
    gate = _Gate(hub, persona, user_id)
    serving = gate.accuracy(held, None)
    with_candidate = gate.accuracy(held, candidate)
    alone = _accuracy([candidate.score(p.prompt, [p.chosen, p.rejected]) for p in held])
    promote = with_candidate > serving
    figures = counts | {
        "heldout_accuracy": round(with_candidate, 4),
        "serving_accuracy": round(serving, 4),
        "alone_accuracy": round(alone, 4),
        "train_accuracy": round(report.train_accuracy, 4),
        "serving_version": owned.serving(user_id, KIND),
        "serving_models": gate.serving_ids,
        "trained_on": _span(train),
        "judged_on": _span(held),
        "seconds": round(time.monotonic() - started, 3),
    }
    status = "promoted" if promote else "rejected"
    record = card.to_dict() | {"training": {"status": status, **figures}}
    record.pop("location")
    if log.count_turns(user_id) == 0:
        # the user was forgotten while this ran: nothing trained on their data may stay
        return AdaptationResult(user_id, KIND, "skipped", "the user was forgotten meanwhile")
    version = owned.add_version(
        user_id, KIND, record, write_model=head.save if promote else None, promote=promote
    )
    if log.count_turns(user_id) == 0:  # forgotten between the check and the write
        owned.delete_user(user_id)
        return AdaptationResult(user_id, KIND, "skipped", "the user was forgotten meanwhile")
    verdict = "beat" if promote else "did not beat"
    reason = (
        f"held-out accuracy {with_candidate:.2f} {verdict} the serving {serving:.2f} "
        f"on the newest {len(held)} pairs"
    )
    return AdaptationResult(user_id, KIND, status, reason, version, figures)


def _accuracy(scores: list[list[float]]) -> float:
    """The share of pairs whose first (chosen) text scores higher; a tie counts half."""
    if not scores:
        return 0.5
    wins = [1.0 if s[0] > s[1] else 0.5 if math.isclose(s[0], s[1]) else 0.0 for s in scores]
    return float(np.mean(wins))


class _Gate:
    """MBR's pick between the two replies of each held-out pair, under the mixture that
    serves the user now, or with a candidate in their own model's place."""

    def __init__(self, hub: PreferenceHub, persona: Any, user_id: str) -> None:
        self.hub, self.persona, self.user_id = hub, persona, user_id
        self.retriever = PreferenceRetriever(hub)
        self.serving_ids: list[str] = []

    def _mixture(self, prompt: str, candidate: PreferenceScorer | None) -> list[tuple]:
        if candidate is not None:  # in the own model's place, as retrieval would serve it
            shared = self.retriever.retrieve(self.persona, prompt, owned=False).models
            mine = [RetrievedPreference("candidate", 1.0, 1.0, "other")]
            return PreferenceMixture(mix_in_own(shared, mine, self.retriever.own_weight)).pairs()
        pairs = self.retriever.retrieve(self.persona, prompt).pairs()
        self.serving_ids = sorted(set(self.serving_ids) | {m for m, _ in pairs})
        return pairs

    def accuracy(self, held: list[LoggedPair], candidate: PreferenceScorer | None) -> float:
        selector = MBRSelector(self.hub)
        persona = self.persona if isinstance(self.persona, Persona) else None
        scores = []
        for pair in held:
            mixture = self._mixture(pair.prompt, candidate)
            if not mixture:
                scores.append([0.0, 0.0])  # nothing serves: a coin toss
                continue
            chooser = selector
            if candidate is not None:
                chooser = MBRSelector(
                    {
                        m: candidate if m == "candidate" else selector.scorer(m, self.user_id)
                        for m, _ in mixture
                    }
                )
            result = chooser.select(
                pair.prompt,
                [pair.chosen, pair.rejected],
                mixture,
                user_id=self.user_id,
                persona=persona,
            )
            scores.append(list(result.utility))
        return _accuracy(scores)
