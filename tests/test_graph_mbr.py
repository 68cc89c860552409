"""The graph's optional MBR stage: the persona's preference models choose among candidates.

The candidates are scripted (a chat model answering in turn with a medium, a long and a
short reply); the preference models are the bundled demo heads on the local embedder,
retrieved from the persona stored in a real SQLite store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from persona_plugin.chat_models.mbr import describe_mbr
from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError
from persona_plugin.graph import build_persona_graph, build_persona_graph_from_settings
from persona_plugin.persona import Persona
from persona_plugin.preferences.hub import PreferenceHub
from persona_plugin.preferences.scorers import CandidateEmbeddings
from persona_plugin.store import PersonaStore
from tests.fakes import CyclingChatModel

SHORT = "Use a password manager and turn on two-factor authentication."
MEDIUM = (
    "Use a password manager so every site gets its own long password, and turn on "
    "two-factor authentication for email and banking."
)
LONG = (
    "Start with a password manager: it generates a long, unique password for every site "
    "and remembers them for you, so a leak at one service cannot unlock the others. Then "
    "turn on two-factor authentication wherever it is offered, preferably with an "
    "authenticator app or a hardware key rather than text messages, which can be "
    "intercepted. Keep your phone and browser updated and be wary of unexpected links."
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> PreferenceHub:
    hub = PreferenceHub(tmp_path_factory.mktemp("prefs"), embedder=CandidateEmbeddings())
    hub.load()
    return hub


def _persona(user: str, style: list[str]) -> Persona:
    persona = Persona.new(user)
    persona.preference.style = style
    return persona


def _ask(graph: Any, user: str, **configurable: Any) -> AIMessage:
    config = {"configurable": {"user_id": user, "thread_id": f"{user}-t", **configurable}}
    state = graph.invoke({"messages": [HumanMessage("How do I keep my accounts safe?")]}, config)
    return state["messages"][-1]


def test_mbr_stage_follows_each_users_preferences(store: PersonaStore, hub: PreferenceHub) -> None:
    store.create("bo", _persona("bo", ["concise", "short answers"]))
    store.create("cleo", _persona("cleo", ["detailed", "thorough, in-depth explanations"]))
    base = CyclingChatModel(replies=[MEDIUM, LONG, SHORT])
    graph = build_persona_graph(base, store=store, reflection="off", mbr_n=3, preference_hub=hub)

    brief = _ask(graph, "bo")
    assert brief.content == SHORT and base.calls == 3
    mbr = brief.response_metadata["mbr"]
    assert sorted(mbr["candidates"]) == sorted([SHORT, MEDIUM, LONG])
    assert mbr["weights"]["brevity"] > 0
    assert describe_mbr(brief.response_metadata).startswith("MBR: candidate")

    detailed = _ask(graph, "cleo")
    assert detailed.content == LONG
    assert detailed.response_metadata["mbr"]["weights"]["brevity"] < 0

    # a new persona version flips the choice
    store.update("bo", lambda p: setattr(p.preference, "style", ["detailed", "in-depth"]))
    assert _ask(graph, "bo").content == LONG


def test_messages_mode_streams_the_chosen_reply_alone(
    store: PersonaStore, hub: PreferenceHub
) -> None:
    store.create("bo", _persona("bo", ["concise", "short answers"]))
    base = CyclingChatModel(replies=[MEDIUM, LONG, SHORT])
    graph = build_persona_graph(base, store=store, reflection="off", mbr_n=3, preference_hub=hub)
    config = {"configurable": {"user_id": "bo", "thread_id": "bo-t"}}
    question = {"messages": [HumanMessage("How do I keep my accounts safe?")]}
    streamed = [m for m, _ in graph.stream(question, config, stream_mode="messages")]
    # the candidates are not streamed; the chosen one is, as one chunk once chosen
    assert [(type(m).__name__, m.text) for m in streamed] == [("AIMessageChunk", SHORT)]
    assert streamed[0].chunk_position == "last" and base.calls == 3


def test_mbr_is_off_by_default_and_configurable_per_call(
    store: PersonaStore, hub: PreferenceHub
) -> None:
    store.create("bo", _persona("bo", ["concise", "short answers"]))
    base = CyclingChatModel(replies=[MEDIUM, LONG, SHORT])
    graph = build_persona_graph(base, store=store, reflection="off", preference_hub=hub)
    plain = _ask(graph, "bo")
    assert plain.content == MEDIUM and "mbr" not in plain.response_metadata
    assert base.calls == 1
    chosen = _ask(graph, "bo", mbr_n=3)
    assert chosen.content == SHORT and base.calls == 4
    for bad in (-1, 33, "3", True):
        with pytest.raises(PersonaConfigError, match="mbr_n"):
            _ask(graph, "bo", mbr_n=bad)


def test_mbr_n_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA_MBR_N", "2")
    graph = build_persona_graph_from_settings(Settings.load())
    try:
        assert graph.mbr_n == 2
        assert isinstance(graph.preference_hub, PreferenceHub)
    finally:
        graph.close()
    with pytest.raises(PersonaConfigError, match="mbr_n"):
        build_persona_graph(
            CyclingChatModel(replies=["x"]),
            store=PersonaStore(f"sqlite:///{tmp_path / 'p.db'}"),
            mbr_n=-2,
        )
