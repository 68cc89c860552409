"""Quickstart: ``with_persona`` around OpenAI's chat model (``langchain_openai.ChatOpenAI``).

Run: .venv/bin/python examples/quickstart_openai.py
Needs ``pip install langchain-openai`` and ``OPENAI_API_KEY``; without either it builds
everything it can (store, persona), prints a one-line notice and exits 0. Data goes to a
temporary directory, never to ``~/.persona-plugin``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from persona_plugin import Persona, PersonaStore, with_persona

NOTICE = "skipped the model call: set OPENAI_API_KEY and install langchain-openai to run it"


def load_chat_openai() -> Any:
    """``ChatOpenAI``, or None when langchain-openai is not installed."""
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        return None
    return ChatOpenAI


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        bob = Persona.new("bob", name="Bob")
        bob.preference.style.append("answers in one sentence")
        store.create("bob", bob)

        chat_openai = load_chat_openai()
        if chat_openai is None or not os.environ.get("OPENAI_API_KEY"):
            print(NOTICE)
            return
        chat = with_persona(chat_openai(model="gpt-4o-mini"), store)
        reply = chat.invoke(
            [("system", "You are a cooking assistant."), ("human", "What should I cook tonight?")],
            config={"configurable": {"user_id": "bob"}},
        )
        print(reply.content)


if __name__ == "__main__":
    main()
