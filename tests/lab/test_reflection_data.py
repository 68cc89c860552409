"""The reflection adapter's synthetic data: varied, split cleanly, injections teach nothing."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest

from persona_plugin.lab.training.reflection_data import (
    build_examples,
    phrasings,
    vocabulary,
)
from persona_plugin.persona import Persona
from persona_plugin.reflection.local import (
    COMPACT_SCHEMA,
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
