"""What the bot templates share: one turn through the persona graph, errors as apologies."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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


#: a message starting with this (any case) is the user's better answer to the last reply
EDIT_PREFIX = "better:"


def feedback(graph: Any, user_id: str, turn_id: str, kind: str, **fields: Any) -> bool:
    """Record feedback on one of the user's turns in the graph's interaction log (its
    reflection then learns from it); whether it was recorded (a bot never raises: an
    unknown turn or a log that is off is logged)."""
    if getattr(graph, "interactions", None) is None:
        return False
    try:
        graph.record_feedback(user_id, turn_id, kind, **fields)
    except Exception as exc:
        log.warning("feedback %s on %s of %s not recorded: %s", kind, turn_id, user_id, exc)
        return False
    return True


#: reactions that rate a reply (Slack's names and Discord's emoji)
RATINGS = {"+1": 1, "thumbsup": 1, "\U0001f44d": 1, "-1": -1, "thumbsdown": -1, "\U0001f44e": -1}


def rating_of(reaction: str) -> int | None:
    """+1 or -1 for a thumbs reaction (any skin tone), else ``None``."""
    name = reaction.split("::")[0]
    # Discord sends the emoji itself, with a skin-tone modifier after it when chosen
    return RATINGS.get(name) or RATINGS.get(name[:1])


class RecentTurns:
    """Which turn a bot's reply answered, and each conversation's last answered turn, for
    the last ``size`` of each (in memory: a restart forgets them)."""

    def __init__(self, size: int = 4096) -> None:
        self._replies: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._last: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def _put(
        self, items: OrderedDict[str, tuple[str, str]], key: str, turn: tuple[str, str]
    ) -> None:
        with self._lock:
            items[key] = turn
            items.move_to_end(key)
            while len(items) > self._size:
                items.popitem(last=False)

    def answered(self, conversation: str, turn: tuple[str, str]) -> None:
        """``turn`` (user id, turn id) was answered in ``conversation``."""
        self._put(self._last, conversation, turn)

    def posted(self, reply_key: str, turn: tuple[str, str]) -> None:
        """The bot's message ``reply_key`` is the reply to ``turn``."""
        self._put(self._replies, reply_key, turn)

    def last(self, conversation: str) -> tuple[str, str] | None:
        with self._lock:
            return self._last.get(conversation)

    def reply(self, reply_key: str) -> tuple[str, str] | None:
        with self._lock:
            return self._replies.get(reply_key)


def better_answer(graph: Any, turns: RecentTurns, conversation: str, text: str) -> str:
    """The bot's answer to a ``better: ...`` message: an edit of the conversation's last
    reply, recorded as feedback."""
    last = turns.last(conversation)
    better = text[len(EDIT_PREFIX) :].strip()
    if last and better and feedback(graph, *last, "edit", text=better):
        return "Thanks: I noted your better answer."
    return "I have no reply of mine here to improve, or the answer was empty."
