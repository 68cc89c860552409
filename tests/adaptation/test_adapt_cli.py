"""``persona adapt``: plan, train, history and rollback, on the settings' own paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import persona_plugin.cli.app as cli
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.interactions import InteractionLog
from persona_plugin.store import PersonaStore
from tests.adaptation.test_adaptation import QUESTIONS, long_reply


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out + captured.err


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COLUMNS", "200")
    home = Path(os.environ["PERSONA_HOME"])
    with PersonaStore(f"sqlite:///{home / 'personas.db'}") as store:
        log = InteractionLog.on(store)
        for user, questions in (("ana", QUESTIONS), ("bob", QUESTIONS[:3])):
            for n, (question, short, topic) in enumerate(questions):
                turn = f"{user}-{n}"
                log.record_turn(user, turn, user_text=question, reply_text=short)
                edit = long_reply(short, topic)  # they expand every reply
                log.record_feedback(user, turn, "edit", text=edit, reflect=False)
    return home


def test_adapt_plans_trains_lists_and_rolls_back(home: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = run(capsys, "adapt", "--all", "--dry-run")
    assert code == 0, out
    assert "ana: preference planned: 14 preference pairs (at least 8)" in out
    assert "bob: preference skipped: 3 preference pairs, fewer than 8" in out
    owned = OwnedCards(home / "owned")
    assert owned.versions("ana", "preference") == []
    code, out = run(capsys, "adapt", "ana", "--kind", "adapter", "--dry-run")
    assert code == 0 and "ana: adapter skipped: 14 endorsed replies, fewer than 32" in out, out
    code, out = run(capsys, "adapt", "ana", "--kind", "lora")
    assert code == 2 and "Use preference, adapter or all" in out, out

    code, out = run(capsys, "adapt", "ana", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["status"] == "promoted" and result["version"] == 1, result
    assert owned.serving("ana", "preference") == 1

    code, out = run(capsys, "adapt", "history", "ana")
    assert code == 0 and "1 (serving)" in out and "promoted" in out, out
    code, out = run(capsys, "adapt", "rollback", "ana", "preference", "0")
    assert code == 0 and owned.serving("ana", "preference") == 0, out
    code, out = run(capsys, "adapt", "rollback", "ana", "preference", "5")
    assert code == 1 and "no preference version 5" in out
    code, out = run(capsys, "adapt", "rollback", "ana", "lora", "1")
    assert code == 2 and "'lora' is not a kind" in out
    code, out = run(capsys, "adapt")
    assert "history" in out  # no arguments: the help
    code, out = run(capsys, "adapt", "ana", "--all")
    assert code == 2 and "name one user or pass --all" in out

    code, out = run(capsys, "delete", "ana", "--yes")
    assert code == 0 and "1 versions of their own models" in out, out
    assert not (home / "owned" / owned.folder("ana", "preference").parent.name).exists()
