"""Long-term memory over ChromaDB, embedded and against a real ``chroma run`` server.

Every test taking ``memory`` or ``backend`` runs twice: against an embedded
``PersistentClient`` in a temporary directory and against one ``chroma run`` server
started for the session (each test on its own collection). The embedding model is loaded
once per session and shared.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError, PersonaValidationError
from persona_plugin.lab.eval.locomo import evaluate, load_conversation
from persona_plugin.memory.lexical import tokenize
from persona_plugin.memory.long_term import LongTermMemory, MemoryItem, update_short_term
from persona_plugin.persona import LongTermMemoryLink, Persona, Turn
from tests.memory.conftest import Backend, free_port
from tests.paths import REPO

ROOT = REPO


class HashEmbeddingFunction(EmbeddingFunction[Documents]):
    """Hashed bag of words, 64 dimensions: cheap, and equal texts get equal vectors."""

    def __init__(self) -> None:
        pass

    @staticmethod
    def name() -> str:
        return "persona-test-hash"

    def get_config(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> HashEmbeddingFunction:
        return HashEmbeddingFunction()

    def __call__(self, input: Documents) -> Embeddings:
        out = np.zeros((len(input), 64), dtype=np.float32)
        for row, text in enumerate(input):
            for token in tokenize(text) or ["<empty>"]:
                out[row, zlib.crc32(token.encode()) % 64] += 1.0
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return list(out)


def _turns(*texts: str, speaker: str = "Ann", prefix: str = "t", **extra: Any) -> list[dict]:
    return [
        {"turn_id": f"{prefix}{i}", "speaker": speaker, "text": text, **extra}
        for i, text in enumerate(texts)
    ]


def _by_turn(items: list[MemoryItem]) -> dict[str, MemoryItem]:
    return {item.source_turn_ids[0]: item for item in items if item.kind == "turn"}


# -- write path and provenance --------------------------------------------------------------


def test_remember_and_facts_keep_provenance(memory: LongTermMemory) -> None:
    turns = [
        {
            "turn_id": "D1:1",
            "speaker": "Alice",
            "text": "I adopted a greyhound named Biscuit last week.",
            "timestamp": "2024-03-02T10:15:00",  # naive: taken as UTC
            "session": "1",
        },
        {
            "turn_id": "D1:2",
            "speaker": "Bob",
            "text": "Wonderful! How is the new dog settling in?",
            "timestamp": "2024-03-02T12:16:00+02:00",
            "session": "1",
        },
    ]
    turn_ids = memory.remember("alice", turns)
    fact_ids = memory.add_facts(
        "alice",
        ["Alice owns a greyhound called Biscuit."],
        source_turn_ids=["D1:1"],
        timestamp="2024-03-03T09:00:00+00:00",
    )
    reflection_ids = memory.add_facts(
        "alice",
        ["Alice cares deeply about animals."],
        kind="reflection",
        source_turn_ids=["D1:1", "D1:2"],
    )
    assert len(turn_ids) == 2 and len(fact_ids) == 1 and len(reflection_ids) == 1
    assert memory.count("alice") == 4

    items = {item.id: item for item in memory.items("alice")}
    first, second = items[turn_ids[0]], items[turn_ids[1]]
    assert first.model_dump(exclude={"id", "score", "scores"}) == {
        "user_id": "alice",
        "kind": "turn",
        "text": "Alice: I adopted a greyhound named Biscuit last week.",
        "source_turn_ids": ["D1:1"],
        "timestamp": "2024-03-02T10:15:00+00:00",
        "speaker": "Alice",
        "session": "1",
        # written by the graph's path, not the mem0 API: the item's time stands in
        "metadata": {},
        "created_at": "2024-03-02T10:15:00+00:00",
        "updated_at": "2024-03-02T10:15:00+00:00",
    }
    assert second.timestamp == "2024-03-02T10:16:00+00:00"  # converted to UTC
    assert (second.speaker, second.source_turn_ids) == ("Bob", ["D1:2"])
    fact = items[fact_ids[0]]
    assert (fact.kind, fact.source_turn_ids, fact.timestamp) == (
        "fact",
        ["D1:1"],
        "2024-03-03T09:00:00+00:00",
    )
    assert fact.text == "Alice owns a greyhound called Biscuit."
    reflection = items[reflection_ids[0]]
    assert (reflection.kind, reflection.source_turn_ids) == ("reflection", ["D1:1", "D1:2"])
    assert reflection.timestamp is not None  # defaults to now

    # recall hands back the same provenance
    recalled = memory.recall("alice", "What is the name of Alice's greyhound?", k=4, dedupe=1.0)
    assert {item.id for item in recalled} == set(items)
    for item in recalled:
        stored = items[item.id]
        assert item.model_dump(exclude={"score", "scores"}) == stored.model_dump(
            exclude={"score", "scores"}
        )
    assert [i.kind for i in memory.items("alice", kinds=["fact", "reflection"])] == [
        "fact",
        "reflection",
    ]
    assert memory.items("alice") == sorted(memory.items("alice"), key=lambda i: (i.timestamp, i.id))


def test_ids_are_deterministic_and_reingest_overwrites(memory: LongTermMemory) -> None:
    turns = _turns("We moved to Lisbon in May.", "The flat has a balcony.", "Same turn again.")
    turns.append(dict(turns[2]))  # the same turn twice in one call
    first = memory.remember("bo", turns)
    assert len(first) == 3 and memory.count("bo") == 3
    assert memory.remember("bo", turns) == first
    assert memory.add_facts("bo", ["Bo lives in Lisbon.", "bo  LIVES in lisbon."]) == (
        memory.add_facts("bo", ["Bo lives in Lisbon."])  # same fact modulo case and spaces
    )
    assert memory.count("bo") == 4
    # an edited turn keeps its id: the text is replaced, not duplicated
    memory.remember("bo", [{"turn_id": "t0", "speaker": "Ann", "text": "We moved to Porto."}])
    assert memory.count("bo") == 4
    assert _by_turn(memory.items("bo"))["t0"].text == "Ann: We moved to Porto."


# -- recall ---------------------------------------------------------------------------------


def test_recall_returns_scores(memory: LongTermMemory) -> None:
    memory.remember(
        "cy",
        _turns(
            "My sister Ingrid is a marine biologist in Bergen.",
            "I bake sourdough bread every Sunday.",
            "The garden needs weeding.",
        ),
    )
    items = memory.recall("cy", "What does Ingrid do for work?", k=3)
    assert items[0].source_turn_ids == ["t0"]
    top = items[0]
    assert set(top.scores) == {"vector", "lexical", "fused"}
    assert -1.0 <= top.scores["vector"] <= 1.0 and top.scores["lexical"] > 0
    # first or second in both lists (a turn's vector carries its neighbours' context)
    assert top.score == top.scores["fused"] >= 1 / 61 + 1 / 62 - 1e-9
    assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)
    assert memory.recall("cy", "anything", k=0) == []
    assert len(memory.recall("cy", "bread", k=1)) == 1


def test_lexical_only_match_is_found_thanks_to_bm25(memory: LongTermMemory) -> None:
    """Id-like codes the embedding blurs: BM25 finds them where the vectors do not."""
    rng = np.random.default_rng(7)
    alphabet = list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789")
    codes = ["".join(rng.choice(alphabet, 8)) for _ in range(30)]
    goods = ["hiking boots", "a raincoat", "two novels", "a coffee grinder", "garden gloves"]
    places = ["grandma's cottage", "the office", "the beach house", "my studio", "the library"]
    turns = [
        {"turn_id": f"o{i}", "speaker": "Dana", "text": f"I placed order {c} for {goods[i % 5]}."}
        for i, c in enumerate(codes[:25])
    ]
    turns += [
        {
            "turn_id": f"w{j}",
            "speaker": "Dana",
            "text": f"{codes[25 + j]} is the wifi password at {p}.",
        }
        for j, p in enumerate(places)
    ]
    memory.remember("dana", turns)
    ids = {turn: item.id for turn, item in _by_turn(memory.items("dana")).items()}

    vector_misses = bm25_only = 0
    for j in range(len(places)):
        query = f"{codes[25 + j]} shipment status"  # the other words point at the orders
        target = ids[f"w{j}"]
        vector_top = memory.collection_for("dana").query(
            query_texts=[query], n_results=3, include=[]
        )["ids"][0]
        vector_misses += target not in vector_top
        found = {item.id: item for item in memory.recall("dana", query, k=3)}
        assert target in found, f"code {codes[25 + j]} not recalled"
        assert found[target].scores["lexical"] > 0
        bm25_only += "vector" not in found[target].scores
    # most codes are outside the vector top 3 (and mostly outside its top 10 altogether)
    assert vector_misses >= 3, "the embedding found the codes itself: pick blurrier data"
    assert bm25_only >= 2


def test_paraphrase_without_shared_words_is_found_thanks_to_vectors(
    memory: LongTermMemory,
) -> None:
    texts = [
        "I adore long walks through the mountains at dawn.",
        "My favourite food is spicy ramen.",
        "I work as an accountant in a bank.",
        "My sister plays the violin in an orchestra.",
        "Our cat sleeps on the sofa all day.",
        "I am learning to speak Japanese.",
        "We repainted the kitchen blue last spring.",
        "The car needs new tyres before winter.",
    ]
    memory.remember("eve", _turns(*texts, speaker="Eve"))
    query = "Does she enjoy hiking trails in the hills?"
    assert not set(tokenize(query)) & set(tokenize(texts[0]))
    top = memory.recall("eve", query, k=3)[0]
    assert top.source_turn_ids == ["t0"]
    assert "lexical" not in top.scores and top.scores["vector"] > 0


def test_decay_reorders_an_old_and_a_recent_item(memory: LongTermMemory) -> None:
    text = "Fay keeps a pet iguana named Rex."
    # the same text as two kinds: equal vectors, equal BM25 scores
    memory.add_facts("fay", [text], kind="fact", timestamp="2024-06-01T00:00:00+00:00")
    memory.add_facts("fay", [text], kind="reflection", timestamp="2024-06-01T00:00:00+00:00")
    plain = memory.recall("fay", "Which pet does Fay keep?", k=2, dedupe=1.0)
    assert len(plain) == 2
    winner, other = plain
    # make the item that wins without decay the old one (same id: the upsert re-dates it)
    memory.add_facts("fay", [text], kind=winner.kind, timestamp="2020-06-01T00:00:00+00:00")
    again = memory.recall("fay", "Which pet does Fay keep?", k=2, dedupe=1.0)
    assert [i.id for i in again] == [winner.id, other.id]  # time alone changes nothing

    decayed = memory.recall(
        "fay",
        "Which pet does Fay keep?",
        k=2,
        dedupe=1.0,
        half_life_days=365,
        now="2024-06-02T00:00:00+00:00",
    )
    assert [i.id for i in decayed] == [other.id, winner.id]
    old, recent = decayed[1], decayed[0]
    assert old.timestamp.startswith("2020-06-01") and recent.timestamp.startswith("2024-06-01")
    age_days = 4 * 365 + 2  # 2020-06-01 .. 2024-06-02, 2024 a leap year (Feb 29 is before)
    expected = again[0].score * math.pow(0.5, age_days / 365)
    assert old.score == pytest.approx(expected, rel=1e-6)
    assert recent.score == pytest.approx(again[1].score * math.pow(0.5, 1 / 365), rel=1e-6)


def test_time_filters_exclude(memory: LongTermMemory) -> None:
    memory.remember(
        "gus",
        [
            {
                "turn_id": "jan",
                "speaker": "Gus",
                "text": "Skiing trip in January.",
                "timestamp": "2024-01-15T10:00:00",
            },
            {
                "turn_id": "apr",
                "speaker": "Gus",
                "text": "Skiing trip in April.",
                "timestamp": "2024-04-15T10:00:00",
            },
            {
                "turn_id": "jul",
                "speaker": "Gus",
                "text": "Skiing trip in July.",
                "timestamp": "2024-07-15T10:00:00",
            },
            {"turn_id": "none", "speaker": "Gus", "text": "Skiing trip some day."},
        ],
    )
    memory.add_facts("gus", ["Gus loves skiing trips."], timestamp="2024-05-01T00:00:00")

    def turns(**kwargs: Any) -> set[str]:
        items = memory.recall("gus", "skiing trip", k=10, dedupe=1.0, **kwargs)
        return {i.source_turn_ids[0] if i.kind == "turn" else i.kind for i in items}

    assert turns() == {"jan", "apr", "jul", "none", "fact"}
    assert turns(since="2024-03-01") == {"apr", "jul", "fact"}
    assert turns(until="2024-03-01T00:00:00+00:00") == {"jan"}
    assert turns(since="2024-03-01", until="2024-06-01") == {"apr", "fact"}
    assert turns(since="2024-03-01", until="2024-06-01", kinds=["turn"]) == {"apr"}
    assert turns(since="2025-01-01") == set()
    assert turns(kinds=["fact"]) == {"fact"}
    with pytest.raises(PersonaValidationError) as err:
        memory.recall("gus", "skiing", since="last week")
    assert err.value.path == "since"


def test_dedupe_removes_near_identical_but_keeps_distinct(memory: LongTermMemory) -> None:
    memory.remember(
        "hal",
        _turns(
            "I love pizza with extra cheese.",
            "I love pizza with extra cheese!!",
            "i LOVE pizza, with extra cheese",
            "I love pizza with anchovies and olives.",
            "I love sushi rolls.",
        ),
    )
    deduped = [i.source_turn_ids[0] for i in memory.recall("hal", "pizza with cheese", k=5)]
    assert sum(t in deduped for t in ("t0", "t1", "t2")) == 1
    assert "t3" in deduped and "t4" in deduped
    everything = [i.source_turn_ids[0] for i in memory.recall("hal", "pizza", k=5, dedupe=1.0)]
    assert sorted(everything) == ["t0", "t1", "t2", "t3", "t4"]


# -- isolation ------------------------------------------------------------------------------


def test_isolation_1000_users_every_result_checked(backend: Backend) -> None:
    """1,000 users with overlapping words and identical texts: each sees only their own.

    A cheap hashed bag-of-words embedding keeps ingest fast (the model is not what is under
    test); identical texts get identical vectors, the worst case for a leaky filter.
    """
    memory = backend.open(embedding_function=HashEmbeddingFunction())
    pets = ["cat", "dog", "parrot", "iguana", "hamster", "goldfish", "rabbit"]
    forms = ["user{}", "u{}@example.com", "slack:U{}", "team.{}+x"]
    users = [forms[i % 4].format(i) for i in range(1000)]
    own: dict[str, set[str]] = {}
    started = time.monotonic()
    for i, user in enumerate(users):
        own[user] = set(
            memory.remember(
                user,
                [
                    # the same turn id and text for everybody
                    {"turn_id": "t1", "speaker": "Me", "text": "We talked about the lake house."},
                    {
                        "turn_id": "t2",
                        "speaker": "Me",
                        "text": f"My {pets[i % 7]} is called Pip{i}, code {i:04d}.",
                    },
                ],
            )
        )
    ingest_s = time.monotonic() - started
    assert len(set().union(*own.values())) == 2000  # ids differ per user

    started = time.monotonic()
    for i, user in enumerate(users):
        # shared words, the neighbours' names and codes, and the user's own
        query = f"lake house {pets[i % 7]} Pip{(i + 1) % 1000} {(i + 7) % 1000:04d} Pip{i}"
        items = memory.recall(user, query, k=10)
        assert items, user
        for item in items:  # every result is checked
            assert item.user_id == user and item.id in own[user], (user, item)
        texts = {item.text for item in items}
        assert f"Me: My {pets[i % 7]} is called Pip{i}, code {i:04d}." in texts
        assert {item.id for item in memory.items(user)} == own[user]
    recall_s = time.monotonic() - started
    print(f"\nisolation ({backend.mode}): ingest {ingest_s:.1f} s, recall+get {recall_s:.1f} s")


def test_user_id_in_filters_and_invalid_user_ids_are_refused(memory: LongTermMemory) -> None:
    # no public method takes raw filters; the one place building them refuses user_id
    with pytest.raises(PersonaValidationError) as err:
        memory._where("ivy", {"user_id": "jon"})
    assert err.value.path == "filters.user_id"
    # inside the user's own collection a filter needs no user clause
    assert memory._where("ivy", {"kind": "fact"}) == {"kind": "fact"}
    assert memory._where("ivy") is None
    # ...and the collection names differ per user, whatever characters the ids hold
    assert memory.collection_name_for("ivy") != memory.collection_name_for("jon")
    assert memory.collection_name_for("a@b.c:d").startswith(memory.collection_name + "-")
    memory.remember("jon", _turns("Jon's secret."))
    bad_ids: list[Any] = ["", " ", "a b", "../etc", "-lead", "x" * 129, "ünï", None, 42]
    calls = [
        lambda u: memory.remember(u, _turns("hello")),
        lambda u: memory.add_facts(u, ["a fact"]),
        lambda u: memory.recall(u, "secret"),
        lambda u: memory.items(u),
        lambda u: memory.count(u),
        lambda u: memory.delete_user(u),
    ]
    for bad in bad_ids:
        for call in calls:
            with pytest.raises(PersonaValidationError) as err:
                call(bad)
            assert err.value.path == "user_id"
    assert memory.count("jon") == 1


# -- deletion -------------------------------------------------------------------------------


def _rows_mentioning(db: Path, needles: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """Every row of every table of the SQLite file with a text value containing a needle."""
    found = []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            if table in skip:
                continue
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    if isinstance(text, str) and any(n in text for n in needles):
                        found.append(f"{table}: {str(row)[:160]}")
                        break
    return found


def _user_rows(db: Path, user: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute(
            "SELECT count(*) FROM embedding_metadata WHERE key = 'user_id' AND string_value = ?",
            (user,),
        ).fetchone()[0]


def test_delete_user_removes_every_item_from_chroma_storage(backend: Backend) -> None:
    memory = backend.open()
    tag = uuid.uuid4().hex[:8]
    gone, kept = f"kim-{tag}", f"lou-{tag}"
    marker, other_marker = f"quokkazebra{tag}", f"wombatyak{tag}"
    gone_ids = memory.remember(gone, _turns(*(f"note {marker} number {i}" for i in range(6))))
    gone_ids += memory.add_facts(gone, [f"Kim's fact {marker}"], kind="fact")
    gone_ids += memory.add_facts(gone, [f"Kim's reflection {marker}"], kind="reflection")
    kept_ids = memory.remember(kept, _turns(f"Lou's note {other_marker}"))
    assert memory.recall(gone, marker, k=3)  # builds the lexical index too
    assert _user_rows(backend.sqlite_file, gone) == 8

    assert memory.delete_user(gone) == 8
    assert memory.count(gone) == 0 and memory.items(gone) == []
    assert memory.recall(gone, marker) == []
    assert memory.delete_user(gone) == 0  # idempotent

    db = backend.sqlite_file
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        stored = {r[0] for r in con.execute("SELECT embedding_id FROM embeddings")}
        fts = con.execute(
            "SELECT count(*) FROM embedding_fulltext_search WHERE string_value LIKE ?",
            (f"%{marker}%",),
        ).fetchone()[0]
    assert not stored & set(gone_ids) and set(kept_ids) <= stored
    assert fts == 0
    assert _user_rows(db, gone) == 0 and _user_rows(db, kept) == 1
    # every table, Chroma's write-ahead log too (see the next test)
    assert _rows_mentioning(db, [marker, gone], skip=("embeddings_queue",)) == []
    assert _rows_mentioning(db, [other_marker], skip=("embeddings_queue",))
    assert [i.id for i in memory.items(kept)] == kept_ids


# Deleting items inside a shared collection left their text in Chroma's write-ahead log
# (embeddings_queue) until the HNSW segment synced; deleting the user's own collection
# purges it. This test keeps it that way.
def test_delete_user_leaves_nothing_in_chroma_write_ahead_log(backend: Backend) -> None:
    memory = backend.open()
    tag = uuid.uuid4().hex[:8]
    user, marker = f"max-{tag}", f"platypus{tag}"
    memory.remember(user, _turns(f"my marker {marker}"))
    memory.delete_user(user)
    assert _rows_mentioning(backend.sqlite_file, [marker]) == []


def _unwritten_tails(folder: Path) -> tuple[int, bytes, bytes]:
    """The count of elements a vector index's header holds, and its two files' bytes past
    the counted elements' slots (see persona_plugin.memory.disk)."""
    _, _, _, count, per_element = struct.unpack_from("=iQQQQ", (folder / "header.bin").read_bytes())
    length = (folder / "length.bin").read_bytes()[count * 4 :]
    data = (folder / "data_level0.bin").read_bytes()[count * per_element :]
    return count, length, data


# hnswlib writes a new index's length.bin and data_level0.bin from unzeroed malloc, which
# once put another user's message text into a file of this user's (a CI run of the privacy
# test); every byte past the elements the header counts must be zero.
def test_a_new_vector_index_holds_no_unzeroed_memory(tmp_path: Path) -> None:
    memory = LongTermMemory(tmp_path / "m", embedding_function=HashEmbeddingFunction())
    memory.remember("ana", _turns("hello there"))
    memory.remember("bob", _turns("hi"))
    folders = [p for p in (tmp_path / "m").iterdir() if p.is_dir()]
    assert len(folders) == 2
    for folder in folders:
        count, length, data = _unwritten_tails(folder)
        assert count == 0 and len(length) > 0 and len(data) > 0  # not synced yet: all unwritten
        assert length.count(0) == len(length) and data.count(0) == len(data), folder.name


_VECTOR_QUERY = """
import json, sys
import chromadb
sys.path.insert(0, sys.argv[2])
from tests.memory.test_long_term import HashEmbeddingFunction
from persona_plugin.memory.long_term import LongTermMemory
memory = LongTermMemory(sys.argv[1], embedding_function=HashEmbeddingFunction())
got = memory.collection_for("ana", create=False).query(
    query_texts=["word1234 thing13"], n_results=1, include=[]
)
print(json.dumps(got["ids"][0]))
"""


# The scrub zeroes what lies past the counted elements; once Chroma has synced the index
# (it does at 1000 items) the elements it wrote must still be there, read back by a fresh
# process from the files alone through a vector query.
def test_a_scrubbed_index_synced_and_reloaded_still_finds_by_vector(tmp_path: Path) -> None:
    path = tmp_path / "m"
    memory = LongTermMemory(path, embedding_function=HashEmbeddingFunction())
    memory.remember("ana", _turns("hello"))
    ids = memory.remember(
        "ana", _turns(*(f"note {i} word{i} about thing{i % 37}" for i in range(1500)), prefix="n")
    )
    (folder,) = [p for p in path.iterdir() if p.is_dir()]
    count, length, data = _unwritten_tails(folder)
    assert count > 1000
    assert length.count(0) == len(length) and data.count(0) == len(data)
    found = subprocess.run(
        [sys.executable, "-c", _VECTOR_QUERY, str(path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(found.stdout.strip().splitlines()[-1]) == [ids[1234]]


# -- bad input and faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "path"),
    [
        ({"turn_id": "b", "speaker": "Ann", "text": ""}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": "   \n"}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": "x" * 8001}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": "bad \ud800 half"}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": "nul \x00 byte"}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": b"\xff\xfe not utf-8"}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann", "text": 42}, "turns[1].text"),
        ({"turn_id": "b", "speaker": "Ann"}, "turns[1].text"),
        ({"speaker": "Ann", "text": "no id"}, "turns[1].turn_id"),
        ({"turn_id": "", "speaker": "Ann", "text": "empty id"}, "turns[1].turn_id"),
        ({"turn_id": "b\udc80", "speaker": "Ann", "text": "surrogate id"}, "turns[1].turn_id"),
        ({"turn_id": "b", "text": "no speaker"}, "turns[1].speaker"),
        ({"turn_id": "b", "speaker": "", "text": "empty speaker"}, "turns[1].speaker"),
        ({"turn_id": "b", "speaker": "A\ud800", "text": "surrogate"}, "turns[1].speaker"),
        ({"turn_id": "b", "speaker": "Ann", "text": "x", "session": "s\ud800"}, "turns[1].session"),
        ({"turn_id": "b", "speaker": "Ann", "text": "x", "timestamp": "May"}, "turns[1].timestamp"),
        ("not a turn", "turns[1]"),
        (None, "turns[1]"),
    ],
)
def test_bad_turn_is_refused_naming_the_field_and_writes_nothing(
    tmp_path: Path, bad: Any, path: str
) -> None:
    # validation comes before any backend call: the embedded store is enough here
    memory = LongTermMemory(tmp_path, embedding_function=HashEmbeddingFunction())
    good = {"turn_id": "a", "speaker": "Ann", "text": "A fine first turn."}
    last = {"turn_id": "c", "speaker": "Ann", "text": "A fine last turn."}
    with pytest.raises(PersonaValidationError) as err:
        memory.remember("nia", [good, bad, last])
    assert err.value.path == path
    assert path in str(err.value)
    assert memory.count("nia") == 0


def test_bad_facts_and_queries_are_refused(memory: LongTermMemory) -> None:
    memory.add_facts("oz", ["An existing fact."])
    for facts, path in [
        (["fine", ""], "facts[1]"),
        (["fine", "x" * 8001], "facts[1]"),
        (["fine", "lone \udfff surrogate"], "facts[1]"),
        (["fine", None], "facts[1]"),
        ("one string, not a list", "facts"),
    ]:
        with pytest.raises(PersonaValidationError) as err:
            memory.add_facts("oz", facts)
        assert err.value.path == path
    for kind in ["turn", "", "two words", "semi;colon"]:
        with pytest.raises(PersonaValidationError) as err:
            memory.add_facts("oz", ["fine"], kind=kind)
        assert err.value.path == "kind"
    with pytest.raises(PersonaValidationError) as err:
        memory.add_facts("oz", ["fine"], timestamp="soon")
    assert err.value.path == "timestamp"
    assert memory.count("oz") == 1
    for query in ["", "   ", "bad \ud800", None]:
        with pytest.raises(PersonaValidationError) as err:
            memory.recall("oz", query)
        assert err.value.path == "query"


def test_text_cap_is_configurable(tmp_path: Path) -> None:
    memory = LongTermMemory(tmp_path, embedding_function=HashEmbeddingFunction(), max_text_chars=20)
    memory.remember("pat", _turns("x" * 20))
    with pytest.raises(PersonaValidationError, match="over the cap of 20"):
        memory.remember("pat", _turns("x" * 21))


def test_unreachable_server_is_a_config_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PersonaConfigError) as err:
        LongTermMemory(url=url, embedding_function=HashEmbeddingFunction())
    assert url in str(err.value)
    assert time.monotonic() - started < 30
    with pytest.raises(PersonaConfigError, match="not an http"):
        LongTermMemory(url="ftp://127.0.0.1:1", embedding_function=HashEmbeddingFunction())
    with pytest.raises(PersonaConfigError, match="path"):
        LongTermMemory(embedding_function=HashEmbeddingFunction())


_INGEST_SCRIPT = """
import json, sys
from persona_plugin.memory import LongTermMemory

args = json.loads(sys.argv[1])
memory = LongTermMemory(args["path"], url=args["url"], collection=args["collection"])
turns = json.loads(open(args["turns"], encoding="utf-8").read())
print("ready", flush=True)
for start in range(0, len(turns), args["batch"]):
    memory.remember(args["user"], turns[start : start + args["batch"]])
    print(start + args["batch"], flush=True)
print("done", flush=True)
"""


def _crash_turns() -> list[dict]:
    words = ["harbour", "violin", "cactus", "glacier", "lantern", "pepper", "saddle", "quartz"]
    turns = [
        {
            "turn_id": f"D{i // 20 + 1}:{i % 20 + 1}",
            "speaker": "Quinn" if i % 2 else "Rae",
            "text": f"Item {i}: the {words[i % 8]} story, token zq{i}x.",
            "timestamp": f"2024-01-{i // 20 + 1:02d}T10:{i % 60:02d}:00",
            "session": str(i // 20 + 1),
        }
        for i in range(200)
    ]
    # repeats, inside a batch and across batches: ids are deterministic, so no duplicates
    return turns + turns[::23] + [turns[5], turns[5]]


def _run_child(backend: Backend, tmp_path: Path, turns: list[dict], user: str, batch: int):
    turns_file = tmp_path / "turns.json"
    turns_file.write_text(json.dumps(turns), encoding="utf-8")
    args = {
        "path": str(backend.path) if backend.path else None,
        "url": backend.url,
        "collection": backend.collection,
        "turns": str(turns_file),
        "user": user,
        "batch": batch,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _INGEST_SCRIPT, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def test_ingest_killed_midway_leaves_memory_usable_and_rerun_does_not_duplicate(
    backend: Backend, tmp_path: Path
) -> None:
    turns = _crash_turns()
    distinct = len({t["turn_id"] for t in turns})
    assert distinct == 200
    batch = 8
    child = _run_child(backend, tmp_path, turns, "sam", batch)
    try:
        progress = []
        assert child.stdout is not None
        for line in child.stdout:
            progress.append(line.strip())
            if len(progress) >= 4:  # "ready" and three batches written
                break
        os.kill(child.pid, signal.SIGKILL)  # in the middle of the next batches
    finally:
        child.kill()
        child.wait()
        stderr = child.stderr.read() if child.stderr else ""
    assert child.returncode == -signal.SIGKILL
    assert "done" not in progress, f"the ingest finished before the kill: {progress}"
    assert progress[0] == "ready", stderr

    memory = backend.open()  # for the embedded store: the first open in this process
    partial = memory.count("sam")
    assert 3 * batch <= partial < distinct, partial
    for start in range(0, len(turns), batch):  # the whole ingest again
        memory.remember("sam", turns[start : start + batch])
    assert memory.count("sam") == distinct
    items = memory.items("sam")
    assert len({i.id for i in items}) == distinct
    assert sorted(t for i in items for t in i.source_turn_ids) == sorted(
        {t["turn_id"] for t in turns}
    )
    found = {i.source_turn_ids[0]: i for i in memory.recall("sam", "Remind me of zq123x", k=3)}
    assert found["D7:4"].text == "Quinn: Item 123: the glacier story, token zq123x."
    vector_only = memory.collection_for("sam").query(
        query_texts=["the glacier story"], n_results=5, include=[]
    )["ids"][0]
    assert len(vector_only) == 5  # the vector index answers after the crash too


def test_reopened_store_finds_the_collection_and_its_embedding_function(
    backend: Backend, tmp_path: Path
) -> None:
    turns = [
        {"turn_id": "x1", "speaker": "Tia", "text": "My grandmother grew up in Valparaíso."},
        {"turn_id": "x2", "speaker": "Tia", "text": "I'm training for a marathon in October."},
    ]
    child = _run_child(backend, tmp_path, turns, "tia", batch=10)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and out.strip().endswith("done"), err

    # a client given no embedding function rebuilds the registered one from the config
    collection = backend.raw_client().get_collection(backend.open().collection_name_for("tia"))
    assert collection.configuration["embedding_function"].name() == "persona-minilm-onnx"
    hits = collection.query(query_texts=["Where did her grandmother grow up?"], n_results=1)
    assert hits["documents"][0] == ["Tia: My grandmother grew up in Valparaíso."]

    memory = backend.open()
    assert memory.count("tia") == 2
    assert memory.recall("tia", "running race", k=1)[0].source_turn_ids == ["x2"]


# -- configuration, link, short-term ----------------------------------------------------------


def test_link_and_from_settings(backend: Backend, embedding_function: Any) -> None:
    if backend.mode == "server":
        settings = Settings.load(memory_url=backend.url, memory_collection=backend.collection)
    else:
        settings = Settings.load(memory_path=backend.path, memory_collection=backend.collection)
    memory = LongTermMemory.from_settings(settings, embedding_function=embedding_function)
    backend.opened.append(memory)
    link = memory.link()
    assert isinstance(link, LongTermMemoryLink)
    assert (link.backend, link.collection) == ("chroma", backend.collection)
    if backend.mode == "server":
        assert (link.url, link.path) == (backend.url, None)
    else:
        assert (link.url, link.path) == (None, str(backend.path))
    # the persona can carry it
    persona = Persona()
    persona.memory.long_term = link
    assert Persona.model_validate(persona.to_dict()).memory.long_term == link


def test_from_settings_default_path_is_under_home(embedding_function: Any) -> None:
    settings = Settings.load()
    memory = LongTermMemory.from_settings(settings, embedding_function=embedding_function)
    assert memory.path == settings.home / "memory"
    assert memory.link().path == str(settings.home / "memory")


def test_from_settings_passes_a_configured_cache_dir_to_the_embedder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PERSONA_CACHE_DIR")  # the environment would win over the file
    config = tmp_path / "persona.toml"
    config.write_text(f'cache_dir = "{tmp_path / "built"}"\n')
    memory = LongTermMemory.from_settings(Settings.load(config_file=config))
    assert memory.embedding_function.cache_dir == str(tmp_path / "built" / "models")
    # without one, the embedder keeps its own default (the environment's cache)
    assert LongTermMemory.from_settings(Settings.load()).embedding_function.cache_dir is None


def test_update_short_term_keeps_the_last_n_turns() -> None:
    persona = Persona()
    persona.memory.short_term = [
        Turn(role="user", content=f"old {i}", turn_id=f"o{i}") for i in range(3)
    ]
    new = [Turn(role="assistant" if i % 2 else "user", content=f"new {i}") for i in range(4)]
    updated = update_short_term(persona, new, window=5)
    assert [t.content for t in updated.memory.short_term] == [
        "old 2",
        "new 0",
        "new 1",
        "new 2",
        "new 3",
    ]
    assert len(persona.memory.short_term) == 3  # the original is untouched
    assert update_short_term(persona, new, window=0).memory.short_term == []
    assert len(update_short_term(persona, [], window=10).memory.short_term) == 3
    assert [t.content for t in update_short_term(persona, new, window=2).memory.short_term] == [
        "new 2",
        "new 3",
    ]


# -- LoCoMo ---------------------------------------------------------------------------------


def _tiny_locomo(path: Path) -> Path:
    data = {
        "speaker_a": "Caroline",
        "speaker_b": "Melanie",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {
                "speaker": "Caroline",
                "dia_id": "D1:1",
                "text": "I went to a pottery class yesterday.",
            },
            {"speaker": "Melanie", "dia_id": "D1:2", "text": "Nice! What did you make?"},
            {
                "speaker": "Caroline",
                "dia_id": "D1:3",
                "text": "A lopsided blue vase.",
                "blip_caption": "a photo of a blue ceramic vase",
            },
            {"speaker": "Melanie", "dia_id": "D1:4", "text": "My kids would love that."},
        ],
        "session_2_date_time": "10:37 am on 27 June, 2023",
        "session_2": [
            {"speaker": "Melanie", "dia_id": "D2:1", "text": "We camped by the lake last weekend."},
            {"speaker": "Caroline", "dia_id": "D2:2", "text": "I joined a choir that sings jazz."},
            {"speaker": "Melanie", "dia_id": "D2:3", "text": "The kids roasted marshmallows."},
        ],
        "qa": [
            {
                "question": "Where did Melanie camp?",
                "answer": "by the lake",
                "evidence": ["D2:1"],
                "category": 4,
            },
            {
                "question": "What hobbies does Caroline have?",
                "answer": "pottery and choir",
                "evidence": ["D1:1; D2:2"],
                "category": 1,
            },
            {
                "question": "What did Caroline make in the pottery class?",
                "answer": "a vase",
                "evidence": ["D1:3"],
                "category": 2,
            },
            {
                "question": "Adversarial: what did Melanie make?",
                "adversarial_answer": "a vase",
                "evidence": ["D1:3"],
                "category": 5,
            },
            {"question": "No evidence at all?", "answer": "-", "evidence": [], "category": 3},
        ],
        "observation": {"ignored": True},
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_locomo_load_conversation(tmp_path: Path) -> None:
    conv = load_conversation(_tiny_locomo(tmp_path / "tiny.json"))
    assert conv.name == "tiny"
    assert [t.turn_id for t in conv.turns] == [
        "D1:1",
        "D1:2",
        "D1:3",
        "D1:4",
        "D2:1",
        "D2:2",
        "D2:3",
    ]
    assert {t.session for t in conv.turns} == {"1", "2"}
    assert conv.turns[0].timestamp.isoformat() == "2023-05-08T13:56:00"
    assert conv.turns[4].timestamp.isoformat() == "2023-06-27T10:37:00"
    assert (
        conv.turns[2].text
        == "A lopsided blue vase. [shares a photo: a photo of a blue ceramic vase]"
    )
    assert conv.baseline_texts["D1:3"] == "[1:56 pm on 8 May, 2023] Caroline: A lopsided blue vase."
    assert [(q.category, q.evidence) for q in conv.questions] == [
        (4, ["D2:1"]),
        (1, ["D1:1", "D2:2"]),  # "D1:1; D2:2" split
        (2, ["D1:3"]),
    ]  # category 5 and the question without evidence are skipped

    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PersonaValidationError, match="cannot read"):
        load_conversation(tmp_path / "bad.json")
    (tmp_path / "noqa.json").write_text('{"session_1": []}', encoding="utf-8")
    with pytest.raises(PersonaValidationError) as err:
        load_conversation(tmp_path / "noqa.json")
    assert err.value.path == "qa"


def test_locomo_evaluate_on_a_tiny_conversation(tmp_path: Path, embedding_function: Any) -> None:
    tiny = _tiny_locomo(tmp_path / "tiny.json")
    progress: list[tuple[str, int, int]] = []
    result = evaluate(
        [tiny],
        ks=(1, 5),
        embedding_function=embedding_function,
        progress=lambda *args: progress.append(args),
    )
    assert result["questions"] == 3 and result["ks"] == [1, 5]
    for side in ("memory", "baseline"):
        assert set(result[side]) == {1, 5}
        assert all(0.0 <= v <= 1.0 for v in result[side].values())
        assert result[side][1] <= result[side][5]
    assert result["memory"][5] == 1.0  # every question is plainly answerable in 7 turns
    assert progress[-1] == ("tiny", 3, 3)
    (conv,) = result["conversations"]
    assert (conv["conversation"], conv["turns"], conv["questions"]) == ("tiny", 7, 3)

    # one question on its own: the obviously answerable one is found at k=1 already
    data = json.loads(tiny.read_text(encoding="utf-8"))
    data["qa"] = [data["qa"][0]]
    (tmp_path / "one.json").write_text(json.dumps(data), encoding="utf-8")
    single = evaluate([tmp_path / "one.json"], ks=(1, 5), embedding_function=embedding_function)
    assert single["memory"] == {1: 1.0, 5: 1.0}


def test_delete_leaves_no_trigram_of_the_text_in_the_full_text_index(
    tmp_path: Path, embedding_function: Any
) -> None:
    """Chroma's full-text index keeps a deleted document's trigrams in its old segments
    until they are merged; a delete merges them, and the file is vacuumed."""
    import sqlite3

    memory = LongTermMemory(tmp_path / "memory", embedding_function=embedding_function)
    memory.remember("zed", [{"turn_id": "t1", "speaker": "user", "text": "my code is QXJWV"}])
    memory.remember("amy", [{"turn_id": "t1", "speaker": "user", "text": "hello there"}])

    def index_bytes() -> bytes:
        conn = sqlite3.connect(str(tmp_path / "memory" / "chroma.sqlite3"))
        try:
            blocks = conn.execute("SELECT block FROM embedding_fulltext_search_data").fetchall()
        finally:
            conn.close()
        return b"".join(b for (b,) in blocks if isinstance(b, bytes))

    assert b"qxj" in index_bytes() and b"jwv" in index_bytes()
    memory.delete_user("zed")
    assert b"qxj" not in index_bytes() and b"jwv" not in index_bytes()
    whole = (tmp_path / "memory" / "chroma.sqlite3").read_bytes()
    assert b"QXJWV" not in whole and b"qxjwv" not in whole
    assert [i.text for i in memory.recall("amy", "hello", k=1)] == ["user: hello there"]
