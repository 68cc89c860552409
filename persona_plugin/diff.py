"""Field-level differences between two persona documents.

A change is one of ``add`` / ``remove`` / ``replace`` at a field path such as
``preference.style[1]``. Lists are compared item by item (an appended item is one
``add``, not a replaced list), so a version's change reads the way it was made.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal

from pydantic import BaseModel


class Change(BaseModel):
    """One field-level change from an older document to a newer one."""

    op: Literal["add", "remove", "replace"]
    path: str
    old: Any = None
    new: Any = None

    def describe(self) -> str:
        if self.op == "add":
            return f"+ {self.path}: {_short(self.new)}"
        if self.op == "remove":
            return f"- {self.path}: {_short(self.old)}"
        return f"~ {self.path}: {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _absent(value: Any) -> bool:
    return value is None or value == [] or value == {}


def diff_documents(old: Any, new: Any, path: str = "") -> list[Change]:
    """The changes that turn ``old`` into ``new`` (both JSON-compatible).

    A key that is missing, null, or an empty list or mapping counts as absent, so
    filling an empty field is an ``add`` of each new leaf, not a ``replace``.
    """
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[Change] = []
        for key in [*old, *(k for k in new if k not in old)]:
            before, after = old.get(key), new.get(key)
            child = _join(path, key)
            if _absent(before) and _absent(after):
                continue
            if _absent(before) and not isinstance(after, dict | list):
                changes.append(Change(op="add", path=child, new=after))
            elif _absent(after) and not isinstance(before, dict | list):
                changes.append(Change(op="remove", path=child, old=before))
            else:
                empty = {} if isinstance(after if before is None else before, dict) else []
                changes.extend(
                    diff_documents(
                        empty if before is None else before,
                        empty if after is None else after,
                        child,
                    )
                )
        return changes
    if isinstance(old, list) and isinstance(new, list):
        return _diff_lists(old, new, path)
    return [Change(op="replace", path=path, old=old, new=new)]


def _diff_lists(old: list[Any], new: list[Any], path: str) -> list[Change]:
    keys_old = [json.dumps(item, sort_keys=True) for item in old]
    keys_new = [json.dumps(item, sort_keys=True) for item in new]
    changes: list[Change] = []
    matcher = difflib.SequenceMatcher(a=keys_old, b=keys_new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "replace" and i2 - i1 == j2 - j1:
            for offset in range(i2 - i1):
                changes.extend(
                    diff_documents(old[i1 + offset], new[j1 + offset], _join(path, j1 + offset))
                )
            continue
        # paths of removals name the old index, of additions the new one
        changes.extend(Change(op="remove", path=_join(path, i), old=old[i]) for i in range(i1, i2))
        changes.extend(Change(op="add", path=_join(path, j), new=new[j]) for j in range(j1, j2))
    return changes
