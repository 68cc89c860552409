"""Importing a chat history into a persona: a cold start from a chat export.

:func:`read_history` reads the messages of a file; :func:`import_history` feeds them, turn
by turn, through what a live turn goes through after its reply: the guard (a message that
reads as instructions is withheld, and its reply with it), long-term memory, and
reflection (the reflector's own cost gate in front, if it has one: ``persona import``
gives the local reflector its gate, ``reflector_for(model, gate=True)``; ``batch`` turns
a call), saved as persona
versions whose source is ``import turn <id>``. No chat model is called: the replies are
the history's.

Accepted files (UTF-8):

* a JSON list of ``{"role", "content"}`` messages, or JSON Lines of them;
* an object with ``"messages"`` (OpenAI-style: a chat completion request, a fine-tuning
  example);
* a ChatGPT export (``conversations.json``): a conversation object with a ``"mapping"``
  tree of messages, or a list of them; each conversation is followed from its root along
  its last child (the branch the user kept), in order.

Roles ``user`` and ``assistant`` (and ``human``/``ai``, ``bot``, ``model``) make turns: a
user message and the assistant messages after it. System and tool messages are left
out. Content may be a string or OpenAI content parts (their text). A message longer than
the graph's cap (``max_message_chars``) refuses the whole file before anything is written,
naming it.

**Resumable.** Each turn's id is derived from the user and its position and text, and an
imported turn is written to the interaction log in the same transaction as the persona
version it produced: running the import again skips what is done. Without a log, a run
starts over (memory ingest is idempotent; reflection is not).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_plugin._yaml import load_json_lines, read_text
from persona_plugin.errors import PersonaValidationError
from persona_plugin.guard import WITHHELD, instruction_reason
from persona_plugin.interactions import (
    DONE,
    InteractionLog,
    TurnNotFoundError,
    TurnOwnedElsewhereError,
)
from persona_plugin.persona import validate_user_id
from persona_plugin.reflection.apply import reflect_and_save
from persona_plugin.reflection.types import ReflectionTurn

log = logging.getLogger(__name__)

#: a message longer than this refuses the file (the persona graph's default cap)
MAX_MESSAGE_CHARS = 16000
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
_HINT = (
    "Give a JSON list of {role, content} messages, JSON Lines of them, an object with "
    '"messages", or a ChatGPT export (conversations with a "mapping").'
)


@dataclass(frozen=True)
class HistoryTurn:
    """One exchange of the history: what the user said and what the assistant answered."""

    index: int
    user: str
    assistant: str


@dataclass
class ImportReport:
    """What an import did."""

    user_id: str
    turns: int = 0
    imported: int = 0
    skipped_done: int = 0
    withheld: int = 0
    reflections: int = 0
    failed: int = 0
    versions: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- reading ---------------------------------------------------------------------------


def read_history(path: str | Path, *, max_message_chars: int = MAX_MESSAGE_CHARS) -> list[dict]:
    """The ``{role, content}`` messages of a history file (see the module for formats)."""
    file = Path(path)
    text = read_text(file, what="history", hint="Give a UTF-8 JSON file.")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = load_json_lines(text, source=str(file), hint=_HINT)
    return parse_history(data, source=str(file), max_message_chars=max_message_chars)


def parse_history(
    data: Any, *, source: str = "<history>", max_message_chars: int = MAX_MESSAGE_CHARS
) -> list[dict]:
    """Plain data as ``{role, content}`` messages (user and assistant only), checked."""
    if isinstance(data, Mapping) and "mapping" in data:
        data = [data]
    if isinstance(data, Mapping) and "messages" in data:
        data = data["messages"]
    if (
        isinstance(data, list)
        and data
        and all(isinstance(c, Mapping) and "mapping" in c for c in data)
    ):
        data = [m for conversation in data for m in _chatgpt_messages(conversation, source)]
    if not isinstance(data, list):
        raise PersonaValidationError(source, "", f"a {type(data).__name__}", _HINT)
    messages = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise PersonaValidationError(source, f"[{i}]", "not a message object", _HINT)
        role = item.get("role")
        if not isinstance(role, str):
            raise PersonaValidationError(source, f"[{i}].role", "missing or not a string", _HINT)
        content = _text(item.get("content"))
        if content is None:
            raise PersonaValidationError(
                source, f"[{i}].content", "not text (a string or text parts)", _HINT
            )
        if len(content) > max_message_chars:
            raise PersonaValidationError(
                source,
                f"[{i}].content",
                f"{len(content)} characters",
                f"A message is at most {max_message_chars} characters (as a live turn).",
            )
        if "\x00" in content:
            raise PersonaValidationError(source, f"[{i}].content", "holds a NUL byte", _HINT)
        kind = _ROLES.get(role.lower())
        if kind is not None and content.strip():
            messages.append({"role": kind, "content": content})
    return messages


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts, ChatGPT "parts"
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None
        return "\n".join(texts)
    if isinstance(content, Mapping) and "parts" in content:  # ChatGPT's content object
        return _text(content["parts"])
    return None


def _chatgpt_messages(conversation: Mapping[str, Any], source: str) -> list[dict]:
    """A ChatGPT export conversation's messages, root to leaf along the last child."""
    mapping = conversation.get("mapping")
    if not isinstance(mapping, Mapping):
        raise PersonaValidationError(source, "mapping", "not an object", _HINT)
    roots = [k for k, node in mapping.items() if not (node or {}).get("parent")]
    out: list[dict] = []
    node_id = roots[0] if roots else None
    seen: set[str] = set()
    while node_id is not None and node_id not in seen:
        seen.add(node_id)
        node = mapping.get(node_id) or {}
        message = node.get("message") or {}
        role = (message.get("author") or {}).get("role")
        content = message.get("content")
        if isinstance(role, str) and content is not None:
            out.append({"role": role, "content": content})
        children = node.get("children") or []
        node_id = children[-1] if children else None
    return out


def history_turns(messages: Sequence[Mapping[str, str]]) -> list[HistoryTurn]:
    """User messages, each with the assistant messages after it (joined), as turns."""
    turns: list[HistoryTurn] = []
    user: str | None = None
    replies: list[str] = []
    for message in messages:
        if message["role"] == "user":
            if user is not None:
                turns.append(HistoryTurn(len(turns), user, "\n\n".join(replies)))
            user, replies = message["content"], []
        elif user is not None:  # an assistant message before any user one greets nobody
            replies.append(message["content"])
    if user is not None:
        turns.append(HistoryTurn(len(turns), user, "\n\n".join(replies)))
    return turns


def turn_id(user_id: str, turn: HistoryTurn) -> str:
    """A stable id: the same history imported again gives the same ids."""
    digest = hashlib.sha256(f"{user_id}\x00{turn.index}\x00{turn.user}".encode()).hexdigest()
    return f"import-{turn.index:05d}-{digest[:12]}"


# -- importing -------------------------------------------------------------------------


def import_history(
    user_id: str,
    messages: Iterable[Mapping[str, str]],
    *,
    store: Any,
    reflector: Any,
    memory: Any = None,
    interactions: Any = True,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Feed ``messages`` (from :func:`read_history` or :func:`parse_history`) into
    ``user_id``'s persona and memory (see the module); what was done.

    ``interactions``: the log that makes the import resumable (default: the store's;
    None: off). ``batch``: turns per reflection call. ``progress(done, total)`` after each
    batch.
    """
    validate_user_id(user_id)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 32:
        raise PersonaValidationError("import", "batch", f"{batch!r}", "Use 1 to 32 turns.")
    turns = history_turns(list(messages))
    logbook = InteractionLog.on(store) if interactions is True else interactions or None
    report = ImportReport(user_id, turns=len(turns))
    todo = []
    for turn in turns:
        if logbook is not None and _logged(logbook, user_id, turn_id(user_id, turn)):
            report.skipped_done += 1
        else:
            todo.append(turn)
    link = memory.link() if memory is not None else None
    done = report.skipped_done
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        guarded = [(t, *_guarded(t)) for t in chunk]
        report.withheld += sum(said == WITHHELD for _, said, _ in guarded)
        if memory is not None:
            memory.remember(user_id, _memory_items(user_id, guarded))
        shown = [
            ReflectionTurn(turn_id(user_id, t), said, answered) for t, said, answered in guarded
        ]

        def logged(conn: Any, version: int, guarded: list = guarded) -> None:
            if logbook is None:
                return
            for turn, said, answered in guarded:
                logbook.record_turn(
                    user_id,
                    turn_id(user_id, turn),
                    user_text=said,
                    reply_text=answered or "(no reply)",
                    thread_id="import",
                    persona_version=version,
                    model="import",
                    reflection=DONE,
                    reflected_version=version,
                    connection=conn,
                )

        outcome = reflect_and_save(
            store=store,
            reflector=reflector,
            user_id=user_id,
            turns=shown,
            memory=memory,
            memory_link=link,
            also=logged,
            source="import",
        )
        report.reflections += 1
        if outcome.error:
            report.failed += len(chunk)
            log.warning(
                "import of %s: reflection failed (%s); re-run to retry", user_id, outcome.error
            )
        else:
            report.imported += len(chunk)
            if outcome.saved and outcome.version is not None:
                report.versions.append(outcome.version)
        for key, value in (outcome.token_usage or {}).items():
            report.tokens[key] = report.tokens.get(key, 0) + int(value)
        done += len(chunk)
        if progress is not None:
            progress(done, len(turns))
    return report


def _logged(logbook: InteractionLog, user_id: str, turn: str) -> bool:
    try:
        logbook.turn(user_id, turn)
    except (TurnNotFoundError, TurnOwnedElsewhereError):
        return False
    return True


def _guarded(turn: HistoryTurn) -> tuple[str, str]:
    """As a live turn: a user message read as instructions is withheld, its reply too."""
    said = WITHHELD if instruction_reason(turn.user) else turn.user
    withheld = said == WITHHELD or (turn.assistant and instruction_reason(turn.assistant))
    return said, WITHHELD if withheld else turn.assistant


def _memory_items(user_id: str, guarded: list[tuple[HistoryTurn, str, str]]) -> list[dict]:
    items = []
    for turn, said, answered in guarded:
        ident = turn_id(user_id, turn)
        items.append(
            {"turn_id": f"{ident}:user", "speaker": "user", "text": said, "session": "import"}
        )
        if answered.strip():
            items.append(
                {
                    "turn_id": f"{ident}:assistant",
                    "speaker": "assistant",
                    "text": answered,
                    "session": "import",
                }
            )
    return items
