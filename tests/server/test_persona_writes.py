"""The persona server's write routes (PUT, PATCH, rollback) over real HTTP: validated,
versioned, compare-and-set with If-Match, behind the same auth; bad input writes nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.server.persona_writes import merge_patch
from persona_plugin.store import PersonaStore
from tests.server.test_server import TOK_A, TOK_T, _app, _call, _error, running
from tests.server.test_server import RecordingChatModel as Recorder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PersonaStore, Any]]:
    tmp = tmp_path_factory.mktemp("writes")
    with PersonaStore(f"sqlite:///{tmp / 'personas.db'}") as store:
        memory = LongTermMemory(tmp / "memory", embedding_function=MiniLMEmbeddingFunction())
        with running(_app(store, memory, Recorder())) as url:
            yield url, store, memory


def doc(name: str, location: str = "Lisbon", **extra: Any) -> dict[str, Any]:
    return {
        "identity": {"name": name},
        "demographics": {"location": location},
        "preference": {"style": ["concise"]},
        **extra,
    }


def call(url: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    """A request with the tenant token, which acts on users ``acme:*``."""
    return _call(url, method, path, body, token=kw.pop("token", TOK_T), **kw)


def put(url: str, user: str, document: Any, **kw: Any) -> Any:
    return call(url, "PUT", f"/v1/personas/{user}", {"document": document, "reason": "app"}, **kw)


def test_merge_patch_follows_rfc_7396() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    assert merge_patch(target, {"a": "z", "c": {"f": None}, "l": [3]}) == {
        "a": "z",
        "c": {"d": "e"},
        "l": [3],
    }
    assert merge_patch(target, {"c": None}) == {"a": "b", "l": [1, 2]}
    assert target["c"] == {"d": "e", "f": "g"}  # untouched


def test_put_creates_then_replaces_with_versions_and_etags(served) -> None:
    url, store, _ = served
    created = put(url, "acme:ana", doc("Ana"))
    assert created.status_code == 200, created.text
    assert created.headers["etag"] == '"1"'
    assert created.json()["version"] == 1 and created.json()["source"] == "api"
    replaced = put(url, "acme:ana", doc("Ana", "Porto"), headers={"If-Match": '"1"'})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2
    assert [c["path"] for c in replaced.json()["change"]] == ["demographics.location"]
    assert store.get("acme:ana").demographics.location == "Porto"
    got = call(url, "GET", "/v1/personas/acme:ana")
    assert got.headers["etag"] == '"2"'
    assert store.get_version("acme:ana", 2).reason == "app"
    # the same document again is no change: no version
    again = put(url, "acme:ana", doc("Ana", "Porto"), headers={"If-Match": '"2"'})
    assert (
        again.json()["version"] == 2
        and put(url, "acme:ana", doc("Ana", "Porto")).json()["version"] == 2
    )
    assert store.current_version("acme:ana") == 2


def test_a_stale_if_match_is_a_409_and_writes_nothing(served) -> None:
    url, store, _ = served
    put(url, "acme:bea", doc("Bea"))
    put(url, "acme:bea", doc("Bea", "Faro"))
    error = _error(put(url, "acme:bea", doc("Bea", "Braga"), headers={"If-Match": "1"}), 409)
    assert error["code"] == "version_conflict" and "version 2" in error["message"]
    assert (
        store.current_version("acme:bea") == 2
        and store.get("acme:bea").demographics.location == "Faro"
    )
    # If-Match: 0 means "only if there is none yet"
    assert _error(put(url, "acme:bea", doc("Bea"), headers={"If-Match": "0"}), 409)
    first = put(url, "acme:cai", doc("Cai"), headers={"If-Match": "0"})
    assert first.status_code == 200 and first.json()["version"] == 1
    bad = _error(put(url, "acme:bea", doc("Bea"), headers={"If-Match": "latest"}), 400)
    assert bad["param"] == "If-Match"


def test_concurrent_compare_and_set_lets_exactly_one_win(served) -> None:
    url, store, _ = served
    put(url, "acme:dan", doc("Dan"))
    codes: list[int] = []

    def write(city: str) -> None:
        codes.append(put(url, "acme:dan", doc("Dan", city), headers={"If-Match": "1"}).status_code)

    threads = [threading.Thread(target=write, args=(c,)) for c in ("Porto", "Faro", "Braga")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409, 409]
    assert store.current_version("acme:dan") == 2


def test_patch_merges_into_the_current_document(served) -> None:
    url, store, _ = served
    put(url, "acme:eva", doc("Eva"))
    patched = call(
        url,
        "PATCH",
        "/v1/personas/acme:eva",
        {"patch": {"demographics": {"location": "Coimbra"}, "preference": {"style": ["warm"]}}},
        headers={"If-Match": '"1"'},
    )
    assert patched.status_code == 200, patched.text
    persona = store.get("acme:eva")
    assert persona.demographics.location == "Coimbra"
    assert persona.preference.style == ["warm"]  # a list is replaced, not duplicated
    assert persona.identity.name == "Eva"  # untouched
    missing = call(url, "PATCH", "/v1/personas/acme:nobody", {"patch": {"identity": {"name": "X"}}})
    assert _error(missing, 404)["code"] == "persona_not_found"
    assert not store.exists("acme:nobody")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"document": {"demographics": {"age": "old"}}}, "demographics"),
        ({"document": {"identity": {"user_id": "somebody-else"}}}, "identity"),
        ({"document": {"unknown_section": {}}}, None),
        ({"document": "a string"}, "document"),
        ({"reason": "no document"}, "document"),
        ({"document": {}, "reason": 5}, "reason"),
    ],
    ids=["bad-age", "other-user", "unknown-section", "not-object", "missing", "bad-reason"],
)
def test_bad_documents_are_400s_naming_the_field_and_write_nothing(served, body, param) -> None:
    url, store, _ = served
    put(url, "acme:fay", doc("Fay"))  # once: the same document again writes no version
    error = _error(call(url, "PUT", "/v1/personas/acme:fay", body), 400)
    if param is not None:
        assert error["param"] == param
    assert store.current_version("acme:fay") == 1


def test_rollback_restores_a_version_as_a_new_one(served) -> None:
    url, store, _ = served
    put(url, "acme:gus", doc("Gus", "Lisbon"))
    put(url, "acme:gus", doc("Gus", "Porto"))
    rolled = call(
        url, "POST", "/v1/personas/acme:gus/rollback", {"version": 1}, headers={"If-Match": "2"}
    )
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["version"] == 3 and rolled.headers["etag"] == '"3"'
    assert store.get("acme:gus").demographics.location == "Lisbon"
    stale = call(
        url, "POST", "/v1/personas/acme:gus/rollback", {"version": 2}, headers={"If-Match": "2"}
    )
    assert _error(stale, 409)["code"] == "version_conflict"
    assert _error(call(url, "POST", "/v1/personas/acme:gus/rollback", {"version": 9}), 404)
    assert _error(call(url, "POST", "/v1/personas/acme:gus/rollback", {"version": "1"}), 400)
    assert store.current_version("acme:gus") == 3


def test_writes_need_a_token_that_owns_the_user(served) -> None:
    url, store, _ = served
    assert _error(put(url, "alice", doc("A"), token=None), 401)
    assert _error(put(url, "alice", doc("A"), token="nope"), 401)
    # TOK_T acts on acme:* users only; TOK_A on alice and bob
    assert _error(put(url, "alice", doc("A"), token=TOK_T), 403)["code"] == "user_not_permitted"
    assert _error(put(url, "acme:zoe", doc("Z"), token=TOK_A), 403)
    patch = _call(url, "PATCH", "/v1/personas/alice", {"patch": {}}, token=TOK_T)
    assert _error(patch, 403)
    rollback = _call(url, "POST", "/v1/personas/alice/rollback", {"version": 1}, token=TOK_T)
    assert _error(rollback, 403)
    assert not store.exists("alice") and not store.exists("acme:zoe")
    assert put(url, "acme:zoe", doc("Zoe"), token=TOK_T).status_code == 200
