"""Running slow adaptation off the request path: a lease per user, a loop, a thread.

:class:`AdaptationScheduler` looks every ``interval_s`` for users with feedback newer than
their last adaptation, and adapts each (:func:`adapt_preference_model`) under a **lease**:
a row of ``adaptation_leases`` in the store's database, taken by one holder until it
expires. Replicas of ``persona serve`` and ``persona adapt --watch`` workers sharing one
database therefore never train one user twice at once; a holder that dies leaves a lease
that expires (``lease_s``) and is taken over. The row also records the newest feedback
event the last run saw (``seen_feedback``), so a user is adapted again only when they
gave feedback since, whatever the outcome (a rejected candidate is not retrained on the
same data every interval).

``persona serve`` starts it when ``PERSONA_ADAPT_INTERVAL_S`` is set (off by default);
``persona adapt --watch`` runs :meth:`AdaptationScheduler.run_forever` as a worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from persona_plugin.adaptation.adapter import MIN_EXAMPLES, adapt_adapter
from persona_plugin.adaptation.preference import MIN_PAIRS, AdaptationResult, adapt_preference_model
from persona_plugin.interactions import feedback_table

log = logging.getLogger(__name__)

_metadata = sa.MetaData()
leases_table = sa.Table(
    "adaptation_leases",
    _metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(20), primary_key=True),
    sa.Column("holder", sa.String(120)),
    sa.Column("expires_at", sa.String(40)),
    # the newest feedback event id the last finished run read
    sa.Column("seen_feedback", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_status", sa.String(20)),
    sa.Column("last_run_at", sa.String(40)),
)


def _now() -> datetime:
    return datetime.now(UTC)


class Leases:
    """Leases on (user, kind) in the store's database: who adapts a user now."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _metadata.create_all(engine, checkfirst=True)

    def acquire(self, user_id: str, kind: str, holder: str, lease_s: float) -> bool:
        """Take the lease if it is free, expired or already ours; whether we hold it."""
        now = _now()
        until = (now + timedelta(seconds=lease_s)).isoformat()
        t = leases_table
        with self.engine.begin() as conn:
            taken = conn.execute(
                t.update()
                .where(t.c.user_id == user_id, t.c.kind == kind)
                .where(
                    sa.or_(
                        t.c.holder.is_(None),
                        t.c.holder == holder,
                        t.c.expires_at < now.isoformat(),
                    )
                )
                .values(holder=holder, expires_at=until)
            ).rowcount
            if taken:
                return True
            exists = conn.execute(
                sa.select(t.c.user_id).where(t.c.user_id == user_id, t.c.kind == kind)
            ).first()
        if exists:
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    t.insert().values(user_id=user_id, kind=kind, holder=holder, expires_at=until)
                )
        except sa.exc.IntegrityError:  # another holder inserted it first
            return False
        return True

    def release(
        self, user_id: str, kind: str, holder: str, *, seen: int | None, status: str | None
    ) -> None:
        """Give the lease back, recording what the run read and how it ended."""
        values: dict[str, Any] = {"holder": None, "expires_at": None}
        if seen is not None:
            values |= {
                "seen_feedback": seen,
                "last_status": status,
                "last_run_at": _now().isoformat(),
            }
        t = leases_table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.user_id == user_id, t.c.kind == kind, t.c.holder == holder)
                .values(**values)
            )

    def seen(self, user_id: str, kind: str) -> int:
        """The newest feedback id the user's last finished run read (0: none ran)."""
        t = leases_table
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(t.c.seen_feedback).where(t.c.user_id == user_id, t.c.kind == kind)
            ).scalar()
        return int(found or 0)

    def due(self, kind: str) -> list[tuple[str, int]]:
        """Users with feedback newer than their last run, and their newest feedback id."""
        f, t = feedback_table, leases_table
        newest = (
            sa.select(f.c.user_id, sa.func.max(f.c.id).label("newest"))
            .group_by(f.c.user_id)
            .subquery()
        )
        query = (
            sa.select(newest.c.user_id, newest.c.newest)
            .select_from(
                newest.outerjoin(t, sa.and_(t.c.user_id == newest.c.user_id, t.c.kind == kind))
            )
            .where(sa.or_(t.c.seen_feedback.is_(None), t.c.seen_feedback < newest.c.newest))
            .order_by(newest.c.user_id)
        )
        with self.engine.connect() as conn:
            return [(row[0], int(row[1])) for row in conn.execute(query)]

    def delete_user(self, user_id: str) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                leases_table.delete().where(leases_table.c.user_id == user_id)
            ).rowcount


class AdaptationScheduler:
    """Adapts users with new feedback every ``interval_s``, one holder per user at a time.

    ``store``: the persona store (its database holds the log and the leases); ``log``: the
    interaction log on it; ``hub``: the preference hub (its ``owned`` folders get the
    versions). ``lease_s`` must outlast one user's training (seconds for a preference
    model, minutes for an adapter). ``on_result`` is called with each run's
    :class:`AdaptationResult`. ``backend``: the local backend; given, users' own adapters
    are trained too (``min_examples`` endorsed replies each).
    """

    def __init__(
        self,
        *,
        store: Any,
        log: Any,
        hub: Any,
        interval_s: float = 300.0,
        min_pairs: int = MIN_PAIRS,
        lease_s: float = 600.0,
        holder: str | None = None,
        on_result: Any = None,
        backend: Any = None,
        min_examples: int = MIN_EXAMPLES,
    ) -> None:
        self.store, self.log, self.hub = store, log, hub
        self.interval_s, self.min_pairs, self.lease_s = interval_s, min_pairs, lease_s
        self.backend, self.min_examples = backend, min_examples
        #: preference models always; adapters too when given the local backend to gate with
        self.kinds = ("preference", "adapter") if backend is not None else ("preference",)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.leases = Leases(store.engine)
        self.outcomes: deque[AdaptationResult] = deque(maxlen=200)
        self.on_result = on_result  # called with each AdaptationResult (a worker prints it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _adapt(self, user_id: str, kind: str) -> AdaptationResult:
        if kind == "adapter":
            return adapt_adapter(
                user_id,
                log=self.log,
                backend=self.backend,
                store=self.store,
                min_examples=self.min_examples,
                embeddings=self.hub.embeddings,
            )
        return adapt_preference_model(
            user_id, log=self.log, hub=self.hub, store=self.store, min_pairs=self.min_pairs
        )

    def run_once(self) -> list[AdaptationResult]:
        """Adapt every user due now whose lease this holder gets; what each run did."""
        done = []
        for kind in self.kinds:
            done += self._round(kind)
        return done

    def _round(self, kind: str) -> list[AdaptationResult]:
        done = []
        for user_id, newest in self.leases.due(kind):
            if self._stop.is_set():
                break
            if not self.leases.acquire(user_id, kind, self.holder, self.lease_s):
                continue  # another replica adapts them now
            seen, status = None, None
            try:
                if self.leases.seen(user_id, kind) >= newest:
                    continue  # another replica finished them since this round looked
                result = self._adapt(user_id, kind)
                seen, status = newest, result.status
                self.outcomes.append(result)
                done.append(result)
                if self.on_result is not None:
                    self.on_result(result)
                log.info("adapted %s (%s): %s (%s)", user_id, kind, result.status, result.reason)
            except Exception:
                # a failed run is retried at the next interval: nothing recorded as seen
                log.exception("adapting %s (%s) failed", user_id, kind)
            finally:
                self.leases.release(user_id, kind, self.holder, seen=seen, status=status)
        return done

    def run_forever(self) -> None:
        """:meth:`run_once` every ``interval_s`` until :meth:`stop`."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run_once()
            except Exception:  # the database away for a moment: try again next interval
                log.exception("adaptation round failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> AdaptationScheduler:
        """Run in a daemon thread (``persona serve``)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self.run_forever, name="persona-adaptation", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop after the user being adapted now; whether the thread ended in time."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
