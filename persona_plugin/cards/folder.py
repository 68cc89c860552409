"""A directory of card files (YAML or JSON), re-read only where a file changed.

The LoRA hub (:mod:`persona_plugin.lora.hub`) and the preference-model hub
(:mod:`persona_plugin.preferences.hub`) each keep one card per file in a directory.
:class:`CardFolder` is the part they share. It is generic over the card type: each hub passes
the function that reads one file and the words its errors use. Every listing compares the
files' sizes and modification times with the last scan, so a hub asked for its cards on every
turn parses only the files that changed. Two cards with one id are an error, so that one
never silently shadows the other. :data:`ID_PATTERN` keeps ids usable as file names and URL
path segments, and :data:`MAX_CARD_BYTES` limits the size of a card.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from persona_plugin._cache import write_atomically
from persona_plugin._yaml import load_yaml
from persona_plugin.cards.owned import OwnedCards
from persona_plugin.errors import (
    PersonaNotFoundError,
    PersonaValidationError,
)

CARD_SUFFIXES = (".yaml", ".yml", ".json")
MAX_CARD_BYTES = 256 * 1024
#: an id is also a file name and a URL path segment: no slashes
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
ID_RE = re.compile(ID_PATTERN)


CardT = TypeVar("CardT")


def read_card_bytes(path: Path) -> bytes:
    """A card file's bytes (an unreadable file is a clear error naming it)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PersonaValidationError(
            str(path), "", f"cannot read the card ({exc.strerror})", "Check the path."
        ) from None


def parse_card_text(text: str | bytes, *, source: str) -> Any:
    """A card's YAML (or JSON, which is YAML too) as plain data: at most
    :data:`MAX_CARD_BYTES`, UTF-8, read strictly (dates stay text, duplicate keys refused)."""
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
    return load_yaml(text, source=source)


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


class CardHub(Generic[CardT]):
    """Cards read from bundled (read-only) directories and the hub's own ``directory``,
    later directories overriding earlier ones' ids: what the LoRA hub and the preference
    hub share. Subclasses say how a card is named in messages (``noun``) and how a user
    adds one (``add_command``).

    Reads go through one :class:`CardFolder` per directory, so :meth:`cards` is cheap on
    every turn and still sees cards another process added; one broken card fails the read,
    naming its file (a hub that silently lost a card would change what users are served).
    """

    noun: ClassVar[str] = "card"
    add_command: ClassVar[str] = ""
    #: the kind of the users' own cards this hub serves (``OwnedCards`` kinds)
    owned_kind: ClassVar[str] = ""

    def __init__(
        self,
        directory: Path | None,
        bundled_dirs: Sequence[Path],
        load: Callable[[Path], CardT],
        *,
        owned: OwnedCards | None = None,
        **folder_wording: str,
    ) -> None:
        self.directory = directory
        self.bundled_dirs = tuple(bundled_dirs)
        self._load = load
        self._folders = [CardFolder(d, load, **folder_wording) for d in self.directories]
        self._lock = threading.RLock()
        self._owned = owned

    @property
    def owned(self) -> OwnedCards:
        """Where users' own cards are (default ``$PERSONA_HOME/owned``)."""
        if self._owned is None:
            self._owned = OwnedCards.from_settings()
        return self._owned

    def owned_cards(self, user_id: str) -> list[CardT]:
        """The card of ``user_id``'s own serving now (slow adaptation), if any: theirs
        alone, never in :meth:`cards`."""
        return self.owned.serving_cards(user_id, self.owned_kind, self._load)

    @property
    def directories(self) -> tuple[Path, ...]:
        """Every directory read, the bundled ones first (later ones override)."""
        own = (self.directory,) if self.directory is not None else ()
        return (*self.bundled_dirs, *own)

    def cards(self) -> list[CardT]:
        """Every card, sorted by id (re-read only where a file changed)."""
        with self._lock:
            merged: dict[str, CardT] = {}
            for folder in self._folders:
                merged.update(folder.cards())
            return sorted(merged.values(), key=lambda c: c.id)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[CardT]:
        return iter(self.cards())

    def __len__(self) -> int:
        return len(self.cards())

    def __contains__(self, card_id: object) -> bool:
        return any(c.id == card_id for c in self.cards())  # type: ignore[attr-defined]

    def ids(self) -> list[str]:
        return [c.id for c in self.cards()]  # type: ignore[attr-defined]

    def get(self, card_id: str) -> CardT:
        for card in self.cards():
            if card.id == card_id:  # type: ignore[attr-defined]
                return card
        known = ", ".join(self.ids()) or "none"
        raise PersonaNotFoundError(
            f"{self.noun} {card_id!r} is not in {self._where()} (known: {known}). Add its "
            f"card with `{self.add_command}`."
        )

    def _where(self) -> str:
        return f"the hub ({', '.join(map(str, self.directories))})"

    def is_bundled(self, card: CardT) -> bool:
        """Whether ``card`` comes from a bundled (read-only) directory."""
        path = getattr(card, "path", None)
        return path is not None and path.parent in self.bundled_dirs

    def _write(self, card_id: str, text: str) -> Path:
        """Write a card's text into the hub's directory as ``<id>.yaml``, atomically."""
        if self.directory is None:
            raise PersonaValidationError(
                "<hub>", "", "this hub has no directory to write to", "Pass directory=."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{card_id}.yaml"
        write_atomically(target, text)
        return target
