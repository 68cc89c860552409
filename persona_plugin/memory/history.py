"""The change history of long-term memory items: what was added, updated, deleted, by whom.

mem0's ``history(memory_id)`` shape. Each event keeps the previous and the new text, the
item's provenance (the turns it came from, its kind) and the writer (``actor``: ``add``,
``update``, ``delete``, ``store``, ``tool``), so an update or a delete never loses where
an item came from. The graph's own ingest (``remember``, ``add_facts``) is not logged: its
provenance is on the items themselves.

Events live beside the items, in a second Chroma collection per user (the item
collection's name plus ``-history``), so the same isolation holds (a read only ever
touches one user's events), the same deployment serves them (a folder or a Chroma server)
and :meth:`LongTermMemory.delete_user
<persona_plugin.memory.long_term.LongTermMemory.delete_user>` drops them with the items.
Chroma needs a vector for each record; an event's is a constant of one dimension: events
are listed, never searched.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

Event = Literal["ADD", "UPDATE", "DELETE"]
SUFFIX = "-history"


class MemoryHistory:
    """The per-user event collections of one Chroma client.

    ``scrub`` is called with a collection after each write (the embedded store's vector
    index is zeroed past its elements once: see :mod:`persona_plugin.memory.disk`).
    """

    def __init__(self, client: Any, *, scrub: Callable[[Any], None] | None = None) -> None:
        self.client = client
        self.scrub = scrub
        self._collections: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _collection(self, name: str, *, create: bool) -> Any:
        with self._lock:
            cached = self._collections.get(name)
        if cached is not None:
            return cached
        if create:
            collection = self.client.get_or_create_collection(name, embedding_function=None)
        else:
            try:
                collection = self.client.get_collection(name, embedding_function=None)
            except Exception as exc:
                if type(exc).__name__ == "NotFoundError" or "does not exist" in str(exc):
                    return None
                raise
        with self._lock:
            self._collections[name] = collection
        return collection

    def _retry(self, name: str, action: Callable[[], Any]) -> Any:
        # another process may have deleted the user (and so this collection) meanwhile
        try:
            return action()
        except Exception as exc:
            if not (type(exc).__name__ == "NotFoundError" or "does not exist" in str(exc)):
                raise
            with self._lock:
                self._collections.pop(name, None)
            return action()

    def record(self, name: str, user_id: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Append ``events`` (from :func:`event`) to the user's history ``name``."""
        if not events:
            return

        seq = time.time_ns()  # the order of events, kept within one call too

        def write() -> None:
            collection = self._collection(name, create=True)
            collection.add(
                ids=[e["id"] for e in events],
                embeddings=[[0.0] for _ in events],
                metadatas=[_to_metadata(user_id, e, seq + i) for i, e in enumerate(events)],
            )
            if self.scrub is not None:
                self.scrub(collection)

        self._retry(name, write)

    def events(self, name: str, user_id: str, memory_id: str | None = None) -> list[dict[str, Any]]:
        """The user's events (of one item, or all), oldest first."""

        def read() -> list[dict[str, Any]]:
            collection = self._collection(name, create=False)
            if collection is None:
                return []
            where = {"memory_id": memory_id} if memory_id is not None else None
            got = collection.get(where=where, include=["metadatas"])
            return [_from_metadata(m) for m in got["metadatas"] if m.get("user_id") == user_id]

        events = self._retry(name, read)
        return sorted(events, key=lambda e: (e.pop("seq"), e["id"]))

    def forget(self, name: str) -> bool:
        """Drop the history collection ``name`` (the user is being deleted); whether there
        was one."""
        with self._lock:
            self._collections.pop(name, None)
        try:
            self.client.delete_collection(name)
        except Exception as exc:
            if not (type(exc).__name__ == "NotFoundError" or "does not exist" in str(exc)):
                raise
            return False
        return True


def event(
    kind: Event,
    memory_id: str,
    *,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    actor: str,
) -> dict[str, Any]:
    """One change of item ``memory_id``: ``old``/``new`` are the item's stored state
    (``document`` and Chroma ``metadata``) before and after, ``None`` where there is none."""
    state = new or old or {}
    meta = state.get("metadata") or {}
    return {
        "id": uuid.uuid4().hex,
        "memory_id": memory_id,
        "event": kind,
        "old_memory": (old or {}).get("document"),
        "new_memory": (new or {}).get("document"),
        "kind": meta.get("kind"),
        "source_turn_ids": json.loads(meta.get("source_turn_ids") or "[]"),
        "metadata": user_metadata(meta),
        "actor": actor,
        "created_at": datetime.now(UTC).isoformat(),
        "is_deleted": kind == "DELETE",
    }


#: the prefix of the caller's metadata keys among an item's Chroma metadata
META_PREFIX = "meta."


def user_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's metadata (``metadata=`` of ``add``) among an item's Chroma metadata."""
    return {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}


def _to_metadata(user_id: str, e: Mapping[str, Any], seq: int) -> dict[str, Any]:
    out: dict[str, Any] = {"user_id": user_id, "seq": seq}
    for key, value in e.items():
        if value is None:
            continue  # Chroma metadata holds no nulls: absent reads back as None
        out[key] = json.dumps(value) if isinstance(value, list | dict) else value
    return out


def _from_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: meta.get(key)
        for key in ("id", "memory_id", "event", "old_memory", "new_memory", "kind", "actor")
    }
    out["user_id"] = meta.get("user_id")
    out["source_turn_ids"] = json.loads(meta.get("source_turn_ids") or "[]")
    out["metadata"] = json.loads(meta.get("metadata") or "{}")
    out["created_at"] = meta.get("created_at")
    out["is_deleted"] = bool(meta.get("is_deleted"))
    out["seq"] = int(meta.get("seq", 0))
    return out
