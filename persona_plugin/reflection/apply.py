"""Applying a reflection: one reflection call, saved as one new persona version.

:func:`reflect_and_save` asks the reflector about the persona as it is now. It then applies
the operations with :func:`~persona_plugin.reflection.optimizer.apply_operations` inside
:meth:`~persona_plugin.store.PersonaStore.update`, so a concurrent save costs a retry, not a
lost update. The new version's source is ``reflection turn <id>``, and its details keep the
loss, the gradients, and what was applied and refused. The optimizer reads each edit
against the user's own words in the turns it cites (:func:`user_words`), so a dislike is
not stored as a like. Memory facts pass the same checks as
operations (the instruction guard, evidence citing this reflection's turns) before they reach
long-term memory. Feedback on a turn (a rating, an edit, a regenerate, a choice) is shown
with it and may be cited as evidence (``fb<n>``): a complaint becomes a preference edit
through the same optimizer and guard. A user message or feedback text that reads as
instructions to the assistant is shown as :data:`WITHHELD`, and nothing citing it is
learned. A failed reflection changes nothing and is reported in ``error``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from persona_plugin.guard import WITHHELD, instruction_reason
from persona_plugin.persona import Persona
from persona_plugin.reflection.optimizer import (
    EVIDENCE_WITHHELD,
    apply_operations,
)
from persona_plugin.reflection.types import (
    MemoryFact,
    ReflectionModel,
    ReflectionOutcome,
    ReflectionTurn,
)
from persona_plugin.store import PersonaStore, VersionRecord, WriteHook

log = logging.getLogger(__name__)


def _shown(turns: Sequence[ReflectionTurn]) -> tuple[list[ReflectionTurn], set[str]]:
    """The turns as the reflection may see them, and the evidence ids withheld: a user
    message or a feedback text that reads as instructions to the assistant is replaced by
    :data:`WITHHELD` (it cannot steer the reflection), and nothing citing it is learned,
    however the reflection words it."""
    shown, withheld = [], set()
    for turn in turns:
        # (a logged turn the guard read already holds the marker, not the text)
        if turn.user == WITHHELD or instruction_reason(turn.user):
            withheld |= turn.evidence_ids
            shown.append(ReflectionTurn(turn.turn_id, WITHHELD, WITHHELD, reflected=turn.reflected))
            continue
        notes = []
        for note in turn.feedback:
            if any(instruction_reason(t) for t in (note.comment, note.text) if t):
                withheld.add(note.id)
                note = replace(
                    note,
                    comment=WITHHELD if note.comment else None,
                    text=WITHHELD if note.text else None,
                    observation="",
                )
            notes.append(note)
        shown.append(replace(turn, feedback=notes))
    return shown, withheld


def user_words(turns: Sequence[ReflectionTurn]) -> dict[str, str]:
    """Each evidence id's words of the user: a turn's message, a feedback's comment (what
    the optimizer reads an edit's polarity against; the assistant's words are not the
    user's, nor is an edited reply)."""
    said = {t.turn_id: t.user for t in turns if t.user != WITHHELD}
    for turn in turns:
        said |= {n.id: n.comment for n in turn.feedback if n.comment and n.comment != WITHHELD}
    return said


def reflect_and_save(
    *,
    store: PersonaStore,
    reflector: ReflectionModel,
    user_id: str,
    turns: Sequence[ReflectionTurn],
    memory: Any = None,
    memory_link: Any = None,
    connection: Any = None,
    also: WriteHook | None = None,
    source: str = "reflection",
) -> ReflectionOutcome:
    """Reflect on ``turns`` (and the feedback on them) and save the result as one new
    persona version (its source: ``"<source> turn <last turn id>"``).

    The reflection call sees the persona as it is now; the operations are re-applied
    inside :meth:`PersonaStore.update`, so a concurrent save costs a retry, not a lost
    update. A failed reflection changes nothing and is reported in ``error``.
    ``also(conn, version)`` runs in the transaction that writes the version (or, when
    nothing changed, in one of its own), and ``connection`` is the caller's open
    transaction to write in: what the reflection worker uses to mark its queued work
    reflected together with the version. Facts for long-term memory are written in that
    transaction's hook too, before it commits: a forget waiting for it finds them.
    """
    evidence = set().union(*(t.evidence_ids for t in turns))
    turn_ids = {t.turn_id for t in turns}
    feedback_ids = sorted(evidence - turn_ids)
    last = turns[-1].turn_id
    try:
        persona = store.get(user_id)
    except Exception:
        persona = Persona.new(user_id)
    shown, withheld = _shown(turns)
    said = user_words(shown)
    call = reflector.call(persona, shown)
    outcome = ReflectionOutcome(
        user_id=user_id, turn_ids=sorted(turn_ids), token_usage=call.token_usage
    )
    outcome.feedback_ids = feedback_ids
    if call.output is None:
        outcome.error = call.error
        return outcome
    output = call.output
    outcome.loss, outcome.gradients = output.loss, output.gradients
    results: dict[str, Any] = {}

    # memory facts pass the same checks as operations; refusals go into the version's
    # details with their reason, like refused operations
    accepted: list[MemoryFact] = []
    refused_facts: list[dict[str, str]] = []
    for fact in output.memories:
        reason = instruction_reason(fact.text)
        if reason:
            refused_facts.append({"text": fact.text, "reason": f"guard: {reason}"})
        elif set(fact.evidence) & withheld:
            refused_facts.append({"text": fact.text, "reason": f"guard: {EVIDENCE_WITHHELD}"})
        elif not fact.evidence or not set(fact.evidence) <= evidence:
            refused_facts.append(
                {"text": fact.text, "reason": "evidence must cite this reflection's turns"}
            )
        else:
            accepted.append(fact)

    def update(current: Persona) -> Persona:
        result = apply_operations(
            current,
            output.operations,
            turn_ids=evidence,
            min_confidence=reflector.min_confidence,
            limits=reflector.limits,
            withheld_turns=withheld,
            evidence_texts=said,
        )
        results["last"] = result
        updated = result.persona
        if memory_link is not None and updated.memory.long_term is None:
            updated.memory.long_term = memory_link
        return updated

    def details() -> dict[str, Any]:
        result = results["last"]
        reflection: dict[str, Any] = {"turn_ids": sorted(turn_ids)}
        if feedback_ids:
            reflection["feedback_ids"] = feedback_ids
        reflection |= {
            "loss": output.loss.model_dump(),
            "gradients": [g.model_dump() for g in output.gradients],
            "applied": [a.model_dump() for a in result.applied],
            "refused": [r.model_dump() for r in result.refused],
            "memories": [f.model_dump() for f in accepted],
            "refused_memories": refused_facts,
        }
        return {"token_usage": call.token_usage, "reflection": reflection}

    def written(conn: Any, version: int) -> None:
        if also is not None:
            also(conn, version)
        if memory is not None and accepted:
            by_evidence: dict[tuple[str, ...], list[str]] = {}
            for fact in accepted:
                by_evidence.setdefault(tuple(sorted(fact.evidence)), []).append(fact.text)
            for cited, texts in by_evidence.items():
                memory.add_facts(user_id, texts, kind="fact", source_turn_ids=list(cited))

    source = f"{source} turn {last}"
    if feedback_ids:
        source = f"{source} (feedback {', '.join(feedback_ids)})"
    source = source[:200]
    record: VersionRecord = store.update(
        user_id,
        update,
        source=source,
        reason="; ".join(output.loss.revealed)[:500],
        create_missing=True,
        details=details,
        # a turn that taught nothing leaves the persona's history alone; its token use
        # is logged here (and, once it exists, in the interaction log). Facts for memory
        # keep their version: a rollback finds what to withdraw by the versions' turns
        skip_unchanged=not accepted,
        connection=connection,
        also=written,
    )
    saved = record.version != persona.meta.version
    if not saved:
        log.info(
            "reflection on %s's turns %s changed nothing (tokens %s); no new version",
            user_id,
            sorted(turn_ids),
            call.token_usage,
        )
    result = results["last"]
    outcome.applied, outcome.refused, outcome.version = (
        result.applied,
        result.refused,
        record.version,
    )
    outcome.saved = saved
    outcome.memories = [fact.text for fact in accepted]
    outcome.refused_memories = [fact["text"] for fact in refused_facts]
    return outcome


def roll_back(
    user_id: str, to_version: int, *, store: PersonaStore, memory: Any = None, reason: str = ""
) -> VersionRecord:
    """Restore ``to_version`` of the persona as a new version, and withdraw what the
    rolled-back reflections wrote to long-term memory.

    A rollback says: what was learned after ``to_version`` is not so. The facts those
    reflections stored (found by the turn ids in their versions' details) are marked
    superseded with the rollback, so recall stops offering them, while the dialogue turns
    themselves stay remembered (they happened) and nothing is erased from the audit trail.
    """
    current = store.current_version(user_id)
    store.get(user_id, to_version)  # an unknown version fails here, before anything changes
    turn_ids: set[str] = set()
    for version in range(to_version + 1, current + 1):
        reflection = store.get_version(user_id, version).details.get("reflection") or {}
        turn_ids.update(reflection.get("turn_ids") or [])
    record = store.rollback(user_id, to_version, reason=reason)
    if memory is not None and turn_ids:
        withdrawn = memory.supersede(
            user_id, sorted(turn_ids), note=f"rolled back to version {to_version}"
        )
        log.info("rollback of %s to v%s withdrew %s facts", user_id, to_version, withdrawn)
    return record


@dataclass
class ReflectionJob:
    """One reflection on a user's finished turns, bound to its parts: what the persona
    graph runs inline and hands to :class:`~persona_plugin.reflection.background.
    BackgroundReflector` to run later. A failure is logged and returns None: the reply has
    been produced, and a failed reflection must not take it away."""

    store: PersonaStore
    reflector: ReflectionModel
    memory: Any = None

    def run(
        self,
        user_id: str,
        turns: Sequence[ReflectionTurn],
        *,
        connection: Any = None,
        also: WriteHook | None = None,
    ) -> ReflectionOutcome:
        """Reflect and save; errors are raised (the reflection worker counts them)."""
        return reflect_and_save(
            store=self.store,
            reflector=self.reflector,
            user_id=user_id,
            turns=turns,
            memory=self.memory,
            memory_link=self.memory.link() if self.memory is not None else None,
            connection=connection,
            also=also,
        )

    def __call__(self, user_id: str, turns: list[ReflectionTurn]) -> ReflectionOutcome | None:
        try:
            return self.run(user_id, turns)
        except Exception:
            log.warning("reflection for user %s failed; persona unchanged", user_id, exc_info=True)
            return None
