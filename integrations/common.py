"""What the bot templates share: one turn through the persona graph, errors as apologies."""

from __future__ import annotations

import logging
from typing import Any

from langchain_core.messages import HumanMessage

from persona_plugin import PersonaValidationError, forget_user

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong while answering. Please try again later."


def answer(
    graph: Any, *, user_id: str, thread_id: str, turn_id: str, text: str, reflection: str
) -> str:
    """The graph's reply to ``text`` (blocking); errors become a short apology, never raise."""
    config = {
        "configurable": {
            "user_id": user_id,
            "thread_id": thread_id,
            "turn_id": turn_id,
            "reflection": reflection,
        }
    }
    try:
        state = graph.invoke({"messages": [HumanMessage(content=text)]}, config)
    except PersonaValidationError as exc:
        return f"Sorry, I can't answer that: {exc.problem}."
    except Exception:
        log.exception("the persona graph failed for %s", user_id)
        return SORRY
    return state["messages"][-1].text or "(no answer)"


def forget(graph: Any, store: Any, memory: Any, user_id: str) -> str:
    """Delete everything kept about the user (persona versions, long-term memory, the
    checkpoints of their conversations); the ``/persona forget`` answer.

    The user's background reflection still queued is finished first, so that it does not
    write the persona back after it was deleted (other users' keep their debounce).
    """
    if graph is not None:
        gone = graph.forget(user_id)
    else:
        gone = forget_user(user_id, store=store, memory=memory)
    if not gone:
        return "I had nothing stored about you: no persona, no memories."
    versions, items, threads = gone.versions, gone.memory_items, gone.threads
    return (
        f"Done: I forgot your persona ({versions} version{'s' if versions != 1 else ''}), "
        f"{items} long-term memor{'ies' if items != 1 else 'y'} and "
        f"{threads} conversation{'s' if threads != 1 else ''}."
    )
