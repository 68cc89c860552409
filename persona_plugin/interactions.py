"""The interaction log: every turn and the feedback on it, per user, in the store's database.

Life-long personalisation learns from what happens to its answers. The log keeps, for every
turn any entry point serves, what was said (as the guard let memory keep it), which persona
version, model, adapters and MBR candidates produced the reply, its tokens and latency;
and the feedback events that refer to a turn:

* ``rating``: +1 or -1, with an optional comment;
* ``edit``: the user's corrected version of the reply (``text``);
* ``regenerate``: the user asked again, so this reply lost;
* ``choice``: the user picked candidate ``choice`` of the turn's MBR candidates.

It lives in the same database as the persona store (SQLite by default, PostgreSQL at
scale), in two tables of its own: ``interaction_turns`` and ``interaction_feedback``.
Sizes are capped (a longer text is cut and marked; a longer feedback text is refused),
and ``PERSONA_LOG_RETENTION_DAYS`` drops what is older (default: keep). Forgetting a
user deletes their rows; exporting includes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field

from persona_plugin.errors import (
    PersonaConfigError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import utc_now, validate_user_id

log = logging.getLogger(__name__)

FeedbackKind = Literal["rating", "edit", "regenerate", "choice"]
FEEDBACK_KINDS: tuple[str, ...] = ("rating", "edit", "regenerate", "choice")
#: longest user message or reply kept whole; longer ones are cut and marked
MAX_TEXT_CHARS = 20_000
#: longest feedback text (an edit, a comment); a longer one is refused
MAX_FEEDBACK_CHARS = 20_000
TRUNCATED = " …(cut: longer than the log keeps)"
#: how often (seconds) a process drops rows past the retention period
_PURGE_EVERY_S = 3600.0

_metadata = sa.MetaData()
turns_table = sa.Table(
    "interaction_turns",
    _metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("turn_id", sa.String(200), primary_key=True),
    sa.Column("thread_id", sa.String(200)),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("user_text", sa.Text, nullable=False),
    sa.Column("reply_text", sa.Text, nullable=False),
    sa.Column("persona_version", sa.Integer),
    sa.Column("model", sa.String(200)),
    sa.Column("latency_ms", sa.Float),
    # adapters retrieved and served, MBR candidates with their scores and the choice,
    # token counts: what produced the reply
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index("ix_interaction_turns_created", "created_at"),
    sa.Index("ix_interaction_turns_turn", "turn_id"),
)
feedback_table = sa.Table(
    "interaction_feedback",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("turn_id", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("rating", sa.Integer),
    sa.Column("comment", sa.Text),
    sa.Column("text", sa.Text),
    sa.Column("choice", sa.Integer),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Index("ix_interaction_feedback_turn", "user_id", "turn_id"),
)


class TurnNotFoundError(PersonaNotFoundError):
    """The user has no logged turn with this id."""


class TurnOwnedElsewhereError(PersonaNotFoundError):
    """The turn id is another user's: the caller may not see or rate it."""


class LoggedTurn(BaseModel):
    user_id: str
    turn_id: str
    thread_id: str | None = None
    created_at: str
    user_text: str
    reply_text: str
    persona_version: int | None = None
    model: str | None = None
    latency_ms: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class FeedbackEvent(BaseModel):
    id: int
    user_id: str
    turn_id: str
    kind: FeedbackKind
    rating: int | None = None
    comment: str | None = None
    text: str | None = None
    choice: int | None = None
    created_at: str


def _cut(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[: max(0, limit - len(TRUNCATED))] + TRUNCATED, True


class InteractionLog:
    """Append-only turns and feedback per user, on a SQLAlchemy engine (the store's)."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        retention_days: float | None = None,
        max_text_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        self.engine = engine
        self.retention_days = retention_days
        self.max_text_chars = max_text_chars
        self._last_purge = 0.0
        self._lock = threading.Lock()
        _metadata.create_all(engine, checkfirst=True)

    @classmethod
    def on(cls, store: Any, **options: Any) -> InteractionLog:
        """The log in ``store``'s database (the same engine: one URL, one connection pool)."""
        return cls(store.engine, **options)

    # -- writing --------------------------------------------------------------------------

    def record_turn(
        self,
        user_id: str,
        turn_id: str,
        *,
        user_text: str,
        reply_text: str,
        thread_id: str | None = None,
        persona_version: int | None = None,
        model: str | None = None,
        latency_ms: float | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> str:
        """Log one turn; returns its id. The same (user, turn id) logged again is kept once:
        a retried request must not count twice."""
        validate_user_id(user_id)
        user_text, cut_user = _cut(user_text, self.max_text_chars)
        reply_text, cut_reply = _cut(reply_text, self.max_text_chars)
        extra = dict(details or {})
        if cut_user or cut_reply:
            extra["truncated"] = [n for n, c in (("user", cut_user), ("reply", cut_reply)) if c]
        row = {
            "user_id": user_id,
            "turn_id": turn_id,
            "thread_id": thread_id,
            "created_at": utc_now(),
            "user_text": user_text,
            "reply_text": reply_text,
            "persona_version": persona_version,
            "model": model,
            "latency_ms": latency_ms,
            "details": extra,
        }
        with self.engine.begin() as conn:
            conn.execute(_insert_new(self.engine.dialect.name, row))
        self._purge_now_and_then()
        return turn_id

    def record_feedback(
        self,
        user_id: str,
        turn_id: str,
        kind: str,
        *,
        rating: int | None = None,
        comment: str | None = None,
        text: str | None = None,
        choice: int | None = None,
    ) -> FeedbackEvent:
        """Log feedback on one of the user's turns.

        Raises :class:`TurnNotFoundError` for a turn the log does not have,
        :class:`TurnOwnedElsewhereError` for another user's turn, and
        :class:`PersonaValidationError` (naming the field) for a malformed event.
        """
        validate_user_id(user_id)
        turn = self.turn(user_id, turn_id)
        self._check_feedback(turn, kind, rating=rating, comment=comment, text=text, choice=choice)
        row = {
            "user_id": user_id,
            "turn_id": turn_id,
            "kind": kind,
            "rating": rating,
            "comment": comment,
            "text": text,
            "choice": choice,
            "created_at": utc_now(),
        }
        with self.engine.begin() as conn:
            key = conn.execute(feedback_table.insert().values(**row)).inserted_primary_key
        return FeedbackEvent(id=int(key[0]), **row)

    def _check_feedback(self, turn: LoggedTurn, kind: str, **fields: Any) -> None:
        def refuse(field: str, problem: str) -> PersonaValidationError:
            return PersonaValidationError(
                "feedback", field, problem, "Fix that field and send the feedback again."
            )

        if kind not in FEEDBACK_KINDS:
            raise refuse("kind", f"{kind!r} is not one of {', '.join(FEEDBACK_KINDS)}")
        allowed = {
            "rating": {"rating", "comment"},
            "edit": {"text", "comment"},
            "regenerate": {"comment"},
            "choice": {"choice", "comment"},
        }[kind]
        for name, value in fields.items():
            if value is not None and name not in allowed:
                raise refuse(name, f"does not go with kind {kind!r} (it takes {sorted(allowed)})")
        for name in ("comment", "text"):
            value = fields[name]
            if value is not None and (
                not isinstance(value, str) or len(value) > MAX_FEEDBACK_CHARS
            ):
                raise refuse(name, f"must be text of at most {MAX_FEEDBACK_CHARS} characters")
        rating = fields["rating"]
        if kind == "rating" and (isinstance(rating, bool) or rating not in (1, -1)):
            raise refuse("rating", "must be 1 (good) or -1 (bad)")
        if kind == "edit" and not (fields["text"] or "").strip():
            raise refuse("text", "an edit needs the corrected reply")
        if kind == "choice":
            candidates = (turn.details.get("mbr") or {}).get("candidates") or []
            choice = fields["choice"]
            if not isinstance(choice, int) or isinstance(choice, bool):
                raise refuse("choice", "must be the index of the chosen candidate")
            if not 0 <= choice < len(candidates):
                raise refuse(
                    "choice",
                    f"turn {turn.turn_id} has {len(candidates)} candidates; pick 0 to "
                    f"{len(candidates) - 1}"
                    if candidates
                    else f"turn {turn.turn_id} had no candidates",
                )

    # -- reading --------------------------------------------------------------------------

    def turn(self, user_id: str, turn_id: str) -> LoggedTurn:
        """One of the user's turns (see :meth:`record_feedback` for the errors)."""
        t = turns_table
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(t).where(t.c.turn_id == turn_id, t.c.user_id == user_id))
                .mappings()
                .first()
            )
            if row is None:
                elsewhere = conn.execute(
                    sa.select(t.c.user_id).where(t.c.turn_id == turn_id).limit(1)
                ).first()
        if row is not None:
            return LoggedTurn(**row)
        if elsewhere is not None:
            raise TurnOwnedElsewhereError(f"turn {turn_id!r} is not one of {user_id!r}'s turns.")
        raise TurnNotFoundError(f"user {user_id!r} has no logged turn {turn_id!r}.")

    def turns(
        self, user_id: str, *, since: datetime | str | None = None, limit: int | None = None
    ) -> list[LoggedTurn]:
        """The user's turns, oldest first (from ``since``; the newest ``limit``)."""
        t = turns_table
        query = sa.select(t).where(t.c.user_id == user_id)
        if since is not None:
            query = query.where(t.c.created_at >= _iso(since))
        query = query.order_by(t.c.created_at.desc(), t.c.turn_id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [LoggedTurn(**row) for row in reversed(rows)]

    def feedback(
        self,
        user_id: str,
        *,
        turn_id: str | None = None,
        kind: str | None = None,
        since: datetime | str | None = None,
    ) -> list[FeedbackEvent]:
        """The user's feedback events, oldest first."""
        f = feedback_table
        query = sa.select(f).where(f.c.user_id == user_id)
        if turn_id is not None:
            query = query.where(f.c.turn_id == turn_id)
        if kind is not None:
            query = query.where(f.c.kind == kind)
        if since is not None:
            query = query.where(f.c.created_at >= _iso(since))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(f.c.id)).mappings().all()
        return [FeedbackEvent(**row) for row in rows]

    # -- privacy and retention ------------------------------------------------------------

    def export_user(self, user_id: str) -> dict[str, Any]:
        return {
            "turns": [t.model_dump(mode="json") for t in self.turns(user_id)],
            "feedback": [f.model_dump(mode="json") for f in self.feedback(user_id)],
        }

    def delete_user(self, user_id: str) -> int:
        """Remove the user's turns and feedback; how many rows went."""
        validate_user_id(user_id)
        with self.engine.begin() as conn:
            gone = conn.execute(
                feedback_table.delete().where(feedback_table.c.user_id == user_id)
            ).rowcount
            gone += conn.execute(
                turns_table.delete().where(turns_table.c.user_id == user_id)
            ).rowcount
        return gone

    def purge_expired(self, *, now: datetime | None = None) -> int:
        """Drop turns (and their feedback) older than the retention period."""
        if self.retention_days is None:
            return 0
        cutoff = _iso((now or datetime.now(UTC)) - timedelta(days=self.retention_days))
        t, f = turns_table, feedback_table
        with self.engine.begin() as conn:
            old = sa.select(t.c.user_id, t.c.turn_id).where(t.c.created_at < cutoff)
            gone = conn.execute(
                f.delete().where(sa.tuple_(f.c.user_id, f.c.turn_id).in_(old))
            ).rowcount
            gone += conn.execute(t.delete().where(t.c.created_at < cutoff)).rowcount
        if gone:
            log.info("interaction log: %d rows past %s days dropped", gone, self.retention_days)
        return gone

    def _purge_now_and_then(self) -> None:
        if self.retention_days is None:
            return
        with self._lock:
            if time.monotonic() - self._last_purge < _PURGE_EVERY_S:
                return
            self._last_purge = time.monotonic()
        self.purge_expired()


def _insert_new(dialect: str, row: dict[str, Any]) -> Any:
    """An insert of ``row`` that leaves an existing (user, turn id) as it is: one statement,
    no read first."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(turns_table).values(**row).on_conflict_do_nothing()


def _iso(value: datetime | str) -> str:
    """The time as ``utc_now`` writes it, so that stored times compare as text."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def record_reply_feedback(
    log: InteractionLog, user_id: str, reply: Any, kind: str, **fields: Any
) -> FeedbackEvent:
    """Feedback on a reply the persona graph returned (an ``AIMessage``): its turn id is
    in ``reply.response_metadata["persona"]["turn_id"]``. ``fields`` as for
    :meth:`InteractionLog.record_feedback`."""
    metadata = getattr(reply, "response_metadata", None) or {}
    turn_id = (metadata.get("persona") or {}).get("turn_id")
    if not turn_id:
        raise PersonaConfigError(
            "this reply carries no persona turn id (response_metadata['persona']['turn_id']): "
            "only replies of the persona graph can be rated by message; pass the turn id to "
            "InteractionLog.record_feedback instead."
        )
    return log.record_feedback(user_id, turn_id, kind, **fields)
