"""Reading documents strictly, and one wording for what is wrong with them.

Personas, adapter cards and preference cards are all YAML/JSON documents a person writes.
:class:`StrictSafeLoader` is ``yaml.SafeLoader`` that keeps dates as text and refuses
duplicate keys; :class:`SafeDumper` writes strings PyYAML would otherwise fold.
:func:`validate_document` turns a pydantic ``ValidationError`` into the one
:class:`~persona_plugin.errors.PersonaValidationError` wording of the project (the field
path, what is wrong with the value shown, every problem listed, and a hint), so a persona
and a card speak alike. :func:`read_text` and :func:`load_json_lines` read the files a
user gives (pairs, chat histories) with the same errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from persona_plugin.errors import PersonaValidationError

M = TypeVar("M", bound=BaseModel)


def format_path(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def describe_error(err: Any, *, id_noun: str = "id") -> str:
    """One pydantic error in the project's words: what is wrong, and the value shown."""
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "string_pattern_mismatch" and loc[-1:] == ("id",):
        return (
            f"{err['input']!r} is not a valid {id_noun}: use 1-128 letters, digits, _ . -, "
            "starting with a letter or digit (no spaces or slashes)"
        )
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "the allowed values")
        field = loc[-1] if loc else "value"
        return f"{err['input']!r} is not a {field} (not allowed; use one of {expected})"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    if kind not in ("missing", "value_error"):
        shown = repr(err["input"])
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return msg


def require_mapping(data: object, *, source: str, what: str, keys: str) -> None:
    """Refuse a document whose top level is not a mapping; ``what`` names the document
    ("a persona"), ``keys`` its top-level keys."""
    if not isinstance(data, Mapping):
        raise PersonaValidationError(
            source,
            "",
            f"top level is a {type(data).__name__}, not a mapping",
            f"{what[0].upper()}{what[1:]} is a mapping with the keys {keys}.",
        )


def validate_document(
    model: type[M],
    data: object,
    *,
    source: str,
    what: str,
    keys: str,
    hint: Callable[[str, tuple[Any, ...]], str],
    id_noun: str = "id",
) -> M:
    """``data`` validated as ``model``, or a :class:`PersonaValidationError` naming
    ``source``, the first problem's field path, every problem, and ``hint(error type,
    location)`` of the first."""
    require_mapping(data, source=source, what=what, keys=keys)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [
            (format_path(tuple(e["loc"])), describe_error(e, id_noun=id_noun)) for e in errors
        ]
        first = errors[0]
        raise PersonaValidationError(
            source,
            problems[0][0],
            problems[0][1],
            hint(first["type"], tuple(first["loc"])),
            problems=problems,
        ) from None


# -- YAML / JSON text ---------------------------------------------------------------------


#: nesting past this stops the composer at once; the persona's own, lower cap
#: (``persona.MAX_DEPTH``) names the field. Pure-Python composing thousands of levels until
#: Python's recursion limit took 1.6 s on a loaded 2-core machine.
MAX_YAML_DEPTH = 100


class _TooDeep(Exception):
    pass


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps dates as text, refuses duplicate keys and stops at
    :data:`MAX_YAML_DEPTH` levels of nesting."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# Dates would load as datetime objects that JSON cannot hold; a persona keeps them as text.
StrictSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: a list or mapping key
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found a list or mapping used as a key (keys are text)",
                key_node.start_mark,
            )
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class SafeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that double-quotes strings it would otherwise mangle."""


# PyYAML writes NEL and the Unicode line/paragraph separators raw inside plain or single-
# quoted scalars, where its own reader then folds them into spaces: a silent data change.
# Double quotes make it escape them (\N, \L, \P).
_YAML_LINE_BREAKS = ("\x85", "\u2028", "\u2029")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if any(char in value for char in _YAML_LINE_BREAKS):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


SafeDumper.add_representer(str, _represent_str)


def yaml_error(exc: yaml.YAMLError, source: str) -> PersonaValidationError:
    """A YAML syntax error as the clear error: where, what, and what to do."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return PersonaValidationError(
        source,
        "",
        f"malformed YAML{where}: {problem}",
        "Fix the syntax; check indentation and quote values that contain ': ' or '#'.",
    )


def dump_yaml(data: Any) -> str:
    """``data`` as block-style YAML, keys in their order, Unicode kept as written."""
    return yaml.dump(
        data, Dumper=SafeDumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def load_yaml(text: str, *, source: str) -> Any:
    """YAML text as plain data, read by :class:`StrictSafeLoader`; every way PyYAML can fail
    on it is a :class:`PersonaValidationError` naming ``source``."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from None
    except (RecursionError, _TooDeep):
        raise PersonaValidationError(
            source, "", "the document is nested too deeply", "Flatten it."
        ) from None
    except ValueError as exc:  # a number of thousands of digits, or `!!float abc`
        raise PersonaValidationError(
            source, "", f"a number cannot be read: {exc}", "Use a finite number of sane size."
        ) from None
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        # PyYAML's constructors fail like this on a value that does not fit its explicit
        # tag (`!!timestamp soon`, `!!bool maybe`) or on an unhashable key
        raise PersonaValidationError(
            source,
            "",
            f"malformed YAML: a value does not fit its tag or cannot be a key ({exc!r})",
            "Remove the !!tag, or write the value as plain text.",
        ) from None


def read_text(path: Path, *, what: str, hint: str) -> str:
    """A UTF-8 file's text (a byte-order mark dropped); an unreadable file is a
    :class:`PersonaValidationError` naming it and ``what`` it was to be."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaValidationError(
            str(path), "", f"cannot read the {what} ({exc})", hint
        ) from None


def load_json_lines(text: str, *, source: str, hint: str) -> list[Any]:
    """JSON Lines as a list of values (blank lines skipped); a line that is not JSON is a
    :class:`PersonaValidationError` naming it."""
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PersonaValidationError(
                source, f"line {n}", f"not JSON ({exc.msg})", hint
            ) from None
    return items
