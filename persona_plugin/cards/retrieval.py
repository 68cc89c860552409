"""Retrieval of cards by persona: the machinery shared by LoRA and preference-model retrieval.

After LoraRetriever (Zhao et al., 2024): a card is represented by the embedding of what it is
for; the query is the embedding of the persona's text blended with that of the current input;
the ``top_k`` cards by cosine similarity get softmax weights (``temperature``: low peaks on the
best match, high is close to uniform). :class:`CardRetriever` holds the machinery, and its
subclasses pick the cards: :class:`~persona_plugin.lora.retrieval.LoraRetriever` adapters,
:class:`~persona_plugin.preferences.retrieval.PreferenceRetriever` preference models.

The persona and the input are embedded separately and then blended, because the embedding
model reads 256 tokens at most and a long profile would push the input out of its window. The
caches keep a turn to one input embedding at most: card vectors per card content, the
persona's vector per ``(user_id, version)``, and inputs and results in bounded
:class:`LRUCache` maps. :func:`compact_persona_text` keeps the parts of a persona that say
which cards fit, and :class:`TextEmbedder` accepts any embedder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import Persona, user_of

PersonaTextMode = Literal["compact", "assembled"]


@dataclass(frozen=True, slots=True)
class RetrievedCard:
    """One card of a retrieved mixture: its weight in the mixture and its similarity."""

    id: str
    weight: float
    score: float  # cosine similarity to the query
    kind: str


#: the share of a mixture a user's own card (an adapter or preference model trained on
#: their feedback by slow adaptation, promoted only when it beat what served them) takes;
#: the cards retrieved by the persona's text share the rest in their proportions
OWN_WEIGHT = 0.5


def mix_in_own(retrieved: tuple[Any, ...], own: Sequence[Any], share: float) -> tuple[Any, ...]:
    """``own`` (retrieved cards of the user's own, weights ignored) at ``share`` of the
    mixture (all of it when nothing else was retrieved), ``retrieved`` scaled to the rest."""
    if not own or share == 0:
        return retrieved
    share = share if retrieved else 1.0
    mine = tuple(dataclasses.replace(c, weight=share / len(own)) for c in own)
    rest = tuple(dataclasses.replace(c, weight=c.weight * (1 - share)) for c in retrieved)
    return mine + tuple(c for c in rest if c.weight != 0)


class CardMixture:
    """What a retrieved mixture of cards answers, over its ``cards`` (best first)."""

    __slots__ = ()

    @property
    def cards(self) -> tuple[RetrievedCard, ...]:
        raise NotImplementedError

    def pairs(self) -> list[tuple[str, float]]:
        """``[(id, weight), ...]``: what a backend's request or the MBR selector takes."""
        return [(c.id, c.weight) for c in self.cards]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cards]

    def weight(self, card_id: str) -> float:
        """The weight of ``card_id`` in the mixture (0.0 when it is not in it)."""
        return next((c.weight for c in self.cards if c.id == card_id), 0.0)

    def __len__(self) -> int:
        return len(self.cards)

    def __bool__(self) -> bool:
        return bool(self.cards)


def preference_lines(persona: Persona) -> list[str]:
    """The persona's preference section as sentences: styles, content, formats, reasoning,
    and its free keys (what both adapter and preference-model retrieval read first)."""
    parts: list[str] = []
    pref = persona.preference
    for label, values in (
        ("Preferred style", pref.style),
        ("Preferred content", pref.content),
        ("Preferred format", pref.format),
        ("Reasoning", pref.reasoning),
    ):
        if values:
            parts.append(f"{label}: {', '.join(values)}.")
    parts.extend(free_values(pref.model_extra))
    return parts


def compact_persona_text(persona: Persona) -> str:
    """The parts of a persona that say which adapters fit: preferences, personality, patterns.

    Identity, demographics and memory are left out: they rarely say anything about style or
    skills, and every word dilutes the embedding.
    """
    parts = preference_lines(persona)
    pers = persona.personality
    if pers.description:
        parts.append(pers.description.rstrip(".") + ".")
    if pers.values:
        parts.append(f"Values: {', '.join(pers.values)}.")
    if pers.interests:
        parts.append(f"Interests: {', '.join(pers.interests)}.")
    if pers.mbti:
        parts.append(f"MBTI {pers.mbti}.")
    parts.extend(free_values(pers.model_extra))
    patterns = [item.description for item in persona.pattern.items[:5]]
    if patterns:
        parts.append(f"Patterns: {'; '.join(patterns)}.")
    return " ".join(parts)


def free_values(extra: dict[str, Any] | None) -> list[str]:
    out = []
    for key, value in (extra or {}).items():
        if isinstance(value, str) and value.strip():
            out.append(f"{key.replace('_', ' ').capitalize()}: {value}.")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out.append(f"{key.replace('_', ' ').capitalize()}: {', '.join(value)}.")
    return out


class TextEmbedder:
    """Any embedder as ``texts -> unit rows``: ``.embed`` (MiniLMEmbeddingFunction), a
    LangChain ``Embeddings`` (``embed_documents``) or a callable (a Chroma function)."""

    def __init__(self, embedder: Any) -> None:
        if isinstance(embedder, TextEmbedder):
            embedder = embedder.embedder
        if embedder is None:
            from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

            embedder = MiniLMEmbeddingFunction()
        if hasattr(embedder, "embed") and callable(embedder.embed):
            self._fn = embedder.embed
        elif hasattr(embedder, "embed_documents"):
            self._fn = embedder.embed_documents
        elif callable(embedder):
            self._fn = embedder
        else:
            raise PersonaConfigError(
                f"{type(embedder).__name__} cannot embed: pass an object with .embed(texts), "
                "a LangChain Embeddings, or a callable texts -> vectors."
            )
        self.embedder = embedder

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = np.asarray(self._fn(list(texts)), dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != len(texts):
            raise PersonaConfigError(
                f"the embedder returned shape {rows.shape} for {len(texts)} texts; it must "
                "return one vector per text."
            )
        return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


class LRUCache:
    """A bounded map that drops the least recently used entry (not thread-safe alone)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


class CardRetriever:
    """What retrieving cards by a persona shares, whatever the cards are (LoRA adapters,
    preference models): the persona's text and its cache key, the query vector (persona
    blended with the input), card vectors cached per content, a result cache, softmax
    weights. Subclasses pick the candidates and shape the result.

    ``persona_text``: ``"compact"`` (what :meth:`compact_text` keeps; the default),
    ``"assembled"`` (the full profile block a :class:`PromptAssembler` renders), or a
    function ``Persona -> str``. ``input_weight`` is the input's share of the query (0:
    persona only, 1: input only).
    """

    def __init__(
        self,
        *,
        embedder: Any = None,
        top_k: int = 3,
        temperature: float = 0.1,
        input_weight: float = 0.5,
        persona_text: PersonaTextMode | Callable[[Persona], str] = "compact",
        assembler: Any = None,
        cache_size: int = 4096,
    ) -> None:
        self._embed = TextEmbedder(embedder)
        self.top_k = check_top_k(top_k)
        self.temperature = check_temperature(temperature)
        if not 0.0 <= input_weight <= 1.0:
            raise PersonaConfigError(f"input_weight must be in [0, 1], not {input_weight}.")
        self.input_weight = input_weight
        if not callable(persona_text) and persona_text not in ("compact", "assembled"):
            raise PersonaConfigError(
                f"persona_text {persona_text!r} is not 'compact', 'assembled' or a function."
            )
        self.persona_text_mode = persona_text
        self._assembler = assembler
        self._card_vectors: dict[str, np.ndarray] = {}
        self._persona_vectors = LRUCache(cache_size)
        self._input_vectors = LRUCache(cache_size)
        self._results = LRUCache(cache_size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # -- texts ----------------------------------------------------------------------------

    def compact_text(self, persona: Persona) -> str:
        """The persona's text in ``"compact"`` mode."""
        return compact_persona_text(persona)

    def persona_text(self, persona: Persona | str | None) -> str:
        """The text the persona is embedded as."""
        if persona is None:
            return ""
        if isinstance(persona, str):
            return persona
        mode = self.persona_text_mode
        if callable(mode):
            return mode(persona)
        if mode == "assembled":
            if self._assembler is None:
                from persona_plugin.prompt import PromptAssembler

                self._assembler = PromptAssembler()
            return str(self._assembler.assemble(persona).text)
        return self.compact_text(persona)

    def _persona_key(self, persona: Persona | str | None) -> tuple[Hashable, str | None]:
        """A cache key, and the text when it had to be computed for the key."""
        user_id = user_of(persona)
        if isinstance(persona, Persona) and user_id and persona.meta.version > 0:
            # the save time too: a user deleted and created again starts at version 1
            # afresh, and must not be served the old version 1's results
            key = ("version", user_id, persona.meta.version, persona.meta.updated_at)
            return key, None
        text = self.persona_text(persona)
        return ("text", hashlib.sha256(text.encode()).hexdigest()), text

    # -- vectors --------------------------------------------------------------------------

    def _mean_vectors(self, groups: Sequence[tuple[str, list[str]]]) -> np.ndarray:
        """One unit vector per ``(digest, texts)``: the mean of the texts' embeddings, kept
        per digest so that a card is embedded once per content."""
        with self._lock:
            missing = [(d, t) for d, t in groups if d not in self._card_vectors]
        if missing:
            texts: list[str] = []
            spans: list[tuple[int, int]] = []
            for _, group_texts in missing:
                spans.append((len(texts), len(texts) + len(group_texts)))
                texts.extend(group_texts)
            rows = self._embed(texts)
            with self._lock:
                for (digest, _), (start, end) in zip(missing, spans, strict=True):
                    mean = rows[start:end].mean(axis=0)
                    self._card_vectors[digest] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        with self._lock:
            return np.stack([self._card_vectors[d] for d, _ in groups])

    def _query_vectors(
        self,
        persona: Persona | str | None,
        persona_key: Hashable,
        persona_text: str | None,
        input: str,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The persona's and the input's vectors (None for an empty text), embedded together
        in one call when both are new."""
        with self._lock:
            p_vec = self._persona_vectors.get(persona_key)
            i_vec = self._input_vectors.get(input)
        todo: list[tuple[LRUCache, Hashable, str]] = []
        if p_vec is None:
            text = self.persona_text(persona) if persona_text is None else persona_text
            todo.append((self._persona_vectors, persona_key, text))
        if i_vec is None:
            todo.append((self._input_vectors, input, input))
        texts = [text for _, _, text in todo if text.strip()]
        rows = iter(self._embed(texts)) if texts else iter(())
        found = {}
        with self._lock:
            for cache, key, text in todo:
                vector = next(rows) if text.strip() else np.zeros(0, dtype=np.float32)
                cache.put(key, vector)
                found[id(cache)] = vector
        p_vec = found.get(id(self._persona_vectors), p_vec)
        i_vec = found.get(id(self._input_vectors), i_vec)
        return (p_vec if p_vec.size else None), (i_vec if i_vec.size else None)

    def _query(
        self,
        persona: Persona | str | None,
        persona_key: Hashable,
        persona_text: str | None,
        input: str,
    ) -> np.ndarray | None:
        """The unit query vector: the persona's and the input's blended by ``input_weight``
        (None: nothing to retrieve with)."""
        p_vec, i_vec = self._query_vectors(persona, persona_key, persona_text, input)
        if p_vec is None and i_vec is None:
            return None
        if p_vec is None or (self.input_weight == 1.0 and i_vec is not None):
            query = i_vec
        elif i_vec is None or self.input_weight == 0.0:
            query = p_vec
        else:
            query = (1 - self.input_weight) * p_vec + self.input_weight * i_vec
        assert query is not None
        return query / max(float(np.linalg.norm(query)), 1e-12)

    @staticmethod
    def _softmax_top(scores: np.ndarray, k: int, temperature: float) -> tuple[Any, np.ndarray]:
        """The indices of the ``k`` best scores, best first, and their softmax weights."""
        order = np.argsort(-scores, kind="stable")[: min(k, len(scores))]
        top = scores[order].astype(np.float64)
        weights = np.exp((top - top.max()) / temperature)
        return order, weights / weights.sum()

    # -- cache ----------------------------------------------------------------------------

    def _retrieve(
        self,
        cards: Sequence[Any],
        persona: Persona | str | None,
        input: str,
        key_extra: tuple[Hashable, ...],
        score: Callable[[np.ndarray], tuple[Any, ...]],
    ) -> tuple[tuple[Any, ...], bool]:
        """What a retrieval found, and whether it came from the cache: the result kept for
        (this retriever, the persona, ``input``, ``key_extra``), else ``score(query)`` over
        the ``cards`` (nothing when there are no cards or nothing to retrieve with)."""
        persona_key, persona_text = self._persona_key(persona)
        key = (type(self).__name__, persona_key, input, *key_extra)
        hit = self._cached(key)
        if hit is not None:
            return hit, True
        found: tuple[Any, ...] = ()
        if cards:
            query = self._query(persona, persona_key, persona_text, input)
            if query is not None:
                found = score(query)
        self._remember(key, found)
        return found, False

    def _cached(self, key: Hashable) -> Any:
        with self._lock:
            hit = self._results.get(key)
            if hit is not None:
                self.hits += 1
            else:
                self.misses += 1
            return hit

    def _remember(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._results.put(key, value)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "results": len(self._results.data),
                "personas": len(self._persona_vectors.data),
                "inputs": len(self._input_vectors.data),
                "cards": len(self._card_vectors),
            }

    def forget(self, user_id: str) -> int:
        """Drop every cached persona vector and result of ``user_id``; how many went."""

        def mentions(key: Any) -> bool:
            if not isinstance(key, tuple):
                return False
            if len(key) > 1 and key[0] == "version" and key[1] == user_id:
                return True
            return any(mentions(part) for part in key)

        dropped = 0
        with self._lock:
            for cache in (self._persona_vectors, self._results):
                for key in [k for k in cache.data if mentions(k) or _keyed_by_text(k)]:
                    del cache.data[key]
                    dropped += 1
            # inputs are keyed by their text and unsaved personas by a hash of theirs:
            # whose they were is not known, so they all go (they are cheap to embed again)
            dropped += len(self._input_vectors.data)
            self._input_vectors.data.clear()
        return dropped

    def clear_cache(self) -> None:
        with self._lock:
            self._card_vectors.clear()
            for cache in (self._persona_vectors, self._input_vectors, self._results):
                cache.data.clear()
            self.hits = self.misses = 0


def _keyed_by_text(key: Any) -> bool:
    """Whether a cache key holds a persona keyed by its text (not by user and version)."""
    if not isinstance(key, tuple):
        return False
    if len(key) > 1 and key[0] == "text":
        return True
    return any(_keyed_by_text(part) for part in key)


def check_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or top_k < 1:
        raise PersonaConfigError(f"top_k must be a positive integer, not {top_k!r}.")
    return top_k


def check_temperature(temperature: float) -> float:
    if not temperature > 0 or not np.isfinite(temperature):
        raise PersonaConfigError(
            f"temperature must be a positive number, not {temperature!r}: low values put "
            "nearly all the weight on the best adapter, high values spread it evenly."
        )
    return float(temperature)
