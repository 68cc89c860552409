"""Reflection: one structured call (loss, gradients, typed operations, memory facts).

The reflection model is scripted: a small tool-calling chat model so that LangChain's own
``with_structured_output`` path runs, and LangChain's fake chat models answering JSON text
for the fallback. The store is the real SQLite store, the memory real Chroma.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import (
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

import persona_plugin.cli.app as cli
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaValidationError
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.persona import Persona
from persona_plugin.reflection.apply import reflect_and_save
from persona_plugin.reflection.graph import build_reflection_graph
from persona_plugin.reflection.reflector import Reflector, parse_reflection_json
from persona_plugin.reflection.types import ReflectionOutput, ReflectionTurn
from persona_plugin.store import PersonaStore
from tests.fakes import ScriptedChatModel, ToolCallingChatModel

USAGE = {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150}


# -- scripted models ----------------------------------------------------------------------


def output(
    turns: list[str],
    ops: list[dict[str, Any]] = (),  # type: ignore[assignment]
    memories: list[str | tuple[str, list[str]]] = (),  # type: ignore[assignment]
    revealed: list[str] | None = None,
    missed: list[str] | None = None,
    score: float = 0.8,
) -> dict[str, Any]:
    """A ReflectionOutput as plain data; operations cite ``turns`` unless they say otherwise."""
    return {
        "loss": {
            "revealed": revealed if revealed is not None else ["the user said something"],
            "missed": missed or [],
            "score": score,
        },
        "gradients": [
            {
                "field": o["path"],
                "suggestion": f"{o['op']} {o.get('value')!r}",
                "reason": "the user said so",
                "evidence": o.get("evidence", turns),
            }
            for o in ops
        ],
        "operations": [{"confidence": 0.9, "evidence": turns, **o} for o in ops],
        "memories": [
            {"text": m, "evidence": turns}
            if isinstance(m, str)
            else {"text": m[0], "evidence": m[1]}
            for m in memories
        ],
    }


def tool_answer(args: dict[str, Any], usage: dict[str, int] | None = None) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[{"name": "ReflectionOutput", "args": args, "id": "call_1"}],
        usage_metadata=usage or USAGE,
    )


def json_answer(args: dict[str, Any], usage: dict[str, int] | None = None) -> AIMessage:
    return AIMessage(content=json.dumps(args), usage_metadata=usage or USAGE)


TURN = [ReflectionTurn("t1", "I moved to Lisbon and I love jazz", "Welcome to Lisbon!")]


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


@pytest.fixture
def store(sqlite_url: str) -> Iterator[PersonaStore]:
    with PersonaStore(sqlite_url) as s:
        yield s


@pytest.fixture
def memory(tmp_path, embedding: MiniLMEmbeddingFunction) -> LongTermMemory:
    return LongTermMemory(tmp_path / "memory", embedding_function=embedding)


# -- the structured call ------------------------------------------------------------------


def test_tool_calling_models_go_through_with_structured_output() -> None:
    args = output(["t1"], [{"op": "set", "path": "demographics.location", "value": "Lisbon"}])
    model = ToolCallingChatModel(script=[tool_answer(args)])
    call = Reflector(model).call(Persona.new("ana"), TURN)
    assert call.attempts == 1 and call.error is None
    assert isinstance(call.output, ReflectionOutput)
    assert call.output.operations[0].value == "Lisbon"
    assert call.token_usage == USAGE
    # LangChain bound the schema as the one tool the model must call
    (bind,) = model.binds
    assert bind["tool_choice"] == "any"
    assert [t["function"]["name"] for t in bind["tools"]] == ["ReflectionOutput"]
    # one call: the system prompt carries the instructions, the user message the turns
    (messages,) = model.calls
    assert isinstance(messages[0], SystemMessage) and "JSON Schema" in messages[0].content
    assert "[turn t1]" in messages[1].content and '"user_id": "ana"' in messages[1].content


def test_tool_answer_failing_validation_is_retried_once() -> None:
    bad = output(["t1"], score=5.0)  # score is 0..1
    good = output(["t1"], [{"op": "append", "path": "personality.interests", "value": "jazz"}])
    model = ToolCallingChatModel(script=[tool_answer(bad), tool_answer(good)])
    call = Reflector(model).call(Persona.new("ana"), TURN)
    assert call.attempts == 2
    assert call.output is not None and call.output.operations[0].value == "jazz"
    # the retry told the model what was wrong
    retry = model.calls[1]
    assert isinstance(retry[-1], HumanMessage) and "not valid" in retry[-1].content
    assert call.token_usage["total_tokens"] == 300  # both attempts count


def test_tool_model_without_a_tool_call_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    model = ToolCallingChatModel(script=[AIMessage(content="sure!"), AIMessage(content="ok")])
    with caplog.at_level(logging.WARNING, logger="persona_plugin.reflection"):
        call = Reflector(model).call(Persona.new("ana"), TURN)
    assert call.output is None and call.attempts == 2
    assert call.error == "no structured answer"
    assert "reflection dropped after 2 attempts" in caplog.text


VALID = output(["t1"], [{"op": "set", "path": "identity.name", "value": "Ana"}])


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(VALID),
        json.dumps(VALID, indent=2),
        f"```json\n{json.dumps(VALID, indent=2)}\n```",
        f"```\n{json.dumps(VALID)}\n```",
        f"Here is the reflection:\n```json\n{json.dumps(VALID)}\n```\nHope it helps.",
        f"Sure. {json.dumps(VALID)} Done.",
    ],
    ids=["plain", "indented", "fenced-json", "fenced", "fenced-with-prose", "inline-prose"],
)
def test_json_mode_fallback_parses_fenced_or_plain_json(text: str) -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
    call = Reflector(model).call(Persona.new("ana"), TURN)
    assert call.attempts == 1
    assert call.output is not None and call.output.operations[0].value == "Ana"


def test_json_mode_can_be_forced_on_a_tool_calling_model() -> None:
    model = ToolCallingChatModel(script=[json_answer(VALID)])
    call = Reflector(model, structured="json").call(Persona.new("ana"), TURN)
    assert call.output is not None and model.binds == []


@pytest.mark.parametrize(
    "text",
    [
        "I think the user likes jazz.",
        "{not json}",
        json.dumps({"loss": {"score": 2}}),
        json.dumps({"operations": []}),
        json.dumps(output(["t1"], [{"op": "rename", "path": "identity.name", "value": "x"}])),
    ],
)
def test_parse_reflection_json_rejects_malformed_answers(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reflection_json(text)


def test_malformed_then_valid_is_applied(store: PersonaStore, caplog) -> None:
    store.create("ana")
    good = output(["t1"], [{"op": "set", "path": "demographics.location", "value": "Lisbon"}])
    model = FakeMessagesListChatModel(
        responses=[
            AIMessage(content='```json\n{"loss": "oops"}\n```', usage_metadata=USAGE),
            json_answer(good),
        ]
    )
    with caplog.at_level(logging.WARNING):
        outcome = reflect_and_save(
            store=store, reflector=Reflector(model), user_id="ana", turns=TURN
        )
    assert model.i == 0  # both scripted answers were used (the list wrapped around)
    call = Reflector(model).call(Persona.new("ana"), TURN)
    assert call.attempts == 2 and call.output is not None
    assert outcome.error is None and outcome.version == 2
    assert store.get("ana").demographics.location == "Lisbon"
    record = store.get_version("ana", 2)
    assert record.details["token_usage"]["total_tokens"] == 300
    assert "reflection dropped" not in caplog.text


def test_malformed_twice_is_dropped_and_nothing_is_written(
    store: PersonaStore, memory: LongTermMemory, caplog: pytest.LogCaptureFixture
) -> None:
    store.create("ana", Persona.from_dict({"identity": {"name": "Ana"}}))
    before = store.get("ana")
    model = ScriptedChatModel(script=['{"loss": {}}', "no idea, sorry"])
    with caplog.at_level(logging.WARNING, logger="persona_plugin.reflection"):
        outcome = reflect_and_save(
            store=store, reflector=Reflector(model), user_id="ana", turns=TURN, memory=memory
        )
    assert len(model.calls) == 2
    assert outcome.version is None and outcome.error
    assert outcome.applied == [] and outcome.memories == []
    assert "reflection dropped after 2 attempts" in caplog.text
    assert store.current_version("ana") == 1
    assert store.get("ana") == before
    assert memory.count("ana") == 0
    # and a user who had no persona still has none
    model = ScriptedChatModel(script=["garbage", "more garbage"])
    reflect_and_save(store=store, reflector=Reflector(model), user_id="new", turns=TURN)
    assert not store.exists("new")


def test_retries_can_be_turned_off() -> None:
    model = ScriptedChatModel(script=["garbage"])
    call = Reflector(model, retries=0).call(Persona.new("ana"), TURN)
    assert call.output is None and call.attempts == 1 and len(model.calls) == 1


# -- applying a reflection ----------------------------------------------------------------


def test_reflection_is_symbolic_learning_saved_as_a_version(
    store: PersonaStore, memory: LongTermMemory
) -> None:
    store.create(
        "ana",
        Persona.from_dict(
            {
                "demographics": {"location": "Berlin"},
                "personality": {"interests": ["jazz", "fish recipes"]},
            }
        ),
    )
    turns = [
        ReflectionTurn("t1", "I moved to Lisbon last month.", "Lisbon is lovely."),
        ReflectionTurn("t2", "I'm vegetarian now. Jazz is still my thing!", "Noted."),
    ]
    args = output(
        ["t1", "t2"],
        [
            # a newer fact contradicting an older one replaces it
            {"op": "set", "path": "demographics.location", "value": "Lisbon", "evidence": ["t1"]},
            {
                "op": "append",
                "path": "personality.interests",
                "value": "vegetarian cooking",
                "replaces": "fish recipes",
                "evidence": ["t2"],
            },
            # a duplicate (case and punctuation aside) is merged, not appended
            {"op": "append", "path": "personality.interests", "value": "Jazz!", "evidence": ["t2"]},
            {"op": "append", "path": "preference.style", "value": "short", "confidence": 0.3},
            {"op": "set", "path": "meta.version", "value": 99},
        ],
        memories=[
            ("moved from Berlin to Lisbon last month", ["t1"]),
            ("became vegetarian", ["t2"]),
            ("has a cat", ["t7"]),
        ],
        revealed=["moved to Lisbon", "is vegetarian now"],
        missed=["did not ask what brought them to Lisbon"],
        score=0.6,
    )
    model = ToolCallingChatModel(script=[tool_answer(args)])
    outcome = reflect_and_save(
        store=store,
        reflector=Reflector(model),
        user_id="ana",
        turns=turns,
        memory=memory,
        memory_link=memory.link(),
    )
    assert len(model.calls) == 1  # one LLM call for the whole reflection

    # the outcome: loss, gradients, applied and refused operations
    assert outcome.turn_ids == ["t1", "t2"]
    assert outcome.loss is not None and outcome.loss.missed and outcome.loss.score == 0.6
    assert [g.field for g in outcome.gradients] == [o["path"] for o in args["operations"]]
    assert all(g.evidence for g in outcome.gradients)
    assert [a.effect for a in outcome.applied] == ["replaced", "replaced", "merged"]
    assert [r.reason for r in outcome.refused] == [
        "confidence below 0.6",
        "path not writable by reflection",
    ]

    # one new version, made by the reflection, through compare-and-set
    assert outcome.version == 2
    record = store.get_version("ana", 2)
    assert record.source == "reflection turn t2"
    assert record.reason == "moved to Lisbon; is vegetarian now"
    persona = record.persona
    assert persona is not None
    assert persona.demographics.location == "Lisbon"
    assert persona.personality.interests == ["jazz", "vegetarian cooking"]
    assert persona.preference.style == []
    assert persona.meta.version == 2
    assert persona.memory.long_term is not None and persona.memory.long_term.backend == "chroma"
    # the old fact stays in history
    assert store.get("ana", 1).demographics.location == "Berlin"
    assert "fish recipes" in store.get("ana", 1).personality.interests
    changes = {(c.op, c.path, str(c.old), str(c.new)) for c in store.diff("ana", 1, 2)}
    assert ("replace", "demographics.location", "Berlin", "Lisbon") in changes

    # the version's details: token use, and the whole reflection for the audit trail
    details = record.details
    assert details["token_usage"] == USAGE
    reflection = details["reflection"]
    assert reflection["turn_ids"] == ["t1", "t2"]
    assert reflection["loss"]["revealed"] == ["moved to Lisbon", "is vegetarian now"]
    assert len(reflection["gradients"]) == 5 and len(reflection["applied"]) == 3
    assert [r["reason"] for r in reflection["refused"]] == [r.reason for r in outcome.refused]
    assert reflection["refused_memories"] == [
        {"text": "has a cat", "reason": "evidence must cite this reflection's turns"}
    ]

    # facts worth remembering went to long-term memory with provenance
    facts = {i.text: i for i in memory.items("ana", kinds=["fact"])}
    assert set(facts) == {"moved from Berlin to Lisbon last month", "became vegetarian"}
    assert facts["became vegetarian"].source_turn_ids == ["t2"]
    assert facts["moved from Berlin to Lisbon last month"].source_turn_ids == ["t1"]
    assert outcome.refused_memories == ["has a cat"]


def test_reflection_of_a_new_user_creates_version_one(store: PersonaStore) -> None:
    args = output(["t1"], [{"op": "set", "path": "identity.name", "value": "Ana"}])
    model = FakeMessagesListChatModel(responses=[json_answer(args)])
    outcome = reflect_and_save(store=store, reflector=Reflector(model), user_id="ana", turns=TURN)
    assert outcome.version == 1
    record = store.get_version("ana", 1)
    assert record.source == "reflection turn t1"
    assert record.persona is not None and record.persona.identity.user_id == "ana"
    assert record.persona.identity.name == "Ana"


def test_concurrent_reflections_all_land(store: PersonaStore) -> None:
    """Compare-and-set: parallel reflections of one user retry rather than lose updates."""
    store.create("ana")
    interests = [f"topic {i}" for i in range(6)]
    errors: list[BaseException] = []

    def reflect(n: int) -> None:
        turn = f"t{n}"
        args = output(
            [turn], [{"op": "append", "path": "personality.interests", "value": interests[n]}]
        )
        model = FakeMessagesListChatModel(responses=[json_answer(args)])
        try:
            reflect_and_save(
                store=store,
                reflector=Reflector(model),
                user_id="ana",
                turns=[ReflectionTurn(turn, "x", "y")],
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reflect, args=(n,)) for n in range(len(interests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(store.get("ana").personality.interests) == interests
    assert store.current_version("ana") == 1 + len(interests)


def test_persona_history_cli_shows_token_use(
    store: PersonaStore,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    args = output(["t1"], [{"op": "set", "path": "identity.name", "value": "Ana"}])
    usage = {"input_tokens": 1000, "output_tokens": 234, "total_tokens": 1234}
    model = ToolCallingChatModel(script=[tool_answer(args, usage)])
    reflect_and_save(store=store, reflector=Reflector(model), user_id="ana", turns=TURN)
    assert store.get_version("ana", 1).details["token_usage"] == usage
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--store", sqlite_url, "history", "ana"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "tokens" in shown
    row = next(line for line in shown.splitlines() if "reflection turn t1" in line)
    assert "1234" in row


# -- the reflection graph -----------------------------------------------------------------


def test_reflection_graph_runs_one_reflection(store: PersonaStore, memory: LongTermMemory) -> None:
    args = output(
        ["t5"],
        [{"op": "append", "path": "preference.style", "value": "bullet points"}],
        memories=["likes bullet points"],
    )
    model = ToolCallingChatModel(script=[tool_answer(args)])
    graph = build_reflection_graph(Reflector(model), store=store, memory=memory)
    state = graph.invoke(
        {"user_id": "ana", "turn_id": "t5", "user": "use bullet points please", "assistant": "ok"}
    )
    outcome = state["outcome"]
    assert outcome["version"] == 1 and outcome["turn_ids"] == ["t5"]
    assert outcome["memories"] == ["likes bullet points"]
    assert store.get("ana").preference.style == ["bullet points"]
    assert store.get("ana").memory.long_term is not None
    assert memory.items("ana")[0].source_turn_ids == ["t5"]


def test_reflection_graph_refuses_incomplete_input(store: PersonaStore) -> None:
    graph = build_reflection_graph(Reflector(ScriptedChatModel()), store=store)
    with pytest.raises(PersonaValidationError, match="assistant"):
        graph.invoke({"user_id": "ana", "turn_id": "t1", "user": "hi", "assistant": ""})
    assert store.users() == []


def test_a_dislike_is_kept_as_something_to_avoid_not_as_a_like(store: PersonaStore) -> None:
    """The scripted reflection stores "I strongly dislike horror films" twice: as an
    interest (the polarity lost, refused) and as preference.avoid (kept); the prompt then
    shows it as something to avoid."""
    from persona_plugin.prompt import PromptAssembler

    turns = [
        ReflectionTurn("t1", "I strongly dislike horror films and prefer light comedies.", "Ok.")
    ]
    args = output(
        ["t1"],
        [
            {"op": "append", "path": "personality.interests", "value": "horror films"},
            {"op": "append", "path": "preference.avoid", "value": "horror films"},
            {"op": "append", "path": "preference.content", "value": "light comedies"},
        ],
    )
    model = ToolCallingChatModel(script=[tool_answer(args)])
    outcome = reflect_and_save(store=store, reflector=Reflector(model), user_id="ana", turns=turns)
    (refused,) = outcome.refused
    assert refused.operation.path == "personality.interests"
    assert refused.reason.startswith("polarity: the user's words ('dislike') avoid 'horror films'")
    persona = store.get("ana")
    assert persona.personality.interests == [] and persona.preference.avoid == ["horror films"]
    assert persona.preference.content == ["light comedies"]
    refusals = store.get_version("ana").details["reflection"]["refused"]
    assert refusals[0]["reason"] == refused.reason  # kept in the version's history
    text = PromptAssembler().assemble(persona).text
    assert '- Avoid (the user dislikes or must not have these): "horror films"' in text
