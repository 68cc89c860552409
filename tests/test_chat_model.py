"""with_persona's result is a chat model: tools, structured output, tool-call streaming,
agents (LangChain v1 create_agent and LangGraph's create_react_agent), the interaction log.

The behaviour of plain calls (what reaches the model per user, every entry point) is
tested in test_chat.py.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from persona_plugin import Persona, PersonaStore, with_persona
from persona_plugin.chat import PersonaChatModel
from persona_plugin.interactions import InteractionLog, record_reply_feedback
from tests.fakes import ToolCallingChatModel


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"rain in {city}"


@tool
def calendar(day: str) -> str:
    """What is on the user's calendar."""
    return "nothing"


class Trip(BaseModel):
    city: str
    days: int


@pytest.fixture
def store(sqlite_url: str) -> Iterator[PersonaStore]:
    with PersonaStore(sqlite_url) as s:
        persona = Persona.new("alice")
        persona.identity.name = "Alice Martins"
        persona.tools = {
            "weather": {"type": "function", "description": "she cycles to work"},
            "calendar": {"type": "function", "description": "her shifts are on it"},
        }
        s.create("alice", persona)
        bob = Persona.new("bob")
        bob.identity.name = "Bob Okafor"
        s.create("bob", bob)
        yield s


def as_user(user: str, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"user_id": user}, **extra}


def system_of(call: list[BaseMessage]) -> str:
    return next(m.text for m in call if isinstance(m, SystemMessage))


def test_it_is_a_chat_model_and_bind_tools_keeps_the_persona(store: PersonaStore) -> None:
    inner = ToolCallingChatModel(default="ok")
    chat = with_persona(inner, store)
    assert isinstance(chat, BaseChatModel)

    bound = chat.bind_tools([weather])
    assert isinstance(bound, PersonaChatModel)
    bound.invoke("will it rain?", as_user("alice"))
    (bind,) = inner.binds
    assert [t["function"]["name"] for t in bind["tools"]] == ["weather"]
    system = system_of(inner.calls[-1])
    assert "Alice Martins" in system
    # the persona lists its notes on the tools the model has, and only those
    assert "she cycles to work" in system and "her shifts are on it" not in system
    # the unbound wrapper is unchanged
    chat.invoke("hi", as_user("alice"))
    assert "she cycles to work" not in system_of(inner.calls[-1])


def test_with_structured_output_parses_and_carries_the_persona(store: PersonaStore) -> None:
    answer = AIMessage(
        content="",
        tool_calls=[{"name": "Trip", "args": {"city": "Porto", "days": 3}, "id": "c1"}],
    )
    inner = ToolCallingChatModel(script=[answer])
    trip = (
        with_persona(inner, store)
        .with_structured_output(Trip)
        .invoke("plan a trip", as_user("bob"))
    )
    assert trip == Trip(city="Porto", days=3)
    assert "Bob Okafor" in system_of(inner.calls[-1])


def test_with_config_binds_a_config_that_names_the_user(store: PersonaStore) -> None:
    inner = ToolCallingChatModel(default="ok")
    chat = with_persona(inner, store).with_config(configurable={"user_id": "bob"})
    chat.invoke("hi")
    assert "Bob Okafor" in system_of(inner.calls[-1])


def tool_step(n: int, city: str = "Porto") -> AIMessage:
    return AIMessage(
        content="", tool_calls=[{"name": "weather", "args": {"city": city}, "id": f"c{n}"}]
    )


def test_create_agent_runs_tool_steps_with_the_persona_in_each(store: PersonaStore) -> None:
    inner = ToolCallingChatModel(script=[tool_step(1), tool_step(2, "Braga"), "Take a coat."])
    agent = create_agent(with_persona(inner, store), [weather, calendar])
    result = agent.invoke({"messages": [("user", "Cycling today?")]}, as_user("alice"))
    assert result["messages"][-1].text == "Take a coat."
    assert [m.text for m in result["messages"] if m.type == "tool"] == [
        "rain in Porto",
        "rain in Braga",
    ]
    assert len(inner.calls) == 3
    for call in inner.calls:
        system = system_of(call)
        assert "Alice Martins" in system and "Bob Okafor" not in system
        assert "she cycles to work" in system and "her shifts are on it" in system


def test_langgraph_create_react_agent_takes_it_as_its_model(store: PersonaStore) -> None:
    from langgraph.prebuilt import create_react_agent

    inner = ToolCallingChatModel(script=[tool_step(1), "Rain: stay in."])
    with warnings.catch_warnings():  # deprecated in favour of create_agent, still used
        warnings.simplefilter("ignore", DeprecationWarning)
        agent = create_react_agent(with_persona(inner, store), [weather])
    result = agent.invoke({"messages": [("user", "Out today?")]}, as_user("bob"))
    assert result["messages"][-1].text == "Rain: stay in."
    assert all("Bob Okafor" in system_of(call) for call in inner.calls)


class StreamingToolModel(BaseChatModel):
    """Streams a tool call in pieces, as provider SDKs do."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "streaming-tools"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[getattr(t, "name", t) for t in tools])

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
        raise NotImplementedError

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
        self.seen.append(list(messages))
        for piece in ['{"ci', 'ty": "Fa', 'ro"}']:
            first = piece.startswith('{"ci')
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        {
                            "name": "weather" if first else None,
                            "args": piece,
                            "id": "c1" if first else None,
                            "index": 0,
                        }
                    ],
                )
            )


def test_tool_call_chunks_stream_through_and_add_up(store: PersonaStore) -> None:
    inner = StreamingToolModel()
    chat = with_persona(inner, store).bind_tools([weather])
    chunks = list(chat.stream("weather in Faro?", as_user("alice")))
    assert sum(bool(c.tool_call_chunks) for c in chunks) == 3  # streamed, not buffered
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert whole.tool_calls == [
        {"name": "weather", "args": {"city": "Faro"}, "id": "c1", "type": "tool_call"}
    ]
    assert "Alice Martins" in system_of(inner.seen[-1])

    async def collect() -> list[Any]:
        return [c async for c in chat.astream("again", as_user("bob"))]

    assert sum(bool(c.tool_call_chunks) for c in asyncio.run(collect())) == 3
    assert "Bob Okafor" in system_of(inner.seen[-1])


def test_with_a_log_every_reply_has_a_turn_id_feedback_can_name(store: PersonaStore) -> None:
    log = InteractionLog.on(store)
    inner = ToolCallingChatModel(default="Sure.")
    chat = with_persona(inner, store, interactions=log)

    reply = chat.invoke("remind me of my shift", as_user("alice"))
    tag = reply.response_metadata["persona"]
    assert tag["persona_version"] == 1
    (turn,) = log.turns("alice")
    assert (turn.turn_id, turn.user_text, turn.reply_text) == (
        tag["turn_id"],
        "remind me of my shift",
        "Sure.",
    )
    event = record_reply_feedback(log, "alice", reply, "rating", rating=-1)
    assert event.turn_id == tag["turn_id"]

    # streamed: the last chunk carries the tag, so the whole reply has it
    chunks = list(chat.stream("and tomorrow?", as_user("bob")))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert whole.text == "Sure."
    assert [t.turn_id for t in log.turns("bob")] == [whole.response_metadata["persona"]["turn_id"]]
    # async
    reply = asyncio.run(chat.ainvoke("hi", as_user("bob")))
    assert len(log.turns("bob")) == 2
    assert reply.response_metadata["persona"]["turn_id"] == log.turns("bob")[-1].turn_id


def test_without_a_log_nothing_is_written(store: PersonaStore) -> None:
    reply = with_persona(ToolCallingChatModel(default="ok"), store).invoke("hi", as_user("bob"))
    assert "persona" not in reply.response_metadata
    assert InteractionLog.on(store).turns("bob") == []
