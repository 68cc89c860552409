"""Long-term memory in ChromaDB: per-user items with provenance, hybrid recall.

Each user's items live in a Chroma collection of their own (named from a hash of the user
id, :meth:`LongTermMemory.collection_for`), so a read can only ever touch that user's
items; every item also carries its ``user_id``, checked again on the way out. A
collection per user is also what makes recall fast: Chroma's metadata-filtered vector
search over one shared collection measured 20x slower here (43 ms vs 2.2 ms at 10k
items). Items are dialogue turns, facts and reflections, each with
provenance: the source turn ids, the time, the kind.

Recall is hybrid: a vector query in Chroma and BM25 over the user's items, fused by
reciprocal rank (RRF), with optional time filters and recency decay, and near-duplicate
removal. Ids are deterministic (user, kind, turn id or text), so ingesting the same turns
again overwrites rather than duplicates: an ingest cut short is simply re-run.

Beside the graph's own calls (:meth:`~LongTermMemory.remember`,
:meth:`~LongTermMemory.add_facts`, :meth:`~LongTermMemory.recall`) the class speaks mem0's
shape, so a mem0 or LangMem user finds what they know:

- ``add(messages | text, user_id=, metadata=)`` -> ``{"results": [{"id", "memory",
  "event"}]}`` (event ``ADD``, ``UPDATE`` or ``NONE``). Messages are LangChain messages or
  ``{role, content}`` dicts, remembered as turns (a message the guard reads as
  instructions is kept as :data:`~persona_plugin.guard.WITHHELD`, as the graph keeps it);
  a text is one fact, refused if the guard reads it as instructions (as reflection
  refuses such facts).
- ``search(query, user_id=, limit=, filters=, min_score=)`` -> ``{"results": [record]}``,
  best first. A record is ``{"id", "memory", "user_id", "kind", "metadata",
  "source_turn_ids", "created_at", "updated_at", "score"}``. **The score is the cosine
  similarity** of the query's and the item's embeddings (all-MiniLM-L6-v2 by default),
  so a threshold means the same on every query and every user: see :data:`SCORE`.
- ``get(memory_id, user_id=)`` -> a record or ``None``; ``get_all(user_id=, filters=)``;
  ``update(memory_id, data, user_id=)``; ``delete(memory_id, user_id=)``;
  ``history(memory_id, user_id=)`` -> the item's events (:mod:`persona_plugin.memory.history`);
  each has an async twin (``aadd``, ``asearch``, ...), run in a worker thread, since
  Chroma's clients are synchronous.
- ``as_retriever(user_id=)``: a LangChain ``BaseRetriever``
  (:mod:`persona_plugin.memory.retriever`).

``user_id`` is a keyword everywhere in this API: an item id alone never reaches another
user's collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
from pydantic import BaseModel, Field

from persona_plugin.config import Settings
from persona_plugin.embeddings.minilm import as_embedding_function
from persona_plugin.errors import PersonaConfigError, PersonaNotFoundError, PersonaValidationError
from persona_plugin.guard import WITHHELD, instruction_reason
from persona_plugin.memory.chroma import http_client
from persona_plugin.memory.disk import INDEX_FILES_LOCK, purge_deleted, scrub_all, vector_folder
from persona_plugin.memory.history import META_PREFIX, SUFFIX, MemoryHistory, event, user_metadata
from persona_plugin.memory.lexical import BM25Index, tokenize
from persona_plugin.memory.messages import as_turns
from persona_plugin.memory.values import text_path, with_text
from persona_plugin.persona import LongTermMemoryLink, Persona, Turn, validate_user_id

if TYPE_CHECKING:
    from persona_plugin.memory.retriever import MemoryRetriever

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the kind of a fact whose persona versions were rolled back (kept, not recalled)
SUPERSEDED = "superseded"
DEFAULT_COLLECTION = "persona_memory"
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
_UPSERT_BATCH = 512
#: what :meth:`LongTermMemory.search` scores (and ``min_score`` thresholds) mean
SCORE = (
    "cosine similarity of the query's and the item's embeddings, in [-1, 1]. With the "
    "default all-MiniLM-L6-v2, on LoCoMo's dev questions (benchmarks/bench_memory_scores.py) "
    "a question's evidence turn scores median 0.47, other turns median 0.27: min_score 0.3 "
    "keeps 90% of evidence and 42% of the rest, 0.4 keeps 70% and 17%"
)
_OPERATORS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"}
_SCALARS = (str, int, float, bool)


class DialogueTurn(BaseModel):
    """One turn to remember: who said what, when, under which id."""

    turn_id: str = Field(min_length=1, max_length=200)
    speaker: str = Field(min_length=1, max_length=200)
    text: str
    timestamp: datetime | str | None = None
    session: str | None = None


class MemoryItem(BaseModel):
    """A remembered item as recall returns it."""

    id: str
    user_id: str
    kind: str
    text: str
    source_turn_ids: list[str] = Field(default_factory=list)
    timestamp: str | None = None
    speaker: str | None = None
    session: str | None = None
    score: float = 0.0
    scores: dict[str, float] = Field(default_factory=dict, description="vector, lexical, fused")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the caller's, from add")
    created_at: str | None = None
    updated_at: str | None = None

    def as_record(self, score: float | None = None) -> dict[str, Any]:
        """The item in mem0's shape (``memory`` is the text), with ``score`` if given."""
        record: dict[str, Any] = {
            "id": self.id,
            "memory": self.text,
            "user_id": self.user_id,
            "kind": self.kind,
            "metadata": dict(self.metadata),
            "source_turn_ids": list(self.source_turn_ids),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if score is not None:
            record["score"] = score
        return record


def _parse_time(value: datetime | str | None, what: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise PersonaValidationError(
                "memory", what, f"{value!r} is not an ISO 8601 time", "Use e.g. 2024-05-08T13:56."
            ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive times are taken as UTC
    return value.astimezone(UTC)


def _bad_unicode(text: str) -> bool:
    """NUL or a lone surrogate: text that cannot be stored (or encoded as UTF-8)."""
    return "\x00" in text or any("\ud800" <= ch <= "\udfff" for ch in text)


def _item_id(user_id: str, kind: str, key: str) -> str:
    return hashlib.sha256(f"{user_id}\x1f{kind}\x1f{key}".encode()).hexdigest()[:32]


def _is_not_found(exc: Exception) -> bool:
    # Chroma's NotFoundError (its class varies by version), or its message
    return type(exc).__name__ == "NotFoundError" or "does not exist" in str(exc)


def _fresh_collection(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` again on a fresh collection when the cached one is gone: another
    process (a second server worker, an admin script) may have deleted the user."""

    @functools.wraps(method)
    def wrapper(self: LongTermMemory, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            # the user is the first argument, or the keyword of the mem0-shaped methods
            user_id = kwargs["user_id"] if "user_id" in kwargs else args[0]
            with self._lock:
                self._collections.pop(user_id, None)
                self._lexical.pop(user_id, None)
            return method(self, *args, **kwargs)

    return wrapper


def exchange_turns(
    turn_id: str,
    user_text: str,
    reply_text: str,
    *,
    session: str | None = None,
    timestamp: datetime | None = None,
) -> list[dict[str, Any]]:
    """One chat exchange as the two turns every entry point remembers of a reply,
    ``<turn_id>:user`` and ``<turn_id>:assistant`` (the texts as the guard let them through),
    for ``memory.remember(user_id, ...)``."""
    when = timestamp or datetime.now(UTC)
    return [
        {
            "turn_id": f"{turn_id}:{speaker}",
            "speaker": speaker,
            "text": text,
            "timestamp": when,
            "session": session,
        }
        for speaker, text in (("user", user_text), ("assistant", reply_text))
    ]


class LongTermMemory:
    """Per-user long-term memory over ChromaDB (embedded by default, or a server).

    ``LongTermMemory(path=...)`` keeps a ``PersistentClient`` there;
    ``LongTermMemory(url="http://127.0.0.1:8000")`` talks to ``chroma run``. The embedding
    function defaults to the offline all-MiniLM-L6-v2 and may be any Chroma embedding
    function or LangChain ``Embeddings``.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        url: str | None = None,
        collection: str = DEFAULT_COLLECTION,
        embedding_function: Any = None,
        max_text_chars: int = 8000,
        context_turns: int = 2,
        context_weight: float = 1.0,
        lexical_refresh_s: float = 30.0,
        client: Any = None,
    ) -> None:
        import chromadb

        self.path = Path(path).expanduser() if path is not None else None
        self.url = url
        self.collection_name = collection
        self.max_text_chars = max_text_chars
        self.context_turns = context_turns
        self.context_weight = context_weight
        self.lexical_refresh_s = lexical_refresh_s
        self.embedding_function = as_embedding_function(embedding_function)
        if client is not None:
            self.client = client
        elif url:
            self.client = http_client(url)
        else:
            if self.path is None:
                raise PersonaConfigError(
                    "long-term memory needs a path (embedded Chroma) or a url (Chroma "
                    "server). Set PERSONA_MEMORY_PATH or PERSONA_MEMORY_URL."
                )
            self.path.mkdir(parents=True, exist_ok=True)
            self.client = chromadb.PersistentClient(path=str(self.path))
        self._collections: dict[str, Any] = {}
        self._check_client()
        self._lexical: dict[str, tuple[float, BM25Index]] = {}
        self._lock = threading.Lock()
        # the vector-index folders scrubbed of what Chroma wrote unzeroed (memory.disk)
        self._scrubbed: set[str] = set()
        self._index_folders: dict[str, str] = {}
        self.changes = MemoryHistory(
            self.client, scrub=self._scrub_index if self.embedded else None
        )

    @property
    def embedded(self) -> bool:
        """Whether this is an embedded store in :attr:`path` (not a Chroma server)."""
        return self.path is not None and self.url is None

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, embedding_function: Any = None
    ) -> LongTermMemory:
        settings = settings or Settings.load()
        if embedding_function is None and settings.cache_dir is not None:
            # a cache_dir from a config file must reach the embedder, which otherwise reads
            # only PERSONA_CACHE_DIR / PERSONA_HOME from the environment
            from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

            embedding_function = MiniLMEmbeddingFunction(
                cache_dir=str(settings.cache_dir / "models")
            )
        return cls(
            settings.resolved_memory_path if not settings.memory_url else None,
            url=settings.memory_url,
            collection=settings.memory_collection,
            embedding_function=embedding_function,
        )

    def _check_client(self) -> None:
        try:
            self.client.heartbeat()
        except Exception as exc:
            where = self.url or str(self.path)
            raise PersonaConfigError(f"cannot open long-term memory at {where}: {exc}") from None

    def collection_name_for(self, user_id: str) -> str:
        """The user's collection name: the prefix and a hash (ids may hold any character)."""
        digest = hashlib.sha256(validate_user_id(user_id).encode()).hexdigest()[:24]
        return f"{self.collection_name}-{digest}"

    def collection_for(self, user_id: str, *, create: bool = True) -> Any:
        """The user's Chroma collection (``None`` if it does not exist and not ``create``)."""
        name = self.collection_name_for(user_id)
        with self._lock:
            cached = self._collections.get(user_id)
        if cached is not None:
            return cached
        try:
            if create:
                collection = self.client.get_or_create_collection(
                    name,
                    embedding_function=self.embedding_function,
                    configuration={"hnsw": {"space": "cosine"}},
                    metadata={"user_id": user_id},
                )
            else:
                try:
                    collection = self.client.get_collection(
                        name, embedding_function=self.embedding_function
                    )
                except Exception as exc:  # Chroma's NotFoundError (class varies by version)
                    if "does not exist" in str(exc) or type(exc).__name__ == "NotFoundError":
                        return None
                    raise
        except PersonaConfigError:
            raise
        except Exception as exc:
            where = self.url or str(self.path)
            raise PersonaConfigError(
                f"cannot open memory collection '{name}' at {where}: {exc}"
            ) from None
        with self._lock:
            self._collections[user_id] = collection
        return collection

    def link(self) -> LongTermMemoryLink:
        """Where this memory lives, for the persona's ``memory.long_term``."""
        return LongTermMemoryLink(
            backend="chroma",
            collection=self.collection_name,
            url=self.url,
            path=str(self.path) if self.path and not self.url else None,
        )

    # -- writing --------------------------------------------------------------------------

    def remember(
        self, user_id: str, turns: Iterable[DialogueTurn | Mapping[str, Any]]
    ) -> list[str]:
        """Store dialogue turns (kind ``turn``); returns their ids. Re-running overwrites.

        Every turn is validated before anything is written: a bad turn in a batch leaves
        the memory as it was.
        """
        validate_user_id(user_id)
        return self._write(user_id, self._turn_records(user_id, turns))

    def _turn_records(
        self, user_id: str, turns: Iterable[DialogueTurn | Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        checked = [self._validate_turn(raw, index) for index, raw in enumerate(turns)]
        records = []
        for index, turn in enumerate(checked):
            when = _parse_time(turn.timestamp, f"turns[{index}].timestamp")
            # the day, not the minute: as good for recall (LoCoMo 0.694 vs 0.695 at k=10)
            # and shorter to embed, which is most of the ingest time
            header = f"[{when.day} {when:%B %Y}] " if when else ""
            record = self._record(
                user_id,
                kind="turn",
                key=turn.turn_id,
                text=f"{turn.speaker}: {turn.text}",
                embed_text=f"{header}{turn.speaker}: {turn.text}",
                source_turn_ids=[turn.turn_id],
                when=when,
                speaker=turn.speaker,
                session=turn.session,
            )
            # The turns just before, from the same session, are the turn's context: an
            # answer such as "Yes, last May!" only means something next to its question.
            record["context"] = [
                j
                for j in range(max(0, index - self.context_turns), index)
                if checked[j].session == turn.session
            ]
            records.append(record)
        return records

    def add_facts(
        self,
        user_id: str,
        facts: Sequence[str],
        *,
        kind: str = "fact",
        source_turn_ids: Sequence[str] = (),
        timestamp: datetime | str | None = None,
    ) -> list[str]:
        """Store facts or reflections (one item each) with their provenance."""
        validate_user_id(user_id)
        if not kind or kind == "turn" or not kind.replace("_", "").isalnum():
            raise PersonaValidationError(
                "memory", "kind", f"{kind!r} is not a kind for facts", "Use e.g. 'fact'."
            )
        if isinstance(facts, str):
            raise PersonaValidationError(
                "memory", "facts", "one string, not a list of facts", "Pass [fact, ...]."
            )
        when = _parse_time(timestamp, "timestamp") or datetime.now(UTC)
        records = []
        for index, fact in enumerate(facts):
            text = self._check_text(fact, f"facts[{index}]")
            records.append(
                self._record(
                    user_id,
                    kind=kind,
                    key=" ".join(text.lower().split()),
                    text=text,
                    embed_text=text,
                    source_turn_ids=list(source_turn_ids),
                    when=when,
                )
            )
        return self._write(user_id, records)

    def _check_text(self, text: object, where: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise PersonaValidationError(
                "memory", where, "text is empty or not text", "Pass non-empty text."
            )
        if len(text) > self.max_text_chars:
            raise PersonaValidationError(
                "memory",
                where,
                f"text is {len(text)} characters, over the cap of {self.max_text_chars}",
                "Split it into smaller items, or raise the memory's max_text_chars.",
            )
        if _bad_unicode(text):
            raise PersonaValidationError(
                "memory", where, "text is not valid Unicode", "Decode the input as UTF-8."
            )
        return text

    def _validate_turn(self, raw: DialogueTurn | Mapping[str, Any], index: int) -> DialogueTurn:
        if isinstance(raw, DialogueTurn):
            turn = raw
        else:
            try:
                turn = DialogueTurn.model_validate(dict(raw))
            except Exception as exc:
                errors = getattr(exc, "errors", lambda: [])()
                field = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
                msg = errors[0]["msg"] if errors else str(exc)
                raise PersonaValidationError(
                    "memory",
                    f"turns[{index}]" + (f".{field}" if field else ""),
                    msg,
                    "Each turn needs turn_id, speaker and text.",
                ) from None
        self._check_text(turn.text, f"turns[{index}].text")
        for name in ("turn_id", "speaker", "session"):
            value = getattr(turn, name)
            if isinstance(value, str) and _bad_unicode(value):
                raise PersonaValidationError(
                    "memory", f"turns[{index}].{name}", "not valid Unicode", "Decode it as UTF-8."
                )
        return turn

    def _record(
        self,
        user_id: str,
        *,
        kind: str,
        key: str,
        text: str,
        embed_text: str,
        source_turn_ids: list[str],
        when: datetime | None,
        speaker: str | None = None,
        session: str | None = None,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "user_id": user_id,
            "kind": kind,
            "source_turn_ids": json.dumps(source_turn_ids),
        }
        if when is not None:
            metadata["timestamp"] = when.isoformat()
            metadata["ts"] = when.timestamp()
        if speaker:
            metadata["speaker"] = speaker
        if session:
            metadata["session"] = session
        return {
            "id": _item_id(user_id, kind, key),
            "document": text,
            "embed_text": embed_text,
            "metadata": metadata,
        }

    @_fresh_collection
    def _write(self, user_id: str, records: list[dict[str, Any]]) -> list[str]:
        if not records:
            return []
        # Each text is embedded once; a turn's stored vector is its own plus the mean of
        # its context turns' (renormalised). On LoCoMo this recalls as well as embedding
        # the context's text with the turn (recall@10 0.708 vs 0.696 in one experiment),
        # at a third of the embedding cost, since texts are not repeated.
        vectors = np.asarray(
            self.embedding_function([r["embed_text"] for r in records]), dtype=np.float32
        )
        stored = vectors.copy()
        for index, record in enumerate(records):
            # read, not popped: a retry of this write (_fresh_collection) needs it again
            context = record.get("context")
            if context:
                mixed = vectors[index] + self.context_weight * vectors[context].mean(axis=0)
                stored[index] = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
        # the same turn (or fact) twice in one call: keep the last, as a re-run would
        last = {r["id"]: i for i, r in enumerate(records)}
        keep = sorted(last.values())
        collection = self.collection_for(user_id)
        with INDEX_FILES_LOCK if self.embedded else contextlib.nullcontext():
            for start in range(0, len(keep), _UPSERT_BATCH):
                chunk = keep[start : start + _UPSERT_BATCH]
                collection.upsert(
                    ids=[records[i]["id"] for i in chunk],
                    documents=[records[i]["document"] for i in chunk],
                    embeddings=stored[chunk],
                    metadatas=[records[i]["metadata"] for i in chunk],
                )
        if self.embedded:
            self._scrub_index(collection)
        with self._lock:
            cached = self._lexical.get(user_id)
        if cached is not None:
            cached[1].add((records[i]["id"], records[i]["document"]) for i in keep)
        return [records[i]["id"] for i in keep]

    def _scrub_index(self, collection: Any) -> None:
        """Zero what Chroma wrote unzeroed into the collection's new vector index, once."""
        key = str(collection.id)
        name = self._index_folders.get(key)
        if name is None:
            folder = vector_folder(self.path, key)  # type: ignore[arg-type]
            if folder is None:
                return
            name = self._index_folders[key] = folder.name
        if name not in self._scrubbed:
            scrub_all([self.path / name], self._scrubbed)  # type: ignore[operator]

    # -- reading --------------------------------------------------------------------------

    def _where(self, user_id: str, filters: Mapping[str, Any] | None = None) -> dict | None:
        """The Chroma filter inside the user's collection (``None``: no filter)."""
        validate_user_id(user_id)
        clauses: list[dict[str, Any]] = []
        for key, value in (filters or {}).items():
            if key == "user_id":
                raise PersonaValidationError(
                    "memory", "filters.user_id", "user_id cannot be a filter", "Pass user_id."
                )
            clauses.append({key: value})
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def _lexical_index(self, user_id: str) -> BM25Index:
        with self._lock:
            cached = self._lexical.get(user_id)
        # other processes may have written: rebuild now and then (own writes are added live)
        if cached is not None and time.monotonic() - cached[0] < self.lexical_refresh_s:
            return cached[1]
        collection = self.collection_for(user_id, create=False)
        got = (
            collection.get(include=["documents"])
            if collection is not None
            else {"ids": [], "documents": []}
        )
        index = BM25Index()
        index.add(zip(got["ids"], got["documents"], strict=True))
        with self._lock:
            self._lexical[user_id] = (time.monotonic(), index)
        return index

    @staticmethod
    def _check_query(query: object) -> None:
        if not isinstance(query, str) or not query.strip():
            raise PersonaValidationError("memory", "query", "query is empty", "Pass some text.")
        if _bad_unicode(query):
            raise PersonaValidationError(
                "memory", "query", "query is not valid Unicode", "Decode it as UTF-8."
            )

    @_fresh_collection
    def recall(
        self,
        user_id: str,
        query: str,
        k: int = 5,
        *,
        kinds: Sequence[str] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        half_life_days: float | None = None,
        now: datetime | str | None = None,
        dedupe: float = 0.9,
    ) -> list[MemoryItem]:
        """The ``k`` items of ``user_id`` that best match ``query``, best first.

        ``kinds`` limits the item kinds; ``since``/``until`` bound item time;
        ``half_life_days`` halves an item's score for each such age (relative to ``now``);
        ``dedupe`` drops an item whose word set overlaps a better one's by at least that
        Jaccard similarity (1.0 turns it off and keeps every item).
        """
        validate_user_id(user_id)
        self._check_query(query)
        if k <= 0:
            return []
        filters: dict[str, Any] = {}
        if kinds:
            filters["kind"] = {"$in": list(kinds)}
        lower, upper = _parse_time(since, "since"), _parse_time(until, "until")
        if lower:
            filters["$lower"] = {"ts": {"$gte": lower.timestamp()}}
        if upper:
            filters["$upper"] = {"ts": {"$lte": upper.timestamp()}}
        clauses = [value if key.startswith("$") else {key: value} for key, value in filters.items()]
        where = None if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
        collection = self.collection_for(user_id, create=False)
        if collection is None:
            return []
        # Each retriever contributes its top 2k: deeper lists let items that only one of
        # them ranks low crowd out items both agree on (measured on LoCoMo: 4k fuses worse).
        depth = max(2 * k, 10)

        vector_hits = collection.query(
            query_texts=[query],
            n_results=depth,
            where=where,
            include=["documents", "metadatas", "distances"],
        )
        found: dict[str, dict[str, Any]] = {}
        vector_rank: dict[str, int] = {}
        for rank, (item_id, doc, meta, dist) in enumerate(
            zip(
                vector_hits["ids"][0],
                vector_hits["documents"][0],
                vector_hits["metadatas"][0],
                vector_hits["distances"][0],
                strict=True,
            )
        ):
            found[item_id] = {"document": doc, "metadata": meta, "vector": 1.0 - float(dist)}
            vector_rank[item_id] = rank

        index = self._lexical_index(user_id)
        allowed = None
        if where is not None:
            allowed = set(collection.get(where=where, include=[])["ids"])
        lexical_hits = index.search(query, depth, allowed=allowed)
        lexical_rank = {item_id: rank for rank, (item_id, _) in enumerate(lexical_hits)}
        lexical_score = dict(lexical_hits)
        missing = [i for i in lexical_rank if i not in found]
        if missing:
            got = collection.get(ids=missing, include=["documents", "metadatas"])
            for item_id, doc, meta in zip(
                got["ids"], got["documents"], got["metadatas"], strict=True
            ):
                found[item_id] = {"document": doc, "metadata": meta}

        reference = _parse_time(now, "now") or datetime.now(UTC)
        scored = []
        for item_id, hit in found.items():
            fused = 0.0
            if item_id in vector_rank:
                fused += 1.0 / (RRF_K + vector_rank[item_id] + 1)
            if item_id in lexical_rank:
                fused += 1.0 / (RRF_K + lexical_rank[item_id] + 1)
            meta = hit["metadata"]
            if half_life_days and "ts" in meta:
                age_days = max(0.0, (reference.timestamp() - float(meta["ts"])) / 86400)
                fused *= math.pow(0.5, age_days / half_life_days)
            scored.append((fused, item_id))
        scored.sort(key=lambda pair: (-pair[0], pair[1]))

        items: list[MemoryItem] = []
        kept_tokens: list[set[str]] = []
        for fused, item_id in scored:
            hit = found[item_id]
            meta = hit["metadata"]
            if meta.get("user_id") != user_id:  # the filter failed: never hand it out
                raise RuntimeError(f"memory isolation violated for item {item_id}")
            if not kinds and meta.get("kind") == SUPERSEDED:  # rolled back: not what is known
                continue
            tokens = set(tokenize(hit["document"]))
            if dedupe < 1.0 and any(_jaccard(tokens, seen) >= dedupe for seen in kept_tokens):
                continue
            kept_tokens.append(tokens)
            scores = {"fused": fused}
            if "vector" in hit:
                scores["vector"] = hit["vector"]
            if item_id in lexical_score:
                scores["lexical"] = lexical_score[item_id]
            items.append(_to_item(item_id, hit["document"], meta, fused, scores))
            if len(items) == k:
                break
        return items

    @_fresh_collection
    def items(self, user_id: str, *, kinds: Sequence[str] | None = None) -> list[MemoryItem]:
        """Every item of the user (optionally of some kinds), oldest first."""
        validate_user_id(user_id)
        filters = {"kind": {"$in": list(kinds)}} if kinds else None
        return self._listed(user_id, self._where(user_id, filters))

    def _listed(self, user_id: str, where: dict | None) -> list[MemoryItem]:
        collection = self.collection_for(user_id, create=False)
        if collection is None:
            return []
        got = collection.get(where=where, include=["documents", "metadatas"])
        items = [
            _to_item(i, d, m, 0.0, {})
            for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)
            if m.get("user_id") == user_id
        ]
        return sorted(items, key=lambda item: (item.timestamp or "", item.id))

    @overload
    def get(self, memory_id: str, *, user_id: str) -> dict[str, Any] | None: ...

    @overload
    def get(self, user_id: str, *, kinds: Sequence[str] | None = None) -> list[MemoryItem]: ...

    def get(
        self,
        memory_id: str,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> dict[str, Any] | list[MemoryItem] | None:
        """One item, as a mem0 record, or ``None``: ``get(memory_id, user_id=...)``.

        Without ``user_id=``, ``get(user_id)`` and ``get(user_id, kinds=...)`` are the
        older spelling of :meth:`items` and still list the user's items.
        """
        if user_id is None:
            return self.items(memory_id, kinds=kinds)
        if kinds is not None:
            raise TypeError("get(memory_id, user_id=) takes no kinds=: use items(user_id, kinds=)")
        stored = self._stored(memory_id, user_id=user_id)
        if stored is None:
            return None
        return _to_item(memory_id, stored["document"], stored["metadata"], 0.0, {}).as_record()

    def get_all(
        self, *, user_id: str, filters: Mapping[str, Any] | None = None, limit: int = 100
    ) -> dict[str, list[dict[str, Any]]]:
        """The user's items as mem0 records (``{"results": [...]}``), oldest first."""
        validate_user_id(user_id)
        where = _filters_where(filters)
        items = self._fresh_listed(user_id=user_id, where=where)
        return {"results": [item.as_record() for item in items[: max(0, limit)]]}

    @_fresh_collection
    def _fresh_listed(self, *, user_id: str, where: dict | None) -> list[MemoryItem]:
        return self._listed(user_id, where)

    @_fresh_collection
    def _stored(self, memory_id: str, *, user_id: str) -> dict[str, Any] | None:
        """The stored ``document`` and ``metadata`` of one of the user's items, or ``None``."""
        validate_user_id(user_id)
        if not isinstance(memory_id, str) or not memory_id or _bad_unicode(memory_id):
            raise PersonaValidationError(
                "memory", "memory_id", f"{memory_id!r} is not an item id", "Pass an id from add."
            )
        collection = self.collection_for(user_id, create=False)
        if collection is None:
            return None
        got = collection.get(ids=[memory_id], include=["documents", "metadatas"])
        if not got["ids"]:
            return None
        meta = got["metadatas"][0]
        if meta.get("user_id") != user_id:  # never hand out what the collection should not hold
            raise RuntimeError(f"memory isolation violated for item {memory_id}")
        return {"document": got["documents"][0], "metadata": meta}

    def _missing(self, memory_id: str, user_id: str) -> PersonaNotFoundError:
        return PersonaNotFoundError(
            f"no memory item {memory_id!r} for user {user_id!r}: get_all(user_id=...) lists "
            "the user's items and their ids"
        )

    def add(
        self,
        messages: str | Sequence[Any] | Mapping[str, Any],
        *,
        user_id: str,
        metadata: Mapping[str, Any] | None = None,
        source_turn_ids: Sequence[str] = (),
        actor: str = "add",
    ) -> dict[str, list[dict[str, Any]]]:
        """Remember ``messages`` (mem0's ``add``): ``{"results": [{"id", "memory", "event"}]}``.

        A text is one fact (kind ``fact``; adding the same text again is event ``NONE``);
        it is refused if the guard reads it as instructions to the assistant. Messages
        (LangChain messages, ``{role, content}`` dicts, or turns) are remembered as turns,
        each of the user's or the assistant's; one the guard reads as instructions is kept
        as :data:`~persona_plugin.guard.WITHHELD`. ``metadata`` (flat: text, numbers,
        booleans) is stored with each item and is what ``search(filters=)`` matches.
        """
        validate_user_id(user_id)
        extra = _metadata_fields(metadata)
        now = datetime.now(UTC)
        if isinstance(messages, str):
            text = self._guarded_fact(messages, "messages")
            records = [
                self._record(
                    user_id,
                    kind="fact",
                    key=" ".join(text.lower().split()),
                    text=text,
                    embed_text=text,
                    source_turn_ids=list(source_turn_ids),
                    when=now,
                )
            ]
        else:
            if isinstance(messages, Mapping) or hasattr(messages, "content"):
                messages = [messages]  # one message
            turns = as_turns(list(messages), timestamp=now.isoformat())
            for turn in turns:
                if isinstance(turn.get("text"), str) and instruction_reason(turn["text"]):
                    turn["text"] = WITHHELD  # as the graph keeps such a turn
            records = self._turn_records(user_id, turns)
        for record in records:
            record["metadata"].update(extra)
        return {"results": self._write_tracked(user_id, records, actor=actor)}

    def _guarded_fact(self, text: object, where: str) -> str:
        checked = self._check_text(text, where)
        reason = instruction_reason(checked)
        if reason:
            raise PersonaValidationError(
                "memory",
                where,
                f"the text reads as an instruction to the assistant (guard: {reason})",
                "Remember what the user said or is; instructions are never remembered.",
            )
        return checked

    def _write_tracked(
        self, user_id: str, records: list[dict[str, Any]], *, actor: str, replace: bool = False
    ) -> list[dict[str, Any]]:
        """Write ``records`` as :meth:`_write` does, keeping each item's ``created_at``,
        setting ``updated_at``, and logging an event for each change; the mem0 results.
        ``replace``: the caller's metadata keys the records lack are removed."""
        if not records:
            return []
        now = datetime.now(UTC).isoformat()
        collection = self.collection_for(user_id, create=False)
        ids = list(dict.fromkeys(r["id"] for r in records))
        old: dict[str, dict[str, Any]] = {}
        if collection is not None:
            got = collection.get(ids=ids, include=["documents", "metadatas"])
            for item_id, doc, meta in zip(
                got["ids"], got["documents"], got["metadatas"], strict=True
            ):
                old[item_id] = {"document": doc, "metadata": meta}
        last = {r["id"]: r for r in records}
        results, events = [], []
        for item_id, record in last.items():
            meta = record["metadata"]
            before = old.get(item_id)
            if before is None:
                change = "ADD"
                meta.setdefault("created_at", now)
                meta["updated_at"] = meta["created_at"]
            else:
                was = before["metadata"]
                meta["created_at"] = was.get("created_at") or was.get("timestamp") or now
                if replace:
                    for key in was:
                        if key.startswith(META_PREFIX) and key not in meta:
                            meta[key] = None  # Chroma removes a key set to None
                same = before["document"] == record["document"] and user_metadata(
                    was
                ) == user_metadata({k: v for k, v in meta.items() if v is not None})
                change = "NONE" if same else "UPDATE"
                meta["updated_at"] = was.get("updated_at") or meta["created_at"]
                if not same:
                    meta["updated_at"] = now
            new = {"document": record["document"], "metadata": meta}
            results.append({"id": item_id, "memory": record["document"], "event": change})
            if change != "NONE":
                events.append(event(change, item_id, old=before, new=new, actor=actor))
        for record in records:  # a record given twice: both carry the times set above
            record["metadata"] = last[record["id"]]["metadata"]
        self._write(user_id, records)
        if any(e["event"] == "UPDATE" for e in events):
            with self._lock:  # BM25 is append-only: an item's new text needs a rebuild
                self._lexical.pop(user_id, None)
        self.changes.record(self._history_name(user_id), user_id, events)
        return results

    def update(
        self,
        memory_id: str,
        data: str,
        *,
        user_id: str,
        metadata: Mapping[str, Any] | None = None,
        actor: str = "update",
    ) -> dict[str, Any]:
        """Change one item's text (and merge ``metadata`` into its own); its kind, source
        turns and creation time stay, and the history gains the previous value. Returns
        ``{"id", "memory", "event"}``. The new text passes the guard as :meth:`add`'s."""
        stored = self._stored(memory_id, user_id=user_id)
        if stored is None:
            raise self._missing(memory_id, user_id)
        text = self._guarded_fact(data, "data")
        meta = dict(stored["metadata"])
        meta.update(_metadata_fields(metadata))
        embed_text = text
        if meta.get("kind") == "turn" and "ts" in meta:
            when = datetime.fromtimestamp(float(meta["ts"]), UTC)
            embed_text = f"[{when.day} {when:%B %Y}] {text}"  # as remember() embeds turns
        if "store_value" in meta:  # a LangGraph store item: its value's text changes too
            path = json.loads(meta.get("store_path") or "null")
            value = with_text(json.loads(meta["store_value"]), path, text)
            meta["store_value"] = json.dumps(value, ensure_ascii=False)
            meta["store_path"] = json.dumps(text_path(value))
        record = {"id": memory_id, "document": text, "embed_text": embed_text, "metadata": meta}
        return self._write_tracked(user_id, [record], actor=actor)[0]

    @_fresh_collection
    def delete(self, memory_id: str, *, user_id: str, actor: str = "delete") -> dict[str, Any]:
        """Remove one item; the history keeps its last value and provenance (kind, source
        turns, writer) in a ``DELETE`` event. Returns ``{"id", "memory", "event"}``.
        :meth:`delete_user` (``forget_user``) removes the history too."""
        stored = self._stored(memory_id, user_id=user_id)
        if stored is None:
            raise self._missing(memory_id, user_id)
        collection = self.collection_for(user_id, create=False)
        with INDEX_FILES_LOCK if self.embedded else contextlib.nullcontext():
            collection.delete(ids=[memory_id])
        with self._lock:
            self._lexical.pop(user_id, None)
        change = event("DELETE", memory_id, old=stored, new=None, actor=actor)
        self.changes.record(self._history_name(user_id), user_id, [change])
        return {"id": memory_id, "memory": stored["document"], "event": "DELETE"}

    def history(self, memory_id: str | None = None, *, user_id: str) -> list[dict[str, Any]]:
        """The changes of one item (or of all the user's items), oldest first: ``{"id",
        "memory_id", "event", "old_memory", "new_memory", "kind", "source_turn_ids",
        "metadata", "actor", "created_at", "is_deleted", "user_id"}`` each."""
        validate_user_id(user_id)
        return self.changes.events(self._history_name(user_id), user_id, memory_id)

    def _history_name(self, user_id: str) -> str:
        return self.collection_name_for(user_id) + SUFFIX

    @_fresh_collection
    def search(
        self,
        query: str,
        *,
        user_id: str,
        limit: int = 5,
        filters: Mapping[str, Any] | None = None,
        min_score: float | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """The user's items most similar to ``query`` (mem0's ``search``), best first.

        ``score`` is the cosine similarity of the query's and the item's embeddings
        (:data:`SCORE`), so ``min_score`` is a threshold that means the same everywhere.
        The candidates are those the hybrid recall looks at (the vector index's nearest
        and BM25's best, so a rare exact word is not missed), ranked by that similarity.
        ``filters`` match the ``metadata`` given to :meth:`add` (``{"topic": "food"}``,
        ``{"year": {"$gte": 2024}}``, ``$and``/``$or`` lists); ``kind`` names the item
        kind (``turn``, ``fact``, ``store``, ...).
        """
        validate_user_id(user_id)
        self._check_query(query)
        if min_score is not None and not -1.0 <= float(min_score) <= 1.0:
            raise PersonaValidationError(
                "memory", "min_score", f"{min_score!r} is not a cosine similarity", "Use -1..1."
            )
        where = _filters_where(filters)
        collection = self.collection_for(user_id, create=False)
        if collection is None or limit <= 0:
            return {"results": []}
        wanted = np.asarray(self.embedding_function([query]), dtype=np.float32)[0]
        wanted /= max(float(np.linalg.norm(wanted)), 1e-12)
        depth = max(2 * limit, 10)
        hits = collection.query(
            query_embeddings=[wanted],
            n_results=depth,
            where=where,
            include=["documents", "metadatas", "distances"],
        )
        found: dict[str, tuple[str, Mapping[str, Any], float]] = {}
        for item_id, doc, meta, dist in zip(
            hits["ids"][0],
            hits["documents"][0],
            hits["metadatas"][0],
            hits["distances"][0],
            strict=True,
        ):
            found[item_id] = (doc, meta, 1.0 - float(dist))  # cosine space: 1 - similarity
        allowed = None if where is None else set(collection.get(where=where, include=[])["ids"])
        lexical = self._lexical_index(user_id).search(query, depth, allowed=allowed)
        missing = [item_id for item_id, _ in lexical if item_id not in found]
        if missing:
            got = collection.get(ids=missing, include=["documents", "metadatas", "embeddings"])
            for item_id, doc, meta, vector in zip(
                got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True
            ):
                vector = np.asarray(vector, dtype=np.float32)
                similarity = float(vector @ wanted) / max(float(np.linalg.norm(vector)), 1e-12)
                found[item_id] = (doc, meta, similarity)
        asked_kind = _names_kind(filters)
        ranked = sorted(found.items(), key=lambda pair: (-pair[1][2], pair[0]))
        results = []
        for item_id, (doc, meta, similarity) in ranked:
            if meta.get("user_id") != user_id:  # the collection failed: never hand it out
                raise RuntimeError(f"memory isolation violated for item {item_id}")
            if meta.get("kind") == SUPERSEDED and not asked_kind:
                continue
            if min_score is not None and similarity < min_score:
                break  # ranked by similarity: the rest score lower still
            item = _to_item(item_id, doc, meta, similarity, {"vector": similarity})
            results.append(item.as_record(score=similarity))
            if len(results) == limit:
                break
        return {"results": results}

    def as_retriever(
        self,
        *,
        user_id: str,
        k: int = 4,
        min_score: float | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> MemoryRetriever:
        """A LangChain ``BaseRetriever`` over the memory of ``user_id`` alone."""
        from persona_plugin.memory.retriever import MemoryRetriever

        return MemoryRetriever(
            memory=self,
            user_id=user_id,
            k=k,
            min_score=min_score,
            filters=dict(filters) if filters else None,
        )

    def user_ids(self) -> list[str]:
        """The users with a memory collection under this memory's prefix, sorted."""
        users = []
        for collection in self.client.list_collections():
            meta = getattr(collection, "metadata", None) or {}
            user_id = meta.get("user_id")
            name = getattr(collection, "name", collection)
            if isinstance(user_id, str) and name == self.collection_name_for(user_id):
                users.append(user_id)
        return sorted(users)

    # -- async twins: Chroma's clients are synchronous, so each runs in a worker thread ----

    async def aadd(
        self,
        messages: str | Sequence[Any] | Mapping[str, Any],
        *,
        user_id: str,
        metadata: Mapping[str, Any] | None = None,
        source_turn_ids: Sequence[str] = (),
    ) -> dict[str, list[dict[str, Any]]]:
        return await asyncio.to_thread(
            self.add,
            messages,
            user_id=user_id,
            metadata=metadata,
            source_turn_ids=source_turn_ids,
        )

    async def asearch(
        self,
        query: str,
        *,
        user_id: str,
        limit: int = 5,
        filters: Mapping[str, Any] | None = None,
        min_score: float | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        return await asyncio.to_thread(
            self.search, query, user_id=user_id, limit=limit, filters=filters, min_score=min_score
        )

    async def aget(self, memory_id: str, *, user_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get, memory_id, user_id=user_id)

    async def aget_all(
        self, *, user_id: str, filters: Mapping[str, Any] | None = None, limit: int = 100
    ) -> dict[str, list[dict[str, Any]]]:
        return await asyncio.to_thread(self.get_all, user_id=user_id, filters=filters, limit=limit)

    async def aupdate(
        self,
        memory_id: str,
        data: str,
        *,
        user_id: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self.update, memory_id, data, user_id=user_id, metadata=metadata
        )

    async def adelete(self, memory_id: str, *, user_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.delete, memory_id, user_id=user_id)

    async def ahistory(self, memory_id: str | None = None, *, user_id: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.history, memory_id, user_id=user_id)

    @_fresh_collection
    def supersede(self, user_id: str, turn_ids: Iterable[str], *, note: str) -> int:
        """Mark the facts drawn from ``turn_ids`` superseded (kind ``superseded``, with
        ``note``, e.g. "rolled back to version 3"); how many. Recall leaves them out unless
        asked for that kind; :meth:`get` and export still list them (nothing is erased)."""
        wanted = set(turn_ids)
        collection = self.collection_for(user_id, create=False)
        if collection is None or not wanted:
            return 0
        got = collection.get(where={"kind": "fact"}, include=["metadatas"])
        ids, metadatas = [], []
        for item_id, meta in zip(got["ids"], got["metadatas"], strict=True):
            sources = set(json.loads(meta.get("source_turn_ids") or "[]"))
            if sources and sources <= wanted:
                ids.append(item_id)
                metadatas.append({**meta, "kind": SUPERSEDED, "superseded_by": note})
        if ids:
            collection.update(ids=ids, metadatas=metadatas)
        return len(ids)

    @_fresh_collection
    def count(self, user_id: str) -> int:
        collection = self.collection_for(user_id, create=False)
        return 0 if collection is None else collection.count()

    def delete_user(self, user_id: str) -> int:
        """Remove every item of the user, and their items' history; how many items went."""
        # a fresh look, not the cached handle: another process may have deleted the
        # collection and the user come back, so that a new one has the same name
        with self._lock:
            self._lexical.pop(user_id, None)
            self._collections.pop(user_id, None)
        collection = self.collection_for(user_id, create=False)
        with self._lock:
            self._collections.pop(user_id, None)
        removed = 0
        if collection is not None:
            try:
                removed = collection.count()
                self.client.delete_collection(self.collection_name_for(user_id))
            except Exception as exc:
                if not _is_not_found(exc):  # deleted meanwhile by another process: gone anyway
                    raise
                removed = 0
        history = self.changes.forget(self._history_name(user_id))
        if collection is None and not history:
            return 0
        if self.embedded:
            purge_deleted(self.path, scrubbed=self._scrubbed)  # type: ignore[arg-type]
        return removed


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _to_item(
    item_id: str, document: str, meta: Mapping[str, Any], score: float, scores: dict[str, float]
) -> MemoryItem:
    return MemoryItem(
        id=item_id,
        user_id=str(meta["user_id"]),
        kind=str(meta.get("kind", "")),
        text=document,
        source_turn_ids=json.loads(meta.get("source_turn_ids") or "[]"),
        timestamp=meta.get("timestamp"),
        speaker=meta.get("speaker"),
        session=meta.get("session"),
        score=score,
        scores=scores,
        metadata=user_metadata(meta),
        created_at=meta.get("created_at") or meta.get("timestamp"),
        updated_at=meta.get("updated_at") or meta.get("created_at") or meta.get("timestamp"),
    )


def _metadata_fields(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's ``metadata`` as Chroma metadata (keys prefixed, flat values only)."""
    fields: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        where = f"metadata.{key}"
        if not isinstance(key, str) or not key or key.startswith("$") or _bad_unicode(key):
            raise PersonaValidationError(
                "memory", where, f"{key!r} is not a metadata key", "Use non-empty text keys."
            )
        if value is None:
            continue
        if not isinstance(value, _SCALARS):
            raise PersonaValidationError(
                "memory",
                where,
                f"a {type(value).__name__} is not a flat metadata value",
                "Use text, numbers or booleans (Chroma stores nothing nested).",
            )
        if isinstance(value, str) and (_bad_unicode(value) or instruction_reason(value)):
            raise PersonaValidationError(
                "memory",
                where,
                "the value is not valid Unicode or reads as instructions to the assistant",
                "Metadata describes the item; it reaches the model as data too.",
            )
        fields[META_PREFIX + key] = value
    return fields


def _filter_clause(key: str, value: Any) -> dict[str, Any]:
    if key in ("$and", "$or"):
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise PersonaValidationError(
                "memory", f"filters.{key}", "not a list of filters", "Pass [{...}, {...}]."
            )
        clauses = [_filters_where(v) for v in value]
        clauses = [c for c in clauses if c]
        return clauses[0] if len(clauses) == 1 else {key: clauses}
    if key == "user_id":
        raise PersonaValidationError(
            "memory", "filters.user_id", "user_id cannot be a filter", "Pass user_id=."
        )
    field = "kind" if key == "kind" else META_PREFIX + key
    if isinstance(value, Mapping):
        unknown = set(value) - _OPERATORS
        if unknown or not value:
            raise PersonaValidationError(
                "memory",
                f"filters.{key}",
                f"{sorted(unknown) or 'no'} operator",
                f"Use a value or one of {sorted(_OPERATORS)}.",
            )
        parts = [{field: {op: operand}} for op, operand in value.items()]
        return parts[0] if len(parts) == 1 else {"$and": parts}
    if isinstance(value, _SCALARS):
        return {field: value}
    raise PersonaValidationError(
        "memory", f"filters.{key}", f"a {type(value).__name__} cannot be matched", "Use a value."
    )


def _filters_where(filters: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """mem0/LangGraph-style ``filters`` as a Chroma ``where`` (``None``: no filter)."""
    clauses = [_filter_clause(key, value) for key, value in (filters or {}).items()]
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _names_kind(filters: Any) -> bool:
    """Whether ``filters`` say which kinds (then superseded items may be asked for)."""
    if isinstance(filters, Mapping):
        return "kind" in filters or any(_names_kind(v) for v in filters.values())
    if isinstance(filters, list):
        return any(_names_kind(v) for v in filters)
    return False


def update_short_term(persona: Persona, turns: Sequence[Turn], window: int) -> Persona:
    """A copy of ``persona`` whose ``memory.short_term`` ends with ``turns``, last ``window``."""
    updated = persona.model_copy(deep=True)
    recent = [*updated.memory.short_term, *turns]
    updated.memory.short_term = recent[-window:] if window > 0 else []
    return updated
