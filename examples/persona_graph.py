"""The persona graph offline: two turns, inline reflection, then what the persona learned.

Run: .venv/bin/python examples/persona_graph.py
A ``FakeMessagesListChatModel`` stands in for the chat model and for the reflection model
(scripted JSON answers); the SQLite store and the Chroma long-term memory are real, in a
temporary directory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage

from persona_plugin import LongTermMemory, Persona, PersonaStore, Reflector, build_persona_graph
from persona_plugin.embeddings import MiniLMEmbeddingFunction


def reflection(turn: str, op: str, path: str, value: str, fact: str) -> AIMessage:
    """A reflection model's JSON answer for ``turn``: one persona edit, one memory."""
    answer = {
        "loss": {"revealed": [fact], "missed": [], "score": 0.8},
        "operations": [
            {"op": op, "path": path, "value": value, "confidence": 0.9, "evidence": [turn]}
        ],
        "memories": [{"text": fact, "evidence": [turn]}],
    }
    return AIMessage(content=json.dumps(answer))


def main() -> None:
    replies = FakeMessagesListChatModel(
        responses=[AIMessage(content="Welcome, Ana!"), AIMessage(content="Try Lisbon's Alfama.")]
    )
    reflections = FakeMessagesListChatModel(
        responses=[
            reflection("t1", "set", "demographics.location", "Lisbon", "lives in Lisbon"),
            reflection("t2", "append", "personality.interests", "fado", "loves fado music"),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        store.create("ana", Persona.new("ana", name="Ana"))
        # the packaged embedding model as is (the default "fast" one is built on first use)
        embedder = MiniLMEmbeddingFunction(variant="shipped")
        memory = LongTermMemory(Path(tmp) / "memory", embedding_function=embedder)
        graph = build_persona_graph(
            replies,
            store=store,
            memory=memory,
            reflector=Reflector(reflections, structured="json"),
            reflection="inline",  # the persona is saved before invoke returns
        )
        for turn, text in [
            ("t1", "Hi, I'm Ana and I live in Lisbon."),
            ("t2", "I love fado. Where can I hear it?"),
        ]:
            config = {"configurable": {"user_id": "ana", "thread_id": "demo", "turn_id": turn}}
            state = graph.invoke({"messages": [("user", text)]}, config)
            print(f"user: {text}\nassistant: {state['messages'][-1].content}")

        version = store.current_version("ana")
        print(f"persona diff, version 1 -> {version}:")
        for change in store.diff("ana", 1, version):
            if not change.path.startswith("memory."):  # skip the bookkeeping (recent turns)
                print(f"  {change.describe()}")
        facts = memory.items("ana", kinds=["fact"])
        print("long-term memories:", ", ".join(sorted(item.text for item in facts)))
        graph.close()


if __name__ == "__main__":
    main()
