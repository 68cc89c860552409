"""The persona document: six sections, free extensions, tool annotations and meta.

A persona is plain data (YAML or JSON). Each section has typed well-known keys and
accepts free keys too, so products can record what they need without a schema change;
further named sections go under ``extensions``. ``meta`` belongs to the store: it is
rewritten on every save.

Loading is strict on purpose: wrong types are errors rather than silent coercions, an
unknown top-level key is an error (it is usually a typo of a section name), YAML is read
with ``safe_load`` semantics, and size caps bound every value and the whole document.
Every rejection is a :class:`PersonaValidationError` naming the source, the field path
and what to do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
)

from persona_plugin._yaml import (
    dump_yaml,
    format_path,
    load_yaml,
    require_mapping,
    validate_document,
)
from persona_plugin.errors import PersonaValidationError

SCHEMA_VERSION = 1
SECTION_NAMES: tuple[str, ...] = (
    "identity",
    "demographics",
    "personality",
    "memory",
    "pattern",
    "preference",
)
TOP_LEVEL_KEYS: tuple[str, ...] = (*SECTION_NAMES, "extensions", "tools", "meta")

_USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:+\-]{0,127}$")
_NAME_RE = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"


def validate_user_id(user_id: object, source: str = "user id") -> str:
    """Return ``user_id`` if it is a usable user id, else raise a clear error."""
    if not isinstance(user_id, str) or not _USER_ID_RE.match(user_id):
        raise PersonaValidationError(
            source,
            "user_id",
            f"{user_id!r} is not a valid user id",
            "Use 1-128 characters: letters, digits and _ . @ : + -, starting with a "
            "letter or digit (e.g. 'alice', 'slack:U123', 'bob@example.com').",
        )
    return user_id


class PersonaLimits(BaseModel):
    """Size caps applied to every persona that is loaded or saved."""

    model_config = ConfigDict(frozen=True)

    max_value_chars: int = Field(2000, ge=1, description="longest string value or key")
    max_document_bytes: int = Field(65536, ge=256, description="largest document, as JSON")


DEFAULT_LIMITS = PersonaLimits()


# -- sections -----------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: a YAML "30" for an int is a mistake worth reporting, not coercing
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class Section(_Model):
    """A section: typed well-known keys plus any free keys (JSON values)."""

    model_config = ConfigDict(extra="allow")


def _wrap_str(value: Any) -> Any:
    # "style: concise" is the natural way to write a one-item list
    return [value] if isinstance(value, str) else value


def _unique(values: list[str]) -> list[str]:
    # a list of preferences or interests is a set written in order: appending what is
    # already there (a user edit, a second import) must not make it count twice
    return list(dict.fromkeys(values))


def _wrap_items(key: str) -> Any:
    def wrap(value: Any) -> Any:
        if isinstance(value, list):
            return [{key: item} if isinstance(item, str) else item for item in value]
        return value

    return wrap


class Identity(Section):
    name: str | None = None
    user_id: str | None = None
    user_type: str | None = Field(None, description="e.g. 'free', 'pro', 'internal'")


class Demographics(Section):
    gender: str | None = None
    age: int | None = Field(None, ge=0, le=150)
    nationality: str | None = None
    native_language: str | None = None
    location: str | None = None


class Personality(Section):
    mbti: str | None = Field(None, pattern=r"^[EI][SN][TF][JP](-[AT])?$", description="e.g. INTJ")
    values: list[str] = Field(default_factory=list)
    interests: list[str] = Field(default_factory=list)
    description: str | None = None

    _wrap = field_validator("values", "interests", mode="before")(_wrap_str)
    _dedupe = field_validator("values", "interests")(_unique)


class Turn(_Model):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str
    turn_id: str | None = None
    timestamp: str | None = None


class LongTermMemoryLink(_Model):
    """Where the user's long-term memory lives (a Chroma collection, locally or remote)."""

    model_config = ConfigDict(extra="allow")

    backend: str = "chroma"
    collection: str | None = None
    url: str | None = Field(None, description="Chroma server URL; empty for the embedded store")
    path: str | None = Field(None, description="embedded store directory; empty for the default")


class FAQ(_Model):
    model_config = ConfigDict(extra="allow")

    question: str
    answer: str | None = None


class Feedback(_Model):
    model_config = ConfigDict(extra="allow")

    text: str
    turn_id: str | None = None
    timestamp: str | None = None


class Memory(Section):
    long_term: LongTermMemoryLink | None = None
    short_term: list[Turn] = Field(default_factory=list, description="recent turns, oldest first")
    faq: list[FAQ] = Field(default_factory=list)
    functions: list[str] = Field(default_factory=list, description="frequently used functions")
    feedback: list[Feedback] = Field(default_factory=list, description="feedback and reflections")

    _wrap_functions = field_validator("functions", mode="before")(_wrap_str)
    _dedupe_functions = field_validator("functions")(_unique)
    _wrap_feedback = field_validator("feedback", mode="before")(_wrap_items("text"))


class PatternItem(_Model):
    model_config = ConfigDict(extra="allow")

    description: str
    frequency: str | None = None
    evidence: list[str] = Field(default_factory=list, description="turn ids")


class Pattern(Section):
    items: list[PatternItem] = Field(default_factory=list)

    _wrap_pattern = field_validator("items", mode="before")(_wrap_items("description"))


#: the preference section's list fields: a bare string is one item, duplicates are dropped
_PREFERENCE_LISTS = ("style", "content", "format", "reasoning", "models", "avoid")


class Preference(Section):
    style: list[str] = Field(default_factory=list)
    content: list[str] = Field(default_factory=list)
    format: list[str] = Field(default_factory=list)
    reasoning: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list, description="preferred models or agents")
    avoid: list[str] = Field(
        default_factory=list,
        description="what the user dislikes, avoids or must not have (allergies, phobias, "
        "'never'): each item is a thing to avoid, not a wish",
    )

    _wrap = field_validator(*_PREFERENCE_LISTS, mode="before")(_wrap_str)
    _dedupe = field_validator(*_PREFERENCE_LISTS)(_unique)


class ToolAnnotation(_Model):
    """A tool the persona carries, e.g. ``{type: knowledge_base, collection: docs}``."""

    model_config = ConfigDict(extra="allow")

    type: str
    description: str | None = None
    address: str | None = Field(None, description="URL or path where the tool is reached")
    collection: str | None = None


class Meta(_Model):
    user_id: str | None = None
    version: int = Field(0, ge=0)
    updated_at: str | None = Field(None, description="ISO 8601, UTC")
    schema_version: Literal[1] = SCHEMA_VERSION

    @field_validator("updated_at")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is not None:
            datetime.fromisoformat(value)
        return value


# -- the document -------------------------------------------------------------------------


class Persona(_Model):
    """A user's persona document."""

    model_config = ConfigDict(
        json_schema_extra={"title": "Persona", "description": "persona-plugin persona document"}
    )

    identity: Identity = Field(default_factory=Identity)
    demographics: Demographics = Field(default_factory=Demographics)
    personality: Personality = Field(default_factory=Personality)
    memory: Memory = Field(default_factory=Memory)
    pattern: Pattern = Field(default_factory=Pattern)
    preference: Preference = Field(default_factory=Preference)
    extensions: dict[str, JsonValue] = Field(
        default_factory=dict, description="further named sections, each rendered generically"
    )
    tools: dict[str, ToolAnnotation] = Field(default_factory=dict)
    meta: Meta = Field(default_factory=Meta)

    SECTIONS: ClassVar[tuple[str, ...]] = SECTION_NAMES

    @field_validator("extensions", "tools")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(_NAME_RE, name):
                raise ValueError(
                    f"name {name!r} must start with a letter and hold only letters, digits, "
                    "_ and - (at most 64 characters)"
                )
        return value

    # -- conversions ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict; empty sections are left out, ``meta`` always kept."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data.pop("meta", None)
        data["meta"] = self.meta.model_dump(mode="json")
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def dump(self, fmt: Literal["yaml", "json"] = "yaml") -> str:
        if fmt == "json":
            return self.to_json()
        if fmt == "yaml":
            return self.to_yaml()
        raise ValueError(f"unknown format {fmt!r}: use 'yaml' or 'json'")

    @classmethod
    def from_dict(
        cls, data: object, *, source: str = "<dict>", limits: PersonaLimits = DEFAULT_LIMITS
    ) -> Persona:
        return parse_persona(data, source=source, limits=limits)

    @classmethod
    def new(cls, user_id: str, **identity: Any) -> Persona:
        """An empty persona for ``user_id`` (cold start)."""
        validate_user_id(user_id)
        return cls(identity=Identity(user_id=user_id, **identity), meta=Meta(user_id=user_id))

    def with_meta(self, **changes: Any) -> Persona:
        """A copy with ``meta`` fields replaced (the store's stamp)."""
        return self.model_copy(update={"meta": self.meta.model_copy(update=changes)}, deep=True)

    def content_dict(self) -> dict[str, Any]:
        """The full document (defaults included) without ``meta``: what diffs compare."""
        data = self.model_dump(mode="json")
        data.pop("meta")
        return data


def json_schema() -> dict[str, Any]:
    """The persona's JSON Schema (what ``persona schema`` prints)."""
    schema = Persona.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


MAX_KEY_CHARS = 200
#: how deep mappings and lists may nest (a persona needs a handful of levels)
MAX_DEPTH = 32
MAX_INT_BITS = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SCALARS = (str, int, float, bool, type(None))


def check_limits(data: object, *, source: str, limits: PersonaLimits = DEFAULT_LIMITS) -> None:
    """Reject non-JSON values, over-long strings and oversized documents."""

    def too_big(size: int | None = None) -> PersonaValidationError:
        measured = f"{size} bytes" if size is not None else "larger"
        return PersonaValidationError(
            source,
            "",
            f"document is {measured} as JSON, over the cap of {limits.max_document_bytes} bytes",
            "Move bulky material to long-term memory or a knowledge base, or raise "
            "PERSONA_MAX_DOCUMENT_BYTES.",
        )

    # A running lower bound of the JSON size stops the walk early: YAML aliases can make
    # a small file expand into a huge tree, which must not be walked (or dumped) whole.
    seen = 0

    def count(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > limits.max_document_bytes:
            raise too_big()

    def walk(value: Any, loc: list[Any]) -> None:
        if len(loc) > MAX_DEPTH:
            raise _too_deep(source)
        if isinstance(value, str):
            count(len(value) + 2)
            if _SURROGATE.search(value):
                raise PersonaValidationError(
                    source,
                    format_path(loc),
                    "value holds a lone surrogate (half of a UTF-16 pair), which is not text",
                    "Re-encode the input as UTF-8.",
                )
            # meta is the store's (its timestamps are longer than a lowered value cap)
            if len(value) > limits.max_value_chars and loc[:1] != ["meta"]:
                raise PersonaValidationError(
                    source,
                    format_path(loc),
                    f"value is {len(value)} characters, over the cap of {limits.max_value_chars}",
                    "Shorten it, or raise PERSONA_MAX_VALUE_CHARS if such values are expected.",
                )
        elif isinstance(value, Mapping):
            count(2)
            for key, item in value.items():
                if not isinstance(key, str):
                    raise PersonaValidationError(
                        source,
                        format_path(loc),
                        f"key {key!r} is a {type(key).__name__}, not a string",
                        "Quote the key so it is text.",
                    )
                if _SURROGATE.search(key):
                    raise PersonaValidationError(
                        source,
                        format_path(loc),
                        "a key holds a lone surrogate (half of a UTF-16 pair)",
                        "Re-encode the input as UTF-8.",
                    )
                if len(key) > MAX_KEY_CHARS:
                    raise PersonaValidationError(
                        source,
                        format_path(loc),
                        f"a key is {len(key)} characters, over the cap of {MAX_KEY_CHARS}",
                        "Use a short key and put long text in its value.",
                    )
                count(len(key) + 3)
                # meta too: the store writes it, but an input's meta is the input's
                walk(item, [*loc, key])
        elif isinstance(value, list):
            count(2)
            for index, item in enumerate(value):
                walk(item, [*loc, index])
        elif isinstance(value, float) and not math.isfinite(value):  # no JSON form
            raise PersonaValidationError(
                source,
                format_path(loc),
                f"value {value} is not a finite number",
                "Use a finite number or leave the key out.",
            )
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            # beyond Python's int/str conversion limit: it could not be written as JSON
            raise PersonaValidationError(
                source,
                format_path(loc),
                f"the number is too large ({value.bit_length()} bits)",
                "Write it as text if it is an identifier.",
            )
        elif not isinstance(value, _JSON_SCALARS):
            raise PersonaValidationError(
                source,
                format_path(loc),
                f"value of type {type(value).__name__} is not JSON data",
                "Use text, numbers, true/false, null, lists and mappings only "
                "(quote dates and times so they stay text).",
            )
        else:
            count(1)

    try:
        walk(data, [])
    except RecursionError:
        raise _too_deep(source) from None
    size = len(json.dumps(data, ensure_ascii=False).encode("utf-8"))
    if size > limits.max_document_bytes:
        raise too_big(size)


def user_of(persona: object) -> str | None:
    """The user a persona is for (``meta.user_id``, else ``identity.user_id``); None for
    anything else (a persona given as text, none at all) or a persona naming nobody."""
    if isinstance(persona, Persona):
        return persona.meta.user_id or persona.identity.user_id or None
    return None


def _hint_for(error_type: str, loc: tuple[Any, ...]) -> str:
    if error_type == "extra_forbidden" and len(loc) == 1:
        return (
            f"The top-level keys are {', '.join(TOP_LEVEL_KEYS)}; put custom sections under "
            "'extensions' (a typo of a section name lands here too)."
        )
    if error_type == "extra_forbidden":
        return "Remove the key; this part of the document has a fixed set of keys."
    if error_type == "missing":
        return "Add the field."
    if error_type.startswith("string_pattern") or error_type == "value_error":
        return "Fix the value; `persona schema` shows what each field accepts."
    return "Fix the value to the expected type; `persona schema` shows what each field accepts."


def parse_persona(
    data: object, *, source: str = "<dict>", limits: PersonaLimits = DEFAULT_LIMITS
) -> Persona:
    """Validate plain data as a persona, raising :class:`PersonaValidationError`."""
    keys = ", ".join(TOP_LEVEL_KEYS)
    require_mapping(data, source=source, what="a persona", keys=keys)
    check_limits(data, source=source, limits=limits)
    return validate_document(
        Persona, data, source=source, what="a persona", keys=keys, hint=_hint_for
    )


def _decode(raw: bytes | str, source: str, limits: PersonaLimits) -> str:
    # a cap on the raw text too, so a huge file is refused before it is parsed
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > limits.max_document_bytes * 4:
        raise PersonaValidationError(
            source,
            "",
            f"input is {size} bytes, far over the document cap of {limits.max_document_bytes}",
            "Check that this is the persona file you meant, or raise PERSONA_MAX_DOCUMENT_BYTES.",
        )
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PersonaValidationError(
            source,
            "",
            f"input is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            "Save the file as UTF-8.",
        ) from None


def loads(
    text: bytes | str,
    *,
    fmt: Literal["yaml", "json", "auto"] = "auto",
    source: str = "<string>",
    limits: PersonaLimits = DEFAULT_LIMITS,
) -> Persona:
    """Parse a persona from YAML or JSON text (``auto``: JSON if it starts with ``{``)."""
    decoded = _decode(text, source, limits)
    if fmt == "auto":
        fmt = "json" if decoded.lstrip().startswith("{") else "yaml"
    data = _load_json(decoded, source) if fmt == "json" else load_yaml(decoded, source=source)
    if data is None:
        raise PersonaValidationError(
            source, "", "document is empty", "Write at least one section, e.g. 'identity: {}'."
        )
    return parse_persona(data, source=source, limits=limits)


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _too_deep(source) from None
    except _DuplicateKeyError as exc:
        raise PersonaValidationError(
            source, "", f"duplicate key {exc.key!r}", "Give each key once per mapping."
        ) from None
    except json.JSONDecodeError as exc:
        raise PersonaValidationError(
            source,
            "",
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            "Fix the syntax (a linter such as `python -m json.tool` points at it).",
        ) from None
    except ValueError as exc:  # NaN/Infinity, or a number of thousands of digits
        raise PersonaValidationError(
            source, "", f"a number cannot be read: {exc}", "Use a finite number of sane size."
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in a persona")


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON allows repeated keys (the last wins); a persona refuses them, as its YAML does
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _too_deep(source: str) -> PersonaValidationError:
    return PersonaValidationError(
        source,
        "",
        f"the document is nested deeper than {MAX_DEPTH} levels",
        "Flatten it: a persona's values are short lists and small mappings.",
    )


def load(path: str | Path, *, limits: PersonaLimits = DEFAULT_LIMITS) -> Persona:
    """Read a persona file (``.json`` as JSON, anything else as YAML)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PersonaValidationError(
            str(file), "", f"cannot read the file ({exc.strerror})", "Check the path."
        ) from None
    fmt: Literal["yaml", "json"] = "json" if file.suffix.lower() == ".json" else "yaml"
    return loads(raw, fmt=fmt, source=str(file), limits=limits)
