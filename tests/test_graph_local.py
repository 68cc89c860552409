"""The persona graph end to end on the local model with the bundled style adapters.

The graph's ``generate`` node hands the persona to the multi-LoRA chat model, which
retrieves the adapter mixture from it: real SmolLM2-135M-Instruct on CPU, real peft
adapters, a real SQLite store. Replies are a few greedy tokens (what matters here is
which adapters serve them); reflection is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")

from langchain_core.language_models.fake_chat_models import FakeListChatModel

from persona_plugin.backends import SERVED_MERGED
from persona_plugin.backends.local import LocalBackend
from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
from persona_plugin.chat_models.registry import local_chat_model, resolve_chat_model
from persona_plugin.config import Settings
from persona_plugin.graph import build_persona_graph, takes_persona
from persona_plugin.lora.hub import BUNDLED_LORA_DIR, LoraHub, parse_card
from persona_plugin.persona import Persona
from persona_plugin.store import PersonaStore
from tests.paths import MODEL_CACHE

MODELS = MODEL_CACHE / "models"
QUESTION = "How do fish breathe underwater?"


@pytest.fixture(scope="module")
def user_lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def model(user_lora_dir: Path) -> MultiLoraChatModel:
    # the suite's model cache: a module fixture runs before conftest sets PERSONA_CACHE_DIR
    hub = LoraHub(user_lora_dir, bundled=(BUNDLED_LORA_DIR,))
    backend = LocalBackend(lora_hub=hub, cache_dir=MODELS).load()
    return local_chat_model(backend=backend, temperature=None, max_new_tokens=6)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with PersonaStore(f"sqlite:///{tmp_path / 'p.db'}") as s:
        yield s


def persona(user_id: str, styles: list[str], about: str) -> Persona:
    p = Persona.new(user_id, name=user_id.title())
    p.preference.style.extend(styles)
    p.personality.description = about
    return p


def ask(graph: Any, user_id: str, thread: str = "t") -> Any:
    config = {"configurable": {"user_id": user_id, "thread_id": f"{user_id}-{thread}"}}
    return graph.invoke({"messages": [("user", QUESTION)]}, config)["messages"][-1]


def test_two_personas_get_different_mixtures(model: MultiLoraChatModel, store: Any) -> None:
    store.create("bo", persona("bo", ["concise", "brief"], "Wants short, to-the-point answers."))
    store.create("cleo", persona("cleo", ["playful", "fun"], "Loves jokes and emoji."))
    graph = build_persona_graph(model, store=store, reflection="off")
    try:
        replies = {user: ask(graph, user) for user in ("bo", "cleo")}
    finally:
        graph.close()
    mixtures = {}
    for user, reply in replies.items():
        meta = reply.response_metadata
        retrieved = meta["retrieved"]
        assert len(retrieved) == 2  # top_k 2
        assert sum(w for _, w, _ in retrieved) == pytest.approx(1.0, abs=1e-3)
        assert [s for *_, s in retrieved] == sorted((s for *_, s in retrieved), reverse=True)
        # what served is what was retrieved
        assert meta["served_by"] == SERVED_MERGED
        assert [a for a, _ in meta["adapters"]] == [a for a, _, _ in retrieved]
        assert reply.text.strip()
        hub = model.backend.lora_hub
        assert all(hub.get(a).kind == "style" for a, _, _ in retrieved)  # never reflection
        mixtures[user] = {a: w for a, w, _ in retrieved}
    assert max(mixtures["bo"], key=mixtures["bo"].get) == "concise"
    assert max(mixtures["cleo"], key=mixtures["cleo"].get) == "playful"
    assert replies["bo"].text != replies["cleo"].text


def test_a_persona_change_changes_the_mixture(model: MultiLoraChatModel, store: Any) -> None:
    store.create("dana", persona("dana", ["concise", "brief"], "Wants short answers."))
    # one token a reply: only the retrieved mixture is compared
    graph = build_persona_graph(model.bind(max_new_tokens=1), store=store, reflection="off")
    try:
        before = ask(graph, "dana", "1").response_metadata["retrieved"]

        def playful(p: Persona) -> None:
            p.preference.style[:] = ["playful", "fun", "cheerful"]
            p.personality.description = "Now wants jokes and emoji in every answer."

        store.update("dana", playful, reason="asked for fun")
        after = ask(graph, "dana", "2").response_metadata["retrieved"]
    finally:
        graph.close()
    assert before[0][0] == "concise" and after[0][0] == "playful"


def test_reflection_adapters_are_never_retrieved_for_replies(
    model: MultiLoraChatModel, user_lora_dir: Path
) -> None:
    concise = LoraHub(BUNDLED_LORA_DIR).get("concise")
    # a reflection card that matches a concise persona better than anything else
    clone = concise.to_dict() | {
        "id": "reflect-concise",
        "kind": "reflection",
        "location": concise.resolved_location,
    }
    hub = model.backend.lora_hub
    hub.add(parse_card(clone))
    try:
        assert "reflect-concise" in hub
        reply = model.bind(max_new_tokens=1).invoke(
            [("user", QUESTION)], persona="Concise, brief, short answers."
        )
        assert "reflect-concise" not in [a for a, _, _ in reply.response_metadata["retrieved"]]
    finally:
        hub.remove("reflect-concise")


def test_only_persona_taking_models_get_the_persona(model: MultiLoraChatModel) -> None:
    assert takes_persona(model) and takes_persona(model.bind(max_new_tokens=3))
    assert not takes_persona(FakeListChatModel(responses=["hi"]))


def test_local_is_a_chat_model_name(tmp_path: Path) -> None:
    settings = Settings.load(lora_dir=tmp_path / "cards")
    local = resolve_chat_model("local", settings)
    assert isinstance(local, MultiLoraChatModel)
    hub = local.backend.lora_hub
    assert hub.directory == tmp_path / "cards" and BUNDLED_LORA_DIR in hub.bundled
    assert local.retriever.top_k == 2 and "reflection" in local.retriever.exclude_kinds
    # one loaded model per hub, shared by every chat model resolved on it
    assert resolve_chat_model("local", settings).backend is local.backend
    assert resolve_chat_model("echo").invoke("hi").text.startswith('You said: "hi"')


def test_the_graph_on_the_local_model_reflects_with_the_reflection_adapter(
    model: MultiLoraChatModel, store: Any
) -> None:
    """End to end, nothing scripted: the local model replies with style adapters, and the
    reflection runs on the same loaded model with the reflection adapter."""
    from persona_plugin.reflection.local import LocalReflector
    from persona_plugin.reflection.reflector import Reflector

    graph = build_persona_graph(model, store=store, reflection="inline")
    try:
        assert isinstance(graph.reflector, LocalReflector)
        assert graph.reflector.backend is model.backend  # one model in memory
        config = {"configurable": {"user_id": "greta", "thread_id": "greta-t"}}
        graph.invoke({"messages": [("user", "These days I'm based in Tallinn.")]}, config)
    finally:
        graph.close()
    persona = store.get("greta")
    assert persona.demographics.location == "Tallinn"
    (record,) = [r for r in store.history("greta") if r.source.startswith("reflection")]
    assert record.details["token_usage"]["total_tokens"] > 0
    # any other chat model keeps the generic reflector
    other = build_persona_graph(FakeListChatModel(responses=["ok"]), store=store)
    assert isinstance(other.reflector, Reflector)
    other.close()


def test_feedback_on_the_local_model_reaches_the_persona_through_the_worker(
    model: MultiLoraChatModel, store: Any
) -> None:
    """Nothing scripted: feedback on a local reply goes through the interaction log and the
    graph's reflection worker to the local reflector's feedback reader. A "thanks" teaches
    nothing; a 👎 "too long" makes preference.style concise (replacing detailed) in a new
    version whose evidence is the feedback event and its turn."""
    from persona_plugin.interactions import DONE

    store.create("hugo", persona("hugo", ["detailed"], "Asks about nature."))
    graph = build_persona_graph(model, store=store, reflection="inline", debounce_s=60)
    try:
        config = {"configurable": {"user_id": "hugo", "thread_id": "hugo-t", "turn_id": "t1"}}
        graph.invoke({"messages": [("user", QUESTION)]}, config)
        before = store.current_version("hugo")
        thanks = graph.record_feedback("hugo", "t1", "rating", rating=1, comment="thanks")
        assert graph.background.drain(timeout=120)
        assert store.current_version("hugo") == before
        assert not graph.background.outcomes[-1].saved
        event = graph.record_feedback("hugo", "t1", "rating", rating=-1, comment="too long")
        assert graph.background.drain(timeout=120)
    finally:
        graph.close(timeout=120)
    assert store.get("hugo").preference.style == ["concise"]
    record = store.get_version("hugo")
    assert record.version == before + 1
    assert record.source == f"reflection turn t1 (feedback fb{event.id})"
    (applied,) = record.details["reflection"]["applied"]
    assert applied["effect"] == "replaced"
    assert applied["operation"]["evidence"] == [f"fb{event.id}", "t1"]
    assert record.details["token_usage"] == {}  # the reader made no model call
    logged = {e.id: e for e in graph.interactions.feedback("hugo")}
    assert logged[thanks.id].reflection == logged[event.id].reflection == DONE
    assert logged[event.id].reflected_version == record.version
