"""The PrefEval benchmark, explicit preferences: is the stated preference still in front of
the model after N unrelated turns?

PrefEval (Zhao et al., ICLR 2025; format of ../shared/data/prefeval-dev/) states a
preference in the first user turn, inserts N unrelated turns, then asks a question whose
generic answer violates the preference. For each item this runs, on a fresh user with a
real SQLite store and a real embedded Chroma memory in a temporary folder:

1. the history, through :func:`~persona_plugin.history.import_history` (the product's
   import path: the guard, long-term memory, reflection): the preference as the first user
   turn with :data:`NEUTRAL_REPLY`, then the first N distractor turns (N user and N
   assistant messages) of ``filtered_inter_turns.json``, its conversations concatenated in
   order, as PrefEval's ``extract_multi_turn_message`` takes them;
2. the question, as the first message of a new conversation, through the persona graph's
   own ``load_persona``, ``recall`` and ``assemble`` nodes (default recall k and token
   budget): the system prompt the chat model would receive. Nothing is generated.

**Retention** is read off that system prompt: the prompt holds a persona value or a
recalled memory (each counted only if its quoted text is in the prompt, so what the budget
dropped does not count) whose MiniLM cosine to the stated preference is at least 0.8
(:data:`THRESHOLDS`: 0.7 and 0.9 too), and, separately, the preference verbatim. The
no-persona baseline sends the question alone: its retention is 0 by construction.

Reflectors (``reflector``): ``"none"`` imports into memory only (a reflector that proposes
nothing), cheap; ``"local"`` runs the local model with its reflection adapter, with the
cost gate in front (``gate=True``) so that only turns the gate sends cost a call. Either
way the run reports what the gate lets through of the history's user turns, and the
reflection calls and seconds per item.

**Choice accuracy** (``choice=True``, PrefEval's ``mcq_options``: four candidate answers, the
first the one that follows the preference): after the same import and assembly, the options
are shuffled (a fixed ``seed``, per item) and the system picks one with the
persona-conditioned preference scorer (:class:`~persona_plugin.preferences.scorers.PersonaScorer`,
through :class:`~persona_plugin.preferences.mbr.MBRSelector` with the mixture
``{"persona": 1}``), bound to what the system holds for the user at the question: the
persona as loaded, and the user's own messages among the recalled memories that the
assembled prompt shows (what the budget dropped is not held; the assistant's replies are
not the user's words). Reported beside chance (0.25) and, in the same run, an oracle: the
same scorer given the preference verbatim as the user's only statement. An item whose
scores are all equal (nothing held bears on the question) is a pick of the first shuffled
option, which is chance; ``no_signal`` says how often. An mcq item whose preference or
question differs from the explicit item of the same index is left out of the choice figures.

Honesty rules: nothing reads the question or the explanation before the question is asked;
the MCQ options are read only for the choice, after the question, shuffled; nothing is
tuned per item. The embedder memoises the
vectors of texts it has embedded before (the same distractor turns recur in every item):
the fast MiniLM embeds each text independently of its batch, so the vectors are the ones
the product computes, and only the seconds differ (``cache=False`` measures them).

Beside the product's prompt, each item reports ``item_fit``: the same figures for a
counterfactual assembly (:func:`fit_items`) that keeps recalled memories one by one while
they fit the budget, where the product keeps or drops the recalled-memory block whole. It
is a measurement of what item-level selection would change, not a product path.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.messages import HumanMessage

from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaValidationError
from persona_plugin.persona import Persona
from persona_plugin.prompt import quote
from persona_plugin.reflection.types import LanguageLoss, ReflectionCall, ReflectionOutput

#: the assistant's answer to the preference turn: acknowledges, adds nothing
NEUTRAL_REPLY = "Thanks for letting me know."
THRESHOLDS = (0.7, 0.8, 0.9)
DEFAULT_THRESHOLD = 0.8
INTER_TURNS = (10, 100, 300)
REFLECTORS = ("none", "local")
TOPICS_DIR = "explicit_preference"
MCQ_DIR = "mcq_options"
INTER_TURNS_FILE = "filtered_inter_turns.json"
#: a uniform pick among PrefEval's four options
CHANCE = 0.25
_HINT = "Pass the PrefEval folder (explicit_preference/, filtered_inter_turns.json)."


@dataclass(frozen=True)
class Item:
    topic: str
    index: int
    preference: str
    question: str
    #: the mcq options (the first follows the preference), when the topic has them
    options: tuple[str, ...] | None = None


class CachedEmbedder(MiniLMEmbeddingFunction):
    """The MiniLM embedder, remembering each text's vector (see the module: same vectors)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if new:
            for text, vector in zip(new, super().embed(new), strict=True):
                self._memo[text] = vector
        if not texts:
            return super().embed([])
        return np.stack([self._memo[t] for t in texts])


class NoReflector:
    """``--reflector none``: reflection that proposes nothing (memory only), no call."""

    min_confidence = 0.6

    def __init__(self) -> None:
        from persona_plugin.persona import DEFAULT_LIMITS

        self.limits = DEFAULT_LIMITS

    def call(self, persona: Persona, turns: Sequence[Any]) -> ReflectionCall:
        return ReflectionCall(output=ReflectionOutput(loss=LanguageLoss(score=0.5)))


class CountingReflector:
    """Counts the model calls and seconds of the reflector it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.min_confidence = inner.min_confidence
        self.limits = inner.limits
        self.calls = 0
        self.seconds = 0.0

    def call(self, persona: Persona, turns: Sequence[Any]) -> ReflectionCall:
        start = time.perf_counter()
        result = self.inner.call(persona, turns)
        self.seconds += time.perf_counter() - start
        self.calls += result.attempts
        return result


# -- data --------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PersonaValidationError(str(path), "", f"cannot read it: {exc}", _HINT) from None


def available_topics(root: str | Path) -> list[str]:
    folder = Path(root) / TOPICS_DIR
    if not folder.is_dir():
        raise PersonaValidationError(str(root), TOPICS_DIR, "no such folder", _HINT)
    return sorted(p.stem for p in folder.glob("*.json"))


def load_items(root: str | Path, topic: str, limit: int | None = None) -> list[Item]:
    """The explicit-preference items of ``topic`` (the first ``limit``)."""
    path = Path(root) / TOPICS_DIR / f"{topic}.json"
    if not path.is_file():
        raise PersonaValidationError(
            str(path), "", "no such topic file", f"Use one of {available_topics(root)}."
        )
    data = _read_json(path)
    if not isinstance(data, list):
        raise PersonaValidationError(str(path), "", "not a list of items", _HINT)
    options = load_options(root, topic)
    items = []
    for i, raw in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(raw, Mapping) or not {"preference", "question"} <= set(raw):
            raise PersonaValidationError(str(path), f"[{i}]", "no preference or question", _HINT)
        preference, question = str(raw["preference"]), str(raw["question"])
        found = options.get(i)
        # the same item in both files, or no choice for it
        same = found is not None and found[:2] == (preference, question)
        items.append(Item(topic, i, preference, question, found[2] if same and found else None))
    return items


def load_options(root: str | Path, topic: str) -> dict[int, tuple[str, str, tuple[str, ...]]]:
    """``index -> (preference, question, options)`` of the topic's mcq items (none when the
    folder has no ``mcq_options/<topic>.json``)."""
    path = Path(root) / MCQ_DIR / f"{topic}.json"
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, list):
        raise PersonaValidationError(str(path), "", "not a list of items", _HINT)
    found = {}
    for i, raw in enumerate(data):
        options = raw.get("classification_task_options") if isinstance(raw, Mapping) else None
        if not isinstance(options, list) or len(options) < 2:
            raise PersonaValidationError(
                str(path), f"[{i}]", "no classification_task_options", _HINT
            )
        if not {"preference", "question"} <= set(raw):
            raise PersonaValidationError(str(path), f"[{i}]", "no preference or question", _HINT)
        found[i] = (str(raw["preference"]), str(raw["question"]), tuple(map(str, options)))
    return found


def load_inter_turns(root: str | Path, turns: int) -> list[dict[str, str]]:
    """The first ``turns`` distractor turns (2 x ``turns`` messages, ending with the
    assistant's), PrefEval's conversations concatenated in order."""
    path = Path(root) / INTER_TURNS_FILE
    data = _read_json(path)
    messages = [
        {"role": m["role"], "content": m["content"]} for c in data for m in c["conversation"]
    ]
    taken = messages[: 2 * turns]
    if len(taken) < 2 * turns:
        raise PersonaValidationError(
            str(path), "", f"only {len(messages) // 2} turns", "Ask for at most that many."
        )
    if taken and taken[-1]["role"] != "assistant":
        raise PersonaValidationError(str(path), "", "turn boundary is not an assistant's", _HINT)
    return taken


# -- one item ----------------------------------------------------------------------------


def persona_values(persona: Persona) -> list[str]:
    """Every text value of the persona a reflection could have written (not the app's)."""
    data = persona.model_dump(mode="json", exclude={"meta", "tools"})
    data.get("memory", {}).pop("long_term", None)
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if value.strip():
                found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(data)
    return found


def _memory_text(item: str) -> str:
    """A recalled item as the graph shows it, without its date and speaker labels."""
    text = item
    if text.startswith("(") and ") " in text[:14]:
        text = text.split(") ", 1)[1]
    for speaker in ("user: ", "assistant: "):
        if text.startswith(speaker):
            return text[len(speaker) :]
    return text


def _in_prompt(value: str, prompt: str) -> bool:
    return quote(value) in prompt


def score_prompt(
    prompt: str, preference: str, persona: Persona, recalled: Sequence[str], embedder: Any
) -> dict[str, Any]:
    """Retention figures of one system prompt (see the module)."""
    shown_persona = [v for v in persona_values(persona) if _in_prompt(v, prompt)]
    shown_memory = [_memory_text(m) for m in recalled if _in_prompt(m, prompt)]
    best = {"persona": 0.0, "memory": 0.0}
    for where, texts in (("persona", shown_persona), ("memory", shown_memory)):
        if texts:
            vectors = embedder.embed([preference, *texts])
            best[where] = float(np.max(vectors[1:] @ vectors[0]))
    cosine = max(best.values())
    return {
        "cosine": round(cosine, 4),
        "cosine_persona": round(best["persona"], 4),
        "cosine_memory": round(best["memory"], 4),
        "verbatim": quote(preference)[1:-1] in prompt,
        "retained": {str(t): cosine >= t for t in THRESHOLDS},
        "persona_values": len(shown_persona),
        "memories_shown": len(shown_memory),
    }


def fit_items(
    assembler: Any, persona: Persona, context: Mapping[str, Sequence[str]], recalled: Sequence[str]
) -> Any:
    """A counterfactual assembly (not the product's): recalled memories kept item by item,
    best first, each only if the block still fits the budget, instead of the whole block
    kept or dropped. What item-level selection inside the memory block would show."""
    kept: list[str] = []
    for memory in recalled:
        trial = assembler.assemble(persona, context={**context, "memory": [*kept, memory]})
        if "context.memory" not in trial.dropped:
            kept.append(memory)
    return assembler.assemble(persona, context={**context, "memory": kept})


def shuffled(item: Item, seed: int) -> tuple[list[str], int]:
    """The item's options in the order shown (fixed by ``seed``, the topic and the index),
    and where the one that follows the preference (the file's first) went."""
    assert item.options is not None
    order = list(range(len(item.options)))
    random.Random(f"{seed}:{item.topic}:{item.index}").shuffle(order)
    return [item.options[j] for j in order], order.index(0)


def choose(
    scorer: Any,
    item: Item,
    seed: int,
    *,
    persona: Persona | None,
    statements: Sequence[str],
) -> dict[str, Any]:
    """The option MBR picks with the persona scorer bound to ``persona`` and ``statements``,
    and whether it is the one that follows the preference."""
    from persona_plugin.preferences.mbr import MBRSelector

    shown, correct = shuffled(item, seed)
    result = MBRSelector({"persona": scorer}).select(
        item.question, shown, {"persona": 1.0}, persona=persona, statements=statements
    )
    scores = result.scores["persona"]
    return {
        "chosen": result.chosen,
        "correct": result.chosen == correct,
        "no_signal": max(scores) - min(scores) <= 1e-12,
    }


def run_item(
    item: Item,
    distractors: Sequence[Mapping[str, str]],
    *,
    reflector: Any,
    embedder: Any,
    gate: Any = None,
    scorer: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One item through import and the graph's assembly; its figures. ``scorer``: the
    persona-conditioned preference scorer for the choice (None: no choice)."""
    from persona_plugin.chat_models.registry import EchoChatModel
    from persona_plugin.graph import PersonaGraph, recalled_user_words
    from persona_plugin.history import import_history
    from persona_plugin.memory.long_term import LongTermMemory
    from persona_plugin.store import PersonaStore

    user = f"prefeval-{item.topic[:24]}-{item.index}"
    history = [
        {"role": "user", "content": item.preference},
        {"role": "assistant", "content": NEUTRAL_REPLY},
        *distractors,
    ]
    counting = CountingReflector(reflector)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefeval-") as tmp:
        store = PersonaStore(f"sqlite:///{Path(tmp) / 'personas.db'}")
        try:
            memory = LongTermMemory(Path(tmp) / "memory", embedding_function=embedder)
            report = import_history(user, history, store=store, reflector=counting, memory=memory)
            imported_s = time.perf_counter() - start
            graph = PersonaGraph(
                EchoChatModel(),
                store=store,
                memory=memory,
                reflector=NoReflector(),
                reflection="off",
                interactions=None,
            )
            config = {"configurable": {"user_id": user, "turn_id": "question"}}
            state: dict[str, Any] = {"messages": [HumanMessage(item.question, id="q")]}
            state |= graph.load_persona(state, config)
            state |= graph.recall(state, config)
            state |= graph.assemble(state, config)
            prompt = state["system_prompt"]
            persona = Persona.model_validate(state["persona"])
            recalled = state["context"].get("memory", [])
            assembled = graph.assembler.assemble(persona, context=state["context"])
            figures = score_prompt(prompt, item.preference, persona, recalled, embedder)
            fitted = fit_items(graph.assembler, persona, state["context"], recalled)
            figures["item_fit"] = score_prompt(
                fitted.text, item.preference, persona, recalled, embedder
            )
            choice = None
            if scorer is not None and item.options is not None:
                held = recalled_user_words([m for m in recalled if _in_prompt(m, prompt)])
                verbatim = [item.preference]
                choice = {
                    "system": choose(scorer, item, seed, persona=persona, statements=held),
                    "oracle": choose(scorer, item, seed, persona=None, statements=verbatim),
                    "statements_held": len(held),
                }
            figures["choice"] = choice
        finally:
            store.close()
    user_turns = [m["content"] for m in history if m["role"] == "user"]
    gate_sends = gate_sends_preference = None
    if gate is not None:
        sent = gate.probabilities(user_turns) >= gate.threshold
        gate_sends, gate_sends_preference = int(np.sum(sent)), bool(sent[0])
    figures.update(
        topic=item.topic,
        index=item.index,
        turns=report.turns,
        versions=len(report.versions),
        withheld=report.withheld,
        failed=report.failed,
        reflection_calls=counting.calls,
        reflection_seconds=round(counting.seconds, 2),
        tokens=report.tokens,
        gate_sends=gate_sends,
        gate_sends_preference=gate_sends_preference,
        preference_recalled=any(_memory_text(m) == item.preference for m in recalled),
        prompt_tokens=assembled.tokens,
        dropped=assembled.dropped,
        import_seconds=round(imported_s, 2),
        seconds=round(time.perf_counter() - start, 2),
    )
    return figures


# -- the run -----------------------------------------------------------------------------


def summarise(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = max(len(items), 1)

    def mean(key: str) -> float:
        return round(sum(float(i[key]) for i in items) / n, 4)

    gated = [i["gate_sends"] for i in items if i.get("gate_sends") is not None]
    chosen = [i["choice"] for i in items if i.get("choice")]

    def share(who: str, key: str) -> float | None:
        return round(sum(c[who][key] for c in chosen) / len(chosen), 4) if chosen else None

    return {
        "items": len(items),
        # the mcq options, shuffled: the persona scorer's pick, chance, the oracle's
        "choice": {
            "items": len(chosen),
            "accuracy": share("system", "correct"),
            "oracle": share("oracle", "correct"),
            "chance": CHANCE,
            "no_signal": share("system", "no_signal"),
            "oracle_no_signal": share("oracle", "no_signal"),
        },
        "retention": {
            str(t): round(sum(i["retained"][str(t)] for i in items) / n, 4) for t in THRESHOLDS
        },
        "verbatim": round(sum(i["verbatim"] for i in items) / n, 4),
        "from_persona": round(sum(i["cosine_persona"] >= DEFAULT_THRESHOLD for i in items) / n, 4),
        "from_memory": round(sum(i["cosine_memory"] >= DEFAULT_THRESHOLD for i in items) / n, 4),
        "preference_recalled": round(sum(i["preference_recalled"] for i in items) / n, 4),
        "memory_dropped_by_budget": round(
            sum("context.memory" in i["dropped"] for i in items) / n, 4
        ),
        # the counterfactual of fit_items: recalled memories kept one by one within the budget
        "item_fit_retention": {
            str(t): round(sum(i["item_fit"]["retained"][str(t)] for i in items) / n, 4)
            for t in THRESHOLDS
        },
        "mean_cosine": mean("cosine"),
        "prompt_tokens": mean("prompt_tokens"),
        "reflection_calls_per_item": mean("reflection_calls"),
        "gate_sends_per_item": round(sum(gated) / len(gated), 2) if gated else None,
        # a preference turn the gate skips cannot reach the persona through reflection
        "gate_sends_preference": round(
            sum(bool(i.get("gate_sends_preference")) for i in items) / n, 4
        ),
        "user_turns_per_item": mean("turns"),
        "seconds_per_item": mean("seconds"),
        # the first item of a run reads every distractor with a cold guard cache
        "median_seconds_per_item": round(float(np.median([i["seconds"] for i in items])), 2)
        if items
        else 0.0,
        "reflection_seconds_per_item": mean("reflection_seconds"),
    }


def evaluate(
    root: str | Path,
    *,
    topics: Sequence[str] | None = None,
    inter_turns: Sequence[int] = INTER_TURNS,
    limit: int | None = None,
    reflector: str | Any = "none",
    gate: bool = True,
    embedder: Any = None,
    cache: bool = True,
    choice: bool = True,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Retention per inter-turn count (and per topic), with the no-persona baseline, and
    (``choice``) the choice accuracy on the mcq options beside chance and the oracle.

    ``reflector``: ``"none"``, ``"local"`` or a reflector object (tests). ``gate``: the
    cost gate in front of the local reflector (and, for any reflector, counted). ``seed``:
    the options' shuffle.
    """
    from persona_plugin.reflection.gate import ReflectionGate

    chosen = list(topics) if topics else available_topics(root)
    items = [item for topic in chosen for item in load_items(root, topic, limit)]
    if embedder is None:
        embedder = CachedEmbedder() if cache else MiniLMEmbeddingFunction()
    the_gate = ReflectionGate.load(embedder=embedder)
    if reflector == "none":
        the_reflector: Any = NoReflector()
        label = "none"
    elif reflector == "local":
        from persona_plugin.chat_models.registry import shared_local_backend
        from persona_plugin.reflection.local import LocalReflector

        the_reflector = LocalReflector(shared_local_backend(), gate=the_gate if gate else None)
        label = "local+gate" if gate else "local"
    elif isinstance(reflector, str):
        raise PersonaValidationError(
            "prefeval", "reflector", repr(reflector), f"Use one of {', '.join(REFLECTORS)}."
        )
    else:
        the_reflector, label = reflector, type(reflector).__name__
    scorer = None
    if choice:
        from persona_plugin.preferences.hub import PreferenceHub
        from persona_plugin.preferences.scorers import CandidateEmbeddings

        # the bundled card alone: no user's hub, the same scorer as MBR's
        hub = PreferenceHub(None, embedder=CandidateEmbeddings(embedder))
        scorer = hub.scorer("persona")
    total = len(items) * len(inter_turns)
    done = 0
    results: dict[str, Any] = {}
    for n in inter_turns:
        distractors = load_inter_turns(root, n)
        per_item = []
        for item in items:
            per_item.append(
                run_item(
                    item,
                    distractors,
                    reflector=the_reflector,
                    embedder=embedder,
                    gate=the_gate,
                    scorer=scorer,
                    seed=seed,
                )
            )
            done += 1
            if progress:
                progress(f"{n} turns, {item.topic} #{item.index}", done, total)
        results[str(n)] = {
            "all": summarise(per_item),
            "topics": {t: summarise([i for i in per_item if i["topic"] == t]) for t in chosen},
            "items": per_item,
        }
    return {
        "reflector": label,
        "topics": chosen,
        "limit": limit,
        "inter_turns": list(inter_turns),
        "thresholds": list(THRESHOLDS),
        "choice": {"on": choice, "seed": seed, "chance": CHANCE},
        "baseline": {"retention": {str(t): 0.0 for t in THRESHOLDS}, "verbatim": 0.0},
        "results": results,
    }
