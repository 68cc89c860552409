"""Fact-extraction benchmark on LoCoMo observations: does reflection find the facts?

Every LoCoMo session carries ``session_N_observation``: per speaker, gold facts with the
turn ids they come from (Maharana et al. 2024; format of ../shared/data/locomo-dev/).
Reflection runs over each session's turns, **one call per turn** (the reflection adapter
is trained on single turns; the speaker is the turn's author), and the facts extracted
from a speaker's turns of a session are matched to that speaker's gold observations of
that session by embedding similarity (all-MiniLM-L6-v2, cosine):

- a gold fact is *found* if some extracted fact is at least ``threshold`` similar to it
  (recall = found / gold);
- an extracted fact is *correct* if some gold fact is at least ``threshold`` similar to it
  (precision = correct / extracted).

:data:`DEFAULT_THRESHOLD` is 0.6: on MiniLM, a third-person paraphrase of the same fact
scores about 0.6-0.85, two facts merely about the same speaker about 0.3-0.5. Figures are
reported at :data:`THRESHOLDS` too, to show how much they depend on it.

The reflection adapter and the bare local model run over the same turns in the same run.
The cost gate, if given, is scored on the adapter's run: a skipped turn contributes no
facts and no call (greedy decoding makes a sent turn's answer the same either way).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persona_plugin.errors import PersonaValidationError
from persona_plugin.lab.eval.locomo import load_conversation

DEFAULT_THRESHOLD = 0.6
_TURN_ID = re.compile(r"D\d+:\d+")
THRESHOLDS = (0.5, 0.6, 0.7)


@dataclass
class FactMatch:
    """How extracted facts meet gold facts at one threshold."""

    gold_found: int
    predicted_correct: int
    gold: int
    predicted: int


def similarity(embedder: Any, gold: Sequence[str], predicted: Sequence[str]) -> np.ndarray:
    """Cosine similarity, one row per gold fact, one column per extracted fact."""
    if not gold or not predicted:
        return np.zeros((len(gold), len(predicted)), dtype=np.float32)
    vectors = embedder.embed([*gold, *predicted])
    return vectors[: len(gold)] @ vectors[len(gold) :].T


def count_matches(sims: np.ndarray, threshold: float) -> FactMatch:
    gold, predicted = sims.shape
    if gold == 0 or predicted == 0:
        return FactMatch(0, 0, gold, predicted)
    hits = sims >= threshold
    return FactMatch(int(hits.any(axis=1).sum()), int(hits.any(axis=0).sum()), gold, predicted)


def match_facts(
    embedder: Any,
    gold: Sequence[str],
    predicted: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> FactMatch:
    """Match extracted facts to gold facts by embedding cosine >= ``threshold``."""
    return count_matches(similarity(embedder, gold, predicted), threshold)


# -- LoCoMo sessions ------------------------------------------------------------------------


@dataclass
class SessionTurn:
    turn_id: str
    speaker: str
    text: str


@dataclass
class Session:
    conversation: str
    number: int
    turns: list[SessionTurn]
    #: speaker -> gold observations
    gold: dict[str, list[str]]


def _cites(item: Any, turn_ids: set[str]) -> bool:
    """An observation ``[fact, evidence]`` whose evidence is among ``turn_ids``."""
    if not isinstance(item, list) or len(item) < 2:
        return False
    return any(e in turn_ids for e in _TURN_ID.findall(json.dumps(item[1])))


def load_sessions(
    path: str | Path, limit: int | None = None, *, turns: int | None = None
) -> list[Session]:
    """The sessions of a LoCoMo file that have turns and observations (the first ``limit``;
    with ``turns``, each session's first ``turns`` turns and the gold facts they cite)."""
    file = Path(path)
    conversation = load_conversation(file)
    data = json.loads(file.read_text("utf-8"))
    by_session: dict[int, list[SessionTurn]] = {}
    for turn in conversation.turns:
        by_session.setdefault(int(turn.session), []).append(
            SessionTurn(turn.turn_id, turn.speaker, turn.text)
        )
    sessions = []
    for number in sorted(by_session):
        observations = data.get(f"session_{number}_observation")
        if not isinstance(observations, dict):
            continue
        kept = by_session[number][:turns] if turns is not None else by_session[number]
        kept_ids = {t.turn_id for t in kept}
        gold = {
            speaker: [
                item[0]
                for item in items
                if isinstance(item, list) and item and isinstance(item[0], str)
                if turns is None or _cites(item, kept_ids)
            ]
            for speaker, items in observations.items()
        }
        sessions.append(Session(conversation.name, number, kept, gold))
        if limit is not None and len(sessions) >= limit:
            break
    if not sessions:
        raise PersonaValidationError(
            str(file),
            "session_N_observation",
            "no session has both turns and observations",
            "Pass a LoCoMo file with session_N and session_N_observation keys.",
        )
    return sessions


# -- the run ---------------------------------------------------------------------------------


@dataclass
class TurnResult:
    facts: list[str]
    called: bool
    valid: bool
    tokens: int
    seconds: float


@dataclass
class Tally:
    """Totals of one configuration over all sessions."""

    turns: int = 0
    sessions: int = 0
    calls: int = 0
    valid: int = 0
    tokens: int = 0
    seconds: float = 0.0
    gold: int = 0
    predicted: int = 0
    found: dict[float, int] = field(default_factory=dict)
    correct: dict[float, int] = field(default_factory=dict)

    def add_session(self, turns: list[TurnResult], sims: dict[str, np.ndarray]) -> None:
        self.sessions += 1
        self.turns += len(turns)
        for result in turns:
            self.calls += result.called
            self.valid += result.called and result.valid
            self.tokens += result.tokens
            self.seconds += result.seconds
        for matrix in sims.values():
            self.gold += matrix.shape[0]
            self.predicted += matrix.shape[1]
            for threshold in THRESHOLDS:
                match = count_matches(matrix, threshold)
                self.found[threshold] = self.found.get(threshold, 0) + match.gold_found
                self.correct[threshold] = self.correct.get(threshold, 0) + match.predicted_correct

    def figures(self) -> dict[str, Any]:
        turns = max(self.turns, 1)
        return {
            "fact_recall": round(self.found.get(DEFAULT_THRESHOLD, 0) / max(self.gold, 1), 3),
            "fact_precision": round(
                self.correct.get(DEFAULT_THRESHOLD, 0) / max(self.predicted, 1), 3
            ),
            "by_threshold": {
                str(t): {
                    "recall": round(self.found.get(t, 0) / max(self.gold, 1), 3),
                    "precision": round(self.correct.get(t, 0) / max(self.predicted, 1), 3),
                }
                for t in THRESHOLDS
            },
            "valid_json": round(self.valid / self.calls, 3) if self.calls else None,
            "turns_sent": round(self.calls / turns, 3),
            "calls_per_turn": round(self.calls / turns, 3),
            "tokens_per_turn": round(self.tokens / turns, 1),
            "seconds_per_session": round(self.seconds / max(self.sessions, 1), 2),
            "facts_extracted": self.predicted,
            "gold_facts": self.gold,
        }


def _session_sims(
    embedder: Any, session: Session, results: Sequence[TurnResult]
) -> dict[str, np.ndarray]:
    extracted: dict[str, list[str]] = {}
    for turn, result in zip(session.turns, results, strict=True):
        extracted.setdefault(turn.speaker, []).extend(result.facts)
    speakers = set(session.gold) | set(extracted)
    return {
        s: similarity(embedder, session.gold.get(s, []), extracted.get(s, [])) for s in speakers
    }


def evaluate(
    files: Sequence[str | Path],
    *,
    sessions: int | None = None,
    turns: int | None = None,
    reflectors: dict[str, Any],
    gate: Any = None,
    gate_of: str = "adapter",
    embedder: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Fact recall, precision and cost of each reflector (label -> LocalReflector).

    ``sessions``: the first N sessions of each file; ``turns``: the first N turns of each
    (and only the gold facts those turns are cited for).

    With ``gate`` (an object with ``should_reflect(text)``), the figures of
    ``"<gate_of>+gate"`` are added: ``gate_of``'s answers on the turns the gate sends.
    """
    from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction

    embedder = embedder or MiniLMEmbeddingFunction()
    loaded = [s for f in files for s in load_sessions(f, sessions, turns=turns)]
    tallies: dict[str, Tally] = {label: Tally() for label in reflectors}
    if gate is not None:
        tallies[f"{gate_of}+gate"] = Tally()
    total = sum(len(s.turns) for s in loaded) * len(reflectors)
    done = 0
    for session in loaded:
        per_label: dict[str, list[TurnResult]] = {}
        for label, reflector in reflectors.items():
            results = []
            for turn in session.turns:
                started = time.monotonic()
                extraction = reflector.extract(turn.speaker, turn.text)
                results.append(
                    TurnResult(
                        facts=extraction.facts if extraction.valid else [],
                        called=extraction.called,
                        valid=extraction.valid,
                        tokens=extraction.prompt_tokens + extraction.completion_tokens,
                        seconds=time.monotonic() - started,
                    )
                )
                done += 1
                if progress is not None:
                    progress(label, done, total)
            per_label[label] = results
            tallies[label].add_session(results, _session_sims(embedder, session, results))
        if gate is not None and gate_of in per_label:
            gated = []
            for turn, result in zip(session.turns, per_label[gate_of], strict=True):
                started = time.monotonic()
                sent = gate.should_reflect(turn.text)
                gate_seconds = time.monotonic() - started
                if sent:
                    gated.append(
                        TurnResult(
                            result.facts,
                            result.called,
                            result.valid,
                            result.tokens,
                            result.seconds + gate_seconds,
                        )
                    )
                else:
                    gated.append(TurnResult([], False, True, 0, gate_seconds))
            tallies[f"{gate_of}+gate"].add_session(gated, _session_sims(embedder, session, gated))
    return {
        "files": [str(f) for f in files],
        "sessions": len(loaded),
        "turns": sum(len(s.turns) for s in loaded),
        "threshold": DEFAULT_THRESHOLD,
        "thresholds": list(THRESHOLDS),
        "mode": "one reflection call per turn; facts matched per speaker and session",
        "results": {label: tally.figures() for label, tally in tallies.items()},
    }
