"""LoRA retrieval: the persona (and the turn's input) picks a weighted mixture of adapters.

After LoraRetriever (Zhao et al., 2024): each adapter is represented by the embedding of
what it is for, here the mean of the embeddings of its card's description (with its tags)
and of its ``sample_inputs``; the query is the embedding of the persona's text blended with
the embedding of the current input; the ``top_k`` adapters by cosine similarity are
returned with softmax weights (``temperature``: low is peaked on the best match, high is
close to uniform). The weights sum to 1 and go to a backend as ``[(id, weight), ...]``.

Fast adaptation comes for free: a reflection step that rewrites the persona saves a new
version, the new version has a new text, and the next turn retrieves a new mixture.

Caching, so that a turn costs one input embedding at most:

* card vectors are kept per card *content* (editing a card re-embeds only that card);
* the persona's vector per ``(user_id, version)`` of a stored persona (a persona that was
  never saved, or plain text, is keyed by its text);
* the input's vector per input text, and the whole result per (persona key, input,
  options, cards), in bounded LRU maps.

The machinery (persona text and key, query blend, card vectors, caches, softmax) is
:class:`CardRetriever`'s; :class:`LoraRetriever` picks adapter cards with it, and
:class:`persona_plugin.preferences.PreferenceRetriever` preference models.

The persona and the input are embedded separately (then blended) rather than as one
string because the embedding model reads 256 tokens at most: a long profile would push
the input out of its window.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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
)
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lora.hub import ADAPTER_KINDS, AdapterCard, LoraHub
from persona_plugin.persona import Persona, user_of


@dataclass(frozen=True, slots=True)
class RetrievedAdapter(RetrievedCard):
    """One adapter of a :class:`LoraMixture`."""


@dataclass(frozen=True, slots=True)
class LoraMixture(CardMixture):
    """The adapters retrieved for one (persona, input), best first; weights sum to 1."""

    adapters: tuple[RetrievedAdapter, ...]
    #: whether this came from the result cache
    cached: bool = False

    @property
    def cards(self) -> tuple[RetrievedAdapter, ...]:
        return self.adapters


class LoraRetriever(CardRetriever):
    """Retrieves a weighted mixture of adapters for a persona and an input.

    ``hub`` is a :class:`LoraHub` (re-read on every call, cheaply, so new cards count at
    once) or a fixed list of cards. ``exclude_kinds`` defaults to ``("reflection",)``: the
    reflection adapter serves the reflection step, not the user's reply. Pre-merged cards
    are never candidates (they are how a server serves a mixture, not a skill of their
    own). ``base_model`` keeps only adapters trained on that model. The other options are
    :class:`CardRetriever`'s.
    """

    def __init__(
        self,
        hub: LoraHub | Sequence[AdapterCard],
        *,
        embedder: Any = None,
        top_k: int = 3,
        temperature: float = 0.1,
        exclude_kinds: Collection[str] = ("reflection",),
        kinds: Collection[str] | None = None,
        base_model: str | None = None,
        input_weight: float = 0.5,
        persona_text: PersonaTextMode | Callable[[Persona], str] = "compact",
        assembler: Any = None,
        cache_size: int = 4096,
        own_weight: float = OWN_WEIGHT,
    ) -> None:
        if not 0.0 <= own_weight <= 1.0:
            raise PersonaConfigError(f"own_weight must be in [0, 1], not {own_weight}.")
        self.own_weight = own_weight
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
        self.exclude_kinds = _check_kinds(exclude_kinds, "exclude_kinds")
        self.kinds = _check_kinds(kinds, "kinds") if kinds is not None else None
        self.base_model = base_model

    def _candidates(
        self,
        kinds: frozenset[str] | None,
        exclude: frozenset[str],
        allowed: frozenset[str] | None,
    ) -> list[AdapterCard]:
        cards = self.hub.cards() if isinstance(self.hub, LoraHub) else list(self.hub)
        return [
            c
            for c in cards
            if not c.is_premerged
            and c.kind not in exclude
            and (kinds is None or c.kind in kinds)
            and (self.base_model is None or c.base_model == self.base_model)
            and (allowed is None or c.id in allowed)
            and c.owner is None  # a user's own adapter reaches that user alone (_owned)
        ]

    def _owned(
        self, persona: Persona | str | None, kinds: frozenset[str] | None, exclude: frozenset[str]
    ) -> list[RetrievedAdapter]:
        """The persona's user's own adapter serving now (slow adaptation), if any."""
        user_id = user_of(persona)
        if not user_id or not isinstance(self.hub, LoraHub) or self.own_weight == 0:
            return []
        return [
            RetrievedAdapter(c.id, 1.0, 1.0, c.kind)
            for c in self.hub.owned_cards(user_id)
            if c.kind not in exclude
            and (kinds is None or c.kind in kinds)
            and (self.base_model is None or c.base_model == self.base_model)
        ]

    # -- retrieval ------------------------------------------------------------------------

    def retrieve(
        self,
        persona: Persona | str | None = None,
        input: str = "",
        *,
        top_k: int | None = None,
        temperature: float | None = None,
        kinds: Collection[str] | None = None,
        exclude_kinds: Collection[str] | None = None,
        allowed: Collection[str] | None = None,
        owned: bool = True,
    ) -> LoraMixture:
        """The ``top_k`` adapters for ``persona`` (a persona or its text) and ``input``.

        ``allowed`` limits the candidates to adapters a backend can serve. The persona's
        user's own adapter, if one serves them, joins at ``own_weight`` of the mixture
        unless ``owned=False`` (a backend that cannot load it). An empty mixture means: no
        candidates, or nothing to retrieve with (no persona text and no input).
        """
        k = self.top_k if top_k is None else check_top_k(top_k)
        temp = self.temperature if temperature is None else check_temperature(temperature)
        kind_set = self.kinds if kinds is None else _check_kinds(kinds, "kinds")
        exclude = self.exclude_kinds if exclude_kinds is None else _check_kinds(exclude_kinds)
        allowed_set = frozenset(allowed) if allowed is not None else None
        cards = self._candidates(kind_set, exclude, allowed_set)
        hashes = [c.content_hash for c in cards]
        adapters, cached = self._retrieve(
            cards,
            persona,
            input,
            (k, temp, kind_set, exclude, allowed_set, tuple(hashes)),
            lambda query: self._score(cards, hashes, query, k, temp),
        )
        if owned:
            adapters = mix_in_own(
                adapters, self._owned(persona, kind_set, exclude), self.own_weight
            )
        return LoraMixture(adapters, cached=cached)

    def _score(
        self,
        cards: list[AdapterCard],
        hashes: list[str],
        query: np.ndarray,
        k: int,
        temperature: float,
    ) -> tuple[RetrievedAdapter, ...]:
        groups = [(h, c.embedding_texts()) for c, h in zip(cards, hashes, strict=True)]
        scores = self._mean_vectors(groups) @ query
        order, weights = self._softmax_top(scores, k, temperature)
        return tuple(
            RetrievedAdapter(cards[i].id, float(w), float(scores[i]), cards[i].kind)
            for i, w in zip(order, weights, strict=True)
        )


def _check_kinds(kinds: Collection[str] | None, what: str = "exclude_kinds") -> frozenset[str]:
    if kinds is None:
        return frozenset()
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = sorted(set(kinds) - set(ADAPTER_KINDS))
    if unknown:
        raise PersonaConfigError(
            f"{what}: unknown adapter kinds {unknown}; known: {', '.join(ADAPTER_KINDS)}."
        )
    return frozenset(kinds)
