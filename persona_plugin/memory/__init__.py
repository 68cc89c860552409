"""Long-term memory (ChromaDB, one collection per user), BM25, knowledge-base search.

:class:`LongTermMemory` remembers dialogue turns and recalls them (hybrid BM25 + vector,
rank fusion, recency), and speaks mem0's shape too (``add``, ``search`` with a cosine
score, ``get``, ``update``, ``delete``, ``history``, async twins); :class:`KnowledgeBaseSearch`
queries the collections a persona's tool annotations name;
:func:`~persona_plugin.memory.chroma.client_for` opens a Chroma server or folder by address.

For the ecosystem, over the same storage: :class:`MemoryRetriever` (LangChain
``BaseRetriever``, ``memory.as_retriever(user_id=...)``); :func:`create_search_memory_tool`
and :func:`create_manage_memory_tool` (agent tools bound to one user, LangMem's shape);
:class:`MemoryStore` (LangGraph ``BaseStore``, namespaces ``("memories", user_id)``).
"""

from persona_plugin.memory.chroma import client_for, http_client
from persona_plugin.memory.knowledge_base import KnowledgeBaseSearch
from persona_plugin.memory.long_term import SCORE, DialogueTurn, LongTermMemory, MemoryItem
from persona_plugin.memory.retriever import MemoryRetriever
from persona_plugin.memory.store import MemoryStore
from persona_plugin.memory.tools import create_manage_memory_tool, create_search_memory_tool

__all__ = [
    "SCORE",
    "DialogueTurn",
    "KnowledgeBaseSearch",
    "LongTermMemory",
    "MemoryItem",
    "MemoryRetriever",
    "MemoryStore",
    "client_for",
    "create_manage_memory_tool",
    "create_search_memory_tool",
    "http_client",
]
