"""Reflection as a LangGraph graph of its own, for apps that generate their replies elsewhere.

:func:`build_reflection_graph` compiles a one-node graph. Its input (:class:`ReflectState`) is
``user_id``, ``turn_id`` and the turn's ``user`` and ``assistant`` texts. It reflects and
saves the persona with :func:`~persona_plugin.reflection.apply.reflect_and_save` and returns
the ``outcome``. This way the learning step can be deployed on its own (``graphs/reflect.py``)
without the persona graph. :func:`build_reflection_graph_from_settings` sets up the chat
model, store and long-term memory from the ``PERSONA_*`` settings.
"""

from __future__ import annotations

import logging
from typing import Any

from typing_extensions import TypedDict  # pydantic reads only this one on Python < 3.12

from persona_plugin.errors import PersonaValidationError
from persona_plugin.reflection.apply import reflect_and_save
from persona_plugin.reflection.reflector import reflector_for
from persona_plugin.reflection.types import ReflectionModel, ReflectionTurn
from persona_plugin.store import PersonaStore

log = logging.getLogger(__name__)


# -- a graph of its own ------------------------------------------------------------------


class ReflectState(TypedDict, total=False):
    user_id: str
    turn_id: str
    user: str
    assistant: str
    outcome: dict[str, Any]


def build_reflection_graph(
    reflector: ReflectionModel, *, store: PersonaStore, memory: Any = None
) -> Any:
    """A one-node LangGraph graph: reflect on a finished turn and save the persona."""
    from langgraph.graph import END, START, StateGraph

    def reflect(state: ReflectState) -> dict[str, Any]:
        missing = [k for k in ("user_id", "turn_id", "user", "assistant") if not state.get(k)]
        if missing:
            raise PersonaValidationError(
                "reflect input",
                missing[0],
                "is missing or empty",
                "Pass user_id, turn_id, user and assistant.",
            )
        outcome = reflect_and_save(
            store=store,
            reflector=reflector,
            user_id=state["user_id"],
            turns=[ReflectionTurn(state["turn_id"], state["user"], state["assistant"])],
            memory=memory,
            memory_link=memory.link() if memory is not None else None,
        )
        return {"outcome": outcome.model_dump()}

    builder = StateGraph(ReflectState)
    builder.add_node("reflect", reflect)
    builder.add_edge(START, "reflect")
    builder.add_edge("reflect", END)
    return builder.compile(name="reflect")


def build_reflection_graph_from_settings(settings: Any = None, *, chat_model: Any = None) -> Any:
    from persona_plugin.chat_models.registry import resolve_chat_model
    from persona_plugin.config import Settings
    from persona_plugin.memory.long_term import LongTermMemory

    settings = settings or Settings.load()
    model = chat_model or resolve_chat_model(settings.chat_model, settings)
    store = PersonaStore.from_settings(settings)
    return build_reflection_graph(
        reflector_for(model, limits=store.limits),
        store=store,
        memory=LongTermMemory.from_settings(settings),
    )
