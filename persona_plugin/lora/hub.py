"""The LoRA hub: a directory of adapter cards, one YAML file per adapter.

A card says what an adapter is (id, base model, description, tags, kind, rank, target
modules), where its weights are (``location``: a local path or a Hugging Face hub id) and
which inference servers have it loaded (``servers``). Retrieval embeds the description and
the optional ``sample_inputs``; backends read ``servers`` to know what they may ask for.

A card with ``merge_of`` stands for a *pre-merged* adapter: the weighted merge of other
adapters, built offline and loaded like any other. Servers that serve one adapter per
request (TGI, vLLM) use it to serve a retrieved mixture exactly.

Example card (``$PERSONA_HOME/lora/formal-concise.yaml``)::

    id: formal-concise
    base_model: Qwen/Qwen2.5-0.5B-Instruct
    description: Answers in a formal, concise, professional register.
    kind: style
    tags: [formal, concise, business]
    rank: 16
    target_modules: [q_proj, v_proj]
    location: acme/qwen-formal-concise-lora
    servers: [tgi-main]             # or {tgi-main: formal}: the id that server knows it by
    sample_inputs: ["Draft a reply to the board about the delay."]

The hub reads the user's directory (``PERSONA_LORA_DIR``, default ``$PERSONA_HOME/lora``)
on top of the cards that ship with the package (:data:`BUNDLED_LORA_DIR`: the demo style
adapters of :mod:`persona_plugin.lab.training.demo_adapters`); a user card with a bundled card's id
overrides it.

Every rejected card raises :class:`PersonaValidationError` naming the file and the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
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
    validate_document,
)
from persona_plugin.cards.folder import (
    ID_PATTERN,
    CardHub,
    parse_card_text,
    read_card_bytes,
)
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.config import ASSETS_DIR
from persona_plugin.errors import (
    PersonaConfigError,
    PersonaValidationError,
)

AdapterKind = Literal[
    "knowledge", "personality", "memory", "style", "reflection", "preference", "task", "other"
]
ADAPTER_KINDS: tuple[str, ...] = AdapterKind.__args__  # type: ignore[attr-defined]
_CARD_KEYS = (
    "id, base_model, description, kind, rank, target_modules, location, tags, servers, "
    "sample_inputs, merge_of, owner, training"
)


class MergeComponent(BaseModel):
    """One adapter of a pre-merged adapter, with its merge weight."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    weight: float = Field(gt=0, allow_inf_nan=False)


class AdapterCard(BaseModel):
    """What the hub knows about one LoRA adapter."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="unique in the hub; the file's name")
    base_model: str = Field(min_length=1, description="the model the adapter was trained on")
    description: str = Field(min_length=1, description="what it does; retrieval embeds it")
    kind: AdapterKind
    rank: int = Field(ge=1, le=65536)
    target_modules: list[str] = Field(min_length=1)
    location: str = Field(min_length=1, description="local path or hub id of the weights")
    tags: list[str] = Field(default_factory=list)
    servers: dict[str, str] = Field(
        default_factory=dict,
        description="server name -> the id that server knows the adapter by; a list of "
        "names means each knows it by the card's id",
    )
    sample_inputs: list[str] = Field(default_factory=list)
    merge_of: list[MergeComponent] = Field(
        default_factory=list, description="a pre-merged adapter: the adapters it merges"
    )
    owner: str | None = Field(
        None, min_length=1, description="the user an adapter of their own serves (alone)"
    )
    training: dict[str, Any] | None = Field(
        None, description="how slow adaptation trained it: data span, figures, the gate"
    )

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("servers", mode="before")
    @classmethod
    def _server_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("a list of servers holds server names (strings)")
            card_id = info.data.get("id")
            if card_id is None:  # the id itself is invalid: reported on its own
                return {}
            return dict.fromkeys(value, card_id)
        return value

    @field_validator("servers")
    @classmethod
    def _non_empty_servers(cls, value: dict[str, str]) -> dict[str, str]:
        if any(not k.strip() or not v.strip() for k, v in value.items()):
            raise ValueError("server names and served ids must be non-empty")
        return value

    @field_validator("target_modules", "tags", "sample_inputs")
    @classmethod
    def _non_empty_items(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("items must be non-empty strings")
        return value

    @field_validator("merge_of")
    @classmethod
    def _merge(cls, value: list[MergeComponent]) -> list[MergeComponent]:
        if len(value) == 1:
            raise ValueError("a pre-merged adapter merges at least two adapters")
        ids = [c.id for c in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"an adapter is listed twice: {ids}")
        return value

    # -- derived --------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The card file it was read from (None for a card built in memory)."""
        return self._path

    @property
    def is_premerged(self) -> bool:
        return bool(self.merge_of)

    @property
    def location_is_local(self) -> bool:
        """A filesystem path (``/``, ``./``, ``../``, ``~`` or ``file://``), not a hub id."""
        loc = self.location
        return loc.startswith(("/", "./", "../", "~", "file://")) or loc in (".", "..")

    @property
    def resolved_location(self) -> str:
        """``location`` with a relative local path made absolute against the card's folder."""
        if not self.location_is_local:
            return self.location
        loc = self.location.removeprefix("file://")
        path = Path(loc).expanduser()
        if not path.is_absolute() and self._path is not None:
            path = (self._path.parent / path).resolve()
        return str(path)

    def merge_weights(self) -> dict[str, float]:
        """The pre-merged mixture, weights normalised to sum to 1 (empty if not pre-merged)."""
        total = sum(c.weight for c in self.merge_of)
        return {c.id: c.weight / total for c in self.merge_of}

    def embedding_texts(self) -> list[str]:
        """What retrieval embeds: the description (with its tags), then the sample inputs."""
        text = self.description.strip()
        if self.tags:
            text += f" Tags: {', '.join(self.tags)}."
        return [text, *self.sample_inputs]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("content_hash", None)  # computed for the original's content
        return copy

    @functools.cached_property
    def content_hash(self) -> str:
        """Changes whenever the card's content does (not its file's name or time)."""
        data = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_defaults=True)
        for key in ("id", "base_model", "description", "kind", "rank", "target_modules"):
            data[key] = getattr(self, key)
        if self.servers and all(v == self.id for v in self.servers.values()):
            data["servers"] = list(self.servers)  # the short form, as usually written
        order = [k for k in _CARD_KEYS.split(", ") if k in data]
        return {k: data[k] for k in order}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


# -- reading cards ------------------------------------------------------------------------


def _hint(err_type: str, loc: tuple[Any, ...]) -> str:
    if err_type == "extra_forbidden":
        return f"An adapter card has the keys {_CARD_KEYS}."
    if err_type == "missing":
        return "Add the field; `persona lora show ID` prints a complete card to copy."
    return "Fix the value; the module docstring of persona_plugin.lora.hub shows an example."


def parse_card(data: object, *, source: str = "<dict>") -> AdapterCard:
    """Validate plain data as an adapter card, raising :class:`PersonaValidationError`."""
    return validate_document(
        AdapterCard,
        data,
        source=source,
        what="an adapter card",
        keys=_CARD_KEYS,
        hint=_hint,
        id_noun="adapter id",
    )


def loads_card(text: str | bytes, *, source: str = "<string>") -> AdapterCard:
    """Parse a card from YAML (or JSON, which is YAML too)."""
    data = parse_card_text(text, source=source)
    if data is None:
        raise PersonaValidationError(source, "", "card is empty", f"Write the keys {_CARD_KEYS}.")
    return parse_card(data, source=source)


def load_card(path: str | os.PathLike[str]) -> AdapterCard:
    """Read one card file."""
    file = Path(path)
    card = loads_card(read_card_bytes(file), source=str(file))
    card._path = file
    return card


# -- the hub ------------------------------------------------------------------------------


def mixture_matches(
    a: Mapping[str, float], b: Mapping[str, float], *, tolerance: float = 0.05
) -> bool:
    """Same adapters, and every normalised weight within ``tolerance`` of the other's."""
    if set(a) != set(b) or not a:
        return False
    ta, tb = sum(a.values()), sum(b.values())
    if ta <= 0 or tb <= 0:
        return False
    return all(abs(a[k] / ta - b[k] / tb) <= tolerance for k in a)


#: the adapter cards that ship with the package (the demo style adapters, ...)
BUNDLED_LORA_DIR = ASSETS_DIR / "lora"


class LoraHub(CardHub[AdapterCard]):
    """A directory of adapter cards (``*.yaml``, ``*.yml``, ``*.json``; default
    ``$PERSONA_HOME/lora``), read on top of optional ``bundled`` directories.

    ``directory`` is the hub's own, where :meth:`add` writes. ``bundled`` directories
    (the package's own adapters, :data:`BUNDLED_LORA_DIR`, in :meth:`from_settings`) are
    read-only; a card in ``directory`` overrides a bundled card with the same id, so a user
    can replace a shipped adapter without touching the package. Reading is the
    :class:`~persona_plugin.cards.folder.CardHub`'s.
    """

    noun = "adapter"
    add_command = "persona lora add FILE"
    owned_kind = "adapter"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        bundled: Sequence[str | os.PathLike[str]] = (),
        owned: OwnedCards | None = None,
    ) -> None:
        super().__init__(
            Path(directory).expanduser(),
            [Path(d).expanduser() for d in bundled],
            load_card,
            owned=owned,
        )

    def owned_card(self, adapter_id: str) -> AdapterCard | None:
        """The card of an own adapter's versioned id, for a backend asked to serve it."""
        return self.owned.find(adapter_id, "adapter", load_card)

    @property
    def bundled(self) -> tuple[Path, ...]:
        return self.bundled_dirs

    @classmethod
    def from_settings(cls, settings: Any = None, *, bundled: bool = True) -> LoraHub:
        """The hub of ``settings.lora_dir``, over the package's bundled adapters unless
        ``bundled=False``."""
        if settings is None:
            from persona_plugin.config import Settings

            settings = Settings.load()
        return cls(
            settings.resolved_lora_dir,
            bundled=(BUNDLED_LORA_DIR,) if bundled else (),
            owned=OwnedCards.from_settings(settings),
        )

    def __repr__(self) -> str:
        if self.bundled:
            return f"LoraHub({str(self.directory)!r}, bundled={[str(d) for d in self.bundled]})"
        return f"LoraHub({str(self.directory)!r})"

    def _where(self) -> str:
        return f"the LoRA hub at {self.directory}"

    # -- writing --------------------------------------------------------------------------

    def add(
        self, card: AdapterCard | str | os.PathLike[str], *, replace: bool = False
    ) -> AdapterCard:
        """Validate ``card`` (a card or a card file) and write it as ``<id>.yaml``."""
        source = "<card>"
        if not isinstance(card, AdapterCard):
            source = str(card)
            card = load_card(card)
            if card.location_is_local and not Path(card.location).expanduser().is_absolute():
                # a relative path is relative to the file it came from, not to the hub
                data = card.to_dict() | {"location": card.resolved_location}
                card = parse_card(data, source=source)
        for existing in self.cards():
            if existing.id == card.id and not replace:
                raise PersonaValidationError(
                    source,
                    "id",
                    f"adapter {card.id!r} is already in the hub ({existing.path})",
                    "Pass replace=True (`persona lora add --replace`) to overwrite it.",
                )
        target = self.directory / f"{card.id}.yaml"  # type: ignore[operator]
        for existing in self.cards():  # a hand-named file holding the same id
            if (
                existing.id == card.id
                and existing.path
                and existing.path != target
                and existing.path.parent == self.directory
            ):
                existing.path.unlink(missing_ok=True)
        self._write(card.id, card.to_yaml())
        return self.get(card.id)

    def remove(self, adapter_id: str) -> None:
        card = self.get(adapter_id)
        if self.is_bundled(card):
            raise PersonaConfigError(
                f"adapter {adapter_id!r} is bundled with persona-plugin ({card.path}) and "
                f"cannot be removed; to change it, add a card with the id {adapter_id!r} to "
                f"{self.directory}, which overrides the bundled one."
            )
        if card.path is not None:
            card.path.unlink(missing_ok=True)

    # -- serving --------------------------------------------------------------------------

    def served_on(self, server: str) -> dict[str, str]:
        """Card id -> the id ``server`` knows it by, for every card loaded there."""
        return {c.id: c.servers[server] for c in self.cards() if server in c.servers}

    def premerged_on(self, server: str | None = None) -> dict[str, dict[str, float]]:
        """Pre-merged card id -> its normalised mixture (those loaded on ``server`` if given)."""
        return {
            c.id: c.merge_weights()
            for c in self.cards()
            if c.is_premerged and (server is None or server in c.servers)
        }

    def find_premerged(
        self,
        mixture: Sequence[tuple[str, float]] | Mapping[str, float],
        *,
        server: str | None = None,
        tolerance: float = 0.05,
    ) -> AdapterCard | None:
        """The pre-merged card whose ``merge_of`` is ``mixture`` (within ``tolerance``)."""
        wanted = dict(mixture.items() if isinstance(mixture, Mapping) else mixture)
        for card_id, weights in self.premerged_on(server).items():
            if mixture_matches(wanted, weights, tolerance=tolerance):
                return self.get(card_id)
        return None
