"""The optimizer of reflection: typed operations on a persona, validated one by one.

Agent symbolic learning (Zhou et al. 2024) updates an agent's symbolic parts from
"language gradients". Here the symbolic part is the persona, and each gradient becomes
a typed :class:`Operation` (set / append / remove / merge at a field path, with a
confidence and the turn ids it rests on). :func:`apply_operations` is pure: it applies
what passes every check to a copy and says why it refused the rest, so a store update
can re-run it on a fresher persona after a compare-and-set conflict.

Checks, in order: the path is one reflection may touch; confidence is high enough;
evidence names turns of this reflection; no value reads as an instruction (the guard);
the value keeps the polarity of the user's words (when the evidence texts are given: a
value that drops a negation its evidence holds, "mobile games" for "I strongly dislike
mobile games", is refused unless it goes to ``preference.avoid``, and a like does not go
there; :func:`~persona_plugin.polarity.contradiction`); the result still validates against
the schema and the size caps.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, JsonValue

from persona_plugin.errors import PersonaValidationError
from persona_plugin.guard import find_instruction
from persona_plugin.persona import DEFAULT_LIMITS, Persona, PersonaLimits, parse_persona
from persona_plugin.polarity import contradiction

#: why an operation or fact citing a withheld turn is refused
EVIDENCE_WITHHELD = "its evidence is a turn that read as instructions to the assistant"

# where reflection may write; meta, tools, identity.user_id and the memory link and
# short-term window are the store's and the app's, not the model's
WRITABLE_ROOTS = (
    "identity",
    "demographics",
    "personality",
    "pattern",
    "preference",
    "memory.faq",
    "memory.functions",
    "memory.feedback",
    "extensions",
)
READ_ONLY = ("identity.user_id",)
#: the field whose items are things to avoid: a bare value there means "avoid it"
AVOID_PATH = "preference.avoid"


class Operation(BaseModel):
    """One change to the persona, as the reflection model proposes it."""

    op: Literal["set", "append", "remove", "merge"]
    path: str = Field(description="dotted field path, e.g. preference.style")
    value: JsonValue = Field(None, description="the value to set, append, remove or merge")
    replaces: JsonValue = Field(
        None, description="append only: an older item this one contradicts and replaces"
    )
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: list[str] = Field(default_factory=list, description="turn ids")


class AppliedOperation(BaseModel):
    operation: Operation
    effect: Literal["changed", "merged", "replaced"]


class RefusedOperation(BaseModel):
    operation: Operation
    reason: str


class OptimizerResult(BaseModel):
    persona: Persona
    applied: list[AppliedOperation] = Field(default_factory=list)
    refused: list[RefusedOperation] = Field(default_factory=list)


_PATH_PART = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


def _split_path(path: str) -> list[str] | None:
    parts = path.split(".")
    if not parts or not all(_PATH_PART.match(p) for p in parts):
        return None
    return parts


def _writable(path: str) -> bool:
    if path in READ_ONLY:
        return False
    return any(path == root or path.startswith(root + ".") for root in WRITABLE_ROOTS) and (
        path not in ("identity", "demographics", "personality", "pattern", "preference")
    )


def _norm(value: Any) -> str:
    """How duplicates are recognised: case, punctuation and spacing do not matter."""
    if isinstance(value, dict):
        for key in ("text", "description", "question"):
            if isinstance(value.get(key), str):
                return _norm(value[key])
        return _norm(" ".join(str(v) for v in value.values()))
    return " ".join(re.sub(r"[^\w\s]", " ", str(value).casefold()).split())


def _texts(value: Any) -> list[str]:
    """The texts a value asserts: a string, the text of an item, each of a list's."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for key in ("text", "description", "question"):
            if isinstance(value.get(key), str):
                return [value[key]]
        return [v for v in value.values() if isinstance(v, str)]
    if isinstance(value, list):
        return [t for item in value for t in _texts(item)]
    return []


def polarity_problem(op: Operation, evidence_texts: Mapping[str, str]) -> str | None:
    """Why ``op`` turns around what its evidence says (None: it does not).

    A value is read as a like, or as an avoid in ``preference.avoid`` (a value with its own
    cue keeps it: "dislikes mobile games" is an avoid anywhere); the user's words of the
    turns it cites are read by :func:`~persona_plugin.polarity.read_polarity`. Removing an
    item asserts nothing, so a remove is never refused here.
    """
    said = [evidence_texts[e] for e in op.evidence if evidence_texts.get(e)]
    if op.op == "remove" or not said:
        return None
    into_avoid = op.path == AVOID_PATH
    for text in _texts(op.value):
        stance = contradiction(text, said, polarity="avoid" if into_avoid else "like")
        if stance is None:
            continue
        if into_avoid:
            return (
                f"polarity: the user's words ({stance.cue!r}) like {stance.text!r}; "
                f"{AVOID_PATH} holds what they avoid"
            )
        return (
            f"polarity: the user's words ({stance.cue!r}) avoid {stance.text!r}; the value "
            f"{text!r} drops that negation (append what they avoid to {AVOID_PATH})"
        )
    return None


def _apply_one(data: dict[str, Any], op: Operation) -> str:
    """Apply ``op`` to ``data`` in place; return its effect or raise ValueError."""
    parts = _split_path(op.path)
    assert parts is not None
    container: Any = data
    for part in parts[:-1]:
        if not isinstance(container, dict):
            raise ValueError(f"'{part}' is not inside a mapping")
        if container.get(part) is None:
            container[part] = {}
        container = container[part]
    if not isinstance(container, dict):
        raise ValueError("the parent of the field is not a mapping")
    key = parts[-1]
    current = container.get(key)

    if op.op == "set":
        if op.value is None:
            raise ValueError("set needs a value (use remove to clear a field)")
        if current == op.value:
            return "merged"
        container[key] = op.value
        return "replaced" if current not in (None, [], {}, "") else "changed"

    if op.op == "append":
        if op.value is None:
            raise ValueError("append needs a value")
        items = [] if current is None else current
        if not isinstance(items, list):
            raise ValueError(f"'{op.path}' is not a list; use set")
        effect = "changed"
        if op.replaces is not None:
            # a newer fact contradicting an older one: the old goes (history keeps it)
            kept = [i for i in items if _norm(i) != _norm(op.replaces)]
            if len(kept) != len(items):
                effect = "replaced"
            items = kept
        if any(_norm(i) == _norm(op.value) for i in items):
            container[key] = items
            return "merged" if effect == "changed" else effect
        container[key] = [*items, op.value]
        return effect

    if op.op == "remove":
        if isinstance(current, list) and op.value is not None:
            kept = [i for i in current if _norm(i) != _norm(op.value)]
            if len(kept) == len(current):
                raise ValueError("no such item to remove")
            container[key] = kept
            return "changed"
        if current in (None, [], {}, ""):
            raise ValueError("the field is already empty")
        if op.value is not None and _norm(current) != _norm(op.value):
            raise ValueError(f"the field holds {current!r}, not {op.value!r}")
        container[key] = [] if isinstance(current, list) else None
        return "changed"

    # merge: mappings key by key, lists as a union without duplicates
    if isinstance(op.value, dict):
        base = {} if current is None else current
        if not isinstance(base, dict):
            raise ValueError(f"'{op.path}' is not a mapping")
        merged = {**base, **op.value}
        if merged == base:
            return "merged"
        container[key] = merged
        return "changed"
    if isinstance(op.value, list):
        base_list = [] if current is None else current
        if not isinstance(base_list, list):
            raise ValueError(f"'{op.path}' is not a list")
        seen = {_norm(i) for i in base_list}
        extra = [v for v in op.value if _norm(v) not in seen]
        if not extra:
            return "merged"
        container[key] = [*base_list, *extra]
        return "changed"
    raise ValueError("merge needs a mapping or a list")


def apply_operations(
    persona: Persona,
    operations: list[Operation],
    *,
    turn_ids: set[str],
    min_confidence: float = 0.6,
    limits: PersonaLimits = DEFAULT_LIMITS,
    withheld_turns: set[str] | frozenset[str] = frozenset(),
    evidence_texts: Mapping[str, str] | None = None,
) -> OptimizerResult:
    """Apply every operation that passes the checks, one at a time, to a copy.

    ``withheld_turns`` are turns the guard read as instructions to the assistant: nothing
    citing one is learned, whatever words the reflection chose for it. ``evidence_texts``
    maps an evidence id to the user's own words in it (a turn's message, a feedback
    comment): an operation whose value turns around what they say is refused
    (:func:`polarity_problem`); without them that check is skipped.
    """
    # the compact form, as the store saves and measures it: the document cap must not
    # count the empty defaults a full dump carries
    data = persona.to_dict()
    applied: list[AppliedOperation] = []
    refused: list[RefusedOperation] = []
    for op in operations:
        if _split_path(op.path) is None:
            refused.append(RefusedOperation(operation=op, reason="malformed path"))
            continue
        if not _writable(op.path):
            refused.append(RefusedOperation(operation=op, reason="path not writable by reflection"))
            continue
        if op.confidence < min_confidence:
            refused.append(
                RefusedOperation(operation=op, reason=f"confidence below {min_confidence}")
            )
            continue
        if not op.evidence or not set(op.evidence) <= turn_ids:
            refused.append(
                RefusedOperation(operation=op, reason="evidence must cite this reflection's turns")
            )
            continue
        if set(op.evidence) & withheld_turns:
            refused.append(RefusedOperation(operation=op, reason=f"guard: {EVIDENCE_WITHHELD}"))
            continue
        # the path's keys are rendered into the prompt as labels, so the guard reads them too
        reason = (
            find_instruction(op.path.split("."))
            or find_instruction(op.value)
            or find_instruction(op.replaces)
        )
        if reason:
            refused.append(RefusedOperation(operation=op, reason=f"guard: {reason}"))
            continue
        problem = polarity_problem(op, evidence_texts) if evidence_texts else None
        if problem:
            refused.append(RefusedOperation(operation=op, reason=problem))
            continue
        trial = copy.deepcopy(data)
        try:
            effect = _apply_one(trial, op)
            parse_persona(trial, source="reflection", limits=limits)
        except (ValueError, PersonaValidationError) as exc:
            message = exc.problem if isinstance(exc, PersonaValidationError) else str(exc)
            refused.append(RefusedOperation(operation=op, reason=f"invalid: {message}"))
            continue
        data = trial
        applied.append(AppliedOperation(operation=op, effect=effect))  # type: ignore[arg-type]
    return OptimizerResult(persona=Persona.model_validate(data), applied=applied, refused=refused)
