"""Forgetting a user, and exporting what is kept about them: one path for every entry point.

:func:`forget_user` removes every trace the project controls: the persona's versions, the
user's long-term memory (with its items' change history), the checkpoints of every thread
the user ran (found by the ``user_id`` LangGraph copies from the config into each
checkpoint's metadata), the retrieval caches that remember their persona, and the
interaction log with the reflection work queued in it. The log goes first: on PostgreSQL
its delete waits for a worker that is reflecting the user to commit, and anywhere a
reflection that finishes after it finds its work gone and writes nothing (see
:mod:`persona_plugin.reflection.worker`), so a late reflection cannot bring the user
back. :func:`export_user` returns all of it. The server's DELETE and export, ``persona
delete`` and ``persona export``, the bots' ``forget`` and :meth:`PersonaGraph.forget
<persona_plugin.graph.PersonaGraph.forget>` all call these.

Deleted text must not stay readable on disk. What the project writes to SQLite is
deleted with ``secure_delete`` on (freed pages are zeroed) and the write-ahead log is
truncated after the delete; the embedded Chroma store is vacuumed and the vector-index
folder Chroma leaves behind for a dropped collection is removed
(:meth:`~persona_plugin.memory.long_term.LongTermMemory.delete_user`). A PostgreSQL
database or a Chroma server keeps deleted rows in its files until its own vacuum or
compaction runs: README's privacy section says what such a deployment must do.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from persona_plugin.errors import PersonaNotFoundError
from persona_plugin.persona import utc_now, validate_user_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forgotten:
    """What :func:`forget_user` removed."""

    versions: int
    memory_items: int
    threads: int = 0
    #: rows of the interaction log (turns and feedback)
    logged: int = 0
    #: versions of the user's own preference models and adapters (slow adaptation)
    owned: int = 0

    def __bool__(self) -> bool:
        return bool(self.versions or self.memory_items or self.threads or self.logged or self.owned)


def user_threads(checkpointer: Any, user_id: str) -> list[str]:
    """The ids of the threads with a checkpoint of ``user_id`` (in LangGraph's metadata)."""
    if checkpointer is None:
        return []
    threads: dict[str, None] = {}
    for item in checkpointer.list(None, filter={"user_id": user_id}):
        threads[item.config["configurable"]["thread_id"]] = None
    return list(threads)


def _delete_threads(checkpointer: Any, threads: list[str]) -> None:
    conn = getattr(checkpointer, "conn", None)
    # SqliteSaver: zero the freed pages, then empty the write-ahead log, so the threads'
    # messages are gone from the file and not only from the tables
    sqlite = isinstance(conn, sqlite3.Connection)
    if sqlite:
        with checkpointer.lock:
            conn.execute("PRAGMA secure_delete=ON")
    for thread in threads:
        checkpointer.delete_thread(thread)
    if sqlite:
        with checkpointer.lock:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy and busy[0]:  # a reader held the log: its old pages stay until later
            log.warning("the checkpointer's WAL was busy after deleting threads %s", threads)


def forget_user(
    user_id: str,
    *,
    store: Any,
    memory: Any = None,
    checkpointer: Any = None,
    retrievers: Iterable[Any] = (),
    interactions: Any = None,
    owned: Any = None,
) -> Forgotten:
    """Delete every trace of ``user_id`` the project controls; what went.

    ``retrievers`` (LoRA or preference retrievers, and backends holding the user's own
    adapter loaded) drop what they keep of the user.
    The interaction log in the store's database goes first (``interactions``: another
    one), with the user's queued reflections: they are not run. ``owned``: where the
    user's own models are (default ``$PERSONA_HOME/owned``), removed with their files.
    """
    validate_user_id(user_id)
    logged = _log_of(store, interactions).delete_user(user_id)
    owned_versions = _owned_of(owned).delete_user(user_id)
    _forget_leases(store, user_id)
    items = memory.delete_user(user_id) if memory is not None else 0
    threads = user_threads(checkpointer, user_id)
    if threads:
        _delete_threads(checkpointer, threads)
    try:
        versions = store.delete(user_id)
    except PersonaNotFoundError:
        versions = 0
    for retriever in retrievers:
        retriever.forget(user_id)
    return Forgotten(
        versions=versions,
        memory_items=items,
        threads=len(threads),
        logged=logged,
        owned=owned_versions,
    )


def _log_of(store: Any, interactions: Any) -> Any:
    from persona_plugin.interactions import InteractionLog

    return interactions if interactions is not None else InteractionLog.on(store)


def _forget_leases(store: Any, user_id: str) -> None:
    """The user's rows of slow adaptation's leases, where the store's database has them."""
    import sqlalchemy as sa

    engine = getattr(store, "engine", None)
    if engine is None or not sa.inspect(engine).has_table("adaptation_leases"):
        return
    from persona_plugin.adaptation.schedule import Leases

    Leases(engine).delete_user(user_id)


def _owned_of(owned: Any) -> Any:
    from persona_plugin.cards.owned import OwnedCards

    return owned if owned is not None else OwnedCards.from_settings()


def export_user(
    user_id: str,
    *,
    store: Any,
    memory: Any = None,
    checkpointer: Any = None,
    interactions: Any = None,
    owned: Any = None,
) -> dict[str, Any]:
    """Everything kept about ``user_id``, as JSON-ready data: every persona version with
    its record, every long-term memory item and the history of their changes, the messages
    of every thread, the interaction log (turns and feedback), and the versions of the
    user's own models.

    Raises :class:`~persona_plugin.errors.PersonaNotFoundError` when nothing is kept.
    """
    validate_user_id(user_id)
    items = memory.items(user_id) if memory is not None else []
    changes = memory.history(user_id=user_id) if memory is not None else []
    logged = _log_of(store, interactions).export_user(user_id)
    adapted = _owned_of(owned).export_user(user_id)
    threads = {}
    for thread in user_threads(checkpointer, user_id):
        saved = checkpointer.get_tuple({"configurable": {"thread_id": thread}})
        messages = (
            (saved.checkpoint.get("channel_values") or {}).get("messages", []) if saved else []
        )
        threads[thread] = [
            {"role": getattr(m, "type", "unknown"), "content": getattr(m, "content", str(m))}
            for m in messages
        ]
    try:
        data = store.export(user_id)
    except PersonaNotFoundError:
        if not items and not changes and not threads and not logged["turns"] and not adapted:
            raise
        data = {"user_id": user_id, "exported_at": utc_now(), "versions": []}
    data["memory"] = [item.model_dump(mode="json") for item in items]
    data["memory_history"] = changes
    data["threads"] = threads
    data["interactions"] = logged
    data["owned"] = adapted
    return data
