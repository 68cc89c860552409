"""A LangGraph store value and the text memory embeds for it.

A ``BaseStore`` value is a dict; memory searches text. The text is the value's first
string under ``content``, ``memory`` or ``text``, looked for one level down too (LangMem
stores ``{"content": {"content": "..."}, ...}`` for its default schema), else the value as
JSON. Where the text came from is kept as a path, so a mem0 ``update`` of the item's text
changes the value in the same place, and the two views never disagree.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

TEXT_FIELDS = ("content", "memory", "text")


def text_path(value: Mapping[str, Any]) -> list[str] | None:
    """The path of the value's text field, or ``None`` (the text is the whole value)."""
    for name in TEXT_FIELDS:
        inner = value.get(name)
        if isinstance(inner, str):
            return [name]
        if isinstance(inner, Mapping):
            for nested in TEXT_FIELDS:
                if isinstance(inner.get(nested), str):
                    return [name, nested]
    return None


def value_text(value: Mapping[str, Any], path: list[str] | None) -> str:
    """The text memory embeds and shows for ``value``."""
    if path is None:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    found: Any = value
    for name in path:
        found = found[name]
    return str(found)


def with_text(value: Mapping[str, Any], path: list[str] | None, text: str) -> dict[str, Any]:
    """A copy of ``value`` whose text is ``text`` (``{"content": text}`` if it had none)."""
    if path is None:
        return {"content": text}
    out = copy.deepcopy(dict(value))
    target = out
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = text
    return out
