"""The interaction log on real SQLite and PostgreSQL: turns, feedback, caps, retention, privacy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from persona_plugin.errors import PersonaValidationError
from persona_plugin.interactions import (
    MAX_FEEDBACK_CHARS,
    TRUNCATED,
    InteractionLog,
    TurnNotFoundError,
    TurnOwnedElsewhereError,
    turns_table,
)
from persona_plugin.store import PersonaStore
from tests.benchmarks import run_quick


@pytest.fixture
def log(store: PersonaStore) -> InteractionLog:
    """The log in the store's database: SQLite, and a fresh PostgreSQL schema."""
    return InteractionLog.on(store)


def turn(log: InteractionLog, user: str, turn_id: str, **extra) -> str:
    return log.record_turn(
        user, turn_id, user_text=f"{user} asks {turn_id}", reply_text="an answer", **extra
    )


def test_a_turn_is_logged_with_what_produced_it(log: InteractionLog) -> None:
    details = {
        "adapters": [["concise", 0.7], ["formal", 0.3]],
        "mbr": {"candidates": ["a", "b"], "scores": [0.2, 0.8], "chosen": 1},
        "tokens": {"input_tokens": 12, "output_tokens": 3},
    }
    turn(
        log,
        "ana",
        "t1",
        thread_id="th",
        persona_version=4,
        model="m",
        latency_ms=12.5,
        details=details,
    )
    (logged,) = log.turns("ana")
    assert (logged.turn_id, logged.thread_id, logged.persona_version, logged.model) == (
        "t1",
        "th",
        4,
        "m",
    )
    assert logged.details == details and logged.latency_ms == 12.5
    assert logged.user_text == "ana asks t1" and logged.reply_text == "an answer"
    # the same turn logged again (a retried request) is kept once
    turn(log, "ana", "t1")
    assert len(log.turns("ana")) == 1


def test_each_kind_of_feedback_refers_to_a_turn(log: InteractionLog) -> None:
    turn(log, "ana", "t1", details={"mbr": {"candidates": ["a", "b", "c"]}})
    log.record_feedback("ana", "t1", "rating", rating=-1, comment="too long")
    log.record_feedback("ana", "t1", "edit", text="A shorter answer.")
    log.record_feedback("ana", "t1", "regenerate")
    log.record_feedback("ana", "t1", "choice", choice=2)
    events = log.feedback("ana", turn_id="t1")
    assert [(e.kind, e.rating, e.comment, e.text, e.choice) for e in events] == [
        ("rating", -1, "too long", None, None),
        ("edit", None, None, "A shorter answer.", None),
        ("regenerate", None, None, None, None),
        ("choice", None, None, None, 2),
    ]
    assert [e.kind for e in log.feedback("ana", kind="edit")] == ["edit"]


@pytest.mark.parametrize(
    ("kind", "fields", "field"),
    [
        ("like", {}, "kind"),
        ("rating", {"rating": 5}, "rating"),
        ("rating", {"rating": True}, "rating"),
        ("rating", {"rating": 1, "text": "x"}, "text"),
        ("edit", {"text": "   "}, "text"),
        ("edit", {"text": "x" * (MAX_FEEDBACK_CHARS + 1)}, "text"),
        ("choice", {"choice": 3}, "choice"),
        ("choice", {"choice": "1"}, "choice"),
    ],
)
def test_malformed_feedback_is_refused_by_field_and_nothing_is_written(
    log: InteractionLog, kind: str, fields: dict, field: str
) -> None:
    turn(log, "ana", "t1", details={"mbr": {"candidates": ["a", "b"]}})
    with pytest.raises(PersonaValidationError) as exc:
        log.record_feedback("ana", "t1", kind, **fields)
    assert exc.value.path == field
    assert log.feedback("ana") == []


def test_feedback_on_an_unknown_or_another_users_turn_is_refused(log: InteractionLog) -> None:
    turn(log, "bo", "t9")
    with pytest.raises(TurnNotFoundError):
        log.record_feedback("ana", "nope", "regenerate")
    with pytest.raises(TurnOwnedElsewhereError):
        log.record_feedback("ana", "t9", "rating", rating=1)
    assert log.feedback("bo") == [] and log.feedback("ana") == []


def test_texts_past_the_cap_are_cut_and_marked(log: InteractionLog) -> None:
    small = InteractionLog(log.engine, max_text_chars=100)
    small.record_turn("ana", "t1", user_text="x" * 500, reply_text="short")
    (logged,) = small.turns("ana")
    assert len(logged.user_text) == 100 and logged.user_text.endswith(TRUNCATED)
    assert logged.reply_text == "short" and logged.details["truncated"] == ["user"]


def test_turns_since_and_limit_are_oldest_first(log: InteractionLog) -> None:
    for n in range(5):
        turn(log, "ana", f"t{n}")
    assert [t.turn_id for t in log.turns("ana", limit=2)] == ["t3", "t4"]
    middle = log.turns("ana")[2].created_at
    assert [t.turn_id for t in log.turns("ana", since=middle)] == ["t2", "t3", "t4"]


def test_retention_drops_old_turns_with_their_feedback(log: InteractionLog) -> None:
    kept = InteractionLog(log.engine, retention_days=30)
    turn(kept, "ana", "old")
    kept.record_feedback("ana", "old", "rating", rating=1)
    turn(kept, "ana", "new")
    long_ago = (datetime.now(UTC) - timedelta(days=31)).isoformat(timespec="microseconds")
    with kept.engine.begin() as conn:
        conn.execute(
            sa.update(turns_table).where(turns_table.c.turn_id == "old").values(created_at=long_ago)
        )
    assert kept.purge_expired() == 2
    assert [t.turn_id for t in kept.turns("ana")] == ["new"]
    assert kept.feedback("ana") == []
    # without a retention period nothing is dropped
    assert InteractionLog(log.engine).purge_expired() == 0


def test_users_are_isolated_exported_and_forgotten(log: InteractionLog) -> None:
    turn(log, "ana", "t1")
    log.record_feedback("ana", "t1", "rating", rating=1)
    turn(log, "bo", "t1")
    exported = log.export_user("ana")
    assert [t["turn_id"] for t in exported["turns"]] == ["t1"]
    assert [f["kind"] for f in exported["feedback"]] == ["rating"]
    assert all(t.user_id == "bo" for t in log.turns("bo"))
    assert log.delete_user("ana") == 2
    assert log.turns("ana") == [] and log.feedback("ana") == []
    assert [t.user_id for t in log.turns("bo")] == ["bo"]


def test_the_log_benchmark_runs_quick() -> None:
    done = run_quick("bench_interaction_log.py", timeout=300)
    assert "record_turn alone (ms)" in done.stdout and "ratio" in done.stdout
