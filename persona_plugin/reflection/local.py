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
(the facts are about the user); a turn the guard reads as instructions to the assistant is
not sent at all, and any fact or value the guard refuses is dropped here, so it reaches
neither the persona, the memory nor the version history. The local model does not judge
the reply, so the language loss carries the facts as ``revealed`` and a neutral score.

Feedback on a reply (:meth:`LocalReflector.read_feedback`) is read without the reflection
adapter's help where it can be:

* what it asks of the next replies, by the
  :class:`~persona_plugin.reflection.feedback_reader.FeedbackReader` (no LLM call): a
  comment, or an edit much shorter or longer than the reply, becomes one edit of the closed
  :data:`FEEDBACK_OPS` ("too long" -> ``preference.style`` concise; it replaces its
  opposite, detailed, if the persona holds it). Style and format edits from feedback come
  from the reader alone: the turn adapter reads "too long" as format "long", and a LoRA
  adapter trained on feedback (tried before the reader) reached a held-out op recall of
  0.35 to 0.52 and turned "thanks" or "nope" into a style edit.
* a comment that tells something about the user ("wrong, I moved to Porto") and that the
  reader read no edit from: when the reflection gate is confident it discloses
  (:data:`COMMENT_GATE_THRESHOLD`), one adapter call on it, as on a turn of the user's.
* an edit of about the reply's length (a correction): one adapter call on the edited
  reply; only memory facts are kept, and only those naming a word the edit added to the
  reply ("Ana lives in Porto." from "... you live in Porto ..." where the reply said
  Lisbon). No persona edit is made from it: the edited reply is written to the user, in
  the assistant's voice, and what it says of the user is the model's reading, not the
  user's statement.

Everything read from feedback cites the event and its turn (``[fb<n>, t<n>]``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from persona_plugin.config import ASSETS_DIR
from persona_plugin.guard import WITHHELD, find_instruction, instruction_reason
from persona_plugin.persona import DEFAULT_LIMITS, Persona, PersonaLimits
from persona_plugin.reflection.feedback_reader import (
    FEEDBACK_OPS,
    FEEDBACK_PATHS,
    OPPOSITES,
    FeedbackReader,
)
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
#: a feedback comment goes to the adapter only when the reflection gate gives it at least
#: this probability of telling something about the user (the gate's own threshold, 0.3,
#: leans toward sending; at 0.5 it sends the corrections among the project's feedback
#: examples and few of the "meh", "helpful" the adapter would make facts of)
COMMENT_GATE_THRESHOLD = 0.5
#: paths the reader alone writes from feedback
_READER_PATHS = frozenset(FEEDBACK_PATHS.values())
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
    #: read from feedback: its :data:`FEEDBACK_OPS` edits need no grounding in the text
    feedback: bool = False
    #: why its edits are made, when not "stated by the user" (a reader's reading)
    reason: str = ""
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
    skipped, except, from feedback, one of :data:`FEEDBACK_OPS` (what a complaint asks for;
    it replaces its opposite, ``concise`` replacing ``detailed``).
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
            replaces = None
            if extraction.feedback and (path, text.casefold()) in FEEDBACK_OPS:
                # "too long" -> concise: a complaint names what the user wants by its opposite
                value = text.casefold()
                replaces = OPPOSITES.get(value)
            elif value is None or (
                source and path in GROUNDED_PATHS and text.casefold() not in source
            ):
                continue
            if find_instruction(value):
                dropped.append(text)
                continue
            kind = OP_PATHS[path]
            operations.append(
                Operation(
                    op=kind,
                    path=path,
                    value=value,
                    replaces=replaces if kind == "append" else None,
                    confidence=confidence,
                    evidence=cite,
                )
            )
            said = "feedback " + cite[0] if extraction.feedback else "turn " + turn_id
            gradients.append(
                Gradient(
                    field=path,
                    suggestion=f"{kind} {text!r}",
                    reason=(extraction.reason or f"stated by the user in {said}")[:500],
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
    nothing to learn before any call. ``feedback_reader``: what reads feedback (default:
    the bundled :class:`~persona_plugin.reflection.feedback_reader.FeedbackReader`, loaded
    on the first feedback; None: feedback is not read). ``comment_gate``: what decides
    whether a feedback comment tells something about the user (default: the bundled
    reflection gate at :data:`COMMENT_GATE_THRESHOLD`, on the reader's embedder).
    """

    def __init__(
        self,
        backend: Any = None,
        *,
        adapter: str | None = ADAPTER_ID,
        gate: Gate | None = None,
        feedback_reader: FeedbackReader | Literal["bundled"] | None = "bundled",
        comment_gate: Gate | None = None,
        confidence: float = 0.8,
        min_confidence: float = 0.6,
        limits: PersonaLimits = DEFAULT_LIMITS,
    ) -> None:
        self.backend = backend if backend is not None else bundled_backend()
        self.adapter = adapter
        self.gate = gate
        self._reader = feedback_reader
        self._comment_gate = comment_gate
        self.confidence = confidence
        self.min_confidence = min_confidence
        self.limits = limits

    @property
    def feedback_reader(self) -> FeedbackReader | None:
        if self._reader == "bundled":
            self._reader = FeedbackReader.load()
        return self._reader

    @property
    def comment_gate(self) -> Gate:
        if self._comment_gate is None:
            from persona_plugin.reflection.gate import ReflectionGate

            reader = self.feedback_reader
            self._comment_gate = ReflectionGate.load(
                threshold=COMMENT_GATE_THRESHOLD,
                embedder=reader.embedder if reader is not None else None,
            )
        return self._comment_gate

    def extract(self, speaker: str, text: str) -> Extraction:
        """One constrained call on one turn (none for a turn the guard or gate skips)."""
        from persona_plugin.reflection.constrained import generate_json

        if instruction_reason(text) or (
            self.gate is not None and not self.gate.should_reflect(text)
        ):
            return Extraction(called=False)
        adapters = [(self.adapter, 1.0)] if self.adapter else []
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

    def read_feedback(
        self, speaker: str, turn: ReflectionTurn, note: FeedbackNote
    ) -> list[Extraction]:
        """What one feedback event on ``turn`` teaches (see the module's docstring): the
        reader's edit, if any; facts a comment tells; facts an edit of about the reply's
        length corrects. Each cites the event and the turn."""
        reader = self.feedback_reader
        if reader is None:
            return []
        cite = [note.id, turn.turn_id]
        out: list[Extraction] = []
        reading = reader.read(note)
        if reading is not None:
            out.append(
                Extraction(
                    ops=[(reading.path, reading.value)],
                    called=False,
                    turn_text=reading.read_from,
                    reason=(
                        f"feedback {note.id} on turn {turn.turn_id} asks for it: "
                        f"{reading.read_from!r} (feedback reader, p={reading.probability:.2f})"
                    ),
                )
            )
        comment = _clean(note.comment or "")
        if (
            comment
            and _usable(comment)
            and (reading is None or reading.source != "comment")
            and self.comment_gate.should_reflect(comment)
        ):
            told = self.extract(speaker, comment)
            told.ops = [op for op in told.ops if op[0] not in _READER_PATHS]
            out.append(told)
        if note.kind == "edit" and note.text and _usable(note.text) and not note.length_change:
            corrected = self.extract(speaker, note.text)
            added = _words(note.text) - _words(turn.assistant)
            corrected.facts = [f for f in corrected.facts if _words(f) & added]
            corrected.ops = []
            out.append(corrected)
        for extraction in out:
            extraction.evidence, extraction.feedback = cite, True
        return out

    def call(self, persona: Persona, turns: Sequence[ReflectionTurn]) -> ReflectionCall:
        speaker = persona.identity.name or "the user"
        result = ReflectionCall(output=None)
        extractions = []
        for turn in turns:
            # a turn reflected on before is here for its feedback: its facts are known
            if not turn.reflected:
                extraction = self.extract(speaker, turn.user)
                extraction.evidence = [turn.turn_id]
                extractions.append((turn.turn_id, extraction))
            for note in turn.feedback:
                extractions.extend(
                    (turn.turn_id, e) for e in self.read_feedback(speaker, turn, note)
                )
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


_WORD = re.compile(r"\w{3,}")


def _words(text: str) -> set[str]:
    """The words of three letters or more, case folded: what an edit added is measured on."""
    return set(_WORD.findall(text.casefold()))


def _usable(text: str) -> bool:
    """Not withheld by the reflection (:data:`~persona_plugin.guard.WITHHELD`) and not
    instructions to the assistant."""
    return text != WITHHELD and not instruction_reason(text)
