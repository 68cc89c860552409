"""Chat messages as memory reads them: LangChain messages and ``{role, content}`` dicts.

``LongTermMemory.add`` takes what a mem0 or LangChain user has at hand: a list of
``BaseMessage`` (``HumanMessage``, ``AIMessage``, ...), of OpenAI-style ``{"role",
"content"}`` dicts, or of the project's own ``{turn_id, speaker, text}`` turns. Each becomes
a :class:`~persona_plugin.memory.long_term.DialogueTurn`; system and tool messages are
not what the user said or was told, and are left out (as mem0 leaves out system
messages).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from persona_plugin.errors import PersonaValidationError

#: LangChain message types and OpenAI roles, as the speaker memory stores
_SPEAKERS = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}
_SKIPPED = {"system", "developer", "tool", "function"}


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return ""


def as_turns(messages: Sequence[Any], *, timestamp: str) -> list[dict[str, Any]]:
    """``messages`` as turn dicts (``turn_id``, ``speaker``, ``text``, ``timestamp``).

    A message's own id (``BaseMessage.id``, a dict's ``id``) is its turn id; one without
    gets a fresh one, so the same text said twice is remembered twice, as mem0 does.
    """
    turns = []
    for index, message in enumerate(messages):
        if isinstance(message, Mapping) and "turn_id" in message:
            turns.append(dict(message))  # the project's own turn shape
            continue
        if isinstance(message, Mapping):
            role, content, message_id = (
                message.get("role"),
                message.get("content"),
                message.get("id"),
            )
        elif hasattr(message, "type") and hasattr(message, "content"):
            role, content, message_id = message.type, message.content, message.id
        else:
            raise PersonaValidationError(
                "memory",
                f"messages[{index}]",
                f"a {type(message).__name__} is not a message",
                "Pass LangChain messages, {'role', 'content'} dicts, or a text.",
            )
        if role in _SKIPPED:
            continue
        speaker = _SPEAKERS.get(str(role))
        if speaker is None:
            raise PersonaValidationError(
                "memory",
                f"messages[{index}].role",
                f"{role!r} is not a chat role",
                "Use 'user' or 'assistant' (system and tool messages are left out).",
            )
        text = message_text(content)
        if not text.strip():
            continue  # a tool-calling AI message has no text to remember
        turns.append(
            {
                "turn_id": str(message_id) if message_id else uuid.uuid4().hex,
                "speaker": speaker,
                "text": text,
                "timestamp": timestamp,
            }
        )
    return turns
