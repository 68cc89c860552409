"""with_persona's result is a chat model: give it to an agent as its model.

Run: .venv/bin/python examples/agent_with_persona_model.py
A scripted chat model stands in for yours; it records the system prompt of each step, so
you can see the persona in every step of the tool loop.
"""

from __future__ import annotations

import tempfile

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from pydantic import Field

from persona_plugin import Persona, PersonaStore, with_persona


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"rain in {city}"


class RecordingToolModel(FakeMessagesListChatModel):
    """Answers from its list and notes each step's system prompt."""

    systems: list[str] = Field(default_factory=list)

    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=[t.name for t in tools])

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.systems.append(messages[0].text)
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        alice = Persona.new("alice", name="Alice")
        alice.preference.style.append("short answers")
        store.create("alice", alice)
        model = RecordingToolModel(
            responses=[
                AIMessage(
                    "", tool_calls=[{"name": "weather", "args": {"city": "Porto"}, "id": "1"}]
                ),
                AIMessage("Rain in Porto: take the bus."),
            ]
        )
        agent = create_agent(with_persona(model, store), [weather])
        result = agent.invoke(
            {"messages": [("user", "Bike or bus today?")]}, {"configurable": {"user_id": "alice"}}
        )
        print("reply:", result["messages"][-1].text)
        for step, system in enumerate(model.systems, 1):
            print(
                f"step {step}: persona in prompt:",
                '"Alice"' in system and "short answers" in system,
            )


if __name__ == "__main__":
    main()
