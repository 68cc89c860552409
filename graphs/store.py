"""The LangGraph Platform store (``langgraph.json``: ``"store": {"path": ...}``): the
persona graph's own long-term memory as a LangGraph ``BaseStore``.

With it, what a platform client or another graph puts in the store under
``("memories", user_id)`` is what the persona graph recalls for that user, what the graph
remembers of a turn is found by ``client.store.search_items``, and ``forget`` removes both:
one memory, not two that drift apart. Configured from the PERSONA_* settings, like the
graph (the same Chroma folder or server).
"""

from persona_plugin.memory import LongTermMemory, MemoryStore

store = MemoryStore(LongTermMemory.from_settings())
