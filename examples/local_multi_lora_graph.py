"""The persona graph on the local multi-LoRA model, offline: the persona picks the adapters.

Run: .venv/bin/python examples/local_multi_lora_graph.py [--max-new-tokens N]
Two users ask the same question. The chat model is ``resolve_chat_model("local")``
(what ``PERSONA_CHAT_MODEL=local`` gives): SmolLM2-135M-Instruct in-process, with the
style adapters bundled with the package (``concise``, ``formal``, ``playful``); the graph
hands each user's persona to it, and it retrieves a weighted mixture of adapters from
the persona's text. The reply's ``response_metadata`` says which adapters were
retrieved, with which weights, and how the mixture was served. The first use converts
the model once into the model cache (about 30 s).
"""

from __future__ import annotations

import argparse
import tempfile

from persona_plugin import Persona, PersonaStore, build_persona_graph
from persona_plugin.chat_models import resolve_chat_model

QUESTION = "What is a good way to learn to cook?"


def persona(user_id: str, name: str, styles: list[str], about: str) -> Persona:
    p = Persona.new(user_id, name=name)
    p.preference.style.extend(styles)
    p.personality.description = about
    return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-new-tokens", type=int, default=40, help="reply length in tokens (default 40)"
    )
    max_new_tokens = parser.parse_args(argv).max_new_tokens
    if max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    # greedy (temperature 0): the same answers on every run
    model = resolve_chat_model("local").bind(max_new_tokens=max_new_tokens, temperature=0)
    with tempfile.TemporaryDirectory() as tmp, PersonaStore(f"sqlite:///{tmp}/p.db") as store:
        store.create("bo", persona("bo", "Bo", ["concise", "brief"], "Wants short answers."))
        store.create(
            "cleo", persona("cleo", "Cleo", ["playful", "fun", "emoji"], "Loves jokes and emoji.")
        )
        graph = build_persona_graph(model, store=store, reflection="off")
        for user in ("bo", "cleo"):
            config = {"configurable": {"user_id": user, "thread_id": user}}
            reply = graph.invoke({"messages": [("user", QUESTION)]}, config)["messages"][-1]
            meta = reply.response_metadata
            mixture = ", ".join(f"{a} {w:.2f}" for a, w, _ in meta["retrieved"])
            print(f"{user}: adapters {mixture} (served {meta['served_by']})")
            print(f"{user}: {reply.text.strip()}")
        graph.close()


if __name__ == "__main__":
    main()
