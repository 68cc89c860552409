"""The ``persona`` command line: every command, both store backends, exit codes, bad input.

Most tests call :func:`persona_plugin.cli.main` in-process (it always raises SystemExit);
a few run the real ``persona`` executable to prove the exit codes are the process's own
and that no traceback reaches the user.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from rich.console import Console

import persona_plugin.cli.app as cli
from persona_plugin.persona import SECTION_NAMES, load, loads
from persona_plugin.store import PersonaStore
from tests.paths import DATA

ALICE = DATA / "alice.yaml"
PERSONA_EXE = Path(sys.executable).parent / "persona"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Call the CLI in-process: ``run("show", "alice", stdin=b"...")`` -> Result."""
    # wide enough that Rich tables and help panels do not fold names and sources
    monkeypatch.setenv("COLUMNS", "200")

    def _run(*args: str | Path, stdin: bytes | None = None) -> Result:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        capsys.readouterr()  # drop anything printed before this call
        with pytest.raises(SystemExit) as exc_info:
            cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        code = exc_info.value.code
        assert isinstance(code, int), f"exit status {code!r} is not an int"
        return Result(code, captured.out, captured.err)

    return _run


def content(document: dict[str, Any]) -> dict[str, Any]:
    """A persona dict without ``meta``, which the store rewrites on every save."""
    return {k: v for k, v in document.items() if k != "meta"}


def alice_content() -> dict[str, Any]:
    """alice.yaml as the library normalizes it (short forms expanded, defaults left out)."""
    return content(load(ALICE).to_dict())


def assert_clean_failure(result: Result, code: int) -> None:
    assert result.code == code, result.output
    assert "Traceback" not in result.output
    assert result.err.strip(), "a failure must say what went wrong on stderr"


def history_rows(text: str) -> dict[int, list[str]]:
    """The first line of each row of ``persona history``'s table, split into cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 6 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


# -- help -----------------------------------------------------------------------------------

COMMAND_ARGUMENTS = {
    "init": ["user_id", "--name", "--from"],
    "show": ["user_id", "--version", "--format"],
    "validate": ["file"],
    "set": ["user_id", "file", "--reason", "--expect-version"],
    "schema": [],
    "history": ["user_id"],
    "diff": ["user_id", "old", "new"],
    "rollback": ["user_id", "version", "--reason"],
    "export": ["user_id", "--output"],
    "delete": ["user_id", "--yes"],
    "demo": ["--home"],
    "worker": ["--until-idle"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_ARGUMENTS))
def test_every_command_has_help_naming_its_arguments(run, command):
    result = run(command, "--help")
    assert result.code == 0, result.output
    # the program name is whatever sys.argv[0] is; the command follows it
    assert re.search(rf"Usage: .* {command} \[OPTIONS\]", result.out), result.out
    for argument in COMMAND_ARGUMENTS[command]:
        assert argument in result.out, f"`{command} --help` does not mention {argument}"


def test_top_level_help_lists_every_command(run):
    result = run("--help")
    assert result.code == 0
    for command in COMMAND_ARGUMENTS:
        assert re.search(rf"\b{command}\b", result.out), command
    assert "--store" in result.out and "--config" in result.out


# -- the full lifecycle, on SQLite and PostgreSQL -------------------------------------------


def test_lifecycle(run, store_url, tmp_path):
    def persona(*args: str | Path) -> Result:
        return run("--store", store_url, *args)

    expected = alice_content()

    created = persona("init", "alice")
    assert created.code == 0, created.output
    assert "version 1" in created.out

    saved = persona("set", "alice", ALICE, "--reason", "imported profile")
    assert saved.code == 0, saved.output
    assert "version 2" in saved.out

    # show, YAML and JSON, parse back to exactly the file's content
    as_yaml = persona("show", "alice")
    assert as_yaml.code == 0, as_yaml.output
    shown = yaml.safe_load(as_yaml.out)
    assert content(shown) == expected
    assert shown["meta"]["version"] == 2 and shown["meta"]["user_id"] == "alice"
    # spot checks against the raw file, independent of the library's normalization
    raw = yaml.safe_load(ALICE.read_text(encoding="utf-8"))
    assert shown["demographics"]["age"] == raw["demographics"]["age"] == 34
    assert shown["identity"]["name"] == raw["identity"]["name"]
    assert shown["tools"] == raw["tools"] and shown["extensions"] == raw["extensions"]
    assert shown["demographics"]["moved_in"] == "2024-03-01"  # a date stays text
    assert content(loads(as_yaml.out).to_dict()) == expected  # the library reads it back

    as_json = persona("show", "alice", "--format", "json")
    assert as_json.code == 0, as_json.output
    assert content(json.loads(as_json.out)) == expected
    assert json.loads(as_json.out)["meta"]["version"] == 2

    first = persona("show", "alice", "--version", "1", "-f", "json")
    assert first.code == 0, first.output
    version1 = json.loads(first.out)
    assert version1["meta"]["version"] == 1
    assert version1["identity"] == {"user_id": "alice"}
    assert "demographics" not in version1

    listed = persona("history", "alice")
    assert listed.code == 0, listed.output
    rows = history_rows(listed.out)
    assert sorted(rows) == [1, 2]
    assert rows[1][2] == "create" and rows[1][3] == "persona init"
    assert rows[2][2] == "user edit" and rows[2][3] == "imported profile"

    changes = persona("diff", "alice", "1", "2")
    assert changes.code == 0, changes.output
    assert re.search(r"^\+ demographics\.age: 34$", changes.out, re.M), changes.out
    assert re.search(r"^\+ identity\.name: \"Alice Martins\"$", changes.out, re.M)
    assert "identity.user_id" not in changes.out  # unchanged between the two versions

    restored = persona("rollback", "alice", "1", "--reason", "undo import")
    assert restored.code == 0, restored.output
    assert "version 3" in restored.out

    current = persona("show", "alice", "-f", "json")
    assert current.code == 0, current.output
    now = json.loads(current.out)
    assert content(now) == content(version1)
    assert now["meta"]["version"] == 3

    rows = history_rows(persona("history", "alice").out)
    assert sorted(rows) == [1, 2, 3]
    assert rows[3][2] == "rollback to version 1" and rows[3][3] == "undo import"

    exported = persona("export", "alice")
    assert exported.code == 0, exported.output
    data = json.loads(exported.out)
    assert data["user_id"] == "alice"
    assert [v["version"] for v in data["versions"]] == [1, 2, 3]
    assert [v["source"] for v in data["versions"]] == [
        "create",
        "user edit",
        "rollback to version 1",
    ]
    assert content(data["versions"][1]["document"]) == expected
    assert content(data["versions"][2]["document"]) == content(version1)
    assert all(v["user_id"] == "alice" for v in data["versions"])

    target = tmp_path / "export[final].json"  # brackets are not Rich markup here
    to_file = persona("export", "alice", "--output", target)
    assert to_file.code == 0, to_file.output
    assert to_file.out == ""
    assert "3 versions" in to_file.err and str(target) in to_file.err
    assert json.loads(target.read_text(encoding="utf-8"))["versions"] == data["versions"]

    deleted = persona("delete", "alice", "--yes")
    assert deleted.code == 0, deleted.output
    assert "3 versions" in deleted.out

    gone = persona("show", "alice")
    assert_clean_failure(gone, 1)
    assert "alice" in gone.err and "persona init" in gone.err
    with PersonaStore(store_url) as store:
        assert not store.exists("alice")


def test_init_with_name_and_from_file(run, tmp_path):
    assert run("init", "bob", "--name", "Bob Stone").code == 0
    shown = yaml.safe_load(run("show", "bob").out)
    assert shown["identity"] == {"name": "Bob Stone", "user_id": "bob"}

    from_file = run("init", "alice", "--from", ALICE)
    assert from_file.code == 0, from_file.output
    assert content(yaml.safe_load(run("show", "alice").out)) == alice_content()


def test_init_twice_is_a_conflict(run):
    assert run("init", "alice").code == 0
    again = run("init", "alice")
    assert_clean_failure(again, 1)
    assert "version 1" in again.err


def test_init_from_another_users_file_is_rejected(run):
    # alice.yaml says identity.user_id: alice
    result = run("init", "bob", "--from", ALICE)
    assert_clean_failure(result, 2)
    assert "identity.user_id" in result.err and "'alice'" in result.err
    assert run("show", "bob").code == 1


def test_invalid_user_id_is_bad_input(run):
    result = run("init", "not a user!")
    assert_clean_failure(result, 2)
    assert "user_id" in result.err and "not a valid user id" in result.err


def test_diff_colours_added_removed_and_replaced_fields(run, tmp_path, monkeypatch):
    edited = load(ALICE).to_dict()
    edited["demographics"]["age"] = 35
    del edited["identity"]["pronouns"]
    edited["personality"]["values"].append("patience")
    edited_file = tmp_path / "edited.yaml"
    edited_file.write_text(yaml.safe_dump(edited), encoding="utf-8")
    assert run("init", "alice", "--from", ALICE).code == 0
    assert run("set", "alice", edited_file).code == 0

    buffer = io.StringIO()
    colour = Console(file=buffer, force_terminal=True, color_system="standard", soft_wrap=True)
    monkeypatch.setattr(cli, "out", colour)
    result = run("diff", "alice", "1", "2")
    assert result.code == 0, result.output
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3, lines
    by_path = {re.sub(r"\x1b\[[0-9;]*m", "", line).split(":")[0]: line for line in lines}
    green, red, yellow = "\x1b[32m", "\x1b[31m", "\x1b[33m"
    assert by_path["+ personality.values[2]"].startswith(green)
    assert "patience" in by_path["+ personality.values[2]"]
    assert by_path["- identity.pronouns"].startswith(red)
    assert by_path["~ demographics.age"].startswith(yellow)
    assert "34 -> 35" in by_path["~ demographics.age"]


def test_diff_of_equal_versions_says_so(run):
    assert run("init", "alice", "--from", ALICE).code == 0
    assert run("rollback", "alice", "1").code == 0
    result = run("diff", "alice", "1", "2")
    assert result.code == 0
    assert "same content" in result.out


def test_set_from_stdin_and_expect_version(run):
    assert run("init", "alice").code == 0
    saved = run("set", "alice", "-", "--expect-version", "1", stdin=ALICE.read_bytes())
    assert saved.code == 0, saved.output
    assert "version 2" in saved.out
    assert content(yaml.safe_load(run("show", "alice").out)) == alice_content()


def test_set_with_stale_expect_version_is_a_conflict_and_saves_nothing(run, tmp_path):
    assert run("init", "alice").code == 0
    assert run("set", "alice", ALICE).code == 0
    before = run("show", "alice", "-f", "json").out
    other = tmp_path / "other.yaml"
    other.write_text("identity: {name: Someone Else}\n", encoding="utf-8")

    result = run("set", "alice", other, "--expect-version", "1")
    assert_clean_failure(result, 1)
    assert "version 2" in result.err and "expected version 1" in result.err
    assert run("show", "alice", "-f", "json").out == before
    assert sorted(history_rows(run("history", "alice").out)) == [1, 2]


# -- bad input ------------------------------------------------------------------------------

BAD_DOCUMENTS = {
    # name: (file bytes, what stderr must name beyond the source, what to do)
    "malformed-yaml": (
        b"identity:\n  name: [unclosed\ndemographics: {}\n",
        ["document", "malformed YAML", "line "],
        "Fix the syntax",
    ),
    "wrong-type": (
        b"demographics: {age: thirty}\n",
        ["field 'demographics.age'", "thirty"],
        "persona schema",
    ),
    "unknown-top-level-key": (
        b"personalty: {mbti: INTJ}\n",
        ["field 'personalty'", "unknown key"],
        "extensions",
    ),
    "nested-list-field": (
        b"memory:\n  short_term:\n    - {content: hi}\n",
        ["field 'memory.short_term[0].role'"],
        "Add the field",
    ),
    "not-utf8": (
        b"identity:\n  name: Jos\xe9\n",
        ["not UTF-8", "0xe9"],
        "Save the file as UTF-8",
    ),
    "oversized-value": (
        b"personality:\n  description: " + b"x" * 2001 + b"\n",
        ["field 'personality.description'", "2001 characters", "cap of 2000"],
        "PERSONA_MAX_VALUE_CHARS",
    ),
}


@pytest.fixture
def alice_at_v2(run) -> str:
    """alice stored at version 2 (alice.yaml); returns that version as JSON."""
    assert run("init", "alice").code == 0
    assert run("set", "alice", ALICE).code == 0
    return run("show", "alice", "-f", "json").out


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_document_is_rejected_clearly_and_loses_nothing(run, tmp_path, alice_at_v2, case):
    raw, named, hint = BAD_DOCUMENTS[case]
    bad = tmp_path / f"{case}.yaml"
    bad.write_bytes(raw)

    for argv in (("validate", bad), ("set", "alice", bad)):
        result = run(*argv)
        assert_clean_failure(result, 2)
        assert result.out == ""
        message = result.err.strip()
        assert len(message.splitlines()) == 1, f"want one message, got: {message}"
        assert str(bad) in message, "the message must name the source"
        for fragment in named:
            assert fragment in message
        assert hint in message, "the message must say what to do"

    assert run("show", "alice", "-f", "json").out == alice_at_v2
    assert sorted(history_rows(run("history", "alice").out)) == [1, 2]


def test_value_at_the_cap_is_accepted(run, tmp_path):
    at_cap = tmp_path / "at-cap.yaml"
    at_cap.write_text("personality:\n  description: " + "x" * 2000 + "\n", encoding="utf-8")
    result = run("validate", at_cap)
    assert result.code == 0, result.output
    assert "valid" in result.out


def test_max_value_chars_setting_lowers_the_cap(run, tmp_path, monkeypatch):
    doc = tmp_path / "forty-one.yaml"
    doc.write_text("personality:\n  description: " + "y" * 41 + "\n", encoding="utf-8")
    assert run("validate", doc).code == 0  # fine under the default cap

    monkeypatch.setenv("PERSONA_MAX_VALUE_CHARS", "40")
    result = run("validate", doc)
    assert_clean_failure(result, 2)
    assert "personality.description" in result.err
    assert "41 characters" in result.err and "cap of 40" in result.err

    assert run("init", "alice").code == 0
    rejected = run("set", "alice", doc)
    assert_clean_failure(rejected, 2)
    assert run("show", "alice", "--version", "2").code == 1  # nothing was saved


def test_invalid_setting_is_bad_input(run, monkeypatch):
    monkeypatch.setenv("PERSONA_MAX_VALUE_CHARS", "zero")
    result = run("validate", ALICE)
    assert_clean_failure(result, 2)
    assert "PERSONA_MAX_VALUE_CHARS" in result.err


def test_invalid_config_file_is_bad_input(run, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[persona]\nmax_value_chars = 0\n", encoding="utf-8")
    result = run("--config", config, "validate", ALICE)
    assert_clean_failure(result, 2)
    assert "max_value_chars" in result.err


def test_invalid_store_url_is_bad_input(run):
    result = run("--store", "not a url", "show", "alice")
    assert_clean_failure(result, 2)
    assert "not a database URL" in result.err


def test_show_format_must_be_yaml_or_json(run, alice_at_v2):
    result = run("show", "alice", "--format", "xml")
    assert_clean_failure(result, 2)
    assert "xml" in result.err and "yaml or json" in result.err
    # the format name is not case-sensitive
    upper = run("show", "alice", "--format", "JSON")
    assert upper.code == 0
    assert json.loads(upper.out) == json.loads(alice_at_v2)


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "nobody"],
        ["history", "nobody"],
        ["diff", "nobody", "1", "2"],
        ["rollback", "nobody", "1"],
        ["export", "nobody"],
        ["delete", "nobody", "--yes"],
    ],
    ids=lambda argv: argv[0],
)
def test_unknown_user_fails_with_exit_1(run, argv):
    result = run(*argv)
    assert_clean_failure(result, 1)
    assert "'nobody'" in result.err and "no persona" in result.err


def test_unknown_version_says_which_versions_exist(run, alice_at_v2):
    result = run("show", "alice", "--version", "99")
    assert_clean_failure(result, 1)
    assert "99" in result.err and "1 to 2" in result.err
    for argv in (("diff", "alice", "1", "99"), ("rollback", "alice", "99")):
        assert_clean_failure(run(*argv), 1)
    assert run("show", "alice", "-f", "json").out == alice_at_v2  # rollback saved nothing


def test_non_integer_version_is_bad_input(run, alice_at_v2):
    result = run("diff", "alice", "one", "2")
    assert_clean_failure(result, 2)
    assert "old" in result.err


def test_delete_without_yes_when_not_interactive_deletes_nothing(run, alice_at_v2):
    # even an answer waiting on stdin is not consent
    result = run("delete", "alice", stdin=b"y\n")
    assert_clean_failure(result, 2)
    assert "--yes" in result.err
    assert run("show", "alice", "-f", "json").out == alice_at_v2


def test_validate_reads_stdin(run):
    good = run("validate", "-", stdin=b"identity: {name: Ana}\npreference: {style: terse}\n")
    assert good.code == 0, good.output
    assert "valid" in good.out and "identity" in good.out and "preference" in good.out
    assert "demographics" not in good.out

    bad = run("validate", "-", stdin=b"demographics: {age: thirty}\n")
    assert_clean_failure(bad, 2)
    assert "<stdin>" in bad.err and "demographics.age" in bad.err


def test_validate_reports_the_file_name_verbatim(run, tmp_path):
    # "[draft]" would be swallowed if the name were printed as Rich markup
    named = tmp_path / "alice[draft].yaml"
    named.write_bytes(ALICE.read_bytes())
    result = run("validate", named)
    assert result.code == 0, result.output
    assert f"{named}: valid" in result.out
    assert all(section in result.out for section in SECTION_NAMES)


def test_validate_missing_file_is_bad_input(run, tmp_path):
    missing = tmp_path / "missing.yaml"
    result = run("validate", missing)
    assert_clean_failure(result, 2)
    assert str(missing) in result.err and "cannot read" in result.err


# -- schema and demo ------------------------------------------------------------------------


def test_schema_is_json_schema_of_the_whole_document(run):
    result = run("schema")
    assert result.code == 0
    schema = json.loads(result.out)
    assert {*SECTION_NAMES, "extensions", "tools", "meta"} <= set(schema["properties"])
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(load(ALICE).to_dict()))
    wrong = {"demographics": {"age": "thirty"}}
    assert any("age" in map(str, e.absolute_path) for e in validator.iter_errors(wrong))


def test_demo_runs_and_leaves_versions_behind(run, tmp_path):
    home = tmp_path / "demo-home"
    result = run("demo", "--home", home)
    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    with PersonaStore(f"sqlite:///{home / 'personas.db'}") as store:
        records = store.history("alice")
        assert len(records) >= 4
        assert [r.version for r in records] == list(range(1, len(records) + 1))
        # the demo ends by rolling back its last turn
        last = records[-1]
        assert last.source == f"rollback to version {last.version - 2}"
        rolled_back_to = store.get("alice", last.version - 2)
        assert store.get("alice").content_dict() == rolled_back_to.content_dict()
        assert store.get("alice").identity.name == "Alice"
        # part 3: the local model and its reflection adapter, nothing scripted
        greta = store.get("greta")
        assert greta.demographics.location == "Tallinn"
        assert greta.demographics.native_language == "Estonian"
        assert "Ignore previous instructions" not in greta.to_yaml()
    assert '+ demographics.location: "Tallinn"' in result.output


# -- the real executable --------------------------------------------------------------------


def run_exe(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PERSONA_EXE), *map(str, args)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "code", "expect"),
    [
        (["show", "alice", "--format", "xml"], 2, "yaml or json"),
        (["set", "alice", "{bad}"], 2, "demographics.age"),
        (["show", "nobody"], 1, "no persona"),
        (["delete", "alice"], 2, "--yes"),
        (["show", "alice", "--no-such-option"], 2, "--no-such-option"),
    ],
    ids=["bad-format", "bad-document", "unknown-user", "delete-no-yes", "unknown-option"],
)
def test_executable_exit_codes_without_traceback(run, tmp_path, argv, code, expect):
    assert PERSONA_EXE.exists(), f"no persona script next to {sys.executable}"
    assert run("init", "alice").code == 0  # same PERSONA_HOME as the subprocess
    bad = tmp_path / "bad.yaml"
    bad.write_text("demographics: {age: thirty}\n", encoding="utf-8")
    argv = [str(bad) if a == "{bad}" else a for a in argv]

    proc = run_exe(*argv)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert expect in proc.stderr
    # the persona is still there, unchanged
    assert json.loads(run("show", "alice", "-f", "json").out)["meta"]["version"] == 1


def test_executable_help_and_success(tmp_path):
    proc = run_exe("--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout
    proc = run_exe("validate", "-", stdin=ALICE.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


# -- persona chat ---------------------------------------------------------------------------


def test_chat_runs_offline_and_creates_the_persona(tmp_path: Path) -> None:
    """The terminal chat on the embedded defaults: echo model, SQLite, Chroma."""
    result = run_exe("chat", "carol", stdin=b"I live in Porto\nWhere do I live?\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert 'assistant> You said: "I live in Porto"' in result.stdout
    # in the same conversation the first turn is in the thread, so it is not recalled again
    second = next(line for line in result.stdout.splitlines() if "Where do I live?" in line)
    assert "0 facts" in second
    assert "persona v0 -> v1" in result.stdout  # the first turn created the persona
    # in a new conversation, long-term memory recalls it into the prompt
    later = run_exe("chat", "carol", "--thread", "another", stdin=b"Where do I live?\n/quit\n")
    assert later.returncode == 0, later.stderr
    asked = next(line for line in later.stdout.splitlines() if "Where do I live?" in line)
    assert "0 facts" not in asked
    from persona_plugin import PersonaStore, Settings

    with PersonaStore.from_settings(Settings.load()) as store:
        assert store.current_version("carol") == 1


def test_chat_shows_the_mbr_choice(tmp_path: Path) -> None:
    result = run_exe("chat", "dana", "--mbr", "2", stdin=b"Hello there\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "MBR: candidate 1 of 2; preferences: " in result.stdout
    bad = run_exe("chat", "dana", "--mbr", "99", stdin=b"/quit\n")
    assert bad.returncode == 2 and "--mbr" in bad.stderr


def test_describe_reply_names_the_adapters_and_the_mbr_choice() -> None:
    meta = {
        "retrieved": [["concise", 0.95, 0.61], ["formal", 0.05, 0.42]],
        "served_by": "merged",
        "mbr": {"chosen": 1, "n": 4, "weights": {"brevity": 0.7}, "chosen_scores": {}},
    }
    assert cli.describe_reply(meta) == [
        "adapters: concise 0.95, formal 0.05 (served: merged)",
        "MBR: candidate 2 of 4; preferences: brevity +0.70",
    ]
    assert cli.describe_reply({"model_name": "echo"}) == []


def test_chat_rejects_an_unknown_reflection_mode() -> None:
    result = run_exe("chat", "carol", "--reflection", "sometimes", stdin=b"/quit\n")
    assert result.returncode == 2
    assert "sometimes" in result.stderr and "Traceback" not in result.stderr


def test_prefs_is_mounted_and_reads_the_configured_hub(run, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PERSONA_PREFS_DIR", str(tmp_path / "prefs"))
    listed = run("prefs", "list", "--json")
    assert listed.code == 0, listed.err
    ids = {card["id"] for card in json.loads(listed.out)}
    assert {"brevity", "formality", "warmth"} <= ids  # the bundled demo models
    missing = run("prefs", "show", "no-such-model")
    assert missing.code == 1 and "no-such-model" in missing.err


def test_reading_from_a_mistyped_store_path_is_an_error_not_an_empty_store(
    run, tmp_path: Path
) -> None:
    missing = tmp_path / "typo" / "personas.db"
    for args in (["show", "alice"], ["history", "alice"], ["export", "alice"]):
        result = run("--store", f"sqlite:///{missing}", *args)
        assert result.code == 2 and "no persona store" in result.err, result.output
    assert not missing.parent.exists()
    assert run("--store", f"sqlite:///{missing}", "init", "alice").code == 0
    assert run("--store", f"sqlite:///{missing}", "show", "alice").code == 0


def test_history_takes_a_limit_and_hides_versions_that_changed_nothing(run, alice_at_v2) -> None:
    with PersonaStore.from_settings() as store:
        store.update("alice", lambda p: None, source="touch", reason="nothing changed")
        store.update("alice", lambda p: p.personality.interests.append("tango"))
        assert store.current_version("alice") == 4
    shown = run("history", "alice")
    assert shown.code == 0 and "touch" not in shown.out and "tango" in shown.out
    assert "touch" in run("history", "alice", "--all").out
    assert "persona init" in shown.out  # version 1 is where the persona began
    latest = run("history", "alice", "--limit", "1")
    assert "tango" in latest.out and "persona init" not in latest.out


def test_chat_feedback_commands_reach_the_interaction_log(tmp_path: Path) -> None:
    result = run_exe(
        "chat",
        "erin",
        stdin=b"/good\nHello there\n/good nice\n/bad too stiff\n/edit Hi!\n/again\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "no reply to give feedback on yet" in result.stdout
    # /again sent the message once more
    assert result.stdout.count('assistant> You said: "Hello there"') == 2
    from persona_plugin import PersonaStore, Settings
    from persona_plugin.interactions import InteractionLog

    with PersonaStore.from_settings(Settings.load()) as store:
        log = InteractionLog.on(store)
        first, second = log.turns("erin")
        assert first.user_text == second.user_text == "Hello there"
        events = [(e.turn_id, e.kind, e.rating, e.comment, e.text) for e in log.feedback("erin")]
    assert events == [
        (first.turn_id, "rating", 1, "nice", None),
        (first.turn_id, "rating", -1, "too stiff", None),
        (first.turn_id, "edit", None, None, "Hi!"),
        (first.turn_id, "regenerate", None, None, None),
    ]


# -- the reflection worker --------------------------------------------------------------------


def test_worker_reflects_on_what_is_queued_with_the_local_model(run, tmp_path, monkeypatch):
    from persona_plugin.interactions import PENDING, InteractionLog
    from persona_plugin.store import PersonaStore

    url = f"sqlite:///{tmp_path / 'personas.db'}"
    with PersonaStore(url) as store:
        InteractionLog.on(store).record_turn(
            "greta",
            "t1",
            user_text="These days I'm based in Tallinn.",
            reply_text="Nice city!",
            reflection=PENDING,
        )
    monkeypatch.setenv("PERSONA_CHAT_MODEL", "echo")
    refused = run("--store", url, "worker", "--until-idle")
    assert_clean_failure(refused, 2)
    assert "PERSONA_CHAT_MODEL" in refused.err
    monkeypatch.setenv("PERSONA_CHAT_MODEL", "local")
    result = run("--store", url, "worker", "--until-idle")
    assert result.code == 0, result.output
    assert "reflected 1 turns and 0 feedback events in 1 reflections; 0 failed" in result.out
    with PersonaStore(url) as store:
        assert store.get("greta").demographics.location == "Tallinn"
        (turn,) = InteractionLog.on(store).turns("greta")
        assert turn.reflection == "done" and turn.reflected_version == 1
