"""The persona document: typed sections with free keys, YAML/JSON round trips, bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from persona_plugin import Persona, PersonaLimits, PersonaValidationError, json_schema, load, loads
from persona_plugin.persona import SECTION_NAMES, validate_user_id
from tests.paths import DATA

ALICE = DATA / "alice.yaml"


def test_full_document_loads_typed_and_free_keys():
    p = load(ALICE)
    assert p.identity.name == "Alice Martins"
    assert p.identity.model_extra == {"pronouns": "she/her"}
    assert p.demographics.age == 34
    # a date stays text: JSON has no date type and the round trip must not change it
    assert p.demographics.model_extra["moved_in"] == "2024-03-01"
    assert p.personality.interests == ["hiking", "jazz", "sourdough baking"]
    assert p.memory.long_term is not None and p.memory.long_term.collection == "user-alice"
    assert p.memory.short_term[1].role == "assistant"
    assert p.memory.feedback[0].turn_id == "t12"
    # a bare string item is the short form of {description: ...}
    assert p.pattern.items[1].description == "Asks for recipes after 8pm"
    # a bare string is the short form of a one-item list
    assert p.preference.format == ["bullet points"]
    assert p.extensions["work"] == {"team": "platform", "stack": ["python", "go"]}
    assert p.tools["product_kb"].collection == "product-docs"


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_is_lossless(fmt):
    original = load(ALICE)
    text = original.dump(fmt)
    again = loads(text, fmt=fmt)
    assert again == original
    assert again.dump(fmt) == text
    assert again.model_dump() == original.model_dump()


def test_yaml_and_json_forms_agree():
    p = load(ALICE)
    assert loads(p.to_json()) == loads(p.to_yaml())
    assert json.loads(p.to_json()) == yaml.safe_load(p.to_yaml())


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(
    free=st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True), _json, max_size=4),
    ext=_json,
    interests=st.lists(_text, max_size=4),
)
def test_free_keys_round_trip_losslessly(free, ext, interests):
    free = {k: v for k, v in free.items() if k not in {"name", "user_id", "user_type"}}
    p = Persona.model_validate(
        {"identity": free, "personality": {"interests": interests}, "extensions": {"x": ext}}
    )
    for fmt in ("yaml", "json"):
        again = loads(p.dump(fmt), fmt=fmt)
        assert again == p
        assert again.identity.model_extra == free
        assert again.extensions["x"] == ext


def test_every_section_accepts_free_keys():
    data = {name: {"custom_field": name} for name in SECTION_NAMES}
    p = loads(json.dumps(data))
    for name in SECTION_NAMES:
        assert getattr(p, name).model_extra == {"custom_field": name}


def test_schema_names_every_top_level_key_and_validates_the_example():
    import jsonschema

    schema = json_schema()
    assert set(schema["properties"]) == {*SECTION_NAMES, "extensions", "tools", "meta"}
    assert schema["additionalProperties"] is False
    jsonschema.validate(load(ALICE).to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"demographics": {"age": "old"}}, schema)


def test_preference_avoid_holds_what_the_user_avoids():
    p = loads("preference: {content: board games, avoid: horror films}")
    assert p.preference.avoid == ["horror films"]  # one item written as a string
    p.preference.avoid = ["peanuts", "Peanuts", "peanuts"]
    assert p.preference.avoid == ["peanuts", "Peanuts"]  # a set written in order
    field = json_schema()["$defs"]["Preference"]["properties"]["avoid"]
    assert field["type"] == "array" and "avoid" in field["description"]


@pytest.mark.parametrize(
    ("text", "path", "needle"),
    [
        ("identity: [unclosed", "", "malformed YAML at line 1"),
        ('{"identity": }', "", "malformed JSON at line 1"),
        ("demographics: {age: thirty}", "demographics.age", "'thirty'"),
        ("demographics: {age: '30'}", "demographics.age", "valid integer"),
        ("demographics: {age: true}", "demographics.age", "valid integer"),
        ("demographics: {age: 200}", "demographics.age", "less than or equal to 150"),
        ("personality: {mbti: XYZW}", "personality.mbti", "pattern"),
        ("personality: {interests: [1, 2]}", "personality.interests[0]", "valid string"),
        ("idenity: {name: A}", "idenity", "extensions"),
        ("memory: {faq: [{answer: x}]}", "memory.faq[0].question", "required"),
        ("memory: {long_term: {path: 3}}", "memory.long_term.path", "valid string"),
        ("tools: {kb: {address: x}}", "tools.kb.type", "required"),
        ("extensions: {'bad name!': {}}", "extensions", "bad name!"),
        ("meta: {version: -1}", "meta.version", "greater than or equal to 0"),
        ("meta: {schema_version: 7}", "meta.schema_version", "1"),
        ("meta: {secret: 1}", "meta.secret", "unknown key"),
        ("identity: {name: A}\nidentity: {name: B}", "", "duplicate key 'identity'"),
        ("demographics: {when: !!binary aGVsbG8=}", "demographics.when", "bytes"),
        ("demographics: {tags: !!set {a, b}}", "demographics.tags", "type set"),
        ("- just\n- a list", "", "not a mapping"),
        ("", "", "empty"),
        ('{"a": NaN}', "", "NaN"),
    ],
)
def test_bad_input_names_the_field_and_what_to_do(text, path, needle):
    with pytest.raises(PersonaValidationError) as info:
        loads(text, source="input.yaml")
    err = info.value
    assert err.path == path
    assert err.source == "input.yaml"
    message = str(err)
    assert message.startswith("input.yaml: ")
    assert needle in message
    assert err.hint and err.hint in message
    if path:
        assert f"field '{path}'" in message


def test_non_utf8_is_rejected_with_offset(tmp_path):
    file = tmp_path / "latin1.yaml"
    file.write_bytes("identity: {name: Jos\u00e9}".encode("latin-1"))
    with pytest.raises(
        PersonaValidationError, match=r"not UTF-8 .*offset 20.*Save the file as UTF-8"
    ):
        load(file)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PersonaValidationError, match="cannot read the file"):
        load(tmp_path / "nope.yaml")


def test_value_cap_default_and_configurable():
    ok = "x" * 2000
    assert loads(json.dumps({"identity": {"name": ok}})).identity.name == ok
    with pytest.raises(PersonaValidationError) as info:
        loads(json.dumps({"identity": {"name": ok + "x"}}))
    assert info.value.path == "identity.name"
    assert "2001 characters, over the cap of 2000" in str(info.value)
    small = PersonaLimits(max_value_chars=10)
    with pytest.raises(PersonaValidationError, match="over the cap of 10"):
        loads("personality: {interests: [a, abcdefghijk]}", limits=small)
    with pytest.raises(PersonaValidationError) as info:
        loads("personality: {interests: [a, abcdefghijk]}", limits=small)
    assert info.value.path == "personality.interests[1]"


def test_document_cap_counts_the_whole_document():
    many = {"extensions": {"notes": {f"k{i}": "v" * 1000 for i in range(70)}}}
    with pytest.raises(PersonaValidationError, match="over the cap of 65536"):
        loads(json.dumps(many))
    # the same document passes a larger cap
    assert loads(json.dumps(many), limits=PersonaLimits(max_document_bytes=200_000))


def test_yaml_alias_bomb_is_stopped_by_the_document_cap():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 8):
        bomb += f"b{i}: &b{i} [*{'a' if i == 1 else f'b{i - 1}'}] \n".replace(
            "] ", ", " + ", ".join([f"*{'a' if i == 1 else f'b{i - 1}'}"] * 8) + "]"
        )
    text = "extensions:\n" + "\n".join("  " + line for line in bomb.splitlines())
    with pytest.raises(PersonaValidationError, match="over the cap"):
        loads(text)


def test_several_problems_are_all_reported():
    with pytest.raises(PersonaValidationError) as info:
        loads("demographics: {age: x, gender: 3}")
    paths = [p for p, _ in info.value.problems]
    assert paths == ["demographics.gender", "demographics.age"] or paths == [
        "demographics.age",
        "demographics.gender",
    ]
    assert "also field" in str(info.value)


def test_user_id_rules():
    for good in ["alice", "U0123ABC", "slack:T1-U2", "bob@example.com", "a" * 128]:
        assert validate_user_id(good) == good
    for bad in ["", " alice", "a/b", "../etc", "a" * 129, 42, None, "al ice"]:
        with pytest.raises(PersonaValidationError, match="not a valid user id"):
            validate_user_id(bad)


def test_assignment_is_validated():
    p = Persona.new("alice")
    with pytest.raises(ValueError, match="age"):
        p.demographics.age = "old"


def test_key_cap():
    with pytest.raises(PersonaValidationError, match="a key is 201 characters") as info:
        loads(json.dumps({"identity": {"k" * 201: 1}}))
    assert info.value.path == "identity"
