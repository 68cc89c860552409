"""The versioned persona store, against a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import sqlalchemy as sa

from persona_plugin import (
    Persona,
    PersonaConflictError,
    PersonaLimits,
    PersonaNotFoundError,
    PersonaStore,
    PersonaValidationError,
    load,
)
from persona_plugin.errors import PersonaConfigError
from tests.paths import DATA

ALICE = DATA / "alice.yaml"


def _rows(store: PersonaStore, user_id: str | None = None) -> list[dict]:
    query = "SELECT user_id, version FROM persona_versions"
    params = {}
    if user_id is not None:
        query += " WHERE user_id = :u"
        params = {"u": user_id}
    with store.engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(sa.text(query + " ORDER BY version"), params).mappings()
        ]


def test_create_get_and_versions(store):
    first = store.create("alice", load(ALICE), reason="sign-up")
    assert first.version == 1 and first.source == "create" and first.reason == "sign-up"
    current = store.get("alice")
    assert current.meta.version == 1 and current.meta.user_id == "alice"
    assert current.meta.updated_at == first.created_at
    assert current.content_dict() == load(ALICE).content_dict()
    current.demographics.age = 35
    second = store.save("alice", current, reason="birthday")
    assert second.version == 2 and second.source == "user edit"
    assert [c.describe() for c in second.change] == ["~ demographics.age: 34 -> 35"]
    assert store.get("alice").demographics.age == 35
    assert store.get("alice", 1).demographics.age == 34
    assert store.get_version("alice", 2).reason == "birthday"
    assert store.current_version("alice") == 2
    assert store.exists("alice") and not store.exists("bob")
    assert store.users() == ["alice"]


def test_not_found_errors_say_what_exists(store):
    with pytest.raises(PersonaNotFoundError, match=r"has no persona\. Create one"):
        store.get("bob")
    store.create("bob")
    with pytest.raises(PersonaNotFoundError, match="no version 5; versions run from 1 to 1"):
        store.get("bob", 5)
    with pytest.raises(PersonaNotFoundError):
        store.history("carol")
    with pytest.raises(PersonaNotFoundError):
        store.delete("carol")
    with pytest.raises(PersonaNotFoundError):
        store.export("carol")


def test_create_twice_conflicts(store):
    store.create("alice")
    with pytest.raises(PersonaConflictError, match="at version 1, not the expected version 0"):
        store.create("alice")
    assert store.current_version("alice") == 1


def test_stale_save_conflicts_and_changes_nothing(store):
    store.create("alice")
    reader_a = store.get("alice")
    reader_b = store.get("alice")
    reader_a.personality.interests.append("jazz")
    store.save("alice", reader_a)
    reader_b.personality.interests.append("golf")
    with pytest.raises(PersonaConflictError) as info:
        store.save("alice", reader_b)
    assert info.value.expected == 1 and info.value.actual == 2
    assert "PersonaStore.update" in str(info.value)
    assert store.get("alice").personality.interests == ["jazz"]
    # an explicit expected version overrides the one the persona carries
    with pytest.raises(PersonaConflictError):
        store.save("alice", reader_b, expected_version=5)
    assert len(_rows(store, "alice")) == 2


def test_invalid_documents_leave_the_store_untouched(store_url):
    with PersonaStore(store_url, limits=PersonaLimits(max_value_chars=50)) as store:
        store.create("alice")
        p = store.get("alice")
        # assignment is validated for types, but the caps need the store's limits
        p.personality.description = "x" * 51
        with pytest.raises(PersonaValidationError, match=r"personality\.description"):
            store.save("alice", p)
        p = store.get("alice")
        p.identity.user_id = "mallory"
        with pytest.raises(PersonaValidationError, match="names user 'mallory'"):
            store.save("alice", p)
        with pytest.raises(PersonaValidationError, match="source"):
            store.save("alice", store.get("alice"), source="")
        with pytest.raises(PersonaValidationError, match="not a valid user id"):
            store.save("../alice", Persona())
        assert store.current_version("alice") == 1
        assert len(_rows(store)) == 1


def test_update_applies_function_and_retries_on_conflict(store):
    store.create("alice")
    calls = []

    def add_interest(p: Persona) -> None:
        calls.append(p.meta.version)
        if len(calls) == 1:
            # someone else saves while we compute: our first save must lose and retry
            other = store.get("alice")
            other.personality.interests.append("chess")
            store.save("alice", other, source="other writer")
        p.personality.interests.append("jazz")

    record = store.update("alice", add_interest, source="reflection turn t7", reason="said so")
    assert calls == [1, 2]
    assert record.version == 3 and record.source == "reflection turn t7"
    assert store.get("alice").personality.interests == ["chess", "jazz"]


def test_update_may_return_a_new_persona_and_create_missing(store):
    with pytest.raises(PersonaNotFoundError):
        store.update("dora", lambda p: None)
    record = store.update("dora", lambda p: Persona.new("dora", name="Dora"), create_missing=True)
    assert record.version == 1
    assert store.get("dora").identity.name == "Dora"


def test_history_diff_and_rollback(store):
    store.create("alice", load(ALICE))
    store.update("alice", lambda p: p.preference.style.append("formal"), reason="r2")
    store.update("alice", lambda p: setattr(p.demographics, "location", "Porto"), reason="r3")
    history = store.history("alice")
    assert [(h.version, h.source, h.reason) for h in history] == [
        (1, "create", ""),
        (2, "user edit", "r2"),
        (3, "user edit", "r3"),
    ]
    assert all(h.persona is None for h in history)
    assert [c.describe() for c in history[1].change] == ['+ preference.style[2]: "formal"']
    changes = store.diff("alice", 1, 3)
    assert {c.path for c in changes} == {"preference.style[2]", "demographics.location"}
    assert store.diff("alice", 3, 3) == []

    record = store.rollback("alice", 1, reason="undo")
    assert record.version == 4
    assert record.source == "rollback to version 1"
    assert record.details == {"rollback_to": 1}
    assert store.get("alice").content_dict() == store.get("alice", 1).content_dict()
    assert store.diff("alice", 1, 4) == []
    # history is kept: the rolled-back versions are still there
    assert store.get("alice", 3).demographics.location == "Porto"
    with pytest.raises(PersonaNotFoundError):
        store.rollback("alice", 9)


def test_details_are_kept(store):
    store.create("alice")
    usage = {"token_usage": {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150}}
    store.update("alice", lambda p: None, source="reflection turn t1", details=usage)
    assert store.history("alice")[-1].details == usage


def test_users_are_isolated(store):
    store.create("alice", load(ALICE))
    store.create("bob", Persona.new("bob", name="Bob"))
    store.update("bob", lambda p: p.personality.interests.append("golf"))
    assert store.get("alice").personality.interests == ["hiking", "jazz", "sourdough baking"]
    assert store.current_version("alice") == 1
    store.delete("bob")
    assert store.get("alice").identity.name == "Alice Martins"
    assert store.users() == ["alice"]


def test_export_holds_every_version(store):
    store.create("alice", load(ALICE))
    store.update("alice", lambda p: p.personality.values.append("kindness"), reason="r")
    store.create("bob")
    data = store.export("alice")
    assert data["user_id"] == "alice"
    assert [v["version"] for v in data["versions"]] == [1, 2]
    assert all(v["user_id"] == "alice" for v in data["versions"])
    assert data["versions"][1]["reason"] == "r"
    assert data["versions"][1]["document"]["personality"]["values"][-1] == "kindness"
    # the export is plain JSON and each document loads as a persona
    for v in json.loads(json.dumps(data))["versions"]:
        Persona.from_dict(v["document"])


def test_delete_removes_every_row(store):
    store.create("alice")
    for i in range(4):
        store.update("alice", lambda p, i=i: p.personality.interests.append(f"i{i}"))
    store.create("bob")
    assert store.delete("alice") == 5
    assert _rows(store, "alice") == []
    assert _rows(store) == [{"user_id": "bob", "version": 1}]
    with pytest.raises(PersonaNotFoundError):
        store.get("alice")
    # a new persona for the same id starts afresh
    assert store.create("alice").version == 1


def test_corrupted_row_is_reported_not_served(store):
    store.create("alice")
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE persona_versions SET document = :d WHERE user_id = 'alice'"),
            {"d": '{"demographics": {"age": "old"}}'},
        )
    with pytest.raises(PersonaValidationError, match=r"store \(alice v1\).*demographics.age"):
        store.get("alice")


def _append_item(store: PersonaStore, n: int) -> None:
    store.update("shared", lambda p: p.personality.interests.append(f"item-{n:02d}"))


def test_fifty_concurrent_thread_updaters_lose_nothing(store):
    store.create("shared")
    barrier = threading.Barrier(50)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            _append_item(store, n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    persona = store.get("shared")
    assert sorted(persona.personality.interests) == [f"item-{n:02d}" for n in range(50)]
    assert persona.meta.version == 51
    assert [h.version for h in store.history("shared")] == list(range(1, 52))


def _process_updater(url: str, n: int, barrier) -> None:
    with PersonaStore(url) as store:
        barrier.wait()
        _append_item(store, n)


def test_fifty_concurrent_process_updaters_lose_nothing(store_url):
    with PersonaStore(store_url) as store:
        store.create("shared")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(50)
    procs = [ctx.Process(target=_process_updater, args=(store_url, n, barrier)) for n in range(50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 50
    with PersonaStore(store_url) as store:
        persona = store.get("shared")
        assert sorted(persona.personality.interests) == [f"item-{n:02d}" for n in range(50)]
        assert persona.meta.version == 51
        assert len(_rows(store, "shared")) == 51


_SAVER = textwrap.dedent(
    """
    import sys
    from persona_plugin import PersonaStore
    store = PersonaStore(sys.argv[1])
    if not store.exists("k"):
        store.create("k")
    while True:
        # distinct items: a list of interests holds each once
        store.update("k", lambda p: p.personality.interests.append(
            f"{len(p.personality.interests)}" + "x" * 500
        ))
    """
)


def test_sigkill_mid_save_leaves_last_committed_version(store_url, tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    for _round in range(3):
        with PersonaStore(store_url) as store:
            start = store.current_version("k")
        proc = subprocess.Popen([sys.executable, str(script), store_url])
        deadline = time.monotonic() + 60
        try:
            with PersonaStore(store_url) as store:
                while store.current_version("k") < start + 15:
                    assert proc.poll() is None, "the saver died on its own"
                    assert time.monotonic() < deadline, "the saver made no progress"
                    time.sleep(0.01)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
    with PersonaStore(store_url) as store:
        current = store.current_version("k")
        assert current >= 45
        rows = _rows(store, "k")
        assert [r["version"] for r in rows] == list(range(1, current + 1))
        # every version loads and holds exactly the items of the saves before it
        for version in (1, current // 2, current):
            assert len(store.get("k", version).personality.interests) == version - 1
        store.update("k", lambda p: None, source="after the kills")
        assert store.current_version("k") == current + 1


def test_bad_store_urls_are_clear_errors(tmp_path):
    with pytest.raises(PersonaConfigError, match="not a database URL"):
        PersonaStore("not a url")
    with pytest.raises(PersonaConfigError, match="not supported"):
        PersonaStore("mysql://localhost/db")
    with pytest.raises(PersonaConfigError, match="cannot open the persona store"):
        PersonaStore("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")


def test_from_settings_uses_a_sqlite_file_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "home"))
    with PersonaStore.from_settings() as store:
        store.create("alice")
        assert store.url == f"sqlite:///{tmp_path / 'home' / 'personas.db'}"
    assert (tmp_path / "home" / "personas.db").is_file()
    with sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'personas.db'}").connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


def test_lowering_a_cap_keeps_stored_personas_readable(store_url):
    with PersonaStore(store_url) as roomy:
        roomy.create("alice", Persona.new("alice", name="A" * 100))
    with PersonaStore(store_url, limits=PersonaLimits(max_value_chars=10)) as tight:
        assert tight.get("alice").identity.name == "A" * 100
        # ...but a save must meet the cap in force
        with pytest.raises(PersonaValidationError, match=r"identity\.name"):
            tight.update("alice", lambda p: None)
        tight.update("alice", lambda p: setattr(p.identity, "name", "Alice"))
        assert tight.get("alice").identity.name == "Alice"


# -- store URLs ---------------------------------------------------------------------------


def test_an_in_memory_store_works_from_other_threads_and_async() -> None:
    import asyncio

    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from persona_plugin import with_persona

    with PersonaStore("sqlite:///:memory:") as store:
        store.create("ana", Persona.new("ana"))
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(store.current_version("ana")))
        worker.start()
        worker.join(10)
        assert seen == [1]
        chat = with_persona(FakeListChatModel(responses=["hi"]), store)
        cfg = {"configurable": {"user_id": "ana"}}
        assert asyncio.run(chat.ainvoke("hello", config=cfg)).content == "hi"


def test_a_missing_store_file_is_an_error_when_not_creating(tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    with pytest.raises(PersonaConfigError, match="no persona store"):
        PersonaStore(f"sqlite:///{missing}", create=False)
    assert not missing.parent.exists()  # and nothing was created on the way
    with PersonaStore(f"sqlite:///{missing}") as created:  # the default creates it
        assert created.users() == []
    with PersonaStore(f"sqlite:///{missing}", create=False) as existing:
        assert existing.users() == []


def test_an_unreachable_checkpointer_is_a_config_error() -> None:
    from persona_plugin import make_checkpointer

    with pytest.raises(PersonaConfigError, match="cannot open the checkpointer") as exc:
        make_checkpointer("postgresql://nobody:s3cret@127.0.0.1:1/nothing")
    assert "s3cret" not in str(exc.value)


def test_a_user_edit_does_not_duplicate_list_items(sqlite_url: str) -> None:
    with PersonaStore(sqlite_url) as store:
        persona = Persona.new("ana")
        persona.preference.style = ["concise"]
        store.create("ana", persona)
        # the README's own snippet, on a persona that already holds the value
        store.update("ana", lambda p: p.preference.style.append("concise"), reason="asked")
        store.update("ana", lambda p: p.personality.interests.extend(["jazz", "jazz"]))
        saved = store.get("ana")
        assert saved.preference.style == ["concise"]
        assert saved.personality.interests == ["jazz"]
