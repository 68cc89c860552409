"""The public loader cannot be knocked over: every input loads or is refused clearly, fast.

Each case below once raised something other than ``PersonaValidationError`` (or took
seconds, or loaded and then failed to save or reload). The fuzz test throws generated
YAML and JSON at ``loads``: every input either loads, dumps and reloads identically and
saves, or raises ``PersonaValidationError``, within a second. ``benchmarks/
bench_loader_fuzz.py`` runs the same check over 10,000+ inputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persona_plugin.cli.app as cli
from persona_plugin import PersonaStore, PersonaValidationError, loads
from tests.benchmarks import run_quick
from tests.fuzz import check_one, documents

NESTED_300 = json.dumps({"extensions": {"deep": json.loads("[" * 300 + "]" * 300)}})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"identity": {"name": "\\ud800"}}', "surrogate"),
        ('identity:\n  name: "\\ud800x"\n', "surrogate"),
        ('{"extensions": {"a": ' + "[" * 5000 + "]" * 5000 + "}}", "nested"),
        ("extensions:\n  a: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
        (NESTED_300, "nested"),
        ('{"extensions": {"n": ' + "9" * 5000 + "}}", "number"),
        ("extensions:\n  n: " + "9" * 5000 + "\n", "number"),
        ('{"extensions": {"n": 1e400}}', "finite"),
        ("extensions:\n  n: .inf\n", "finite"),
        ("extensions:\n  n: -.inf\n", "finite"),
        ("? [a, b]\n: 1\n", "key"),
        ("? !!set {a}\n: 1\n", "key"),
        ("extensions:\n  t: !!timestamp not-a-date\n", "tag"),
        ("extensions:\n  b: !!bool maybe\n", "tag"),
        ("extensions:\n  f: !!float abc\n", "number"),
        ('{"identity": {"name": "a", "name": "b"}}', "duplicate"),
        ('{"identity": {}, "identity": {}}', "duplicate"),
    ],
)
def test_hostile_input_is_a_clear_error(text: str, needle: str) -> None:
    started = time.monotonic()
    with pytest.raises(PersonaValidationError) as exc:
        loads(text, source="fuzz")
    assert needle in str(exc.value).lower()
    assert time.monotonic() - started < 1.0


def test_an_alias_bomb_under_meta_is_stopped_fast() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]")
    text = "meta:\n" + "\n".join("  " + line for line in lines) + "\n"
    started = time.monotonic()
    with pytest.raises(PersonaValidationError):
        loads(text, source="bomb")
    assert time.monotonic() - started < 1.0


def test_a_deep_but_allowed_document_saves_and_reloads(sqlite_url: str) -> None:
    deep: object = "leaf"
    for _ in range(20):
        deep = [deep]
    persona = loads(json.dumps({"extensions": {"deep": deep}}), source="deep")
    with PersonaStore(sqlite_url) as store:
        store.create("deep", persona)
        assert store.get("deep").extensions == persona.extensions


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(documents())
def test_fuzzed_documents_load_or_are_refused_clearly(text: str) -> None:
    outcome = check_one(text)
    assert outcome.seconds < 1.0, outcome
    assert outcome.kind in ("loaded", "refused"), outcome


@pytest.mark.postgres
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_what_loads_saves_on_postgres(postgres_url: str, data: st.DataObject) -> None:
    with PersonaStore(postgres_url) as store:
        text = data.draw(documents())
        outcome = check_one(text, store=store)
        assert outcome.kind in ("loaded", "refused"), outcome


def test_the_cli_refuses_hostile_input_as_rejected_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"extensions": {"n": 1e400}}', encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", str(bad)])
    assert exc.value.code == 2  # the input was rejected, not the operation failed
    assert "finite" in capsys.readouterr().err


def test_the_fuzz_benchmark_runs_quick() -> None:
    done = run_quick("bench_loader_fuzz.py", timeout=300)
    assert "crashed   0" in done.stdout and "mismatch  0" in done.stdout
