"""Preference-model cards: what the hub knows about one reward model, one YAML file per model.

A :class:`PreferenceCard` names the model's scorer type (``embedding_head``,
``sequence_classifier``, ``llm_judge``, or ``persona``: the persona's own stated likes and
avoids, no model file), where the model is (``location``, relative to the
card's folder), what a high score means (``description``) and, optionally, what a low one
means (``opposite``). A persona that asks for the opposite gets the model with a negative
weight, so one model serves both poles. The demo models bundled with the package are in
:data:`BUNDLED_DIR`.

:func:`load_card` and :func:`parse_card` check a card strictly (unknown keys, a scorer without
its ``location`` or ``rubric``) and raise
:class:`~persona_plugin.errors.PersonaValidationError` naming the file and the field. That way
a bad card fails when it is read, not when it is first used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)

from persona_plugin._yaml import (
    dump_yaml,
    require_mapping,
    validate_document,
)
from persona_plugin.cards.folder import ID_PATTERN, parse_card_text, read_card_bytes
from persona_plugin.config import ASSETS_DIR

PreferenceKind = Literal["behaviour", "style", "content", "format", "safety", "other"]
PREFERENCE_KINDS: tuple[str, ...] = PreferenceKind.__args__  # type: ignore[attr-defined]
ScorerType = Literal["embedding_head", "sequence_classifier", "llm_judge", "persona"]
SCORER_TYPES: tuple[str, ...] = ScorerType.__args__  # type: ignore[attr-defined]
#: the demo models that ship with the package, and their training data
BUNDLED_DIR = ASSETS_DIR / "prefs"
_CARD_KEYS = (
    "id, description, opposite, kind, scorer, location, rubric, scale, tags, sample_inputs, "
    "owner, training"
)


# -- cards --------------------------------------------------------------------------------


class PreferenceCard(BaseModel):
    """What the hub knows about one preference model."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="unique in the hub; the file's name")
    description: str = Field(min_length=1, description="what a high score means")
    opposite: str | None = Field(
        None, min_length=1, description="what a low score means; lets a persona ask for it"
    )
    kind: PreferenceKind
    scorer: ScorerType
    location: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="the model: a head file or a classifier folder",
    )
    rubric: str | None = Field(
        None, min_length=1, validate_default=True, description="what an LLM judge grades"
    )
    scale: tuple[float, float] = Field((0.0, 10.0), description="an LLM judge's score range")
    tags: list[str] = Field(default_factory=list)
    sample_inputs: list[str] = Field(default_factory=list)
    owner: str | None = Field(
        None, min_length=1, description="the user a model of their own serves (alone)"
    )
    training: dict[str, Any] | None = Field(
        None, description="how slow adaptation trained it: data span, figures, the gate"
    )

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("location")
    @classmethod
    def _location_fits_scorer(cls, value: str | None, info: ValidationInfo) -> str | None:
        scorer = info.data.get("scorer")
        if value is None and scorer in ("embedding_head", "sequence_classifier"):
            raise ValueError(f"scorer {scorer} needs a location (its model file or folder)")
        return value

    @field_validator("rubric")
    @classmethod
    def _rubric_fits_scorer(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("scorer") == "llm_judge":
            raise ValueError("scorer llm_judge needs a rubric (what the judge grades)")
        return value

    @field_validator("scale")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{list(value)} is not a range [low, high] with low < high")
        return value

    @field_validator("tags", "sample_inputs")
    @classmethod
    def _non_empty_items(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("items must be non-empty strings")
        return value

    @property
    def path(self) -> Path | None:
        """The card file it was read from (None for a card built in memory)."""
        return self._path

    @property
    def resolved_location(self) -> Path | None:
        """``location`` as a path, made absolute against the card's folder."""
        if self.location is None:
            return None
        path = Path(self.location.removeprefix("file://")).expanduser()
        if not path.is_absolute() and self._path is not None:
            path = (self._path.parent / path).resolve()
        return path

    @property
    def source(self) -> str:
        return str(self._path) if self._path is not None else f"preference card {self.id!r}"

    def embedding_texts(self) -> list[str]:
        """What retrieval embeds for a high score: description, tags, sample inputs."""
        text = self.description.strip()
        if self.tags:
            text += f" Tags: {', '.join(self.tags)}."
        return [text, *self.sample_inputs]

    @functools.cached_property
    def content_hash(self) -> str:
        """Changes whenever the card's content (or where it was read from) does."""
        data = json.dumps([self.to_dict(), str(self._path)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_defaults=True)
        for key in ("id", "description", "kind", "scorer"):
            data[key] = getattr(self, key)
        order = _CARD_KEYS.split(", ")
        return {k: data[k] for k in order if k in data}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def _hint(err_type: str, loc: tuple[Any, ...]) -> str:
    if err_type == "extra_forbidden":
        return f"A preference card has the keys {_CARD_KEYS}."
    return "Fix it; the docstring of persona_plugin.preferences.cards shows an example card."


def parse_card(data: object, *, source: str = "<dict>") -> PreferenceCard:
    """Validate plain data as a preference card, raising :class:`PersonaValidationError`."""
    require_mapping(data, source=source, what="a preference card", keys=_CARD_KEYS)
    if isinstance(data.get("scale"), list):  # YAML has no tuples; strict mode wants one
        data = {**data, "scale": tuple(data["scale"])}
    return validate_document(
        PreferenceCard, data, source=source, what="a preference card", keys=_CARD_KEYS, hint=_hint
    )


def load_card(path: str | os.PathLike[str]) -> PreferenceCard:
    """Read one card file (YAML or JSON)."""
    file = Path(path)
    data = parse_card_text(read_card_bytes(file), source=str(file))
    card = parse_card(data, source=str(file))
    card._path = file
    return card
