"""The fact-extraction benchmark: LoCoMo sessions, matching by embedding, the run, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaValidationError
from persona_plugin.lab.eval.facts import (
    DEFAULT_THRESHOLD,
    count_matches,
    evaluate,
    load_sessions,
    match_facts,
    similarity,
)
from persona_plugin.reflection.gate import ReflectionGate
from persona_plugin.reflection.local import LocalReflector, bundled_backend

CONVERSATION = {
    "speaker_a": "Greta",
    "speaker_b": "Hugo",
    "session_1_date_time": "1:56 pm on 8 May, 2023",
    "session_1": [
        {"speaker": "Greta", "dia_id": "D1:1", "text": "These days I'm based in Tallinn."},
        {"speaker": "Hugo", "dia_id": "D1:2", "text": "Nice! I can't get enough of surfing."},
        {"speaker": "Greta", "dia_id": "D1:3", "text": "Wow, that is wonderful news!"},
    ],
    "session_1_observation": {
        "Greta": [["Greta lives in Tallinn.", "D1:1"]],
        "Hugo": [["Hugo loves surfing.", "D1:2"]],
    },
    "session_2_date_time": "2:00 pm on 9 May, 2023",
    "session_2": [
        {"speaker": "Hugo", "dia_id": "D2:1", "text": "I work as a pharmacist now."},
    ],
    "session_2_observation": {"Hugo": [["Hugo is a pharmacist.", "D2:1"]]},
    "qa": [],
}


@pytest.fixture
def locomo_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(CONVERSATION))
    return path


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


def test_sessions_carry_their_turns_and_gold(locomo_file: Path) -> None:
    sessions = load_sessions(locomo_file)
    assert [s.number for s in sessions] == [1, 2]
    assert [t.turn_id for t in sessions[0].turns] == ["D1:1", "D1:2", "D1:3"]
    assert sessions[0].gold == {
        "Greta": ["Greta lives in Tallinn."],
        "Hugo": ["Hugo loves surfing."],
    }
    assert len(load_sessions(locomo_file, 1)) == 1
    # the first turn only: only the gold it is cited for
    first = load_sessions(locomo_file, 1, turns=1)[0]
    assert first.gold == {"Greta": ["Greta lives in Tallinn."], "Hugo": []}


def test_a_file_without_observations_is_refused(tmp_path: Path) -> None:
    data = {k: v for k, v in CONVERSATION.items() if "observation" not in k}
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PersonaValidationError, match="observations"):
        load_sessions(path)


def test_paraphrases_match_and_unrelated_facts_do_not(embedder) -> None:
    gold = ["Greta lives in Tallinn.", "Greta loves knitting."]
    match = match_facts(embedder, gold, ["Greta is based in Tallinn.", "Greta owns a red car."])
    assert (match.gold_found, match.predicted_correct) == (1, 1)
    assert (match.gold, match.predicted) == (2, 2)
    assert match_facts(embedder, gold, []).gold_found == 0


def test_a_higher_threshold_never_finds_more(embedder) -> None:
    gold = ["Hugo loves surfing.", "Hugo is a pharmacist.", "Hugo has a turtle."]
    predicted = ["Hugo enjoys surfing.", "Hugo works in a pharmacy.", "Hugo likes animals."]
    sims = similarity(embedder, gold, predicted)
    found = [count_matches(sims, t).gold_found for t in (0.3, DEFAULT_THRESHOLD, 0.9)]
    assert found == sorted(found, reverse=True) and found[0] > found[-1]
    assert np.allclose(np.diag(sims) >= 0.5, True)


def test_the_run_reports_recall_cost_and_the_gate(locomo_file: Path, embedder) -> None:
    reflector = LocalReflector(bundled_backend())
    gate = ReflectionGate.load(embedder=embedder)
    result = evaluate(
        [locomo_file], reflectors={"adapter": reflector}, gate=gate, embedder=embedder
    )
    assert result["sessions"] == 2 and result["turns"] == 4
    tuned, gated = result["results"]["adapter"], result["results"]["adapter+gate"]
    assert tuned["valid_json"] == 1.0 and tuned["calls_per_turn"] == 1.0
    assert tuned["gold_facts"] == 3 and tuned["fact_recall"] > 0
    assert tuned["tokens_per_turn"] > 0
    assert gated["turns_sent"] <= 1.0 and gated["fact_recall"] <= tuned["fact_recall"]


def test_cli_prints_json(locomo_file: Path) -> None:
    from persona_plugin.cli.app import app

    args = ["eval", "facts", str(locomo_file), "--sessions", "1", "--turns", "1", "--no-base"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["turns"] == 1 and list(figures["results"]) == ["adapter"]
