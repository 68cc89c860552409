"""Wrap a chat model so each call carries the calling user's persona.

Run: .venv/bin/python examples/drop_in_chat_model.py
A fake chat model stands in for yours (ChatOpenAI, ChatAnthropic, ...); swap it in.
"""

from __future__ import annotations

import tempfile

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage

from persona_plugin import Persona, PersonaStore, with_persona


class ShowPromptModel(FakeMessagesListChatModel):
    """Replies with the system prompt it received, so you can see the injection."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.responses = [AIMessage(content=str(messages[0].content))]
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        alice = Persona.new("alice", name="Alice")
        alice.preference.style.append("concise")
        store.create("alice", alice)

        chat = with_persona(ShowPromptModel(responses=[]), store)
        reply = chat.invoke(
            [("system", "You are a travel assistant."), ("human", "Trail ideas?")],
            config={"configurable": {"user_id": "alice"}},
        )
        print(reply.content)


if __name__ == "__main__":
    main()
