"""A LangGraph ``BaseStore`` over long-term memory: namespaces ``("memories", user_id)``.

``MemoryStore(memory)`` lets LangMem's tools and managers, and any LangGraph app
(``graph.compile(store=...)``, ``create_react_agent(..., store=...)``), keep memories in the
same per-user Chroma collections the persona graph recalls from. A namespace is
``("memories", user_id)`` and nothing else: one user's whole memory. What the store puts
is an item of kind ``store``; what the graph and ``add`` wrote (turns, facts) is there too,
read as ``{"content": text, "kind": kind, "metadata": {...}}`` under its memory id. So the
two views are one memory: ``store.put(ns, key, value)`` is found by ``memory.search``, and
a mem0 ``update`` of a store item changes its value's text (:mod:`persona_plugin.memory.values`).

- ``search(ns, query=...)`` ranks by cosine similarity (``SearchItem.score``, as
  ``LongTermMemory.search`` scores); without a query, items come newest first. ``filter``
  matches a value's top-level fields that are text, numbers or booleans (what Chroma can
  store flat), with ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in``,
  ``$nin``.
- ``put`` always indexes (``index=False`` is accepted and ignored: Chroma needs a vector
  for every record) and keeps no TTL (``supports_ttl`` is false). A value that reads as
  instructions to the assistant anywhere is refused, as a fact is.
- ``MemoryStore(memory, user_id="ana")`` is bound to one user: a namespace of anyone else
  is refused (:class:`~langgraph.store.base.InvalidNamespaceError`), and a search or a
  listing over ``("memories",)`` sees that user alone. Unbound, a prefix shorter than a
  whole namespace reaches every user: give an agent a bound store or a namespace built
  from the run's user, as LangMem's ``("memories", "{langgraph_user_id}")``.

LangGraph namespace labels cannot hold a period, so a user id such as ``bob@example.com``
cannot be a namespace label; such users are served by ``LongTermMemory`` directly.
LangGraph ships a conformance suite for checkpointers (``langgraph-checkpoint-conformance``)
but none for stores; ``tests/memory/test_store.py`` checks this one against the behaviour of
LangGraph's ``InMemoryStore``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    validate_op_namespace,
)

from persona_plugin.errors import PersonaValidationError
from persona_plugin.guard import find_instruction
from persona_plugin.memory.history import META_PREFIX, user_metadata
from persona_plugin.memory.long_term import (
    SUPERSEDED,
    LongTermMemory,
    _filters_where,
    _item_id,
    _names_kind,
)
from persona_plugin.memory.values import text_path, value_text
from persona_plugin.persona import validate_user_id

STORE_KIND = "store"


class MemoryStore(BaseStore):
    """LangGraph's ``BaseStore`` over a :class:`LongTermMemory` (see the module's notes)."""

    supports_ttl = False

    def __init__(
        self, memory: LongTermMemory, *, user_id: str | None = None, prefix: str = "memories"
    ) -> None:
        self.memory = memory
        self.user_id = None if user_id is None else validate_user_id(user_id, "store")
        self.prefix = prefix

    # -- BaseStore ------------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        results: list[Result] = []
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                results.append(self._get(op))
            elif isinstance(op, PutOp):
                self._put(op)
                results.append(None)
            elif isinstance(op, SearchOp):
                results.append(self._search(op))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op))
            else:
                raise ValueError(f"unknown store operation {type(op).__name__}")
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        # Chroma's clients are synchronous: run the batch in a worker thread
        return await asyncio.to_thread(self.batch, list(ops))

    # -- namespaces -------------------------------------------------------------------------

    def _user(self, namespace: tuple[str, ...]) -> str:
        if len(namespace) != 2 or namespace[0] != self.prefix:
            raise InvalidNamespaceError(
                f"{namespace} is not a namespace of this store: each user's memories are "
                f"under ({self.prefix!r}, user_id)"
            )
        user_id = validate_user_id(namespace[1], "store")
        if self.user_id is not None and user_id != self.user_id:
            raise InvalidNamespaceError(
                f"this store is bound to one user; {namespace} is another user's namespace"
            )
        return user_id

    def _users(self) -> list[str]:
        if self.user_id is not None:
            exists = self.memory.collection_for(self.user_id, create=False) is not None
            return [self.user_id] if exists else []
        return self.memory.user_ids()

    def _users_under(self, prefix: tuple[str, ...]) -> list[str]:
        if not prefix or (len(prefix) == 1 and prefix[0] == self.prefix):
            return self._users()
        if len(prefix) == 2 and prefix[0] == self.prefix:
            return [self._user(prefix)]
        return []  # no namespace of this store starts so

    def _namespace(self, user_id: str) -> tuple[str, str]:
        return (self.prefix, user_id)

    # -- reading ------------------------------------------------------------------------------

    def _rows(
        self, user_id: str, *, ids: list[str] | None = None, where: dict | None = None
    ) -> list[tuple[str, str, Mapping[str, Any]]]:
        collection = self.memory.collection_for(user_id, create=False)
        if collection is None or ids == []:
            return []
        got = collection.get(ids=ids, where=where, include=["documents", "metadatas"])
        rows = []
        for item_id, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
            if meta.get("user_id") != user_id:  # never hand out what the collection should not hold
                raise RuntimeError(f"memory isolation violated for item {item_id}")
            rows.append((item_id, doc, meta))
        return rows

    def _find(self, user_id: str, key: str) -> tuple[str, str, Mapping[str, Any]] | None:
        """The row a key names: the store's own item, else a memory item of that id."""
        own = _item_id(user_id, STORE_KIND, key)
        rows = {row[0]: row for row in self._rows(user_id, ids=list(dict.fromkeys([own, key])))}
        return rows.get(own) or rows.get(key)

    def _item(
        self, user_id: str, row: tuple[str, str, Mapping[str, Any]], cls: type = Item, **kw: Any
    ) -> Any:
        item_id, doc, meta = row
        if "store_value" in meta:
            key, value = str(meta["store_key"]), json.loads(meta["store_value"])
        else:
            value = {"content": doc, "kind": meta.get("kind"), "metadata": user_metadata(meta)}
            key = item_id
        created = _time(meta.get("created_at") or meta.get("timestamp"))
        updated = _time(meta.get("updated_at")) if meta.get("updated_at") else created
        return cls(
            namespace=self._namespace(user_id),
            key=key,
            value=value,
            created_at=created,
            updated_at=updated,
            **kw,
        )

    def _get(self, op: GetOp) -> Item | None:
        user_id = self._user(op.namespace)
        row = self._find(user_id, op.key)
        return None if row is None else self._item(user_id, row)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        users = self._users_under(op.namespace_prefix)
        if not users or op.limit <= 0:
            return []
        found: list[tuple[Any, str, tuple[str, str, Mapping[str, Any]]]] = []
        if op.query:
            for user_id in users:
                hits = self.memory.search(
                    op.query, user_id=user_id, limit=op.offset + op.limit, filters=op.filter
                )["results"]
                scores = {hit["id"]: hit["score"] for hit in hits}
                for row in self._rows(user_id, ids=list(scores)):
                    found.append((scores[row[0]], user_id, row))
        else:
            where = _filters_where(op.filter)
            for user_id in users:
                for row in self._rows(user_id, where=where):
                    if row[2].get("kind") == SUPERSEDED and not _names_kind(op.filter):
                        continue  # rolled back: not what is known (as search leaves it out)
                    newest = row[2].get("updated_at") or row[2].get("timestamp") or ""
                    found.append((str(newest), user_id, row))
        # best score first, or newest first; ties in a stable order
        found.sort(key=lambda entry: (entry[1], entry[2][0]))
        found.sort(key=lambda entry: entry[0], reverse=True)
        page = found[op.offset : op.offset + op.limit]
        return [
            self._item(user_id, row, SearchItem, score=rank if op.query else None)
            for rank, user_id, row in page
        ]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        namespaces = [self._namespace(user_id) for user_id in self._users()]
        if op.match_conditions:
            namespaces = [
                ns for ns in namespaces if all(_matches(c, ns) for c in op.match_conditions)
            ]
        if op.max_depth is not None:
            namespaces = sorted({ns[: op.max_depth] for ns in namespaces})
        else:
            namespaces = sorted(namespaces)
        return namespaces[op.offset : op.offset + op.limit]

    # -- writing ------------------------------------------------------------------------------

    def _put(self, op: PutOp) -> None:
        user_id = self._user(op.namespace)
        existing = self._find(user_id, op.key)
        if op.value is None:
            if existing is not None:
                self.memory.delete(existing[0], user_id=user_id, actor="store")
            return
        value = dict(op.value)
        reason = find_instruction(value)
        if reason:
            raise PersonaValidationError(
                "store",
                "value",
                f"the value reads as an instruction to the assistant (guard: {reason})",
                "Keep what the user said or is; instructions are never remembered.",
            )
        path = text_path(value)
        text = self.memory._check_text(value_text(value, path), "value")
        # the top-level flat fields are what a filter matches (the text field is the text)
        fields = {
            META_PREFIX + name: inner
            for name, inner in value.items()
            if isinstance(name, str)
            and not name.startswith("$")
            and _flat(inner)
            and [name] != path
        }
        store_fields = {
            "store_key": op.key,
            "store_value": json.dumps(value, ensure_ascii=False),
            "store_path": json.dumps(path),
        }
        if existing is not None and "store_value" not in existing[2]:
            # a key that is a memory id (LangMem updates what its search found): that item
            # takes the value, keeping its kind and provenance
            meta = {k: v for k, v in existing[2].items() if not k.startswith(META_PREFIX)}
            record = {"id": existing[0], "document": text, "embed_text": text, "metadata": meta}
        else:
            record = self.memory._record(
                user_id,
                kind=STORE_KIND,
                key=op.key,
                text=text,
                embed_text=text,
                source_turn_ids=[],
                when=datetime.now(UTC),
            )
        record["metadata"].update({**fields, **store_fields})
        self.memory._write_tracked(user_id, [record], actor="store", replace=True)


def _flat(value: Any) -> bool:
    return isinstance(value, str | bool | int | float)


def _time(value: Any) -> datetime:
    if not value:
        return datetime.now(UTC)
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    pairs = (
        zip(namespace, path, strict=False)
        if condition.match_type == "prefix"
        else zip(reversed(namespace), reversed(path), strict=False)
    )
    return all(want == "*" or got == want for got, want in pairs)
