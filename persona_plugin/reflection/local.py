"""Reflection on the embedded local model: the reflection adapter + schema-bounded decoding.

Zero-shot, SmolLM2-135M cannot produce the reflection's structured answer. With the
project's reflection adapter (``persona-reflection``, trained by
``python -m persona_plugin.lab.training.reflection`` and shipped in ``persona_plugin/assets``)
and decoding constrained to :data:`COMPACT_SCHEMA`, it writes, per user turn, a compact
answer (third-person facts + persona edits on a fixed list of paths) that always parses.
:class:`LocalReflector` maps it onto the project's typed
:class:`~persona_plugin.reflection.ReflectionOutput`, so
:func:`~persona_plugin.reflection.reflect_and_save`, the optimizer and the guard apply it
exactly as they apply any other model's.

Decisions: one call per user turn (the adapter is trained on single turns; a batch of
turns becomes one call each, their answers merged); the assistant's reply is not shown
(the facts are about the user); feedback on a reply is one more call, on the feedback
worded as a message (:func:`feedback_message`) for a feedback adapter, whose preference
edits may come from the closed :data:`FEEDBACK_OPS` (none ships yet: without one in the
hub, feedback is not read by the local model); a turn the guard
reads as instructions to the assistant is not sent at all, and any fact or value the guard
refuses is dropped here, so it reaches neither the persona, the memory nor the version
history. The local model does not judge
the reply, so the language loss carries the facts as ``revealed`` and a neutral score.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from persona_plugin.config import ASSETS_DIR
from persona_plugin.guard import find_instruction, instruction_reason
from persona_plugin.persona import DEFAULT_LIMITS, Persona, PersonaLimits
from persona_plugin.reflection.optimizer import Operation
from persona_plugin.reflection.types import (
    FeedbackNote,
    Gradient,
    LanguageLoss,
    MemoryFact,
    ReflectionCall,
    ReflectionOutput,
    ReflectionTurn,
)

log = logging.getLogger(__name__)


#: the instruction the reflection adapter is trained with (short: every token costs on CPU)
SYSTEM = "Extract what the message says about its speaker. Answer in JSON."

#: persona paths the compact answer may name; list fields get "append", the rest "set"
OP_PATHS: dict[str, Literal["set", "append"]] = {
    "identity.name": "set",
    "identity.occupation": "set",
    "demographics.age": "set",
    "demographics.gender": "set",
    "demographics.location": "set",
    "demographics.nationality": "set",
    "demographics.native_language": "set",
    "personality.mbti": "set",
    "personality.interests": "append",
    "personality.values": "append",
    "pattern.items": "append",
    "preference.style": "append",
    "preference.content": "append",
    "preference.format": "append",
    "memory.feedback": "append",
}

#: bounds of the compact answer (also the decoding schema's)
MAX_FACTS = 4
MAX_FACT_CHARS = 160
MAX_OPS = 3
MAX_VALUE_CHARS = 60


#: how a feedback event reaches the adapter: a message of this form (see
#: :func:`feedback_message`)
FEEDBACK_PREFIX = "Feedback on the last reply:"
#: the edits a feedback message may make without the user's own words for them: a closed
#: vocabulary. The adapter maps a complaint ("too long") onto one of these; any other value
#: must appear in the message, as for any turn
FEEDBACK_OPS: frozenset[tuple[str, str]] = frozenset(
    {
        ("preference.style", "concise"),
        ("preference.style", "detailed"),
        ("preference.style", "casual"),
        ("preference.style", "formal"),
        ("preference.style", "plain language"),
        ("preference.format", "bullet points"),
    }
)


def feedback_message(note: FeedbackNote) -> str | None:
    """A feedback event as a message for the reflection adapter, or None when it says
    nothing the local model can learn from (a bare rating, a choice, an edit of about the
    reply's length without a comment). The comment is the user's own words; an edit's
    length is measured by code and said plainly."""
    comment = " ".join((note.comment or "").split())
    if note.kind == "edit":
        if note.length_change:
            head = f"rewritten much {note.length_change}."
        elif comment:
            head = "rewritten."
        else:
            return None
        return f"{FEEDBACK_PREFIX} {head} {comment}".strip()
    if not comment:
        return None
    if note.kind == "rating":
        return f"{FEEDBACK_PREFIX} {'good' if note.rating == 1 else 'bad'}. {comment}"
    if note.kind == "regenerate":
        return f"{FEEDBACK_PREFIX} asked again. {comment}"
    return None


def prompt_messages(speaker: str, text: str) -> list[dict[str, str]]:
    """The chat the reflection adapter answers: who speaks, and what they said."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Speaker: {speaker}\nMessage: {text}"},
    ]


def compact_json(facts: Sequence[str], ops: Sequence[tuple[str, str]]) -> str:
    """The compact answer as the adapter is trained to write it."""
    return json.dumps(
        {"facts": list(facts), "ops": [{"path": p, "value": v} for p, v in ops]},
        ensure_ascii=False,
    )


ADAPTER_ID = "persona-reflection"
#: the adapter that reads feedback messages (trained on them alone, so that learning them
#: costs the turn adapter nothing). None ships yet: the candidates trained so far turned
#: even "thanks" into a style edit. Without it, the local reflector does not read feedback
#: (the turn adapter misreads it: "too long" -> format "long")
FEEDBACK_ADAPTER_ID = "persona-feedback"
#: the hub folder that ships with the package: the reflection adapter's card and weights
BUNDLED_HUB = ASSETS_DIR / "lora"
#: the language loss's score: the local model extracts facts, it does not judge replies
NEUTRAL_SCORE = 0.5
#: edits whose value the user states in their own words ("I live in Porto" -> "Porto"): a
#: value the turn does not contain is the small model's invention, not the user's
GROUNDED_PATHS = frozenset(OP_PATHS) - {"pattern.items", "memory.feedback"}

COMPACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "facts": {
            "type": "array",
            "items": {"type": "string", "maxLength": MAX_FACT_CHARS},
            "maxItems": MAX_FACTS,
        },
        "ops": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "enum": list(OP_PATHS)},
                    "value": {"type": "string", "maxLength": MAX_VALUE_CHARS},
                },
                "required": ["path", "value"],
                "additionalProperties": False,
            },
            "maxItems": MAX_OPS,
        },
    },
    "required": ["facts", "ops"],
    "additionalProperties": False,
}


class Gate(Protocol):
    """Decides, before any LLM call, whether a turn may teach anything."""

    def should_reflect(self, text: str) -> bool: ...


@dataclass
class Extraction:
    """What one constrained call read from one turn."""

    facts: list[str] = field(default_factory=list)
    ops: list[tuple[str, str]] = field(default_factory=list)
    valid: bool = True
    called: bool = True
    text: str = ""
    #: the turn it was read from (edits must be grounded in it)
    turn_text: str = ""
    #: what its facts and edits cite (default: the turn's id)
    evidence: list[str] = field(default_factory=list)
    #: read from a feedback message: preference edits only from :data:`FEEDBACK_OPS`
    feedback: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)


def parse_compact(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Facts and (path, value) edits of a compact answer; ValueError if it does not fit."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    facts = data.get("facts", [])
    ops = data.get("ops", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
        raise ValueError("'facts' is not a list of strings")
    if not isinstance(ops, list):
        raise ValueError("'ops' is not a list")
    pairs = []
    for op in ops:
        if not isinstance(op, dict) or op.get("path") not in OP_PATHS:
            raise ValueError(f"an op names no known path: {op!r}")
        if not isinstance(op.get("value"), str):
            raise ValueError(f"an op's value is not a string: {op!r}")
        pairs.append((op["path"], _clean(op["value"])))
    return [_clean(f) for f in facts], pairs


_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _value(path: str, raw: str, turn_id: str) -> Any:
    """The persona value for a compact edit (None: not a usable value for that path)."""
    if path == "demographics.age":
        return int(raw) if raw.isdigit() and 0 < int(raw) <= 150 else None
    if path == "personality.mbti":
        return raw.upper()
    if path == "pattern.items":
        return {"description": raw, "evidence": [turn_id]}
    if path == "memory.feedback":
        return {"text": raw, "turn_id": turn_id}
    return raw


def to_reflection_output(
    extractions: Sequence[tuple[str, Extraction]], *, confidence: float = 0.8
) -> tuple[ReflectionOutput, list[str]]:
    """The typed reflection output of per-turn extractions, and what the guard dropped.

    Facts become memories, edits become operations (``append`` on list fields, ``set``
    elsewhere) citing their turn (or the extraction's ``evidence``), with ``confidence``.
    An edit on a :data:`GROUNDED_PATHS` path whose value the turn does not contain is
    skipped, except, from feedback, one of :data:`FEEDBACK_OPS` (what a complaint asks for).
    Anything that reads as an instruction to the assistant is dropped, never passed on.
    """
    revealed: list[str] = []
    memories: list[MemoryFact] = []
    operations: list[Operation] = []
    gradients: list[Gradient] = []
    dropped: list[str] = []
    seen: set[str] = set()
    for turn_id, extraction in extractions:
        cite = extraction.evidence or [turn_id]
        for raw in extraction.facts:
            fact = _clean(raw)
            if not fact or fact.casefold() in seen:
                continue
            if instruction_reason(fact):
                dropped.append(fact)
                continue
            seen.add(fact.casefold())
            revealed.append(fact)
            memories.append(MemoryFact(text=fact, evidence=cite))
        for path, raw in extraction.ops:
            text = _clean(raw)
            value = _value(path, text, turn_id) if text else None
            source = extraction.turn_text.casefold()
            if extraction.feedback and (path, text.casefold()) in FEEDBACK_OPS:
                # "too long" -> concise: a complaint names what the user wants by its opposite
                value = text.casefold()
            elif value is None or (
                source and path in GROUNDED_PATHS and text.casefold() not in source
            ):
                continue
            if find_instruction(value):
                dropped.append(text)
                continue
            kind = OP_PATHS[path]
            operations.append(
                Operation(op=kind, path=path, value=value, confidence=confidence, evidence=cite)
            )
            said = "feedback " + cite[0] if extraction.feedback else "turn " + turn_id
            gradients.append(
                Gradient(
                    field=path,
                    suggestion=f"{kind} {text!r}",
                    reason=f"stated by the user in {said}",
                    evidence=cite,
                )
            )
    output = ReflectionOutput(
        loss=LanguageLoss(revealed=revealed[:10], missed=[], score=NEUTRAL_SCORE),
        gradients=gradients[:12],
        operations=operations[:12],
        memories=memories[:8],
    )
    return output, dropped


def bundled_backend() -> Any:
    """A LocalBackend that serves the bundled hub (the reflection adapter)."""
    from persona_plugin.backends.local import LocalBackend
    from persona_plugin.lora.hub import LoraHub

    return LocalBackend(lora_hub=LoraHub(BUNDLED_HUB))


class LocalReflector:
    """The reflection call on the local model; same interface as
    :class:`~persona_plugin.reflection.Reflector` (``call(persona, turns)``).

    ``backend``: a :class:`~persona_plugin.backends.local.LocalBackend` that knows
    ``adapter`` (a hub card id; default: a backend on the bundled hub). ``adapter=None``
    runs the bare model (for comparison). ``gate``: an optional cost gate
    (:class:`~persona_plugin.reflection.gate.ReflectionGate`) that skips turns with
    nothing to learn before any call.
    """

    def __init__(
        self,
        backend: Any = None,
        *,
        adapter: str | None = ADAPTER_ID,
        feedback_adapter: str | None = FEEDBACK_ADAPTER_ID,
        gate: Gate | None = None,
        confidence: float = 0.8,
        min_confidence: float = 0.6,
        limits: PersonaLimits = DEFAULT_LIMITS,
    ) -> None:
        self.backend = backend if backend is not None else bundled_backend()
        self.adapter = adapter
        hub = getattr(self.backend, "lora_hub", None)
        known = feedback_adapter and adapter and hub is not None and feedback_adapter in hub
        #: None: feedback is not read (no feedback adapter in the hub)
        self.feedback_adapter = feedback_adapter if known else None
        self.gate = gate
        self.confidence = confidence
        self.min_confidence = min_confidence
        self.limits = limits

    def extract(self, speaker: str, text: str, *, feedback: bool = False) -> Extraction:
        """One constrained call on one turn, or on one feedback message with the feedback
        adapter (none for a turn the guard or gate skips)."""
        from persona_plugin.reflection.constrained import generate_json

        if instruction_reason(text) or (
            not feedback and self.gate is not None and not self.gate.should_reflect(text)
        ):
            return Extraction(called=False)
        adapter = self.feedback_adapter if feedback else self.adapter
        adapters = [(adapter, 1.0)] if adapter else []
        with self.backend.serving(adapters):
            result = generate_json(
                self.backend.model,
                self.backend.tokenizer,
                prompt_messages(speaker, text),
                COMPACT_SCHEMA,
            )
        extraction = Extraction(
            text=result.text,
            turn_text=text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            seconds=result.seconds,
        )
        try:
            extraction.facts, extraction.ops = parse_compact(result.text)
        except ValueError as exc:  # never expected under the schema; counted if it happens
            extraction.valid = False
            log.warning("local reflection answer did not parse (%s): %r", exc, result.text[:200])
        return extraction

    def call(self, persona: Persona, turns: Sequence[ReflectionTurn]) -> ReflectionCall:
        speaker = persona.identity.name or "the user"
        result = ReflectionCall(output=None)
        extractions = []
        for turn in turns:
            # a turn reflected on before is here for its feedback: its facts are known
            reads = [] if turn.reflected else [(turn.user, [turn.turn_id], False)]
            for note in turn.feedback if self.feedback_adapter else ():
                message = feedback_message(note)
                if message:
                    reads.append((message, [note.id, turn.turn_id], True))
            for text, cite, from_feedback in reads:
                extraction = self.extract(speaker, text, feedback=from_feedback)
                extraction.evidence, extraction.feedback = cite, from_feedback
                extractions.append((turn.turn_id, extraction))
        for _turn_id, extraction in extractions:
            if extraction.called:
                result.attempts += 1
                usage = result.token_usage
                usage["input_tokens"] = usage.get("input_tokens", 0) + extraction.prompt_tokens
                usage["output_tokens"] = (
                    usage.get("output_tokens", 0) + extraction.completion_tokens
                )
                usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            if not extraction.valid:
                result.error = "the local model's answer did not parse"
        kept = [(turn_id, e) for turn_id, e in extractions if e.valid]
        output, dropped = to_reflection_output(kept, confidence=self.confidence)
        if dropped:
            log.info("local reflection dropped %d instruction-like item(s)", len(dropped))
        result.output = output
        return result
