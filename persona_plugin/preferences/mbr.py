"""Minimum-Bayes-risk (MBR) selection: the best candidate under a persona's preference models.

:class:`MBRSelector` returns the candidate with the highest

    utility_j = sum_i w_i * norm(score_i)_j  +  consensus_weight * norm(consensus)_j

where ``w_i`` are the mixture's signed weights (``sum |w_i| = 1``; a negative weight prefers
low scores), and ``norm`` (:func:`normalize_scores`: ``minmax``, ``zscore`` or ``rank``)
rescales one model's scores over the candidates so that models on different scales can be
added. ``consensus_j`` is classic MBR's mean cosine of candidate ``j`` to the others. A model
that gives every candidate the same score gets a neutral value, so it does not sway the
choice. :class:`MBRResult` keeps every score and weight for ``response_metadata["mbr"]``, and
:meth:`MBRSelector.select_batch` lets each request carry its own mixture. A scorer conditioned
on the persona (``scorer: persona``) is bound to the request's ``persona`` (and the user's
``statements``, e.g. recalled messages) before it scores. Drawing the
candidates is the job of :class:`~persona_plugin.chat_models.mbr.MBRChatModel`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from persona_plugin.cards.owned import OWNED_PREFIX
from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import Persona, user_of
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.retrieval import (
    PreferenceWeights,
    normalize_preferences,
)
from persona_plugin.preferences.scorers import (
    CandidateEmbeddings,
    PersonaConditioned,
    PreferenceScorer,
    check_scores,
)

Normalization = Literal["minmax", "zscore", "rank"]
NORMALIZATIONS: tuple[str, ...] = Normalization.__args__  # type: ignore[attr-defined]


def normalize_scores(scores: Sequence[float], how: Normalization = "minmax") -> np.ndarray:
    """One model's scores over the candidates on a common scale (constant scores: 0.5 for
    minmax and rank, 0 for zscore, so that the model does not sway the choice)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return s
    spread = float(s.max() - s.min())
    if how == "minmax":
        return (s - s.min()) / spread if spread > 1e-12 else np.full(len(s), 0.5)
    if how == "zscore":
        std = float(s.std())
        return (s - s.mean()) / std if std > 1e-12 else np.zeros(len(s))
    if how == "rank":
        if len(s) == 1 or spread <= 1e-12:
            return np.full(len(s), 0.5)
        ranks = s.argsort(kind="stable").argsort(kind="stable").astype(np.float64)
        return ranks / (len(s) - 1)
    raise PersonaConfigError(f"normalization {how!r} is not one of {', '.join(NORMALIZATIONS)}.")


@dataclass(frozen=True, slots=True)
class MBRResult:
    """What MBR decided for one request."""

    prompt: str
    candidates: tuple[str, ...]
    chosen: int
    utility: tuple[float, ...]
    #: model id -> signed weight (absolute values sum to 1)
    weights: dict[str, float]
    #: model id -> raw scores, one per candidate
    scores: dict[str, tuple[float, ...]]
    #: model id -> normalised scores, one per candidate
    normalized: dict[str, tuple[float, ...]]
    consensus: tuple[float, ...] | None = None
    consensus_weight: float = 0.0

    @property
    def text(self) -> str:
        """The chosen candidate."""
        return self.candidates[self.chosen]

    def chosen_scores(self) -> dict[str, float]:
        """The chosen candidate's raw score under each model."""
        return {m: s[self.chosen] for m, s in self.scores.items()}

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-ready summary (``response_metadata["mbr"]``)."""

        def r(values: Sequence[float]) -> list[float]:
            return [round(float(v), 4) for v in values]

        return {
            "n": len(self.candidates),
            "chosen": self.chosen,
            "candidates": list(self.candidates),
            "weights": {m: round(w, 4) for m, w in self.weights.items()},
            "scores": {m: r(s) for m, s in self.scores.items()},
            "normalized": {m: r(s) for m, s in self.normalized.items()},
            "utility": r(self.utility),
            "consensus": r(self.consensus) if self.consensus is not None else None,
            "consensus_weight": self.consensus_weight,
            "chosen_scores": {m: round(v, 4) for m, v in self.chosen_scores().items()},
        }


@dataclass(frozen=True, slots=True)
class MBRRequest:
    """One request of a batch: its prompt, its candidates, its own preference mixture."""

    prompt: str
    candidates: Sequence[str]
    preferences: Any = None
    user_id: str | None = None
    persona: Persona | None = None
    statements: Sequence[str] = ()


class MBRSelector:
    """Chooses among candidates by the weighted, normalised scores of preference models.

    ``hub``: a :class:`PreferenceHub` (scorers loaded by id on first use; call
    ``hub.load()`` to check them all up front) or a mapping ``{id: scorer}``. ``embeddings``
    (default: the hub's) embed candidates for the consensus term.
    """

    def __init__(
        self,
        hub: PreferenceHub | Mapping[str, PreferenceScorer],
        *,
        consensus_weight: float = 0.0,
        normalization: Normalization = "minmax",
        embeddings: CandidateEmbeddings | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise PersonaConfigError(
                f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}."
            )
        if not np.isfinite(consensus_weight) or consensus_weight < 0:
            raise PersonaConfigError(
                f"consensus_weight must be a finite number >= 0, not {consensus_weight!r}."
            )
        self.hub = hub
        self.consensus_weight = float(consensus_weight)
        self.normalization = normalization
        if embeddings is None and isinstance(hub, PreferenceHub):
            embeddings = hub.embeddings
        self._embeddings = embeddings

    @property
    def embeddings(self) -> CandidateEmbeddings:
        if self._embeddings is None:
            self._embeddings = CandidateEmbeddings()
        return self._embeddings

    def scorer(self, model_id: str, user_id: str | None = None) -> PreferenceScorer:
        """The scorer of ``model_id``: a hub's card, or ``user_id``'s own model (another
        user's own model is not found)."""
        if isinstance(self.hub, PreferenceHub):
            if model_id.startswith(OWNED_PREFIX):
                if user_id is None:
                    raise PersonaConfigError(
                        f"preference model {model_id!r} is a user's own: score with the "
                        "user_id it belongs to."
                    )
                return self.hub.scorer(self.hub.owned_card(user_id, model_id))
            return self.hub.scorer(model_id)
        if model_id not in self.hub:
            raise PersonaConfigError(
                f"preference model {model_id!r} is not among the scorers given "
                f"({', '.join(self.hub) or 'none'})."
            )
        return self.hub[model_id]

    def _consensus(self, candidates: Sequence[str]) -> np.ndarray:
        if len(candidates) < 2:
            return np.zeros(len(candidates))
        rows = self.embeddings(list(candidates))
        sim = rows @ rows.T
        np.fill_diagonal(sim, 0.0)
        return sim.sum(axis=1) / (len(candidates) - 1)

    def select(
        self,
        prompt: str,
        candidates: Sequence[str],
        preferences: Any = None,
        *,
        user_id: str | None = None,
        persona: Persona | None = None,
        statements: Sequence[str] = (),
    ) -> MBRResult:
        """The best of ``candidates`` for ``prompt`` under ``preferences`` (``{id: weight}``,
        pairs, or a :class:`PreferenceMixture`; weights are normalised). With no
        preferences and no consensus term, the first candidate is chosen. ``user_id``:
        whose request it is (their own model may be in the mixture; default: the
        persona's user). ``persona`` and ``statements`` (the user's own words, e.g.
        recalled messages): what a persona-conditioned scorer is bound to."""
        candidates = list(candidates)
        if not candidates:
            raise PersonaConfigError("MBR needs at least one candidate; none were given.")
        if not all(isinstance(c, str) for c in candidates):
            raise PersonaConfigError("MBR candidates must be strings.")
        weights: PreferenceWeights = normalize_preferences(preferences)
        if user_id is None:
            user_id = user_of(persona)
        utility = np.zeros(len(candidates))
        raw: dict[str, tuple[float, ...]] = {}
        normed: dict[str, tuple[float, ...]] = {}
        for model_id, weight in weights:
            scorer = self.scorer(model_id, user_id)
            if isinstance(scorer, PersonaConditioned):
                scorer = scorer.bind(persona, statements)
            values = scorer.score(prompt, candidates)
            values = check_scores(model_id, values, len(candidates))
            norm = normalize_scores(values, self.normalization)
            utility += weight * norm
            raw[model_id] = tuple(values)
            normed[model_id] = tuple(float(v) for v in norm)
        consensus = None
        if self.consensus_weight > 0:
            consensus_raw = self._consensus(candidates)
            utility += self.consensus_weight * normalize_scores(consensus_raw, self.normalization)
            consensus = tuple(float(v) for v in consensus_raw)
        return MBRResult(
            prompt=prompt,
            candidates=tuple(candidates),
            chosen=int(np.argmax(utility)),
            utility=tuple(float(u) for u in utility),
            weights=dict(weights),
            scores=raw,
            normalized=normed,
            consensus=consensus,
            consensus_weight=self.consensus_weight,
        )

    def select_batch(self, requests: Sequence[MBRRequest | tuple[Any, ...]]) -> list[MBRResult]:
        """:meth:`select` for each request, each with its own mixture. Every text of the
        batch is embedded in one call first (the cache then serves the scorers)."""
        items = [r if isinstance(r, MBRRequest) else MBRRequest(*r) for r in requests]
        texts = [t for r in items for t in (*r.candidates, r.prompt) if t.strip()]
        if texts and isinstance(self.hub, PreferenceHub):
            self.embeddings(list(dict.fromkeys(texts)))
        return [
            self.select(
                r.prompt,
                r.candidates,
                r.preferences,
                user_id=r.user_id,
                persona=r.persona,
                statements=r.statements,
            )
            for r in items
        ]
