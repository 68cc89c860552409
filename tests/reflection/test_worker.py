"""Background reflection driven by the interaction log, on real SQLite and PostgreSQL.

The worker claims a user's queued turns and feedback, reflects, and marks them reflected in
the transaction that writes the version. These tests queue turns in a real log, run real
workers (threads here; processes in ``test_worker_processes.py``) and read what the store and
the log say afterwards.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from persona_plugin.interactions import (
    BATCHED,
    DONE,
    FAILED,
    PENDING,
    InteractionLog,
    turns_table,
)
from persona_plugin.privacy import forget_user
from persona_plugin.reflection.apply import ReflectionJob
from persona_plugin.reflection.worker import ReflectionWorker
from persona_plugin.store import PersonaStore
from tests.fakes import TurnReflector


def queue(log: InteractionLog, user: str, *turn_ids: str, state: str = PENDING) -> None:
    for turn_id in turn_ids:
        log.record_turn(
            user, turn_id, user_text=f"message {turn_id}", reply_text="ok", reflection=state
        )


def worker_for(
    store: PersonaStore, reflector: TurnReflector, **options: Any
) -> tuple[InteractionLog, ReflectionWorker]:
    log = InteractionLog.on(store)
    return log, ReflectionWorker(log, ReflectionJob(store=store, reflector=reflector), **options)


def interests(store: PersonaStore, user: str) -> list[str]:
    return store.get(user).personality.interests


def test_quick_turns_become_one_reflection_per_user_once_the_debounce_passes(
    store: PersonaStore,
) -> None:
    reflector = TurnReflector()
    log, worker = worker_for(store, reflector, debounce_s=0.4, poll_s=0.1)
    try:
        for n in range(1, 4):
            queue(log, "ana", f"a{n}")
            queue(log, "ben", f"b{n}")
            worker.notify()
        assert reflector.calls == []  # the debounce is still running
        deadline = time.monotonic() + 15
        while len(reflector.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # longer than the debounce: nothing follows
        assert sorted([t.turn_id for t in call] for call in reflector.calls) == [
            ["a1", "a2", "a3"],
            ["b1", "b2", "b3"],
        ]
    finally:
        assert worker.close(timeout=10)
    assert interests(store, "ana") == ["topic a1", "topic a2", "topic a3"]
    record = store.get_version("ana")
    assert record.details["reflection"]["turn_ids"] == ["a1", "a2", "a3"]
    logged = log.turns("ana")
    assert {(t.reflection, t.reflected_version) for t in logged} == {(DONE, record.version)}


def test_a_long_queue_is_reflected_in_batches_in_order(store: PersonaStore) -> None:
    reflector = TurnReflector()
    log, worker = worker_for(store, reflector, max_turns=4)
    queue(log, "ana", *(f"t{n:02}" for n in range(10)))
    assert worker.drain(timeout=30)
    assert [[t.turn_id for t in call] for call in reflector.calls] == [
        ["t00", "t01", "t02", "t03"],
        ["t04", "t05", "t06", "t07"],
        ["t08", "t09"],
    ]
    assert interests(store, "ana") == [f"topic t{n:02}" for n in range(10)]
    assert store.current_version("ana") == 3


def test_drain_and_close_finish_queued_work_and_count_failures(
    store: PersonaStore, caplog: pytest.LogCaptureFixture
) -> None:
    reflector = TurnReflector(fail_for=("bad",))
    log, worker = worker_for(store, reflector, debounce_s=60, max_attempts=2, retry_after_s=0.2)
    queue(log, "ana", "t1")
    queue(log, "bad", "t2")
    assert worker.drain(timeout=10)
    assert interests(store, "ana") == ["topic t1"]
    assert "background reflection for bad failed" in caplog.text
    # the failure waits for its retry, with its error kept
    (failed,) = log.turns("bad")
    assert failed.reflection == PENDING
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(turns_table.c.reflect_attempts, turns_table.c.reflect_error).where(
                turns_table.c.turn_id == "t2"
            )
        ).one()
    assert row.reflect_attempts == 1 and "reflection model down" in row.reflect_error
    assert not store.exists("bad")
    time.sleep(0.25)
    queue(log, "ana", "t3")
    assert worker.close(timeout=10)  # close drains first: ana's t3, bad's second try
    assert interests(store, "ana") == ["topic t1", "topic t3"]
    assert log.turns("bad")[0].reflection == FAILED  # after max_attempts: kept, not retried
    assert [o.user_id for o in worker.outcomes] == ["ana", "bad", "ana", "bad"]


def test_draining_one_user_leaves_the_others_queued(store: PersonaStore) -> None:
    reflector = TurnReflector()
    log, worker = worker_for(store, reflector, debounce_s=60)
    queue(log, "ana", "t1")
    queue(log, "ben", "t2")
    assert worker.drain(timeout=10, user_id="ana")
    assert [[t.turn_id for t in c] for c in reflector.calls] == [["t1"]]
    assert worker.drain(timeout=10, user_id="nobody")
    assert log.count_queued("ben") == 1
    assert worker.close(timeout=10)
    assert [[t.turn_id for t in c] for c in reflector.calls] == [["t1"], ["t2"]]


def test_batched_turns_wait_for_their_nth_turn_not_for_the_worker(store: PersonaStore) -> None:
    reflector = TurnReflector()
    log, worker = worker_for(store, reflector, debounce_s=0.0, poll_s=0.05)
    queue(log, "ana", "t1", "t2", state=BATCHED)
    worker.notify()
    time.sleep(0.3)
    assert reflector.calls == []  # the background worker leaves them alone
    assert worker.reflect_user("ana", states=(BATCHED,)) is not None
    assert interests(store, "ana") == ["topic t1", "topic t2"]
    worker.close(timeout=10)


def test_a_restarted_worker_resumes_what_was_pending(store: PersonaStore) -> None:
    first_reflector = TurnReflector()
    log, first = worker_for(store, first_reflector, debounce_s=600)
    queue(log, "ana", "t1", "t2")
    first.notify()  # the debounce holds them; then the process "stops" without draining
    first._closed = True
    second_reflector = TurnReflector()
    _, second = worker_for(store, second_reflector, debounce_s=0.0, poll_s=0.05)
    second.start()
    deadline = time.monotonic() + 15
    while log.count_queued("ana") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert second.close(timeout=10)
    assert first_reflector.calls == []
    assert [[t.turn_id for t in c] for c in second_reflector.calls] == [["t1", "t2"]]


def test_forgetting_a_user_mid_reflection_writes_nothing_back(store: PersonaStore) -> None:
    """The reflection was running when the user was forgotten: its version must not bring
    the user back (SQLite: it finds its work gone; PostgreSQL: the delete waits for it)."""
    reflector = TurnReflector(delay=0.6)
    log, worker = worker_for(store, reflector)
    queue(log, "ana", "t1")
    running = threading.Thread(target=worker.drain, kwargs={"timeout": 30})
    running.start()
    deadline = time.monotonic() + 10
    while not reflector.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reflector.calls, "the reflection did not start"
    forget_user("ana", store=store, interactions=log)
    running.join(30)
    assert not store.exists("ana")
    assert log.turns("ana") == []
    worker.close(timeout=10)


def test_two_workers_in_one_process_never_reflect_a_turn_twice(store: PersonaStore) -> None:
    reflector = TurnReflector(delay=0.01)
    log = InteractionLog.on(store)
    for user in range(6):
        queue(log, f"u{user}", *(f"u{user}-t{n}" for n in range(5)))
    job = ReflectionJob(store=store, reflector=reflector)
    workers = [ReflectionWorker(log, job, max_turns=2) for _ in range(2)]
    threads = [threading.Thread(target=w.drain, kwargs={"timeout": 60}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for worker in workers:
        worker.close(timeout=10)
    # on SQLite the second may repeat a reflection the first already counted; what counts
    # is that every turn is learned once and marked reflected once
    for user in range(6):
        assert sorted(interests(store, f"u{user}")) == [f"topic u{user}-t{n}" for n in range(5)]
        assert {t.reflection for t in log.turns(f"u{user}")} == {DONE}
    if store.engine.dialect.name == "postgresql":
        reflected = [t.turn_id for call in reflector.calls for t in call]
        assert sorted(reflected) == sorted(set(reflected)) and len(reflected) == 30


def test_an_old_log_is_upgraded_in_place(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:  # the log as the first release wrote it
        conn.execute(
            sa.text(
                "CREATE TABLE interaction_turns (user_id VARCHAR(128) NOT NULL, turn_id "
                "VARCHAR(200) NOT NULL, thread_id VARCHAR(200), created_at VARCHAR(40) NOT "
                "NULL, user_text TEXT NOT NULL, reply_text TEXT NOT NULL, persona_version "
                "INTEGER, model VARCHAR(200), latency_ms FLOAT, details JSON NOT NULL, "
                "PRIMARY KEY (user_id, turn_id))"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO interaction_turns VALUES ('ana', 't0', NULL, "
                "'2026-11-01T00:00:00.000000+00:00', 'hi', 'hello', 1, 'm', 1.0, '{}')"
            )
        )
    engine.dispose()
    with PersonaStore(sqlite_url) as store:
        log = InteractionLog.on(store)
        queue(log, "ana", "t1")
        assert [(t.turn_id, t.reflection) for t in log.turns("ana")] == [
            ("t0", None),
            ("t1", PENDING),
        ]
        assert log.count_queued("ana") == 1
