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
adapters of :mod:`persona_plugin.demo_adapters`); a user card with a bundled card's id
overrides it.

Every rejected card raises :class:`PersonaValidationError` naming the file and the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from persona_plugin.errors import (
    PersonaConfigError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import _SafeDumper, _StrictSafeLoader, format_path, yaml_error

AdapterKind = Literal[
    "knowledge", "personality", "memory", "style", "reflection", "preference", "task", "other"
]
ADAPTER_KINDS: tuple[str, ...] = AdapterKind.__args__  # type: ignore[attr-defined]
CARD_SUFFIXES = (".yaml", ".yml", ".json")
MAX_CARD_BYTES = 256 * 1024
#: an id is also a file name and a URL path segment: no slashes
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_ID_RE = re.compile(_ID_PATTERN)
_CARD_KEYS = (
    "id, base_model, description, kind, rank, target_modules, location, tags, servers, "
    "sample_inputs, merge_of"
)


class MergeComponent(BaseModel):
    """One adapter of a pre-merged adapter, with its merge weight."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN)
    weight: float = Field(gt=0, allow_inf_nan=False)


class AdapterCard(BaseModel):
    """What the hub knows about one LoRA adapter."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN, description="unique in the hub; the file's name")
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
        return yaml.dump(
            self.to_dict(),
            Dumper=_SafeDumper,
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
        )


# -- reading cards ------------------------------------------------------------------------


def _describe(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "string_pattern_mismatch" and err["loc"][-1:] == ("id",):
        return (
            f"{err['input']!r} is not a valid adapter id: use 1-128 letters, digits, _ . -, "
            "starting with a letter or digit (no spaces or slashes)"
        )
    if err["type"] == "literal_error":
        return f"{err['input']!r} is not a kind; use one of {', '.join(ADAPTER_KINDS)}"
    msg = err["msg"][0].lower() + err["msg"][1:]
    if err["type"] != "missing":
        shown = repr(err["input"])
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return msg


def _hint(err_type: str) -> str:
    if err_type == "extra_forbidden":
        return f"An adapter card has the keys {_CARD_KEYS}."
    if err_type == "missing":
        return "Add the field; `persona lora show ID` prints a complete card to copy."
    return "Fix the value; the module docstring of persona_plugin.lora_hub shows an example."


def parse_card(data: object, *, source: str = "<dict>") -> AdapterCard:
    """Validate plain data as an adapter card, raising :class:`PersonaValidationError`."""
    if not isinstance(data, Mapping):
        raise PersonaValidationError(
            source,
            "",
            f"top level is a {type(data).__name__}, not a mapping",
            f"An adapter card is a mapping with the keys {_CARD_KEYS}.",
        )
    try:
        return AdapterCard.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [(format_path(tuple(e["loc"])), _describe(e)) for e in errors]
        raise PersonaValidationError(
            source, problems[0][0], problems[0][1], _hint(errors[0]["type"]), problems=problems
        ) from None


def loads_card(text: str | bytes, *, source: str = "<string>") -> AdapterCard:
    """Parse a card from YAML (or JSON, which is YAML too)."""
    if isinstance(text, bytes):
        if len(text) > MAX_CARD_BYTES:
            raise PersonaValidationError(
                source, "", f"card is {len(text)} bytes", f"Cards are at most {MAX_CARD_BYTES}."
            )
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PersonaValidationError(
                source, "", f"not UTF-8 (offset {exc.start})", "Save the card as UTF-8."
            ) from None
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(exc, source) from None
    if data is None:
        raise PersonaValidationError(source, "", "card is empty", f"Write the keys {_CARD_KEYS}.")
    return parse_card(data, source=source)


def load_card(path: str | os.PathLike[str]) -> AdapterCard:
    """Read one card file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PersonaValidationError(
            str(file), "", f"cannot read the card ({exc.strerror})", "Check the path."
        ) from None
    card = loads_card(raw, source=str(file))
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
BUNDLED_LORA_DIR = Path(__file__).resolve().parent / "assets" / "lora"


CardT = TypeVar("CardT")


class CardFolder(Generic[CardT]):
    """One directory of cards, re-read only where a file changed (size, modification time).

    Shared by the LoRA hub and the preference-model hub: ``load`` reads one card file (its
    errors name the file and field); ``hub``, ``setting`` and ``noun`` word the errors of
    a folder that is not a directory and of two cards with one id.
    """

    def __init__(
        self,
        directory: Path,
        load: Callable[[Path], CardT],
        *,
        hub: str = "the LoRA hub",
        setting: str = "PERSONA_LORA_DIR",
        noun: str = "adapter",
    ) -> None:
        self.directory = directory
        self._load, self._hub, self._setting, self._noun = load, hub, setting, noun
        self._cache: dict[str, tuple[tuple[int, int], CardT]] = {}
        self._snapshot: tuple[tuple[str, tuple[int, int]], ...] | None = None
        self._cards: dict[str, CardT] = {}

    def _scan(self) -> list[tuple[str, tuple[int, int]]]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise PersonaValidationError(
                str(self.directory), "", f"{self._hub} is not a directory", f"Fix {self._setting}."
            ) from None
        files = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(CARD_SUFFIXES):
                continue
            if not entry.is_file():
                continue
            stat = entry.stat()
            files.append((entry.name, (stat.st_size, stat.st_mtime_ns)))
        return sorted(files)

    def cards(self) -> dict[str, CardT]:
        """Card id -> card; the caller holds the hub's lock."""
        files = tuple(self._scan())
        if files == self._snapshot:
            return self._cards
        cards: dict[str, CardT] = {}
        fresh: dict[str, tuple[tuple[int, int], CardT]] = {}
        for name, stamp in files:
            cached = self._cache.get(name)
            card = cached[1] if cached and cached[0] == stamp else self._load(self.directory / name)
            fresh[name] = (stamp, card)
            card_id = card.id  # type: ignore[attr-defined]
            if card_id in cards:
                other = cards[card_id].path  # type: ignore[attr-defined]
                raise PersonaValidationError(
                    str(self.directory / name),
                    "id",
                    f"{self._noun} id {card_id!r} is also used by {other}",
                    "Ids are unique in a hub folder: rename one of the cards.",
                )
            cards[card_id] = card
        self._cache, self._snapshot, self._cards = fresh, files, cards
        return cards


class LoraHub:
    """A directory of adapter cards (``*.yaml``, ``*.yml``, ``*.json``; default
    ``$PERSONA_HOME/lora``), read on top of optional ``bundled`` directories.

    ``directory`` is the hub's own, where :meth:`add` writes. ``bundled`` directories
    (the package's own adapters, :data:`BUNDLED_LORA_DIR`, in :meth:`from_settings`) are
    read-only; a card in ``directory`` overrides a bundled card with the same id, so a user
    can replace a shipped adapter without touching the package.

    Reads are cached per file (size and modification time), so :meth:`cards` is cheap to
    call on every turn and still sees cards added by another process. One broken card
    fails the whole read, naming the file: a hub that silently loses an adapter would
    change what users are served without a word.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        bundled: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.bundled = tuple(Path(d).expanduser() for d in bundled)
        self._folders = [CardFolder(d, load_card) for d in (*self.bundled, self.directory)]
        self._cards: list[AdapterCard] = []
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any = None, *, bundled: bool = True) -> LoraHub:
        """The hub of ``settings.lora_dir``, over the package's bundled adapters unless
        ``bundled=False``."""
        if settings is None:
            from persona_plugin.config import Settings

            settings = Settings.load()
        return cls(settings.resolved_lora_dir, bundled=(BUNDLED_LORA_DIR,) if bundled else ())

    @property
    def directories(self) -> tuple[Path, ...]:
        """Every directory read, the bundled ones first (later ones override)."""
        return (*self.bundled, self.directory)

    def __repr__(self) -> str:
        if self.bundled:
            return f"LoraHub({str(self.directory)!r}, bundled={[str(d) for d in self.bundled]})"
        return f"LoraHub({str(self.directory)!r})"

    # -- reading --------------------------------------------------------------------------

    def cards(self) -> list[AdapterCard]:
        """Every card, sorted by id (re-read only where a file changed)."""
        with self._lock:
            merged: dict[str, AdapterCard] = {}
            for folder in self._folders:
                merged.update(folder.cards())
            self._cards = sorted(merged.values(), key=lambda c: c.id)
            return list(self._cards)

    def is_bundled(self, card: AdapterCard) -> bool:
        """Whether ``card`` comes from a bundled (read-only) directory."""
        return card.path is not None and card.path.parent in self.bundled

    def __iter__(self) -> Iterator[AdapterCard]:
        return iter(self.cards())

    def __len__(self) -> int:
        return len(self.cards())

    def __contains__(self, adapter_id: object) -> bool:
        return any(c.id == adapter_id for c in self.cards())

    def ids(self) -> list[str]:
        return [c.id for c in self.cards()]

    def get(self, adapter_id: str) -> AdapterCard:
        for card in self.cards():
            if card.id == adapter_id:
                return card
        known = ", ".join(self.ids()) or "none"
        raise PersonaNotFoundError(
            f"adapter {adapter_id!r} is not in the LoRA hub at {self.directory} (known: "
            f"{known}). Add its card with `persona lora add FILE`."
        )

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
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{card.id}.yaml"
        for existing in self.cards():  # a hand-named file holding the same id
            if (
                existing.id == card.id
                and existing.path
                and existing.path != target
                and existing.path.parent == self.directory
            ):
                existing.path.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{card.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(card.to_yaml())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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
