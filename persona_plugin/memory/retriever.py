"""A LangChain ``BaseRetriever`` over one user's long-term memory.

``memory.as_retriever(user_id="ana", k=4, min_score=0.3)`` (or ``MemoryRetriever(memory=...,
user_id=...)``) plugs the user's memory into any LangChain chain or RAG recipe. The user
is fixed when the retriever is made, and nothing a caller passes at run time (a query,
``k``) names another one. Each document's ``page_content`` is the item's text; its
``metadata`` holds the caller's metadata from ``add`` and then ``id``, ``score`` (the
cosine similarity, see :data:`~persona_plugin.memory.long_term.SCORE`), ``kind``,
``source_turn_ids``, ``created_at`` and ``updated_at``.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import field_validator

from persona_plugin.persona import validate_user_id


class MemoryRetriever(BaseRetriever):
    """The ``k`` items of ``user_id``'s memory most similar to the query, as Documents.

    ``memory`` is a :class:`~persona_plugin.memory.long_term.LongTermMemory`; ``min_score``
    drops items less similar than that; ``filters`` are those of its ``search``. ``k`` may
    also be given per call: ``retriever.invoke(query, k=2)``.
    """

    memory: Any
    user_id: str
    k: int = 4
    min_score: float | None = None
    filters: dict[str, Any] | None = None

    @field_validator("user_id")
    @classmethod
    def _valid_user(cls, value: str) -> str:
        return validate_user_id(value, "retriever")

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        found = self.memory.search(
            query,
            user_id=self.user_id,
            limit=self.k if k is None else k,
            filters=self.filters,
            min_score=self.min_score,
        )
        return [_document(record) for record in found["results"]]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
    ) -> list[Document]:
        found = await self.memory.asearch(
            query,
            user_id=self.user_id,
            limit=self.k if k is None else k,
            filters=self.filters,
            min_score=self.min_score,
        )
        return [_document(record) for record in found["results"]]


def _document(record: dict[str, Any]) -> Document:
    metadata = {
        **record["metadata"],
        "id": record["id"],
        "score": record["score"],
        "kind": record["kind"],
        "source_turn_ids": record["source_turn_ids"],
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }
    return Document(id=record["id"], page_content=record["memory"], metadata=metadata)
