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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field

from persona_plugin._db import reading, writing
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


def _queue_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("reflection", sa.String(10)),
        sa.Column("reflect_attempts", sa.Integer, nullable=False, server_default="0"),
        # not before this time (a failed reflection's retry waits)
        sa.Column("reflect_after", sa.String(40)),
        sa.Column("reflected_version", sa.Integer),
        sa.Column("reflect_error", sa.Text),
    ]


#: reflection states of a queued turn or feedback event
PENDING, BATCHED, DONE, FAILED = "pending", "batched", "done", "failed"

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
    # the reflection queue (see persona_plugin.reflection.worker): None (not queued, or
    # reflected inline), "pending" (background), "batched" (every n turns), "done", "failed"
    *_queue_columns(),
    sa.Index("ix_interaction_turns_created", "created_at"),
    sa.Index("ix_interaction_turns_queue", "reflection", "user_id"),
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
    *_queue_columns(),
    sa.Index("ix_interaction_feedback_turn", "user_id", "turn_id"),
    sa.Index("ix_interaction_feedback_queue", "reflection", "user_id"),
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
    #: where the turn is in the reflection queue (None: not queued)
    reflection: str | None = None
    reflected_version: int | None = None


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
    reflection: str | None = None
    reflected_version: int | None = None


@dataclass
class Claim:
    """Queued work of one user taken for one reflection: turns, feedback events, and the
    turns those events refer to that were not themselves queued (for their texts)."""

    user_id: str
    turns: list[LoggedTurn] = field(default_factory=list)
    feedback: list[FeedbackEvent] = field(default_factory=list)
    rated_turns: dict[str, LoggedTurn] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.turns or self.feedback)


class ClaimLostError(RuntimeError):
    """The claimed work is no longer queued (reflected elsewhere, or its user forgotten):
    the reflection's version must not be written."""


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
        _add_missing_columns(engine)

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
        reflection: str | None = None,
        reflected_version: int | None = None,
        connection: sa.Connection | None = None,
    ) -> str:
        """Log one turn; returns its id. The same (user, turn id) logged again is kept once:
        a retried request must not count twice. ``reflection``: :data:`PENDING` queues the
        turn for the background worker, :data:`BATCHED` for reflection every n turns,
        :data:`DONE` records that it was reflected inline (as ``reflected_version``).
        ``connection``: the caller's transaction to write in (a history import logs a
        turn with the persona version it produced)."""
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
            "reflection": reflection,
            "reflected_version": reflected_version,
        }
        with writing(self.engine, connection) as conn:
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
        reflect: bool = True,
    ) -> FeedbackEvent:
        """Log feedback on one of the user's turns, queued for reflection (``reflect``):
        a worker shows it to the reflection together with its turn.

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
            "reflection": PENDING if reflect else None,
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
            return LoggedTurn(**_turn_fields(row))
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
        return [LoggedTurn(**_turn_fields(row)) for row in reversed(rows)]

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
        return [FeedbackEvent(**_feedback_fields(row)) for row in rows]

    def ratings_by_model(self, user_id: str) -> dict[str, tuple[int, int]]:
        """Per model that served the user: how many of its turns they rated and the sum of
        those ratings (the last rating of a turn counts)."""
        t, f = turns_table, feedback_table
        query = (
            sa.select(t.c.model, f.c.turn_id, f.c.rating)
            .select_from(f.join(t, sa.and_(t.c.user_id == f.c.user_id, t.c.turn_id == f.c.turn_id)))
            .where(f.c.user_id == user_id, f.c.kind == "rating")
            .order_by(f.c.id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        last = {turn: (model, rating) for model, turn, rating in rows}
        out: dict[str, tuple[int, int]] = {}
        for model, rating in last.values():
            count, total = out.get(model or "", (0, 0))
            out[model or ""] = (count + 1, total + int(rating or 0))
        return out

    def count_turns(self, user_id: str) -> int:
        """How many turns of the user are logged."""
        query = sa.select(sa.func.count()).where(turns_table.c.user_id == user_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def users_with_feedback(self) -> list[str]:
        """Every user with at least one feedback event (whom slow adaptation looks at)."""
        query = sa.select(feedback_table.c.user_id).distinct().order_by(feedback_table.c.user_id)
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(query)]

    # -- the reflection queue -------------------------------------------------------------

    def queued(
        self, *, states: tuple[str, ...] = (PENDING,), user_id: str | None = None
    ) -> dict[str, str]:
        """Users with queued work that may run now (no retry wait), each with the time of
        their newest queued item: a debounce counts from it."""
        now = utc_now()
        newest: dict[str, str] = {}
        with self.engine.connect() as conn:
            for table in (turns_table, feedback_table):
                query = (
                    sa.select(table.c.user_id, sa.func.max(table.c.created_at))
                    .where(table.c.reflection.in_(states), _not_waiting(table, now))
                    .group_by(table.c.user_id)
                )
                if user_id is not None:
                    query = query.where(table.c.user_id == user_id)
                for user, latest in conn.execute(query):
                    newest[user] = max(latest, newest.get(user, ""))
        return newest

    def count_queued(self, user_id: str, *, states: tuple[str, ...] = (PENDING,)) -> int:
        """How many of the user's turns and feedback events are queued in ``states``."""
        total = 0
        with self.engine.connect() as conn:
            for table in (turns_table, feedback_table):
                total += conn.execute(
                    sa.select(sa.func.count()).where(
                        table.c.user_id == user_id, table.c.reflection.in_(states)
                    )
                ).scalar_one()
        return total

    def claim(
        self,
        user_id: str,
        *,
        conn: sa.Connection | None = None,
        states: tuple[str, ...] = (PENDING,),
        limit: int = 8,
    ) -> Claim:
        """The user's oldest queued turns (at most ``limit``) and feedback events.

        With ``conn`` (PostgreSQL, inside the caller's transaction) the rows are locked
        ``FOR UPDATE SKIP LOCKED``: no other worker sees them until that transaction ends,
        and a worker that dies releases them with its connection. Without, nothing is
        locked; :meth:`mark_reflected` then makes sure only one reflection of them counts.
        """
        t, f = turns_table, feedback_table
        now = utc_now()
        claim = Claim(user_id)

        def locked(query: Any) -> Any:
            return query.with_for_update(skip_locked=True) if conn is not None else query

        with reading(self.engine, conn) as c:
            turn_rows = c.execute(
                locked(
                    sa.select(t)
                    .where(t.c.user_id == user_id, t.c.reflection.in_(states), _not_waiting(t, now))
                    .order_by(t.c.created_at, t.c.turn_id)
                    .limit(limit)
                )
            ).mappings()
            claim.turns = [LoggedTurn(**_turn_fields(row)) for row in turn_rows]
            feedback_rows = c.execute(
                locked(
                    sa.select(f)
                    .where(f.c.user_id == user_id, f.c.reflection == PENDING, _not_waiting(f, now))
                    .order_by(f.c.id)
                    .limit(limit)
                )
            ).mappings()
            claim.feedback = [FeedbackEvent(**_feedback_fields(row)) for row in feedback_rows]
            claimed = {turn.turn_id for turn in claim.turns}
            others = sorted({e.turn_id for e in claim.feedback} - claimed)
            if others:
                rows = c.execute(
                    sa.select(t).where(t.c.user_id == user_id, t.c.turn_id.in_(others))
                ).mappings()
                claim.rated_turns = {
                    row["turn_id"]: LoggedTurn(**_turn_fields(row)) for row in rows
                }
        return claim

    @staticmethod
    def mark_reflected(conn: sa.Connection, claim: Claim, version: int | None) -> None:
        """Mark the claim's work reflected, in ``conn``'s transaction (the one that writes
        the reflection's version). Raises :class:`ClaimLostError` when any of it is no
        longer queued, so that the transaction, version included, is rolled back."""
        t, f = turns_table, feedback_table
        done = {"reflection": DONE, "reflected_version": version, "reflect_error": None}
        queued = (PENDING, BATCHED)
        marked = 0
        if claim.turns:
            marked += conn.execute(
                t.update()
                .where(
                    t.c.user_id == claim.user_id,
                    t.c.turn_id.in_([turn.turn_id for turn in claim.turns]),
                    t.c.reflection.in_(queued),
                )
                .values(**done)
            ).rowcount
        if claim.feedback:
            marked += conn.execute(
                f.update()
                .where(f.c.id.in_([e.id for e in claim.feedback]), f.c.reflection.in_(queued))
                .values(**done)
            ).rowcount
        if marked != len(claim.turns) + len(claim.feedback):
            raise ClaimLostError(
                f"{claim.user_id}'s queued work was reflected elsewhere or deleted meanwhile"
            )

    def mark_failed(
        self,
        claim: Claim,
        error: str,
        *,
        max_attempts: int = 3,
        retry_after_s: float = 30.0,
        conn: sa.Connection | None = None,
    ) -> None:
        """Count a failed reflection of the claim: retried after ``retry_after_s`` (doubling
        per attempt), :data:`FAILED` after ``max_attempts`` (kept, with the error)."""
        now = datetime.now(UTC)
        for table, key, ids in (
            (turns_table, turns_table.c.turn_id, [turn.turn_id for turn in claim.turns]),
            (feedback_table, feedback_table.c.id, [e.id for e in claim.feedback]),
        ):
            if not ids:
                continue
            mine = [table.c.user_id == claim.user_id, table.c.reflection != DONE]
            with writing(self.engine, conn) as c:
                rows = c.execute(
                    sa.select(key, table.c.reflect_attempts).where(*mine, key.in_(ids))
                ).all()
                for item, tried in rows:
                    tried = (tried or 0) + 1
                    later = now + timedelta(seconds=retry_after_s * 2 ** (tried - 1))
                    values: dict[str, Any] = {
                        "reflect_attempts": tried,
                        "reflect_error": error[:2000],
                        "reflect_after": _iso(later),
                    }
                    if tried >= max_attempts:
                        values["reflection"] = FAILED
                    c.execute(table.update().where(*mine, key == item).values(**values))

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


def _turn_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in LoggedTurn.model_fields}


def _feedback_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in FeedbackEvent.model_fields}


def _not_waiting(table: sa.Table, now: str) -> Any:
    return sa.or_(table.c.reflect_after.is_(None), table.c.reflect_after <= now)


def _add_missing_columns(engine: sa.Engine) -> None:
    """Bring a log made by an earlier version up to date: the columns and indexes it lacks
    are added (nothing is dropped or rewritten)."""
    inspector = sa.inspect(engine)
    for table in (turns_table, feedback_table):
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        if not missing and all(i.name in indexes for i in table.indexes):
            continue
        with engine.begin() as conn:
            for column in missing:
                kind = column.type.compile(dialect=engine.dialect)
                default = (
                    f" DEFAULT {column.server_default.arg}"
                    if column.server_default is not None
                    else ""
                )
                null = "" if column.nullable or default else " NOT NULL"
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{default}{null}"
                    )
                )
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn, checkfirst=True)
        log.info("interaction log: table %s upgraded (%s)", table.name, [c.name for c in missing])


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
    target: Any, user_id: str, reply: Any, kind: str, **fields: Any
) -> FeedbackEvent:
    """Feedback on a reply the persona graph returned (an ``AIMessage``): its turn id is
    in ``reply.response_metadata["persona"]["turn_id"]``. ``target``: the graph (its
    reflection then learns from the feedback) or an :class:`InteractionLog` (logged only,
    for a worker to reflect on). ``fields`` as for :meth:`InteractionLog.record_feedback`."""
    metadata = getattr(reply, "response_metadata", None) or {}
    turn_id = (metadata.get("persona") or {}).get("turn_id")
    if not turn_id:
        raise PersonaConfigError(
            "this reply carries no persona turn id (response_metadata['persona']['turn_id']): "
            "only replies of the persona graph can be rated by message; pass the turn id to "
            "InteractionLog.record_feedback instead."
        )
    return target.record_feedback(user_id, turn_id, kind, **fields)
