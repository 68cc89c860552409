"""The reflection adapter's synthetic data: varied, split cleanly, injections teach nothing."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

from persona_plugin.lab.training.reflection_data import (
    build_examples,
    build_feedback_examples,
    phrasings,
    vocabulary,
)
from persona_plugin.persona import Persona
from persona_plugin.reflection.local import (
    COMPACT_SCHEMA,
    FEEDBACK_OPS,
    FEEDBACK_PREFIX,
    MAX_FACT_CHARS,
    MAX_FACTS,
    MAX_OPS,
    MAX_VALUE_CHARS,
    OP_PATHS,
    Extraction,
    parse_compact,
    to_reflection_output,
)
from persona_plugin.reflection.optimizer import apply_operations


@pytest.fixture(scope="module")
def train() -> list:
    return build_examples(400, split="train")


def test_examples_are_varied(train) -> None:
    assert len({e.text for e in train}) > 300
    kinds = Counter(k for e in train for k in e.kind.split("+"))
    for kind in (
        "identity",
        "demographics",
        "personality",
        "pattern",
        "preference",
        "feedback",
        "event",
        "nothing",
        "injection",
    ):
        assert kinds[kind] >= 5, kind
    speakers = {e.speaker for e in train}
    assert "the user" in speakers and len(speakers) > 10
    paths = {p for e in train for p, _ in e.ops}
    assert paths == set(OP_PATHS) - {"demographics.gender"}  # gender is never guessed
    assert Counter(len(e.facts) for e in train)[2] > 50  # turns with two disclosures


def test_the_same_seed_gives_the_same_examples() -> None:
    assert build_examples(30, seed=3) == build_examples(30, seed=3)
    assert build_examples(30, seed=3) != build_examples(30, seed=4)


def test_train_and_eval_pools_are_disjoint(train) -> None:
    assert not vocabulary("train") & vocabulary("eval")
    assert not phrasings("train") & phrasings("eval")
    held_out = build_examples(200, split="eval")
    train_names = {e.speaker for e in train} - {"the user"}
    assert not train_names & {e.speaker for e in held_out}
    assert not {e.text for e in train} & {e.text for e in held_out}


def test_every_answer_fits_the_decoding_schema(train) -> None:
    for example in train:
        answer = json.loads(example.completion)
        jsonschema.validate(answer, COMPACT_SCHEMA)
        facts, ops = parse_compact(example.completion)
        assert len(facts) <= MAX_FACTS and len(ops) <= MAX_OPS
        assert all(len(f) <= MAX_FACT_CHARS for f in facts)
        assert all(len(v) <= MAX_VALUE_CHARS for _, v in ops)


def test_injection_and_small_talk_examples_yield_nothing(train) -> None:
    silent = [e for e in train if e.kind in ("injection", "nothing")]
    assert len(silent) > 40
    for example in silent:
        assert json.loads(example.completion) == {"facts": [], "ops": []}
        assert not example.discloses


def test_gold_edits_apply_cleanly_through_the_optimizer(train) -> None:
    for example in train[:150]:
        extraction = Extraction(
            facts=list(example.facts), ops=list(example.ops), turn_text=example.text
        )
        output, dropped = to_reflection_output([("t1", extraction)])
        assert not dropped
        assert len(output.operations) == len(example.ops)  # every gold value is grounded
        result = apply_operations(
            Persona.new("u1"),
            output.operations,
            turn_ids={"t1"},
            evidence_texts={"t1": example.text},  # the polarity check reads the words too
        )
        assert not result.refused, (example.text, result.refused)
        assert len(output.memories) == len(example.facts)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        build_examples(3, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shares"):
        build_examples(3, nothing_share=0.8, injection_share=0.5)


def test_feedback_examples_teach_the_closed_vocabulary_and_fit_the_schema() -> None:
    train = build_feedback_examples(300, split="train")
    held_out = build_feedback_examples(100, split="eval")
    assert all(e.text.startswith(FEEDBACK_PREFIX) for e in train + held_out)
    # the user's words never repeat across the splits (an edit's length is said in fixed
    # words: "rewritten much shorter.")
    worded = [
        {e.text for e in split if "rewritten much" not in e.text} for split in (train, held_out)
    ]
    assert not worded[0] & worded[1]
    style_edits = {op for e in train for op in e.ops if op[0].startswith("preference.")}
    assert {op for op in style_edits if op in FEEDBACK_OPS} == set(FEEDBACK_OPS)
    kinds = Counter(e.kind.split("+")[0] for e in train)
    assert kinds == {"reply_feedback": 300}
    assert sum(1 for e in train if not e.ops and not e.facts) > 10  # nothing to learn
    assert sum(1 for e in train if "+" in e.kind) > 30  # corrections in a comment
    for example in train:
        jsonschema.validate(json.loads(example.completion), COMPACT_SCHEMA)
        # as LocalReflector reads a feedback message: every gold edit is taken
        extraction = Extraction(
            facts=list(example.facts),
            ops=list(example.ops),
            turn_text=example.text,
            feedback=True,
        )
        output, dropped = to_reflection_output([("t1", extraction)])
        assert not dropped and len(output.operations) == len(example.ops), example
    with pytest.raises(ValueError, match="split"):
        build_feedback_examples(3, split="test")  # type: ignore[arg-type]
