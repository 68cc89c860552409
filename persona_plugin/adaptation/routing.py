"""Routing each user to the model they prefer, among those configured.

A graph serving several chat models (``models={name: model}``) with ``routing=True``
answers a turn that names no model (or names ``"auto"``) with the one :class:`ModelRouter`
picks for the user:

1. **measured**: once a model has :data:`MIN_RATINGS` (5) ratings from the user (the last
   rating of each of its turns, from the interaction log), its mean rating counts; the
   best mean among the measured models serves;
2. **stated**, before any is measured: the first of the persona's ``preference.models``
   that is configured;
3. **default**: the graph's first configured model.

Ties (equal means) go to the stated order, then the name. **Exploration**: every
:data:`EXPLORE_EVERY` (10th) turn of the user goes to the configured model with the fewest
ratings from them while some model has fewer than :data:`MIN_RATINGS`, so a new model (or
one never tried) gets measured without the user's best model losing more than a tenth of
their turns; and while the best measured model's mean rating is not above 0 (the user
rates it down as often as up), every turn tries the unmeasured ones first. The choice and
its reason are in the reply's ``response_metadata["route"]`` and the log's ``model``
column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: ratings a model needs from a user before its mean rating routes them
MIN_RATINGS = 5
#: every this many turns of a user explores the least-rated model (while one is unmeasured)
EXPLORE_EVERY = 10


@dataclass(frozen=True)
class Route:
    """Which model serves a turn, and why."""

    model: str
    reason: str  # measured, stated, default or explore
    ratings: dict[str, list[float]] = field(default_factory=dict)  # model -> [count, mean]

    def to_metadata(self) -> dict[str, Any]:
        return {"model": self.model, "reason": self.reason, "ratings": self.ratings}


class ModelRouter:
    """Picks a configured model for a user from their ratings and stated preference."""

    def __init__(
        self,
        models: Sequence[str],
        log: Any,
        *,
        min_ratings: int = MIN_RATINGS,
        explore_every: int = EXPLORE_EVERY,
    ) -> None:
        if not models:
            raise ValueError("routing needs at least one model")
        self.models = list(models)
        self.log = log
        self.min_ratings = min_ratings
        self.explore_every = explore_every

    def route(self, user_id: str, persona: Any = None) -> Route:
        stated = [m for m in getattr(getattr(persona, "preference", None), "models", []) or []]
        stated = [m for m in stated if m in self.models]
        counts = self.log.ratings_by_model(user_id) if self.log is not None else {}
        ratings = {
            m: [float(n), round(total / n, 4)]
            for m, (n, total) in counts.items()
            if m in self.models
        }
        order = {m: i for i, m in enumerate(dict.fromkeys([*stated, *sorted(self.models)]))}
        measured = [m for m in self.models if ratings.get(m, [0])[0] >= self.min_ratings]
        unmeasured = [m for m in self.models if m not in measured]
        # the model to explore: the one with the fewest ratings (then the stated order)
        least = min(unmeasured, key=lambda m: (ratings.get(m, [0])[0], order[m]), default=None)
        turns = self.log.count_turns(user_id) if self.log is not None else 0
        if (
            least is not None
            and self.explore_every
            and turns
            and (turns + 1) % self.explore_every == 0
        ):
            return Route(least, "explore", ratings)
        if measured:
            best = min(measured, key=lambda m: (-ratings[m][1], order[m]))
            if ratings[best][1] <= 0 and least is not None:
                # the best the user has measured is rated poorly: try the others first
                return Route(least, "explore", ratings)
            return Route(best, "measured", ratings)
        if stated:
            return Route(stated[0], "stated", ratings)
        return Route(self.models[0], "default", ratings)
