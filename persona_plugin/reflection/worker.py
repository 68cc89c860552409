"""Background reflection driven by the interaction log: nothing queued is lost to a crash.

In ``background`` mode the persona graph logs each turn as *pending* before its reply is
returned, and feedback events are logged pending too. A :class:`ReflectionWorker` claims
a user's pending work, reflects on it (the turns with the feedback on them), and marks it
reflected **in the same transaction** as the persona version it saves: either both are
written or neither. A process that dies mid-reflection leaves its work pending, and the
next worker (the restarted server, another process) picks it up.

- **PostgreSQL**: the claim locks the user's queued rows ``FOR UPDATE SKIP LOCKED``
  inside the worker's transaction, and a transaction-scoped advisory lock on the user
  keeps two workers from reflecting one user at once. Other workers skip locked work, so
  several server processes on one database never reflect the same turn twice; a worker
  that dies releases its locks with its connection. The transaction stays open while the
  reflection call runs (one connection per busy worker).
- **SQLite**: a worker thread in the process. Nothing is locked while the reflection runs
  (a write lock would stall every turn); marking the work reflected only succeeds if it is
  still pending, so if two processes ever reflect the same work, only one version is kept.

Debounce stays: a user's pending work is taken once their newest item is ``debounce_s``
old, so several quick turns become one reflection. A failed reflection is retried after
``retry_after_s`` (doubling), and kept as *failed* with its error after ``max_attempts``.
``every_n_turns`` mode logs turns as *batched*; the graph reflects them inline on every
n-th turn (:meth:`ReflectionWorker.reflect_user`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from persona_plugin._db import writing
from persona_plugin.interactions import (
    PENDING,
    Claim,
    ClaimLostError,
    FeedbackEvent,
    InteractionLog,
    LoggedTurn,
)
from persona_plugin.reflection.types import FeedbackNote, ReflectionOutcome, ReflectionTurn

log = logging.getLogger(__name__)

#: first key of the workers' advisory locks (the second is the user id's hash)
_LOCK_SPACE = 0x5045  # "PE"


def _words(text: str | None) -> int:
    return len((text or "").split())


def feedback_note(event: FeedbackEvent, turn: LoggedTurn) -> FeedbackNote:
    """A feedback event as the reflection is shown it, with what plain code can observe."""
    note = FeedbackNote(
        id=f"fb{event.id}",
        kind=event.kind,
        rating=event.rating,
        comment=event.comment,
        text=event.text,
    )
    if event.kind == "edit":
        before, after = _words(turn.reply_text), _words(event.text)
        if before:
            note.length_ratio = round(after / before, 3)
            change = note.length_change
            size = f"much {change} than" if change else "about as long as"
            note.observation = (
                f"the user's version is {size} the reply: {after} words against {before}"
            )
    elif event.kind == "choice":
        candidates = (turn.details.get("mbr") or {}).get("candidates") or []
        if event.choice is not None and 0 <= event.choice < len(candidates):
            note.text = str(candidates[event.choice])
    return note


def reflection_turns(claim: Claim) -> list[ReflectionTurn]:
    """The claim as reflection turns: its turns in order, each with its feedback, then the
    earlier turns that only feedback brought back."""
    turns = {t.turn_id: t for t in claim.turns}
    notes: dict[str, list[FeedbackNote]] = {}
    for event in claim.feedback:
        turn = turns.get(event.turn_id) or claim.rated_turns.get(event.turn_id)
        if turn is None:  # its turn has gone (retention): nothing to judge it by
            continue
        notes.setdefault(event.turn_id, []).append(feedback_note(event, turn))
    ordered = [*claim.turns, *(claim.rated_turns[t] for t in notes if t not in turns)]
    return [
        ReflectionTurn(
            t.turn_id,
            t.user_text,
            t.reply_text,
            feedback=notes.get(t.turn_id, []),
            reflected=t.turn_id not in turns,
        )
        for t in ordered
    ]


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


class ReflectionWorker:
    """Reflects on the interaction log's queued work, in a thread, with debounce.

    ``job`` is a :class:`~persona_plugin.reflection.apply.ReflectionJob` (the store,
    reflector and memory to use). The thread starts with :meth:`start` or the first
    :meth:`notify` (a new pending turn); from then on it also polls every ``poll_s`` for
    work other processes queued. :meth:`drain` reflects on what is queued now without
    waiting for the debounce (all of it, or one user's, before that user is forgotten);
    :meth:`close` drains and stops the thread (call it on shutdown).
    """

    def __init__(
        self,
        log_: InteractionLog,
        job: Any,
        *,
        debounce_s: float = 1.0,
        poll_s: float = 2.0,
        max_turns: int = 8,
        max_attempts: int = 3,
        retry_after_s: float = 30.0,
    ) -> None:
        self.log = log_
        self.job = job
        self.debounce_s = debounce_s
        self.poll_s = poll_s
        self.max_turns = max_turns
        self.max_attempts = max_attempts
        self.retry_after_s = retry_after_s
        self.lock_rows = log_.engine.dialect.name == "postgresql"
        #: the latest outcomes, newest last (for tests and operators; bounded)
        self.outcomes: deque[ReflectionOutcome] = deque(maxlen=200)
        self._reflecting = threading.Lock()  # one reflection at a time in this process
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (idempotent): it resumes whatever was left pending."""
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._work, name="persona-reflection", daemon=True
                )
                self._thread.start()

    def notify(self) -> None:
        """New work was queued: look now (starts the thread if needed)."""
        self.start()
        self._wake.set()

    def _work(self) -> None:
        failing = ""
        while not self._closed:
            self._wake.clear()
            wait = self.poll_s
            try:
                wait = min(wait, self._run_due())
                failing = ""
            except Exception as exc:  # a database hiccup: keep the thread, try again later
                if str(exc) != failing:
                    log.warning("reflection worker: cannot read the queue: %s", exc)
                failing, wait = str(exc), max(wait, 10.0)
            self._wake.wait(max(wait, 0.01))

    def _run_due(self) -> float:
        """Reflect on every user whose debounce has passed; seconds until the next is due."""
        now = datetime.now(UTC)
        debounce = timedelta(seconds=self.debounce_s)
        queued = sorted(self.log.queued().items(), key=lambda item: item[1])
        wait = self.poll_s
        for user_id, newest in queued:
            if self._closed:
                break
            due = _parse(newest) + debounce
            if due > now:
                wait = min(wait, (due - now).total_seconds())
            elif self.reflect_user(user_id) is not None:
                wait = 0.0  # more may be queued for them (over max_turns): look again
        return wait

    # -- reflecting -----------------------------------------------------------------------

    def reflect_user(
        self, user_id: str, *, states: Sequence[str] = (PENDING,), limit: int | None = None
    ) -> ReflectionOutcome | None:
        """Claim one batch of the user's queued work (at most ``limit`` turns, default
        ``max_turns``) and reflect on it now; None when there is none to claim (or, on
        PostgreSQL, another worker is reflecting the user)."""
        limit = limit or self.max_turns
        with self._reflecting:
            if not self.lock_rows:
                claim = self.log.claim(user_id, states=tuple(states), limit=limit)
                return self._reflect(claim, None) if claim else None
            with self.log.engine.connect() as conn, conn.begin():
                locked = conn.execute(
                    sa.select(
                        sa.func.pg_try_advisory_xact_lock(_LOCK_SPACE, sa.func.hashtext(user_id))
                    )
                ).scalar_one()
                if not locked:
                    return None
                claim = self.log.claim(user_id, conn=conn, states=tuple(states), limit=limit)
                return self._reflect(claim, conn) if claim else None

    def _reflect(self, claim: Claim, conn: sa.Connection | None) -> ReflectionOutcome:
        turns = reflection_turns(claim)

        def reflected(c: sa.Connection, version: int) -> None:
            InteractionLog.mark_reflected(c, claim, version)

        try:
            if not turns:  # feedback whose turns are gone: nothing to reflect on
                with writing(self.log.engine, conn) as c:
                    InteractionLog.mark_reflected(c, claim, None)
                outcome = ReflectionOutcome(user_id=claim.user_id, turn_ids=[])
            else:
                outcome = self.job.run(claim.user_id, turns, connection=conn, also=reflected)
        except ClaimLostError as exc:
            log.info("reflection of %s not kept: %s", claim.user_id, exc)
            return ReflectionOutcome(
                user_id=claim.user_id, turn_ids=[t.turn_id for t in turns], error=str(exc)
            )
        except Exception as exc:
            log.warning("background reflection for %s failed", claim.user_id, exc_info=True)
            outcome = ReflectionOutcome(
                user_id=claim.user_id,
                turn_ids=[t.turn_id for t in turns],
                error=f"{type(exc).__name__}: {exc}",
            )
        if outcome.error:
            try:
                self.log.mark_failed(
                    claim,
                    outcome.error,
                    max_attempts=self.max_attempts,
                    retry_after_s=self.retry_after_s,
                    conn=conn,
                )
            except Exception:
                log.warning("could not count the failed reflection of %s", claim.user_id)
        self.outcomes.append(outcome)
        return outcome

    # -- draining -------------------------------------------------------------------------

    def drain(self, timeout: float | None = None, *, user_id: str | None = None) -> bool:
        """Reflect on everything queued now, without the debounce; True if nothing that
        may run is left (a failed reflection waits for its retry, and does not count).

        ``user_id``: only that user's work, e.g. before the user is forgotten.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            users = list(self.log.queued(user_id=user_id))
            if not users:
                return True
            progressed = False
            for user in users:
                progressed |= self.reflect_user(user) is not None
                if deadline is not None and time.monotonic() > deadline:
                    return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            if not progressed:  # another worker holds them: wait for it
                time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after the reflection in hand; what is queued stays queued."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop the thread; True if everything queued was reflected."""
        try:
            finished = self.drain(timeout)
        finally:
            self.stop(timeout)
        return finished
