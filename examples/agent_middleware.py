"""A LangChain v1 tool-calling agent that knows its user: PersonaMiddleware.

Run: .venv/bin/python examples/agent_middleware.py
A scripted chat model stands in for yours (ChatOpenAI, ChatAnthropic, ...): it calls the
weather tool, then answers; a scripted reflection model learns from the turn. Swap in a
real model and leave ``reflector`` out to have that model reflect.
"""

from __future__ import annotations

import json
import tempfile

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from persona_plugin import Persona, PersonaMiddleware, PersonaStore


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny, 24°C in {city}"


class ToolCallingFake(FakeMessagesListChatModel):
    """Answers from its list; binding tools changes nothing (the script already calls one)."""

    def bind_tools(self, tools, **kwargs):
        return self


LEARNED = {  # what a reflection model would answer for this turn
    "loss": {"revealed": ["cycles to work"], "missed": [], "score": 0.8},
    "gradients": [],
    "operations": [
        {
            "op": "append",
            "path": "personality.interests",
            "value": "cycling",
            "confidence": 0.9,
            "evidence": ["TURN"],
        }
    ],
    "memories": [],
}


class ScriptedReflection(FakeMessagesListChatModel):
    """Answers the reflection prompt with LEARNED, citing the turn it was shown."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        turn = messages[-1].text.split("[turn ", 1)[1].split("]", 1)[0]
        self.responses = [AIMessage(json.dumps(LEARNED).replace("TURN", turn))]
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        store.create("alice", Persona.new("alice", name="Alice"))
        model = ToolCallingFake(
            responses=[
                AIMessage(
                    "", tool_calls=[{"name": "weather", "args": {"city": "Porto"}, "id": "1"}]
                ),
                AIMessage("Sunny in Porto: a good day to cycle in."),
            ]
        )

        persona = PersonaMiddleware(store, reflector=ScriptedReflection(responses=[]))
        agent = create_agent(model, [weather], middleware=[persona])
        result = agent.invoke(
            {"messages": [("user", "I cycle to work. Weather in Porto?")]},
            {"configurable": {"user_id": "alice"}},
        )
        reply = result["messages"][-1]
        print("reply:", reply.text)
        print("tool steps:", sum(m.type == "tool" for m in result["messages"]))
        tag = reply.response_metadata["persona"]
        print("served by persona version", tag["persona_version"])
        print(
            "learned:",
            store.get("alice").personality.interests,
            "as version",
            store.current_version("alice"),
        )


if __name__ == "__main__":
    main()
