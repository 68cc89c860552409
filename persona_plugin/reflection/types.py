"""The data of reflection: what the reflection call returns, and what a reflection did.

One call returns a :class:`ReflectionOutput`: the **language loss** (:class:`LanguageLoss`:
what the turn reveals, where the reply missed, a score), the **language gradients**
(:class:`Gradient`: per persona field, what should change and why, citing turn ids), the same
changes in typed form as :class:`~persona_plugin.reflection.optimizer.Operation`, and each
:class:`MemoryFact` worth keeping. The lists and texts have size limits, so a runaway answer
fails validation rather than bloat the persona. :class:`ReflectionModel` is what a reflector
must offer: ``call`` on a persona and its :class:`ReflectionTurn` items, which returns a
:class:`ReflectionCall`. That lets the chat-model reflector and the local one be swapped
freely. :class:`ReflectionOutcome` reports what was applied and refused, and
:data:`ReflectionMode` says when reflection runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from persona_plugin.persona import Persona, PersonaLimits
from persona_plugin.reflection.optimizer import (
    AppliedOperation,
    Operation,
    RefusedOperation,
)

log = logging.getLogger(__name__)

ReflectionMode = Literal["inline", "background", "every_n_turns", "off"]


# -- what the reflection model returns ---------------------------------------------------


class LanguageLoss(BaseModel):
    """The judge's verdict on the turn."""

    revealed: list[str] = Field(
        default_factory=list, max_length=10, description="what the turn reveals about the user"
    )
    missed: list[str] = Field(
        default_factory=list, max_length=10, description="where the reply missed their needs"
    )
    score: float = Field(ge=0.0, le=1.0, description="how well the reply served the user, 0-1")


class Gradient(BaseModel):
    """What one persona field should change, and why."""

    field: str = Field(max_length=200, description="persona field path, e.g. preference.style")
    suggestion: str = Field(max_length=500)
    reason: str = Field(max_length=500)
    evidence: list[str] = Field(default_factory=list, max_length=10, description="turn ids")


class MemoryFact(BaseModel):
    """A fact worth keeping in long-term memory."""

    text: str = Field(max_length=500)
    evidence: list[str] = Field(default_factory=list, max_length=10)


class ReflectionOutput(BaseModel):
    """The structured answer of the reflection call."""

    loss: LanguageLoss
    gradients: list[Gradient] = Field(default_factory=list, max_length=12)
    operations: list[Operation] = Field(default_factory=list, max_length=12)
    memories: list[MemoryFact] = Field(default_factory=list, max_length=8)


#: an edit at most this share of the reply's length is "much shorter" (at least its
#: inverse, "much longer"): what the reflection is told, and what the local model reads
MUCH_SHORTER = 0.6


@dataclass
class FeedbackNote:
    """What the user said of a reply, as the reflection is shown it.

    ``id`` is the event's evidence id (``fb<n>``: an operation citing it cites the
    feedback). ``observation`` is what plain code can tell of the event without judging it
    (e.g. how much shorter an edit is than the reply), so a small reflection model need
    not count words.
    """

    id: str
    kind: str
    rating: int | None = None
    comment: str | None = None
    text: str | None = None
    observation: str = ""
    #: an edit's length against the reply's (words), when both are known
    length_ratio: float | None = None

    @property
    def length_change(self) -> Literal["shorter", "longer"] | None:
        """Whether an edit is much shorter or much longer than the reply, if either."""
        if self.length_ratio is None:
            return None
        if self.length_ratio <= MUCH_SHORTER:
            return "shorter"
        return "longer" if self.length_ratio >= 1 / MUCH_SHORTER else None

    def render(self) -> str:
        said = []
        if self.kind == "rating":
            said.append("rated the reply good (+1)" if self.rating == 1 else "rated it bad (-1)")
        elif self.kind == "edit":
            said.append(f"rewrote the reply as: {json.dumps(self.text, ensure_ascii=False)}")
        elif self.kind == "regenerate":
            said.append("asked for another answer instead of this one")
        elif self.kind == "choice":
            said.append(f"preferred this answer: {json.dumps(self.text, ensure_ascii=False)}")
        if self.comment:
            said.append(f"comment: {json.dumps(self.comment, ensure_ascii=False)}")
        line = "; ".join(said)
        return f"{line} ({self.observation})" if self.observation else line


@dataclass
class ReflectionTurn:
    """One exchange to reflect on, with the feedback on its reply (if any). ``reflected``:
    the turn was reflected on before and is shown again for the feedback on it."""

    turn_id: str
    user: str
    assistant: str
    feedback: list[FeedbackNote] = field(default_factory=list)
    reflected: bool = False

    @property
    def evidence_ids(self) -> set[str]:
        """What an operation learned from this turn may cite: the turn, its feedback."""
        return {self.turn_id, *(note.id for note in self.feedback)}


# -- the reflection call -----------------------------------------------------------------


@dataclass
class ReflectionCall:
    """What one reflection call produced (``output`` is None if it failed)."""

    output: ReflectionOutput | None
    token_usage: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None


def add_usage(total: dict[str, int], message: Any) -> None:
    usage = getattr(message, "usage_metadata", None) or {}
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        if isinstance(usage.get(key), int):
            total[key] = total.get(key, 0) + usage[key]


class ReflectionModel(Protocol):
    """What :func:`reflect_and_save` needs of a reflector: :class:`Reflector` on any chat
    model, or :class:`~persona_plugin.reflection.local.LocalReflector` on the local one."""

    min_confidence: float
    limits: PersonaLimits

    def call(self, persona: Persona, turns: Sequence[ReflectionTurn]) -> ReflectionCall: ...


# -- applying a reflection ---------------------------------------------------------------


class ReflectionOutcome(BaseModel):
    """What a reflection did: the loss, the gradients, what was applied and refused."""

    user_id: str
    turn_ids: list[str]
    #: the feedback events reflected on with the turns (``fb<n>``)
    feedback_ids: list[str] = Field(default_factory=list)
    loss: LanguageLoss | None = None
    gradients: list[Gradient] = Field(default_factory=list)
    applied: list[AppliedOperation] = Field(default_factory=list)
    refused: list[RefusedOperation] = Field(default_factory=list)
    memories: list[str] = Field(default_factory=list)
    refused_memories: list[str] = Field(default_factory=list)
    #: the persona's version after the reflection: a new one when ``saved``
    version: int | None = None
    #: whether the reflection wrote a version (it does only when something changed)
    saved: bool = False
    token_usage: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
