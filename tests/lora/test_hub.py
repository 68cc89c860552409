"""The LoRA hub: adapter cards, their validation, the hub directory and ``persona lora``."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import persona_plugin.cli.app as cli
from persona_plugin.config import Settings
from persona_plugin.errors import PersonaConfigError, PersonaNotFoundError, PersonaValidationError
from persona_plugin.lora.hub import (
    ADAPTER_KINDS,
    BUNDLED_LORA_DIR,
    AdapterCard,
    LoraHub,
    load_card,
    loads_card,
    mixture_matches,
    parse_card,
)

CARD: dict[str, Any] = {
    "id": "formal-concise",
    "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
    "description": "Answers in a formal, concise, professional register.",
    "kind": "style",
    "tags": ["formal", "concise"],
    "rank": 16,
    "target_modules": ["q_proj", "v_proj"],
    "location": "acme/qwen-formal-concise-lora",
    "servers": ["tgi-main"],
    "sample_inputs": ["Draft a reply to the board about the delay."],
}


def card(**changes: Any) -> dict[str, Any]:
    data = {**CARD, **changes}
    return {k: v for k, v in data.items() if v is not None}


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# -- cards --------------------------------------------------------------------------------


def test_a_valid_card() -> None:
    c = parse_card(card())
    assert c.servers == {"tgi-main": "formal-concise"}  # the short form: known by its id
    assert c.kind == "style" and not c.is_premerged and not c.location_is_local
    assert c.embedding_texts() == [
        "Answers in a formal, concise, professional register. Tags: formal, concise.",
        "Draft a reply to the board about the delay.",
    ]
    other = parse_card(card(servers={"tgi-main": "acme/formal", "vllm": "formal"}))
    assert other.servers == {"tgi-main": "acme/formal", "vllm": "formal"}
    assert set(ADAPTER_KINDS) >= {"knowledge", "personality", "memory", "style", "reflection"}


def test_a_card_round_trips_and_hashes_its_content() -> None:
    c = parse_card(card())
    again = loads_card(c.to_yaml(), source="x.yaml")
    assert again == c and again.content_hash == c.content_hash
    assert yaml.safe_load(c.to_yaml())["servers"] == ["tgi-main"]
    assert "content_hash" not in c.model_dump()
    assert parse_card(card(description="Something else.")).content_hash != c.content_hash
    edited = c.model_copy(update={"description": "Something else."})
    assert edited.content_hash != c.content_hash  # not the original's cached hash
    with pytest.raises(Exception):  # noqa: B017 - frozen: a card is not edited in place
        c.rank = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (card(description=None), "description", "required"),
        (card(kind="stile"), "kind", "is not a kind"),
        (card(id="formal concise"), "id", "not a valid adapter id"),
        (card(id="org/formal"), "id", "no spaces or slashes"),
        (card(rank=0), "rank", "greater than or equal to 1"),
        (card(rank="16"), "rank", "valid integer"),
        (card(target_modules=[]), "target_modules", "at least 1"),
        (card(tags="formal"), "tags", "valid list"),
        (card(servers=[1]), "servers", "server names"),
        (card(colour="blue"), "colour", "unknown key"),
        (card(merge_of=[{"id": "a", "weight": 1}]), "merge_of", "at least two"),
        (card(merge_of=[{"id": "a", "weight": 1}, {"id": "a", "weight": 2}]), "merge_of", "twice"),
        (
            card(merge_of=[{"id": "a", "weight": 0}, {"id": "b", "weight": 1}]),
            "merge_of[0].weight",
            "greater than 0",
        ),
    ],
)
def test_bad_cards_name_the_file_and_the_field(
    tmp_path: Path, data: dict[str, Any], field: str, words: str
) -> None:
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(PersonaValidationError) as info:
        load_card(path)
    message = str(info.value)
    assert info.value.source == str(path) and str(path) in message
    assert info.value.path == field, message
    assert words in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("id: a\nkind: [style\n", "malformed YAML at line"),
        ("id: a\nid: b\n", "duplicate key"),
        ("- just\n- a list\n", "not a mapping"),
        ("", "card is empty"),
    ],
)
def test_unreadable_cards(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(PersonaValidationError, match=words) as info:
        load_card(path)
    assert str(path) in str(info.value)
    with pytest.raises(PersonaValidationError, match="cannot read"):
        load_card(tmp_path / "missing.yaml")


def test_every_problem_of_a_card_is_listed() -> None:
    with pytest.raises(PersonaValidationError) as info:
        parse_card(card(kind="stile", rank=-1, colour="blue"), source="c.yaml")
    fields = [p for p, _ in info.value.problems]
    assert fields == ["kind", "rank", "colour"]


def test_local_locations_resolve_against_the_card(tmp_path: Path) -> None:
    (tmp_path / "cards").mkdir()
    path = write(tmp_path / "cards" / "a.yaml", card(location="./weights/formal"))
    c = load_card(path)
    assert c.location_is_local
    assert c.resolved_location == str((tmp_path / "cards" / "weights" / "formal").resolve())
    assert parse_card(card(location="/abs/path")).resolved_location == "/abs/path"
    assert parse_card(card(location="org/name")).resolved_location == "org/name"


# -- the hub ------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> LoraHub:
    return LoraHub(tmp_path / "lora")


def test_an_empty_or_missing_hub(hub: LoraHub) -> None:
    assert hub.cards() == [] and len(hub) == 0 and "x" not in hub
    with pytest.raises(PersonaNotFoundError, match="not in the LoRA hub") as info:
        hub.get("formal-concise")
    assert "persona lora add" in str(info.value)


def test_add_get_list_remove(tmp_path: Path, hub: LoraHub) -> None:
    added = hub.add(write(tmp_path / "my card.yml", card()))
    assert added.path == hub.directory / "formal-concise.yaml"
    hub.add(parse_card(card(id="casual", kind="personality")))
    assert hub.ids() == ["casual", "formal-concise"]
    assert hub.get("casual").kind == "personality" and "casual" in hub
    with pytest.raises(PersonaValidationError, match="already in the hub") as info:
        hub.add(parse_card(card(id="casual", kind="style")))
    assert info.value.path == "id"
    hub.add(parse_card(card(id="casual", kind="style")), replace=True)
    assert hub.get("casual").kind == "style"
    hub.remove("casual")
    assert hub.ids() == ["formal-concise"]
    assert not any(p.name.endswith(".tmp") for p in hub.directory.iterdir())


def test_add_makes_a_relative_location_absolute(tmp_path: Path, hub: LoraHub) -> None:
    path = write(tmp_path / "a.yaml", card(location="./weights"))
    assert hub.add(path).location == str((tmp_path / "weights").resolve())


def test_hand_written_cards_are_read_and_rechecked(hub: LoraHub) -> None:
    hub.directory.mkdir(parents=True)
    write(hub.directory / "one.yaml", card(id="one"))
    (hub.directory / "two.json").write_text(json.dumps(card(id="two")))
    write(hub.directory / ".hidden.yaml", card(id="hidden"))
    write(hub.directory / "notes.txt", "not a card")
    assert hub.ids() == ["one", "two"]
    first = hub.get("one")
    assert hub.get("one") is first  # unchanged files are not re-read
    time.sleep(0.01)
    write(hub.directory / "one.yaml", card(id="one", rank=32))
    os.utime(hub.directory / "one.yaml", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert hub.get("one").rank == 32
    write(hub.directory / "three.yaml", card(id="three", kind="mood"))
    with pytest.raises(PersonaValidationError, match=r"three\.yaml") as info:
        hub.cards()
    assert info.value.path == "kind"
    write(hub.directory / "three.yaml", card(id="one"))
    with pytest.raises(PersonaValidationError, match="also used by") as info:
        hub.cards()
    assert "one.yaml" in str(info.value) and "three.yaml" in str(info.value)


def test_servers_and_premerged_cards(hub: LoraHub) -> None:
    hub.add(parse_card(card(id="formal", servers={"tgi": "acme/formal", "vllm": "formal"})))
    hub.add(parse_card(card(id="kb", kind="knowledge", servers=["tgi"])))
    merged = card(
        id="formal-kb",
        servers=["tgi"],
        merge_of=[{"id": "formal", "weight": 3}, {"id": "kb", "weight": 1}],
    )
    hub.add(parse_card(merged))
    assert hub.served_on("tgi") == {"formal": "acme/formal", "kb": "kb", "formal-kb": "formal-kb"}
    assert hub.served_on("vllm") == {"formal": "formal"}
    assert hub.premerged_on("tgi") == {"formal-kb": {"formal": 0.75, "kb": 0.25}}
    assert hub.premerged_on("vllm") == {}
    found = hub.find_premerged([("kb", 0.27), ("formal", 0.73)], server="tgi")
    assert found is not None and found.id == "formal-kb"
    assert hub.find_premerged({"kb": 0.5, "formal": 0.5}) is None  # beyond the tolerance
    assert hub.find_premerged({"kb": 0.5, "formal": 0.5}, tolerance=0.3) is not None
    assert hub.find_premerged([("formal", 1.0)]) is None


def test_mixture_matching() -> None:
    assert mixture_matches({"a": 3, "b": 1}, {"a": 0.75, "b": 0.25}, tolerance=0)
    assert not mixture_matches({"a": 1}, {"a": 1, "b": 0.1})
    assert not mixture_matches({}, {})


def test_the_hub_directory_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load()
    assert settings.resolved_lora_dir == settings.home / "lora"
    assert LoraHub.from_settings(settings).directory == settings.home / "lora"
    monkeypatch.setenv("PERSONA_LORA_DIR", str(tmp_path / "cards"))
    assert LoraHub.from_settings(Settings.load()).directory == tmp_path / "cards"


def test_bundled_cards_under_the_users_own(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write(shipped / "concise.yaml", card(id="concise", description="shipped"))
    write(shipped / "formal.yaml", card(id="formal"))
    hub = LoraHub(tmp_path / "mine", bundled=[shipped])
    assert hub.ids() == ["concise", "formal"] and hub.directories[-1] == tmp_path / "mine"
    assert hub.is_bundled(hub.get("concise"))
    with pytest.raises(PersonaValidationError, match="already in the hub"):
        hub.add(parse_card(card(id="concise", description="mine")))
    # a user card overrides the bundled one with its id, and removing it brings that back
    hub.add(parse_card(card(id="concise", description="mine")), replace=True)
    assert hub.get("concise").description == "mine" and not hub.is_bundled(hub.get("concise"))
    assert (shipped / "concise.yaml").is_file()  # the bundled file is never touched
    hub.remove("concise")
    assert hub.get("concise").description == "shipped"
    with pytest.raises(PersonaConfigError, match=r"bundled .* overrides"):
        hub.remove("formal")
    assert hub.ids() == ["concise", "formal"]
    assert "bundled=" in repr(hub)


def test_the_default_hub_includes_the_bundled_adapters() -> None:
    hub = LoraHub.from_settings(Settings.load())
    assert hub.bundled == (BUNDLED_LORA_DIR,)
    assert {"concise", "formal", "playful"} <= set(hub.ids())
    assert LoraHub.from_settings(Settings.load(), bundled=False).bundled == ()


def test_a_file_where_the_hub_should_be(tmp_path: Path) -> None:
    (tmp_path / "lora").write_text("")
    with pytest.raises(PersonaValidationError, match="not a directory"):
        LoraHub(tmp_path / "lora").cards()


def test_cards_are_pydantic_models() -> None:
    assert AdapterCard.model_json_schema()["properties"]["kind"]["enum"] == list(ADAPTER_KINDS)


# -- the CLI ------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("PERSONA_LORA_DIR", str(tmp_path / "hub"))

    def _run(*args: str | Path) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli.main(["lora", *map(str, args)])
        captured = capsys.readouterr()
        assert isinstance(info.value.code, int)
        return Result(info.value.code, captured.out, captured.err)

    return _run


def test_cli_add_list_show(run: Any, tmp_path: Path) -> None:
    result = run("list")  # the user's hub is empty: the bundled adapters show
    assert result.code == 0 and "concise" in result.out and "playful" in result.out
    result = run("list", "--kind", "knowledge")
    assert result.code == 0 and "no adapter cards" in result.err
    path = write(tmp_path / "formal.yaml", card())
    result = run("add", path)
    assert result.code == 0 and "added adapter 'formal-concise' (style)" in result.out
    write(tmp_path / "kb.yaml", card(id="kb", kind="knowledge", servers={"tgi-main": "acme/kb"}))
    assert run("add", tmp_path / "kb.yaml").code == 0
    result = run("list")
    assert result.code == 0
    assert "formal-concise" in result.out and "tgi-main (as acme/kb)" in result.out
    result = run("list", "--kind", "knowledge", "--json")
    assert [c["id"] for c in json.loads(result.out)] == ["kb"]
    result = run("show", "kb")
    assert result.code == 0 and yaml.safe_load(result.out)["servers"] == {"tgi-main": "acme/kb"}
    assert json.loads(run("show", "formal-concise", "-f", "json").out)["rank"] == 16


def test_cli_errors(run: Any, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", card(kind="stile"))
    result = run("add", bad)
    assert result.code == 2 and "bad.yaml" in result.err and "'kind'" in result.err
    assert "Traceback" not in result.err
    good = write(tmp_path / "good.yaml", card())
    assert run("add", good).code == 0
    result = run("add", good)
    assert result.code == 2 and "--replace" in result.err
    assert run("add", good, "--replace").code == 0
    result = run("show", "nope")
    assert result.code == 1 and "not in the LoRA hub" in result.err
    assert run("list", "--kind", "mood").code == 2


def test_cli_help(run: Any) -> None:
    result = run("--help")
    assert result.code == 0
    for command in ("list", "add", "show"):
        assert command in result.out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_added_cards_are_readable_by_others(hub: LoraHub) -> None:
    hub.add(parse_card(card()))
    assert (hub.directory / "formal-concise.yaml").stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize(
    "text", ["id: !!int abc\n", "id: !!timestamp soon\n", "id: " + "[" * 3000 + "]" * 3000]
)
def test_a_card_whose_values_break_yaml_names_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(PersonaValidationError) as exc:
        LoraHub(tmp_path).cards()
    assert "bad.yaml" in str(exc.value)
