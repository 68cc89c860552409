"""Long-term memory the way mem0, LangChain and LangGraph users know it, offline.

Run: .venv/bin/python examples/memory_ecosystem.py
The mem0-shaped API (add, search with a cosine score, update, history), the user's memory
as a LangChain retriever and as agent tools, and the same memory as a LangGraph store,
over a real embedded Chroma store in a temporary directory.
"""

from __future__ import annotations

import json
import tempfile

from langchain_core.messages import AIMessage, HumanMessage

from persona_plugin import LongTermMemory
from persona_plugin.memory import MemoryStore, create_manage_memory_tool, create_search_memory_tool


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        memory = LongTermMemory(folder)

        # mem0's shape: messages or a text in, {"results": [...]} out
        memory.add(
            [HumanMessage("I just moved to Porto."), AIMessage("Welcome to Porto!")],
            user_id="ana",
        )
        (fact,) = memory.add("Ana is vegetarian", user_id="ana", metadata={"topic": "food"})[
            "results"
        ]
        memory.add("Bob is vegetarian too", user_id="bob")
        hits = memory.search("what does Ana eat?", user_id="ana", min_score=0.3)["results"]
        print("search:", ", ".join(f"{h['memory']} ({h['kind']})" for h in hits))
        memory.update(fact["id"], "Ana is vegan", user_id="ana")
        print(
            "history:",
            [(e["event"], e["new_memory"]) for e in memory.history(fact["id"], user_id="ana")],
        )

        # a LangChain retriever, bound to Ana
        docs = memory.as_retriever(user_id="ana", k=1).invoke("Which city did she move to?")
        print("retriever:", docs[0].page_content)

        # agent tools, bound to Ana when made: the model never chooses the user
        remember = create_manage_memory_tool(memory, user_id="ana")
        search = create_search_memory_tool(memory, user_id="ana")
        print("remember:", remember.invoke({"content": "Ana's cat is called Miso"}).split()[:2])
        found = json.loads(search.invoke({"query": "pets", "limit": 1}))
        print("search_memory:", found[0]["memory"])

        # the same memory as a LangGraph BaseStore, namespaces ("memories", user_id)
        store = MemoryStore(memory)
        store.put(("memories", "ana"), "trip", {"content": "Ana plans a trip to Kyoto in May"})
        (item,) = store.search(("memories", "ana"), query="travel plans", limit=1)
        print("store:", item.key, item.value["content"])
        print("namespaces:", store.list_namespaces())


if __name__ == "__main__":
    main()
