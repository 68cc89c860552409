"""MemoryRetriever: LangChain's standard retriever tests, and one user's memory only."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_tests.integration_tests import RetrieversIntegrationTests

from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.memory.retriever import MemoryRetriever

_SHARED: dict[str, LongTermMemory] = {}


@pytest.fixture(scope="module", autouse=True)
def _standard_memory(embedding_function: Any) -> Iterator[None]:
    """The memory the standard tests read (their constructor params are class properties)."""
    path = Path(tempfile.mkdtemp(prefix="persona-retriever-"))
    memory = LongTermMemory(path, embedding_function=embedding_function)
    for text in ["Ana sails on weekends", "Ana's boat is called Maré", "Ana crewed a regatta"]:
        memory.add(text, user_id="ana")
    memory.add("Bob sails too, on Lake Geneva", user_id="bob")
    _SHARED["memory"] = memory
    yield
    _SHARED.clear()
    shutil.rmtree(path, ignore_errors=True)


# the suite's one async test carries no marker of its own, pytest-asyncio runs in strict
# mode here, and the suite's DO_NOT_OVERRIDE test forbids marking it by overriding: the
# class is marked, and pytest-asyncio's note that the sync tests need no mark is silenced
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test .* is marked with '@pytest.mark.asyncio'")
class TestMemoryRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[MemoryRetriever]:
        return MemoryRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"memory": _SHARED["memory"], "user_id": "ana"}

    @property
    def retriever_query_example(self) -> str:
        return "What does Ana do on the water?"


def test_as_retriever_returns_documents_of_the_bound_user_alone() -> None:
    memory = _SHARED["memory"]
    retriever = memory.as_retriever(user_id="ana", k=10)
    docs = retriever.invoke("sailing on a lake")
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    assert all("Bob" not in d.page_content for d in docs)
    assert {d.id for d in docs} <= {i.id for i in memory.items("ana")}
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True) and docs[0].metadata["kind"] == "fact"
    # a threshold drops what is less similar
    strict = memory.as_retriever(user_id="ana", k=10, min_score=scores[0] - 1e-6)
    assert [d.id for d in strict.invoke("sailing on a lake")] == [docs[0].id]
    bob = memory.as_retriever(user_id="bob", k=10).invoke("Ana's boat")
    assert [d.page_content for d in bob] == ["Bob sails too, on Lake Geneva"]


def test_a_retriever_needs_a_valid_user() -> None:
    with pytest.raises(ValueError, match="not a valid user id"):
        MemoryRetriever(memory=_SHARED["memory"], user_id="no spaces allowed")
