"""Memory tools an agent can call, in the shape of LangMem's.

- :func:`create_search_memory_tool` (``search_memory``): the user's memories most similar
  to a query, as JSON text for the model and the records as the tool's artifact
  (LangMem's ``create_search_memory_tool`` answers the same way).
- :func:`create_manage_memory_tool` (``remember``): create, update or delete one memory
  (LangMem's ``create_manage_memory_tool``: ``content``, ``action``, ``id``).

Both are bound to one user when made: the user id is not an argument the model fills in,
and an id of another user's memory is simply not found, so a prompt cannot steer a tool
into someone else's memory. In a LangGraph app serving many users, make the tools per
request, or give LangMem's own tools :class:`~persona_plugin.memory.store.MemoryStore` with
the namespace ``("memories", "{langgraph_user_id}")``.

What ``remember`` writes passes the guard as every memory write does: a text that reads as
instructions to the assistant is refused, and the model is told so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from persona_plugin.errors import PersonaNotFoundError, PersonaValidationError
from persona_plugin.persona import validate_user_id

Action = Literal["create", "update", "delete"]


class SearchMemoryInput(BaseModel):
    query: str = Field(description="What to look for in the user's memories.")
    limit: int = Field(default=5, ge=1, le=50, description="How many memories at most.")


class ManageMemoryInput(BaseModel):
    content: str | None = Field(
        default=None, description="The memory to keep (for create and update)."
    )
    action: Action = Field(default="create", description="create, update or delete.")
    id: str | None = Field(default=None, description="The id of the memory to update or delete.")


def create_search_memory_tool(
    memory: Any,
    *,
    user_id: str,
    name: str = "search_memory",
    min_score: float | None = None,
    description: str | None = None,
) -> StructuredTool:
    """A tool that searches ``user_id``'s long-term memory (``memory``, a
    :class:`~persona_plugin.memory.long_term.LongTermMemory`); ``min_score`` drops the
    memories less similar than that cosine similarity."""
    validate_user_id(user_id, "memory tool")

    def found(records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        shown = [
            {"id": r["id"], "memory": r["memory"], "score": round(r["score"], 3)} for r in records
        ]
        return json.dumps(shown, ensure_ascii=False), records

    def search(query: str, limit: int = 5) -> tuple[str, list[dict[str, Any]]]:
        hits = memory.search(query, user_id=user_id, limit=limit, min_score=min_score)
        return found(hits["results"])

    async def asearch(query: str, limit: int = 5) -> tuple[str, list[dict[str, Any]]]:
        hits = await memory.asearch(query, user_id=user_id, limit=limit, min_score=min_score)
        return found(hits["results"])

    return StructuredTool.from_function(
        func=search,
        coroutine=asearch,
        name=name,
        description=description
        or "Search the user's long-term memory: what they said and what is known about "
        "them. Returns the most similar memories with their ids and similarity scores.",
        args_schema=SearchMemoryInput,
        response_format="content_and_artifact",
    )


def create_manage_memory_tool(
    memory: Any,
    *,
    user_id: str,
    name: str = "remember",
    actions_permitted: Sequence[Action] = ("create", "update", "delete"),
    description: str | None = None,
) -> StructuredTool:
    """A tool that creates, updates or deletes one of ``user_id``'s memories; each change
    is in the memory's history with actor ``tool``."""
    validate_user_id(user_id, "memory tool")
    permitted = tuple(actions_permitted)

    def manage(content: str | None = None, action: Action = "create", id: str | None = None) -> str:
        if action not in permitted:
            return f"The {action} action is not permitted; use one of {', '.join(permitted)}."
        try:
            if action == "create":
                if not content:
                    return "Give the memory's content to create it."
                (result,) = memory.add(content, user_id=user_id, actor="tool")["results"]
                return f"created memory {result['id']}"
            if not id:
                return f"Give the id of the memory to {action} (search_memory finds it)."
            if action == "update":
                if not content:
                    return "Give the memory's new content to update it."
                memory.update(id, content, user_id=user_id, actor="tool")
                return f"updated memory {id}"
            memory.delete(id, user_id=user_id, actor="tool")
            return f"deleted memory {id}"
        except PersonaNotFoundError:
            return f"There is no memory {id}."
        except PersonaValidationError as exc:
            return f"Not saved: {exc.problem}."

    async def amanage(
        content: str | None = None, action: Action = "create", id: str | None = None
    ) -> str:
        return await asyncio.to_thread(manage, content, action, id)

    verbs = ", ".join(permitted)
    return StructuredTool.from_function(
        func=manage,
        coroutine=amanage,
        name=name,
        description=description
        or f"Keep a memory about the user for later conversations ({verbs}). Create one "
        "for a fact, preference or event worth remembering; update or delete one by its "
        "id when it has changed or is wrong.",
        args_schema=ManageMemoryInput,
    )
