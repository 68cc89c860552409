"""Training data for slow adaptation, read from a user's interaction log.

Preference pairs (``chosen`` beat ``rejected`` for ``prompt``), from each kind of feedback:

* ``edit``: the user's corrected reply beats the reply they corrected;
* ``regenerate``: the reply the user kept beats each one they asked again for. The kept
  reply is the next turn of the same thread that asks the same (or nearly the same) thing
  and was not itself regenerated; a regenerate with no such turn yields nothing;
* ``rating``: a +1 reply beats a -1 reply to a similar prompt (cosine of the prompts'
  embeddings at least ``similarity``; each -1 reply pairs with its ``per_rejected`` most
  similar +1 replies). A turn's last rating counts;
* ``choice``: the candidate the user picked beats every other candidate of that turn.

Supervised examples (prompt, reply) for adapters: the replies rated +1 (last rating) and
the users' edited replies. Anything the guard reads as instructions to the assistant, in
the prompt or either reply, is left out, as is a text the log kept withheld; what was left
out, and why, is counted in :attr:`TrainingData.left_out`. Every item carries the time its
signal arrived (``created_at``), which orders the time split of the gate.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import numpy as np

from persona_plugin.errors import PersonaNotFoundError
from persona_plugin.guard import WITHHELD, instruction_reason
from persona_plugin.interactions import FeedbackEvent, InteractionLog, LoggedTurn
from persona_plugin.persona import Persona
from persona_plugin.preferences.training import PreferencePair

T = TypeVar("T")

#: prompts this similar (cosine of MiniLM embeddings) count as "a similar prompt": a
#: paraphrase of the same request scores 0.6-0.9 there, another topic under 0.3
PROMPT_SIMILARITY = 0.5
#: a regenerated turn's next turn asking this similar a thing is the same request again
SAME_REQUEST = 0.9
#: a regenerated reply of a thread that did not go on (a server request is a thread of
#: its own) is kept by the user's next turn asking the same thing within this many seconds
REGENERATE_WINDOW_S = 600.0
#: the newest share of a user's pairs (or examples) the gate holds out
HOLDOUT = 0.2


@dataclass(frozen=True, slots=True)
class LoggedPair:
    """One preference pair drawn from the log, with where it came from and when."""

    prompt: str
    chosen: str
    rejected: str
    source: str  # edit, regenerate, rating or choice
    turn_id: str  # the turn whose reply lost
    created_at: str  # when the signal arrived (the later event for a rating pair)

    def pair(self) -> PreferencePair:
        return PreferencePair(self.prompt, self.chosen, self.rejected)


@dataclass(frozen=True, slots=True)
class SupervisedExample:
    """A reply the user endorsed (rated +1) or wrote (an edit), for the prompt it answers."""

    prompt: str
    reply: str
    source: str  # rating or edit
    turn_id: str
    created_at: str


@dataclass
class TrainingData:
    """A user's pairs and examples, oldest first, and what was left out (reason: count)."""

    user_id: str
    pairs: list[LoggedPair] = field(default_factory=list)
    examples: list[SupervisedExample] = field(default_factory=list)
    left_out: Counter[str] = field(default_factory=Counter)

    def sources(self) -> dict[str, int]:
        """How many pairs each kind of feedback gave."""
        return dict(Counter(p.source for p in self.pairs))


def split(items: list[T], holdout: float = HOLDOUT) -> tuple[list[T], list[T]]:
    """Older items (pairs or examples, oldest first) to train on, and the newest
    ``holdout`` share of them (at least 2) to judge the candidate by."""
    held = max(2, math.ceil(len(items) * holdout))
    return items[:-held], items[-held:]


def persona_of(store: Any, user_id: str) -> Persona:
    """The user's persona in ``store``; a new one when there is none (no store, or no
    persona yet), as the graph makes for a new user: what serves them is then retrieved
    from the input alone, with their own models."""
    if store is not None:
        try:
            return store.get(user_id)
        except PersonaNotFoundError:
            pass
    return Persona.new(user_id)


def _flagged(*texts: str) -> bool:
    return any(t == WITHHELD or instruction_reason(t) for t in texts)


def training_data(
    log: InteractionLog,
    user_id: str,
    *,
    embeddings: Any = None,
    similarity: float = PROMPT_SIMILARITY,
    per_rejected: int = 3,
) -> TrainingData:
    """The user's preference pairs and supervised examples from ``log`` (see the module).

    ``embeddings`` (texts -> unit rows; default the local MiniLM) compare prompts for
    rating pairs and regenerated requests; it is only called when there is something to
    compare.
    """
    turns = {t.turn_id: t for t in log.turns(user_id)}
    events = log.feedback(user_id)
    data = TrainingData(user_id)
    by_kind: dict[str, list[FeedbackEvent]] = defaultdict(list)
    for event in events:
        if event.turn_id in turns:
            by_kind[event.kind].append(event)
        else:  # the turn went (retention) while its feedback stayed
            data.left_out["feedback on a turn no longer logged"] += 1
    embed = _Embedder(embeddings)

    def add_pair(pair: LoggedPair) -> None:
        if pair.chosen.strip() == pair.rejected.strip():
            data.left_out["chosen and rejected are the same text"] += 1
        elif _flagged(pair.prompt, pair.chosen, pair.rejected):
            data.left_out["read as instructions by the guard"] += 1
        else:
            data.pairs.append(pair)

    edited: dict[str, FeedbackEvent] = {}
    for event in by_kind["edit"]:
        turn = turns[event.turn_id]
        edited[turn.turn_id] = event  # the last edit of a turn is its best version
        add_pair(
            LoggedPair(
                turn.user_text,
                event.text or "",
                turn.reply_text,
                "edit",
                turn.turn_id,
                event.created_at,
            )
        )
    for turn_id, event in edited.items():
        turn = turns[turn_id]
        if _flagged(turn.user_text, event.text or ""):
            data.left_out["read as instructions by the guard"] += 1
        else:
            data.examples.append(
                SupervisedExample(
                    turn.user_text, event.text or "", "edit", turn_id, event.created_at
                )
            )

    _regenerate_pairs(turns, by_kind["regenerate"], embed, add_pair, data)
    _choice_pairs(turns, by_kind["choice"], add_pair, data)

    last_rating: dict[str, FeedbackEvent] = {}
    for event in by_kind["rating"]:
        last_rating[event.turn_id] = event
    good = [(turns[t], e) for t, e in last_rating.items() if e.rating == 1]
    bad = [(turns[t], e) for t, e in last_rating.items() if e.rating == -1]
    for turn, event in good:
        if turn.turn_id in edited:
            continue  # its edit is the better example
        if _flagged(turn.user_text, turn.reply_text):
            data.left_out["read as instructions by the guard"] += 1
        else:
            data.examples.append(
                SupervisedExample(
                    turn.user_text, turn.reply_text, "rating", turn.turn_id, event.created_at
                )
            )
    if good and bad:
        prompts = embed([t.user_text for t, _ in good] + [t.user_text for t, _ in bad])
        similar = prompts[len(good) :] @ prompts[: len(good)].T
        for row, (turn, event) in enumerate(bad):
            best = [
                j
                for j in np.argsort(-similar[row], kind="stable")[:per_rejected]
                if similar[row, j] >= similarity
            ]
            if not best:
                data.left_out["a -1 reply with no +1 reply to a similar prompt"] += 1
            for j in best:
                winner, won = good[j]
                add_pair(
                    LoggedPair(
                        turn.user_text,
                        winner.reply_text,
                        turn.reply_text,
                        "rating",
                        turn.turn_id,
                        max(event.created_at, won.created_at),
                    )
                )
    data.pairs.sort(key=lambda p: (p.created_at, p.turn_id, p.source))
    data.examples.sort(key=lambda e: (e.created_at, e.turn_id))
    return data


def _regenerate_pairs(
    turns: dict[str, LoggedTurn],
    events: list[FeedbackEvent],
    embed: _Embedder,
    add_pair: Any,
    data: TrainingData,
) -> None:
    """Each regenerated reply loses to the reply finally kept for the same request."""
    regenerated = {e.turn_id: e for e in events}
    if not regenerated:
        return
    ordered = sorted(turns.values(), key=lambda t: (t.created_at, t.turn_id))
    position = {t.turn_id: i for i, t in enumerate(ordered)}
    for turn_id, event in regenerated.items():
        lost = turns[turn_id]
        kept = _kept_reply(lost, ordered[position[turn_id] + 1 :], regenerated, embed)
        if kept is None:
            data.left_out["a regenerate with no kept reply after it"] += 1
            continue
        add_pair(
            LoggedPair(
                lost.user_text,
                kept.reply_text,
                lost.reply_text,
                "regenerate",
                turn_id,
                event.created_at,
            )
        )


def _kept_reply(
    lost: LoggedTurn, later: list[LoggedTurn], regenerated: dict[str, Any], embed: _Embedder
) -> LoggedTurn | None:
    """The first later turn asking the same thing again that was not itself regenerated
    (following a chain of regenerations); None if the conversation moved on.

    In the same thread when the thread went on. A client of the OpenAI-compatible server
    sends each request as a thread of its own: then the user's next turns within
    :data:`REGENERATE_WINDOW_S` of the regenerated one, whatever their thread."""
    thread = [t for t in later if t.thread_id == lost.thread_id]
    if not thread:
        since = _time(lost.created_at)
        thread = [
            t for t in later if (_time(t.created_at) - since).total_seconds() <= REGENERATE_WINDOW_S
        ]
    current = lost
    for turn in thread:
        if not _same_request(current.user_text, turn.user_text, embed):
            return None  # the conversation moved on without a kept answer to this request
        if turn.turn_id not in regenerated:
            return turn
        current = turn
    return None


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _same_request(a: str, b: str, embed: _Embedder) -> bool:
    if a.strip() == b.strip():
        return True
    rows = embed([a, b])
    return float(rows[0] @ rows[1]) >= SAME_REQUEST


def _choice_pairs(
    turns: dict[str, LoggedTurn], events: list[FeedbackEvent], add_pair: Any, data: TrainingData
) -> None:
    last = {e.turn_id: e for e in events}  # the last pick of a turn counts
    for turn_id, event in last.items():
        turn = turns[turn_id]
        candidates = (turn.details.get("mbr") or {}).get("candidates") or []
        if event.choice is None or not 0 <= event.choice < len(candidates):
            data.left_out["a choice that names no logged candidate"] += 1
            continue
        picked = candidates[event.choice]
        # each other text once (MBR may sample one reply twice), and never the pick itself
        others = dict.fromkeys(c for c in candidates if isinstance(c, str) and c != picked)
        for other in others:
            add_pair(LoggedPair(turn.user_text, picked, other, "choice", turn_id, event.created_at))


class _Embedder:
    """Unit rows for texts, the local MiniLM loaded only when first needed."""

    def __init__(self, embeddings: Any) -> None:
        self._embeddings = embeddings

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._embeddings is None:
            from persona_plugin.preferences.scorers import CandidateEmbeddings

            self._embeddings = CandidateEmbeddings()
        rows = np.asarray(self._embeddings(texts), dtype=np.float32)
        return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)
