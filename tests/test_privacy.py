"""Forgetting a user removes every trace, on disk too; export returns all of it.

Distinctive strings go in through every path that keeps data (the graph with a
checkpointer, the server's chat completions, a user edit, long-term memory directly); the
user is deleted through each entry point (the graph, the server's DELETE, ``persona
delete``, the bots' ``forget``); then every file under the data directory is read as bytes
and must not hold the strings, while another user's data is still there.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import persona_plugin.cli.app as cli
from integrations.common import forget
from persona_plugin import (
    LongTermMemory,
    PersonaStore,
    build_persona_graph,
    create_app,
    export_user,
    forget_user,
    make_checkpointer,
)
from persona_plugin.chat_models import EchoChatModel
from persona_plugin.embeddings import MiniLMEmbeddingFunction
from persona_plugin.lora import LoraRetriever, parse_card
from persona_plugin.memory import MemoryStore
from persona_plugin.persona import Persona
from persona_plugin.reflection import Reflector
from tests.fakes import ScriptedReflection
from tests.paths import REPO

SECRET = "zqpassport7731"  # what the user must get back from export and nobody from disk
OTHER = "bobsecret4410"  # another user's, which must survive
TOKEN = "tok-privacy-0123456789"


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


class Parts:
    def __init__(self, home: Path, store_url: str, checkpointer_url: str, embedding: Any):
        self.home = home
        self.store = PersonaStore(store_url)
        self.memory = LongTermMemory(home / "memory", embedding_function=embedding)
        self.checkpointer = make_checkpointer(checkpointer_url)
        self.graph = build_persona_graph(
            EchoChatModel(),
            store=self.store,
            memory=self.memory,
            checkpointer=self.checkpointer,
            reflector=Reflector(ScriptedReflection()),
        )

    def turn(self, user: str, text: str, thread: str) -> None:
        config = {"configurable": {"user_id": user, "thread_id": thread}}
        self.graph.invoke({"messages": [("user", text)]}, config)


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedding: Any) -> Iterator[Parts]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PERSONA_HOME", str(home))
    built = Parts(
        home, f"sqlite:///{home / 'personas.db'}", f"sqlite:///{home / 'checkpoints.db'}", embedding
    )
    yield built
    built.graph.close(timeout=10)
    built.store.close()


def write_everywhere(parts: Parts) -> None:
    """The secret through the graph (two threads), the server, a user edit and memory."""
    parts.turn("ana", f"I love {SECRET} and hiking", "ana-1")
    parts.turn("ana", f"my passport number is {SECRET}", "ana-2")
    app = create_app(graph=parts.graph, tokens={TOKEN: {"users": ["ana", "bob"]}})
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={
                "model": next(iter(parts.graph.models)),
                "user": "ana",
                "messages": [{"role": "user", "content": f"remember {SECRET} please"}],
            },
        )
        assert reply.status_code == 200, reply.text
    parts.store.update("ana", lambda p: p.preference.style.append(f"{SECRET} style"))
    parts.memory.remember(
        "ana", [{"turn_id": "m1", "speaker": "user", "text": f"note: {SECRET} again"}]
    )
    # the mem0 API and the LangGraph store: after the update the secret is in the history
    (noted,) = parts.memory.add(f"Ana's locker code is {SECRET}", user_id="ana")["results"]
    parts.memory.update(noted["id"], "Ana's locker is empty", user_id="ana")
    MemoryStore(parts.memory).put(("memories", "ana"), "k", {"content": f"{SECRET} stored"})
    parts.turn("bob", f"I love {OTHER}", "bob-1")


def files_holding(root: Path, text: str) -> list[str]:
    needle = text.encode()
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    )


def index_folders(memory: Path) -> dict[str, str]:
    """Each vector-index folder and whose it is, for a failure message."""
    conn = sqlite3.connect(str(memory / "chroma.sqlite3"))
    try:
        owners = dict(
            conn.execute(
                "SELECT s.id, c.name FROM segments s JOIN collections c ON s.collection = c.id"
            ).fetchall()
        )
    finally:
        conn.close()
    return {p.name: owners.get(p.name, "(orphan)") for p in memory.iterdir() if p.is_dir()}


def delete_via(entry: str, parts: Parts, run_cli: Any) -> None:
    if entry == "graph":
        gone = parts.graph.forget("ana")
        assert gone.versions >= 2 and gone.memory_items >= 5 and gone.threads >= 2
    elif entry == "server":
        app = create_app(graph=parts.graph, tokens={TOKEN: {"users": ["ana"]}})
        with TestClient(app) as client:
            deleted = client.delete(
                "/v1/personas/ana", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["threads"] >= 2
    elif entry == "cli":
        assert run_cli("delete", "ana", "--yes") == 0
    elif entry == "bot":
        assert forget(parts.graph, parts.store, parts.memory, "ana").startswith("Done:")
    else:  # pragma: no cover
        raise AssertionError(entry)


@pytest.fixture
def run_cli(parts: Parts, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as exc:
            cli.main(list(args))
        capsys.readouterr()
        return exc.value.code  # type: ignore[return-value]

    return run


@pytest.mark.parametrize("entry", ["graph", "server", "cli", "bot"])
def test_forgetting_leaves_no_trace_on_disk(entry: str, parts: Parts, run_cli: Any) -> None:
    write_everywhere(parts)
    parts.graph.background.drain(timeout=30)
    before = files_holding(parts.home, SECRET)
    # the scan finds what is there: the store, the checkpoints and Chroma all hold it
    for where in ("personas.db", "checkpoints.db", "memory/"):  # -wal files count
        assert any(f.startswith(where) for f in before), (where, before)
    vector_folders = {p.name for p in (parts.home / "memory").iterdir() if p.is_dir()}

    delete_via(entry, parts, run_cli)

    assert files_holding(parts.home, SECRET) == [], index_folders(parts.home / "memory")
    assert files_holding(parts.home, OTHER), "the other user's data went too"
    assert not parts.store.exists("ana") and parts.store.exists("bob")
    assert parts.memory.count("ana") == 0 and parts.memory.count("bob") > 0
    assert [i.text for i in parts.memory.recall("bob", OTHER, k=3)]
    # the deleted collection's vector-index folder went; bob's stayed
    left = {p.name for p in (parts.home / "memory").iterdir() if p.is_dir()}
    assert left < vector_folders and left
    assert parts.graph.get_state({"configurable": {"thread_id": "ana-1"}}).values == {}
    assert parts.graph.get_state({"configurable": {"thread_id": "bob-1"}}).values


def test_export_holds_everything_that_forget_removes(parts: Parts) -> None:
    write_everywhere(parts)
    parts.graph.background.drain(timeout=30)
    data = parts.graph.export("ana")
    assert [v["version"] for v in data["versions"]][:1] == [1]
    assert any(SECRET in item["text"] for item in data["memory"])
    assert any(SECRET in (e["old_memory"] or "") for e in data["memory_history"])
    assert set(data["threads"]) >= {"ana-1", "ana-2"}
    assert any(SECRET in m["content"] for m in data["threads"]["ana-2"])
    assert all(OTHER not in str(value) for value in data.values())
    # the same through the function the CLI and server use
    same = export_user(
        "ana", store=parts.store, memory=parts.memory, checkpointer=parts.checkpointer
    )
    assert same["threads"] == data["threads"] and len(same["memory"]) == len(data["memory"])
    parts.graph.forget("ana")
    with pytest.raises(Exception, match="no persona to export"):
        parts.graph.export("ana")


@pytest.mark.postgres
def test_forgetting_on_postgres_leaves_no_row(
    tmp_path: Path, postgres_url: str, embedding: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PERSONA_HOME", str(home))
    parts = Parts(home, postgres_url, postgres_url, embedding)
    try:
        parts.turn("ana", f"I love {SECRET}", "ana-1")
        parts.turn("bob", f"I love {OTHER}", "bob-1")
        gone = parts.graph.forget("ana")
        assert gone.versions >= 1 and gone.threads == 1
        engine = sa.create_engine(postgres_url)
        with engine.connect() as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                )
            ]
            assert {"persona_versions", "checkpoints", "checkpoint_writes"} <= set(tables)

            def rows_holding(text: str) -> int:
                return sum(
                    conn.execute(
                        sa.text(f'SELECT count(*) FROM "{t}" AS r WHERE r::text LIKE :needle'),
                        {"needle": f"%{text}%"},
                    ).scalar_one()
                    for t in tables
                )

            # checkpoint blobs are msgpack bytes: the ::text form of bytea is hex
            assert rows_holding(SECRET) == 0 and rows_holding(SECRET.encode().hex()) == 0
            assert rows_holding(OTHER) + rows_holding(OTHER.encode().hex()) > 0
        engine.dispose()
        assert files_holding(home, SECRET) == [], index_folders(home / "memory")
    finally:
        parts.graph.close(timeout=10)
        parts.store.close()
        parts.checkpointer.conn.close()


def test_a_user_deleted_by_another_process_is_not_an_error(parts: Parts) -> None:
    parts.memory.remember("ana", [{"turn_id": "t1", "speaker": "user", "text": "I live in Oslo"}])
    assert parts.memory.recall("ana", "Oslo", k=1)  # the collection is cached now
    script = (
        "import sys; from persona_plugin.memory import LongTermMemory; "
        "print(LongTermMemory(sys.argv[1]).delete_user('ana'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(parts.home / "memory")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    assert parts.memory.recall("ana", "Oslo", k=1) == []
    assert parts.memory.get("ana") == [] and parts.memory.count("ana") == 0
    parts.memory.remember("ana", [{"turn_id": "t2", "speaker": "user", "text": "now in Rome"}])
    assert [i.text for i in parts.memory.recall("ana", "Rome", k=1)] == ["user: now in Rome"]


BASE = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "rank": 8}
CARDS = [
    parse_card(
        {"id": card_id, "kind": "style", "description": text, "location": f"acme/{card_id}"}
        | BASE
        | {"target_modules": ["q_proj"]}
    )
    for card_id, text in [
        ("formal", "formal, precise, business tone"),
        ("playful", "playful, jokes, emoji"),
    ]
]


def test_a_user_created_again_is_not_served_the_deleted_users_retrieval(
    parts: Parts, embedding: Any
) -> None:
    retriever = LoraRetriever(CARDS, embedder=embedding, top_k=1)
    formal = Persona.new("ana")
    formal.preference.style = ["formal", "precise"]
    first = parts.store.create("ana", formal)
    assert retriever.retrieve(parts.store.get("ana"), "hi").ids == ["formal"]
    forget_user("ana", store=parts.store, memory=parts.memory, retrievers=[])
    playful = Persona.new("ana")
    playful.preference.style = ["playful", "jokes"]
    again = parts.store.create("ana", playful)
    assert again.version == first.version == 1
    mixture = retriever.retrieve(parts.store.get("ana"), "hi")
    assert mixture.ids == ["playful"] and not mixture.cached
    # and forget drops what a retriever cached for the user
    assert retriever.forget("ana") >= 1
    assert retriever.forget("ana") == 0
