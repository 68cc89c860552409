"""Retrieval of preference models by persona: a signed, weighted mixture for MBR decoding.

:class:`PreferenceRetriever` works like LoRA retrieval
(:class:`~persona_plugin.cards.retrieval.CardRetriever`): the query is the persona's text
blended with the input's, and the ``top_k`` cards by cosine similarity get softmax weights.
Two things differ. The persona's text is only its preference and pattern sections
(:func:`preference_persona_text`), the parts that say how an answer should read. And each
card is matched by its ``description`` and, when it has one, by its ``opposite``. The pole
that matches better sets the sign, so a persona that wants detail is served by the brevity
model reversed. The result is a :class:`PreferenceMixture` whose absolute weights sum to 1.
:func:`normalize_preferences` converts the other ways of writing a mixture (``{id: weight}``,
pairs, ids) to the same form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_plugin.cards.retrieval import (
    OWN_WEIGHT,
    CardMixture,
    CardRetriever,
    PersonaTextMode,
    RetrievedCard,
    check_temperature,
    check_top_k,
    mix_in_own,
    preference_lines,
)
from persona_plugin.errors import PersonaConfigError, PersonaValidationError
from persona_plugin.persona import Persona, user_of
from persona_plugin.preferences.cards import PREFERENCE_KINDS, PreferenceCard
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.scorers import persona_stances

# -- mixtures -----------------------------------------------------------------------------

#: ``((model id, signed weight), ...)``, absolute weights summing to 1, heaviest first
PreferenceWeights = tuple[tuple[str, float], ...]


def normalize_preferences(value: Any) -> PreferenceWeights:
    """``{id: weight}``, ``[(id, weight), ...]``, ids, a :class:`PreferenceMixture` or None
    as weights whose absolute values sum to 1.

    A negative weight uses the model reversed (prefer low scores). Zero weights are
    dropped; NaN, infinities, non-numbers and an id listed twice are errors.
    """
    if value is None:
        return ()
    if isinstance(value, PreferenceMixture):
        value = value.pairs()
    if isinstance(value, str):
        value = [value]
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    hint = "Pass preferences as {model_id: weight} or [(model_id, weight), ...]."
    pairs: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            item = (item, 1.0)
        if not isinstance(item, Sequence) or len(item) != 2:
            raise PersonaValidationError("preferences", "", f"{item!r} is not a pair", hint)
        model_id, weight = item
        if not isinstance(model_id, str) or not model_id:
            raise PersonaValidationError("preferences", "", f"{model_id!r} is not an id", hint)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise PersonaValidationError(
                "preferences", model_id, f"weight {weight!r} is not a number", hint
            )
        if not math.isfinite(weight):
            raise PersonaValidationError(
                "preferences", model_id, f"weight {weight!r} is not finite", "Use a real number."
            )
        if any(m == model_id for m, _ in pairs):
            raise PersonaValidationError("preferences", model_id, "listed twice", hint)
        if weight != 0:
            pairs.append((model_id, float(weight)))
    total = sum(abs(w) for _, w in pairs)
    return tuple(sorted(((m, w / total) for m, w in pairs), key=lambda p: -abs(p[1])))


@dataclass(frozen=True, slots=True)
class RetrievedPreference(RetrievedCard):
    """One preference model of a :class:`PreferenceMixture`; its weight is signed (negative:
    the model is used reversed) and its score is the similarity to the matching pole."""

    @property
    def reversed(self) -> bool:
        return self.weight < 0


@dataclass(frozen=True, slots=True)
class PreferenceMixture(CardMixture):
    """The preference models retrieved for one (persona, input); ``|weights|`` sum to 1."""

    models: tuple[RetrievedPreference, ...]
    cached: bool = False

    @property
    def cards(self) -> tuple[RetrievedPreference, ...]:
        return self.models


#: the share of a mixture a persona-conditioned card takes when the persona states likes or
#: avoids (all of it when nothing else was retrieved)
PERSONA_WEIGHT = 0.5


def preference_persona_text(persona: Persona) -> str:
    """The parts of a persona that say which preference models apply: the preference
    section (styles, content, formats, reasoning, free keys) and the patterns. What the
    user avoids is left out: its words would match a card's pole by similarity, the
    opposite of what they mean (the persona card reads them instead)."""
    parts = preference_lines(persona)
    patterns = [item.description for item in persona.pattern.items[:5]]
    if patterns:
        parts.append(f"Patterns: {'; '.join(patterns)}.")
    return " ".join(parts)


class PreferenceRetriever(CardRetriever):
    """Retrieves a weighted mixture of preference models for a persona and an input.

    As for LoRA adapters (:class:`LoraRetriever`), the query is the persona's text (its
    preference and pattern sections, :func:`preference_persona_text`) blended with the
    input; each card is matched by its description and, when it has one, by its
    ``opposite``. The better-matching pole decides the sign: a persona asking for detail
    gets the brevity model with a negative weight. The ``top_k`` cards by that similarity
    get softmax weights; results are cached per persona version and input. A card with
    ``scorer: persona`` is mixed in at ``persona_weight`` whenever the persona (or the
    ``statements`` passed to :meth:`retrieve`) states a like or an avoid.
    """

    def __init__(
        self,
        hub: PreferenceHub | Sequence[PreferenceCard],
        *,
        embedder: Any = None,
        top_k: int = 3,
        temperature: float = 0.1,
        kinds: Collection[str] | None = None,
        input_weight: float = 0.25,
        persona_text: PersonaTextMode | Callable[[Persona], str] = "compact",
        assembler: Any = None,
        cache_size: int = 4096,
        own_weight: float = OWN_WEIGHT,
        persona_weight: float = PERSONA_WEIGHT,
    ) -> None:
        if not 0.0 <= own_weight <= 1.0:
            raise PersonaConfigError(f"own_weight must be in [0, 1], not {own_weight}.")
        if not 0.0 <= persona_weight <= 1.0:
            raise PersonaConfigError(f"persona_weight must be in [0, 1], not {persona_weight}.")
        self.own_weight = own_weight
        self.persona_weight = persona_weight
        if embedder is None and isinstance(hub, PreferenceHub):
            embedder = hub.embeddings.embed_texts  # one embedding model for both
        super().__init__(
            embedder=embedder,
            top_k=top_k,
            temperature=temperature,
            input_weight=input_weight,
            persona_text=persona_text,
            assembler=assembler,
            cache_size=cache_size,
        )
        self.hub = hub
        self.kinds = _check_preference_kinds(kinds) if kinds is not None else None

    def compact_text(self, persona: Persona) -> str:
        return preference_persona_text(persona)

    def _candidates(
        self, kinds: frozenset[str] | None, allowed: frozenset[str] | None
    ) -> list[PreferenceCard]:
        cards = self.hub.cards() if isinstance(self.hub, PreferenceHub) else list(self.hub)
        return [
            c
            for c in cards
            if (kinds is None or c.kind in kinds)
            and (allowed is None or c.id in allowed)
            and c.owner is None  # a user's own model reaches that user alone (_owned)
        ]

    def _conditioned(
        self,
        persona: Persona | str | None,
        statements: Sequence[str],
        cards: list[PreferenceCard],
    ) -> list[PreferenceCard]:
        """The persona-conditioned cards among ``cards``, when the persona or the
        statements state something they can score by."""
        mine = [c for c in cards if c.scorer == "persona"]
        if not mine or self.persona_weight == 0:
            return []
        holder = persona if isinstance(persona, Persona) else None
        return mine if persona_stances(holder, statements) else []

    def _owned(
        self,
        persona: Persona | str | None,
        kinds: frozenset[str] | None,
        allowed: frozenset[str] | None,
    ) -> list[PreferenceCard]:
        """The persona's user's own model serving now (slow adaptation), if any."""
        user_id = user_of(persona)
        if not user_id or not isinstance(self.hub, PreferenceHub) or self.own_weight == 0:
            return []
        return [
            c
            for c in self.hub.owned_cards(user_id)
            if (kinds is None or c.kind in kinds) and (allowed is None or c.id in allowed)
        ]

    def retrieve(
        self,
        persona: Persona | str | None = None,
        input: str = "",
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        kinds: Collection[str] | None = None,
        allowed: Collection[str] | None = None,
        owned: bool = True,
        statements: Sequence[str] = (),
    ) -> PreferenceMixture:
        """The ``top_k`` preference models for ``persona`` (a persona or its text) and
        ``input``, with signed weights; a persona-conditioned card at ``persona_weight``
        when the persona (or ``statements``, the user's own words recalled for this turn)
        states a like or an avoid; the persona's user's own model, if one serves them, at
        ``own_weight`` unless ``owned=False``. Empty: no cards, or nothing to retrieve
        with."""
        k = self.top_k if top_k is None else check_top_k(top_k)
        temp = self.temperature if temperature is None else check_temperature(temperature)
        kind_set = self.kinds if kinds is None else _check_preference_kinds(kinds)
        allowed_set = frozenset(allowed) if allowed is not None else None
        every = self._candidates(kind_set, allowed_set)
        cards = [c for c in every if c.scorer != "persona"]
        hashes = tuple(c.content_hash for c in cards)
        models, cached = self._retrieve(
            cards,
            persona,
            input,
            (k, temp, kind_set, allowed_set, hashes),
            lambda query: self._score(cards, query, k, temp),
        )
        conditioned = [
            RetrievedPreference(c.id, 1.0, 1.0, c.kind)
            for c in self._conditioned(persona, statements, every)
        ]
        models = mix_in_own(models, conditioned, self.persona_weight)
        if owned:
            own = [
                RetrievedPreference(c.id, 1.0, 1.0, c.kind)
                for c in self._owned(persona, kind_set, allowed_set)
            ]
            models = mix_in_own(models, own, self.own_weight)
        return PreferenceMixture(models, cached=cached)

    def _score(
        self,
        cards: list[PreferenceCard],
        query: np.ndarray,
        k: int,
        temperature: float,
    ) -> tuple[RetrievedPreference, ...]:
        positive = self._mean_vectors([(c.content_hash, c.embedding_texts()) for c in cards])
        similarity = positive @ query
        sign = np.ones(len(cards))
        with_opposite = [i for i, c in enumerate(cards) if c.opposite]
        if with_opposite:
            groups = [
                (cards[i].content_hash + ":opposite", [cards[i].opposite or ""])
                for i in with_opposite
            ]
            negative = self._mean_vectors(groups) @ query
            for j, i in enumerate(with_opposite):
                if negative[j] > similarity[i]:
                    similarity[i], sign[i] = negative[j], -1.0
        order, weights = self._softmax_top(similarity, k, temperature)
        return tuple(
            RetrievedPreference(
                cards[i].id, float(sign[i] * w), float(similarity[i]), cards[i].kind
            )
            for i, w in zip(order, weights, strict=True)
        )


def _check_preference_kinds(kinds: Collection[str]) -> frozenset[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = sorted(set(kinds) - set(PREFERENCE_KINDS))
    if unknown:
        raise PersonaValidationError(
            "kinds",
            "",
            f"unknown preference kinds {unknown}",
            f"Use some of {', '.join(PREFERENCE_KINDS)}.",
        )
    return frozenset(kinds)
