"""PersonaMiddleware in real LangChain v1 agents (``create_agent``), on a real store, memory
and interaction log; LangChain-style scripted chat models play the LLM."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, SystemMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import Field

from persona_plugin import Persona, PersonaConfigError, PersonaStore
from persona_plugin.embeddings import MiniLMEmbeddingFunction
from persona_plugin.interactions import InteractionLog
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.middleware import PersonaMiddleware
from tests.fakes import ScriptedChatModel, ScriptedReflection, ToolCallingChatModel

WEATHER_CALLS: list[str] = []


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    WEATHER_CALLS.append(city)
    return f"sunny in {city}"


@tool
def distance(city: str) -> str:
    """How far a city is from the user, in km."""
    return f"{len(city) * 100} km"


def tool_call(name: str, city: str, n: int) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": {"city": city}, "id": f"c{n}"}])


def two_tool_steps_then(answer: str) -> list[Any]:
    return [tool_call("weather", "Porto", 1), tool_call("distance", "Porto", 2), answer]


@dataclass
class Context:
    user_id: str


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


@pytest.fixture
def store(sqlite_url: str):
    with PersonaStore(sqlite_url) as s:
        yield s


@pytest.fixture
def memory(tmp_path: Path, embedding: MiniLMEmbeddingFunction) -> LongTermMemory:
    return LongTermMemory(tmp_path / "memory", embedding_function=embedding)


def alice(store: PersonaStore) -> None:
    persona = Persona.new("alice")
    persona.identity.name = "Alice Martins"
    persona.tools = {  # annotated tools: only the ones the agent has are listed
        "weather": {"type": "function", "description": "she checks it before cycling"},
        "calendar": {"type": "function", "description": "her work calendar"},
    }
    store.create("alice", persona)


def test_a_tool_calling_agent_sees_the_persona_at_every_step_and_learns_from_the_turn(
    store: PersonaStore, memory: LongTermMemory
) -> None:
    alice(store)
    model = ToolCallingChatModel(script=two_tool_steps_then("Go cycling: it is sunny."))
    persona = PersonaMiddleware(store, memory=memory, reflector=ScriptedReflection())
    agent = create_agent(
        model, [weather, distance], system_prompt="You are a trip planner.", middleware=[persona]
    )

    result = agent.invoke(
        {"messages": [{"role": "user", "content": "I love cycling. Should I ride to Porto?"}]},
        {"configurable": {"user_id": "alice"}},
    )

    # three model steps (two tool calls, the answer), each with the app's prompt and persona
    assert len(model.calls) == 3
    for call in model.calls:
        system = call[0]
        assert isinstance(system, SystemMessage)
        assert system.text.startswith("You are a trip planner.")
        assert "Alice Martins" in system.text
        assert "she checks it before cycling" in system.text
        assert "her work calendar" not in system.text  # the agent has no calendar tool
    assert model.calls[2][-1].text == "500 km"  # the tool results reached the model
    reply = result["messages"][-1]
    assert reply.text == "Go cycling: it is sunny."
    tag = reply.response_metadata["persona"]
    assert tag["persona_version"] == 1
    # it learned from the turn: a new version with the interest, cited to this turn
    learned = store.get("alice")
    assert "cycling" in learned.personality.interests
    assert tag["reflection"] == {"version": learned.meta.version, "saved": True}
    record = store.get_version("alice", learned.meta.version)
    assert tag["turn_id"] in str(record.details)
    # remembered and logged under that turn id
    assert any("Should I ride to Porto" in i.text for i in memory.get("alice"))
    (logged,) = InteractionLog.on(store).turns("alice")
    assert logged.turn_id == tag["turn_id"]
    assert logged.reply_text == "Go cycling: it is sunny."
    # the client's state has no persona internals
    assert "persona_turn" not in result


def test_the_user_comes_from_the_runtime_context_and_a_missing_one_says_how(
    store: PersonaStore,
) -> None:
    alice(store)
    model = ToolCallingChatModel(default="hello")
    agent = create_agent(
        model,
        [weather],
        context_schema=Context,
        middleware=[PersonaMiddleware(store, reflection="off")],
    )
    agent.invoke({"messages": [("user", "hi")]}, context=Context(user_id="alice"))
    assert "Alice Martins" in model.calls[-1][0].text

    with pytest.raises(PersonaConfigError) as info:
        create_agent(model, [weather], middleware=[PersonaMiddleware(store)]).invoke(
            {"messages": [("user", "hi")]}
        )
    assert "user_id" in str(info.value) and "context=" in str(info.value)


def test_users_never_see_each_other(store: PersonaStore, memory: LongTermMemory) -> None:
    alice(store)
    bob = Persona.new("bob")
    bob.identity.name = "Bob Okafor"
    store.create("bob", bob)
    model = ScriptedChatModel(default="ok")
    middleware = PersonaMiddleware(store, memory=memory, reflector=ScriptedReflection())
    agent = create_agent(model, [], middleware=[middleware])
    secrets = {"alice": "my locker code is 4471", "bob": "my locker code is 9902"}
    for _ in range(2):
        for user in ("alice", "bob"):
            agent.invoke(
                {"messages": [("user", secrets[user])]}, {"configurable": {"user_id": user}}
            )
    systems = [call[0].text for call in model.calls]
    for text, user in zip(systems, ["alice", "bob"] * 2, strict=True):
        other = "bob" if user == "alice" else "alice"
        assert secrets[other].split()[-1] not in text
        assert ("Bob Okafor" in text) == (user == "bob")
    # the second round recalled each user's own first turn
    assert "4471" in systems[2] and "9902" in systems[3]


def test_async_agent_runs_the_same_hooks(store: PersonaStore, memory: LongTermMemory) -> None:
    alice(store)
    model = ToolCallingChatModel(script=[tool_call("weather", "Braga", 1), "Sunny: I love it."])
    agent = create_agent(
        model,
        [weather],
        middleware=[PersonaMiddleware(store, memory=memory, reflector=ScriptedReflection())],
    )
    result = asyncio.run(
        agent.ainvoke(
            {"messages": [("user", "I love swimming. Weather in Braga?")]},
            {"configurable": {"user_id": "alice"}},
        )
    )
    assert all("Alice Martins" in call[0].text for call in model.calls)
    assert result["messages"][-1].response_metadata["persona"]["turn_id"]
    assert "swimming" in store.get("alice").personality.interests


def test_the_agents_own_model_reflects_when_no_reflector_is_given(store: PersonaStore) -> None:
    reflection = ScriptedReflection()

    def answer(messages: list[Any]) -> AIMessage:
        if "[turn " in messages[-1].text:  # the reflection prompt
            return reflection.invoke(messages)
        return AIMessage(content="Noted.")

    model = ScriptedChatModel(default=answer)
    agent = create_agent(model, [], middleware=[PersonaMiddleware(store)])
    agent.invoke({"messages": [("user", "I love chess.")]}, {"configurable": {"user_id": "carol"}})
    # a new user: cold start, then reflection created their persona
    assert store.get("carol").personality.interests == ["chess"]
    assert len(model.calls) == 2


def test_background_reflection_goes_through_the_log_and_feedback_is_taken(
    store: PersonaStore,
) -> None:
    alice(store)
    middleware = PersonaMiddleware(store, reflector=ScriptedReflection(), reflection="background")
    agent = create_agent(ScriptedChatModel(default="Enjoy!"), [], middleware=[middleware])
    result = agent.invoke(
        {"messages": [("user", "I love kayaking.")]}, {"configurable": {"user_id": "alice"}}
    )
    turn_id = result["messages"][-1].response_metadata["persona"]["turn_id"]
    assert "kayaking" not in store.get("alice").personality.interests  # not yet
    assert middleware.background.drain(timeout=30)
    assert "kayaking" in store.get("alice").personality.interests
    event = middleware.record_feedback("alice", turn_id, "rating", rating=1)
    assert event.turn_id == turn_id
    with pytest.raises(Exception, match="turn"):
        middleware.record_feedback("bob", turn_id, "rating", rating=1)
    middleware.close()


def test_a_thread_keeps_its_messages_and_forget_removes_everything(
    store: PersonaStore, memory: LongTermMemory
) -> None:
    alice(store)
    saver = InMemorySaver()
    model = ScriptedChatModel(default="ok")
    middleware = PersonaMiddleware(store, memory=memory, reflector=ScriptedReflection())
    agent = create_agent(model, [], middleware=[middleware], checkpointer=saver)
    config = {"configurable": {"user_id": "alice", "thread_id": "th-1"}}
    agent.invoke({"messages": [("user", "I love tea.")]}, config)
    agent.invoke({"messages": [("user", "What do I love?")]}, config)
    # the thread shows the first turn, so memory does not recall it a second time
    second = model.calls[-1]
    assert second[0].text.count("I love tea.") == 0
    assert [m.text for m in second[1:]] == ["I love tea.", "ok", "What do I love?"]

    gone = middleware.forget("alice", checkpointer=saver)
    assert gone.versions >= 1 and gone.memory_items >= 2 and gone.threads == 1 and gone.logged == 2
    assert not store.exists("alice") and memory.count("alice") == 0


class PersonaTakingModel(ScriptedChatModel):
    """Chooses what serves a call from ``persona=``, as the multi-LoRA model does."""

    takes_persona: bool = True
    personas: list[Any] = Field(default_factory=list)

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
        self.personas.append(kw.get("persona"))
        return super()._generate(messages, stop, run_manager)


def test_a_model_that_takes_the_persona_gets_the_users(store: PersonaStore) -> None:
    alice(store)
    model = PersonaTakingModel(default="ok")
    agent = create_agent(model, [], middleware=[PersonaMiddleware(store, reflection="off")])
    agent.invoke({"messages": [("user", "hi")]}, {"configurable": {"user_id": "alice"}})
    (given,) = model.personas
    assert given.identity.name == "Alice Martins"
