"""Long-term memory (ChromaDB, one collection per user), BM25, knowledge-base search.

:class:`LongTermMemory` remembers dialogue turns and recalls them (hybrid BM25 + vector,
rank fusion, recency); :class:`KnowledgeBaseSearch` queries the collections a persona's
tool annotations name; :func:`~persona_plugin.memory.chroma.client_for` opens a Chroma
server or folder by address.
"""

from persona_plugin.memory.chroma import client_for, http_client
from persona_plugin.memory.knowledge_base import KnowledgeBaseSearch
from persona_plugin.memory.long_term import DialogueTurn, LongTermMemory, MemoryItem

__all__ = [
    "DialogueTurn",
    "KnowledgeBaseSearch",
    "LongTermMemory",
    "MemoryItem",
    "client_for",
    "http_client",
]
