"""The preference-model hub: cards for reward models, their scorers, and retrieval by persona.

A preference (reward) model scores how well a candidate answer fits one preference:
brevity, formality, warmth, a content rule. Every scorer exposes one method,
``score(prompt, candidates) -> list[float]`` (higher is better), and MBR decoding
(:mod:`persona_plugin.chat_models.mbr`) picks the candidate with the best weighted sum of normalised
scores. Four scorer types:

* ``embedding_head``: a small Bradley-Terry head (linear or one hidden layer) on the local
  sentence embeddings: the candidate's embedding, its cosine to the prompt's, and a few
  surface features (length, contractions, exclamations, ...). Trained from preference
  pairs in seconds on CPU (:mod:`persona_plugin.preferences.training`); stored as a small
  ``.npz`` file.
* ``sequence_classifier``: a transformers sequence-classification reward model in a local
  folder (one logit, or two: the second minus the first), reading ``(prompt, candidate)``.
* ``llm_judge``: any LangChain chat model grading each candidate against the card's
  ``rubric`` with a number in ``scale``.
* ``persona``: no model file; candidates scored against the persona's own stated likes and
  avoids (its ``preference.content``, ``preference.avoid``, interests, values, description,
  read by :mod:`persona_plugin.polarity`, and the user's recalled words), bound to each
  request's persona by MBR. The bundled ``persona`` card is one; retrieval mixes it in for
  any persona that states a like or an avoid.

Cards are YAML files, one per model, in ``$PERSONA_HOME/prefs`` (and the demo models
bundled in ``persona_plugin/assets/prefs``; a user card with the same id replaces the
bundled one). Example (``$PERSONA_HOME/prefs/brevity.yaml``)::

    id: brevity
    description: Brief, concise, to-the-point answers; short replies without padding.
    opposite: Detailed, thorough, in-depth answers with long, complete explanations.
    kind: style
    scorer: embedding_head
    location: brevity.npz          # relative to the card's folder
    tags: [concise, short]

``opposite`` says what a *low* score means: a persona that asks for the opposite gets the
model with a negative weight (a persona wanting detail is served by the brevity model
reversed), so one model serves both poles.

A card's model is checked when it is loaded (:meth:`PreferenceHub.load`), not at first
use: a missing file, a head built for another embedding size, a classifier with three
labels, a judge card without a judge all raise :class:`PersonaValidationError` naming the
card and the field. A scorer that returns NaN raises :class:`PreferenceScoreError`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from persona_plugin.cards.folder import CardHub
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.errors import PersonaNotFoundError, PersonaValidationError
from persona_plugin.preferences.cards import BUNDLED_DIR, PreferenceCard, load_card, parse_card
from persona_plugin.preferences.scorers import CandidateEmbeddings, PreferenceScorer, load_scorer

# -- the hub ------------------------------------------------------------------------------


class PreferenceHub(CardHub[PreferenceCard]):
    """Preference cards from ``directory`` (default ``$PERSONA_HOME/prefs``) and the bundled
    demo models, and their loaded scorers.

    Card reads are cached per file (size and modification time), so :meth:`cards` is cheap
    on every turn. One broken card fails the read, naming its file. Scorers load once per
    card content; :meth:`load` loads (and so checks) them all up front.

    ``embedder``: what embedding heads and retrieval embed with (default: the local
    MiniLM). ``judge``: the chat model of ``llm_judge`` cards.
    """

    noun = "preference model"
    add_command = "persona prefs add FILE"
    owned_kind = "preference"

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        bundled: bool = True,
        embedder: Any = None,
        judge: Any = None,
        device: str = "cpu",
        owned: OwnedCards | None = None,
    ) -> None:
        super().__init__(
            Path(directory).expanduser() if directory is not None else None,
            [BUNDLED_DIR] if bundled else [],
            load_card,
            owned=owned,
            hub="the preference hub",
            setting="prefs_dir",
            noun="preference",
        )
        self.bundled = bundled
        self.embeddings = (
            embedder if isinstance(embedder, CandidateEmbeddings) else CandidateEmbeddings(embedder)
        )
        self.judge = judge
        self.device = device
        self._scorers: dict[str, PreferenceScorer] = {}

    def owned_card(self, user_id: str, model_id: str) -> PreferenceCard:
        """``user_id``'s own model ``model_id``; another user's is not found."""
        found = next((c for c in self.owned_cards(user_id) if c.id == model_id), None)
        if found is None:
            raise PersonaNotFoundError(
                f"preference model {model_id!r} is not a model of user {user_id!r}'s own."
            )
        return found

    @classmethod
    def from_settings(cls, settings: Any = None, **options: Any) -> PreferenceHub:
        if settings is None:
            from persona_plugin.config import Settings

            settings = Settings.load()
        options.setdefault("owned", OwnedCards.from_settings(settings))
        return cls(prefs_dir(settings), **options)

    def __repr__(self) -> str:
        return f"PreferenceHub({str(self.directory)!r}, bundled={self.bundled})"

    # -- scorers --------------------------------------------------------------------------

    def scorer(self, model_id: str | PreferenceCard) -> PreferenceScorer:
        """The loaded scorer of a card (loaded and checked on first request, then kept)."""
        card = model_id if isinstance(model_id, PreferenceCard) else self.get(model_id)
        key = card.content_hash
        with self._lock:
            found = self._scorers.get(key)
            if found is None:
                found = load_scorer(
                    card, embeddings=self.embeddings, judge=self.judge, device=self.device
                )
                self._scorers[key] = found
            return found

    def load(self, ids: Collection[str] | None = None) -> dict[str, PreferenceScorer]:
        """Load (and so check) the scorers of ``ids`` (default: every card) now."""
        cards = self.cards() if ids is None else [self.get(i) for i in ids]
        return {card.id: self.scorer(card) for card in cards}

    # -- writing --------------------------------------------------------------------------

    def add(
        self, card: PreferenceCard | str | os.PathLike[str], *, replace: bool = False
    ) -> PreferenceCard:
        """Validate ``card`` (a card or a card file), check its model loads, and write it
        into the hub's directory as ``<id>.yaml`` (a relative location made absolute)."""
        if self.directory is None:
            raise PersonaValidationError(
                "<hub>", "", "this hub has no directory to write to", "Pass directory=."
            )
        source = "<card>"
        if not isinstance(card, PreferenceCard):
            source = str(card)
            card = load_card(card)
        resolved = card.resolved_location
        if resolved is not None and str(resolved) != card.location:
            # a relative path is relative to the file it came from, not to the hub
            card = parse_card(card.to_dict() | {"location": str(resolved)}, source=source)
        existing = next((c for c in self.cards() if c.id == card.id), None)
        if existing is not None and not replace and not self.is_bundled(existing):
            raise PersonaValidationError(
                source,
                "id",
                f"preference model {card.id!r} is already in the hub ({existing.path})",
                "Pass replace=True (`persona prefs add --replace`) to overwrite it.",
            )
        # the model must load before the card is written: nothing half-added
        load_scorer(card, embeddings=self.embeddings, judge=self.judge, device=self.device)
        target = self._write(card.id, card.to_yaml())
        stale = existing is not None and existing.path not in (None, target)
        if stale and not self.is_bundled(existing):  # type: ignore[arg-type]
            existing.path.unlink(missing_ok=True)  # type: ignore[union-attr]
        return self.get(card.id)


def prefs_dir(settings: Any) -> Path:
    """The user's preference hub: ``settings.prefs_dir``, else ``$PERSONA_HOME/prefs``."""
    directory = getattr(settings, "prefs_dir", None)
    return Path(directory).expanduser() if directory else Path(settings.home) / "prefs"
