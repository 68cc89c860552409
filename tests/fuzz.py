"""Generated hostile persona documents, and the one check each must pass.

Shared by ``tests/test_loader_robustness.py`` (a few hundred inputs in the suite) and
``benchmarks/bench_loader_fuzz.py`` (10,000+). :func:`documents` draws YAML and JSON
texts: valid personas with odd values (lone surrogates, huge and non-finite numbers, deep
nesting), YAML features a persona has no use for (tags, anchors and aliases, complex
keys), and random text. :func:`check_one` loads one: it must load, dump and reload to the
same document (and save, given a store), or raise ``PersonaValidationError``, in < 1 s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import yaml
from hypothesis import strategies as st

from persona_plugin import PersonaValidationError, loads

FRAGMENTS = [
    "!!set {a: null}",
    "!!binary aGVsbG8=",
    "!!timestamp 2001-12-14",
    "!!omap [a: 1]",
    "!!pairs [a: 1]",
    "!!python/object:os.system ls",
    "&x [1, 2]",
    "*x",
    "? [a, b]\n: 1",
    "? {a: 1}\n: 2",
    ".inf",
    "-.inf",
    ".nan",
    "1e400",
    "9" * 5000,
    "0x" + "f" * 40,
    "[" * 400 + "]" * 400,
    "{" * 200 + "}" * 200,
    '"\\ud800"',
    "'\udcff'",
    "~",
    "<<: {a: 1}",
    "--- \n---\n",
    "%YAML 1.1\n---\na: 1",
    "a: b: c",
    "\t- x",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None), max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(codec=None), max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
sections = st.sampled_from(
    ["identity", "demographics", "personality", "memory", "pattern", "preference"]
)


@st.composite
def structured(draw: st.DrawFn) -> str:
    """A document built as data, then written as JSON or YAML."""
    doc: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 3))):
        doc[draw(sections)] = draw(st.dictionaries(st.text(max_size=12), values, max_size=3))
    if draw(st.booleans()):
        doc["extensions"] = {draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)): draw(values)}
    if draw(st.integers(0, 9)) == 0:
        doc["meta"] = draw(values)
    if draw(st.booleans()):
        try:
            return json.dumps(doc, ensure_ascii=draw(st.booleans()))
        except (ValueError, UnicodeEncodeError):
            return json.dumps(doc)
    try:
        return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, UnicodeEncodeError):
        return json.dumps(doc)


@st.composite
def hostile(draw: st.DrawFn) -> str:
    """YAML with a fragment a persona has no use for, under a random key."""
    key = draw(st.sampled_from(["extensions:\n  x", "identity:\n  name", "meta", "x"]))
    fragment = draw(st.sampled_from(FRAGMENTS))
    if "\n" in fragment:
        return draw(st.sampled_from(["", "identity: {}\n"])) + fragment + "\n"
    return f"{key}: {fragment}\n"


def documents() -> st.SearchStrategy[str]:
    return st.one_of(
        structured(),
        hostile(),
        st.text(st.characters(codec=None), max_size=200),
        st.text(st.sampled_from(list("{}[]:,-?&*!|>'\"#%@` \n\tab01.")), max_size=120),
    )


@dataclass
class Outcome:
    kind: str  # loaded | refused | crashed | mismatch
    #: how long loading (or refusing) the input took: what the 1-second bound is about; the
    #: round trips and the save checked after it are not timed
    seconds: float
    detail: str = ""


def check_one(text: str, *, store: Any = None) -> Outcome:
    """Load ``text``: refused clearly, or loaded, round-tripped (and saved) identically."""
    started = time.monotonic()
    try:
        persona = loads(text, source="fuzz")
    except PersonaValidationError:
        return Outcome("refused", time.monotonic() - started)
    except Exception as exc:
        return Outcome("crashed", time.monotonic() - started, f"{type(exc).__name__}: {exc}"[:300])
    loaded = time.monotonic() - started
    try:
        for fmt in ("yaml", "json"):
            again = loads(persona.dump(fmt), source=f"fuzz ({fmt})")
            if again.to_dict() != persona.to_dict():
                return Outcome("mismatch", loaded, f"{fmt}: {text[:200]!r}")
        if store is not None:
            user = f"fuzz-{abs(hash(text)) % 10**12}"
            if store.exists(user):
                store.delete(user)
            store.create(user, persona)
            saved = store.get(user)
            if saved.content_dict() != persona.content_dict():
                return Outcome("mismatch", loaded, f"store: {text[:200]!r}")
    except Exception as exc:
        return Outcome("crashed", loaded, f"after load: {exc!r}"[:300])
    return Outcome("loaded", loaded)
