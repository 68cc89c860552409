"""Knowledge-base search: the Chroma collections a persona's tool annotations point at.

A persona may annotate a tool ``{type: knowledge_base, collection: product-docs, address:
...}``; the graph's recall step searches each such collection with the user's message and
hands the hits to prompt assembly as tool results. One client per address is kept (opening
a Chroma client is costly); a knowledge base with no address lives beside long-term memory.
"""

from __future__ import annotations

import threading
from typing import Any

from persona_plugin.errors import PersonaConfigError
from persona_plugin.memory.chroma import client_for


class KnowledgeBaseSearch:
    """Searches knowledge-base collections by address; ``default_client`` (long-term
    memory's client) serves annotations without an address."""

    def __init__(self, default_client: Any = None, *, k: int = 3) -> None:
        self.default_client = default_client
        self.k = k
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, address: str | None) -> Any:
        if not address:
            if self.default_client is None:
                raise PersonaConfigError(
                    "a knowledge base without an address needs long-term memory to live in: "
                    "give the tool annotation an address (a Chroma URL or folder)."
                )
            return self.default_client
        with self._lock:
            if address not in self._clients:
                self._clients[address] = client_for(address)
            return self._clients[address]

    def search(self, address: str | None, collection: str, query: str) -> list[str]:
        """The texts of the ``k`` documents of ``collection`` nearest to ``query``."""
        found = self._client(address).get_collection(collection)
        hits = found.query(query_texts=[query], n_results=self.k, include=["documents"])
        return [doc for doc in hits["documents"][0] if doc]
