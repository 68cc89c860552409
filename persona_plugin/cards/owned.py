"""Cards a user owns: the versions of their own preference models (and adapters), on disk.

Slow adaptation (:mod:`persona_plugin.adaptation`) trains artefacts for one user; each
candidate becomes a version, promoted or rejected by the gate, whose card records its
figures and the span of data it was trained on. They live apart from the shared hubs, one
folder per user and kind::

    $PERSONA_HOME/owned/<sha256(user)[:24]>/<kind>/
        v1.yaml  v1.npz        a version: its card and its model (a rejected one: card only)
        v2.yaml  ...
        serving.json           which version serves the user now ({"version": N}; 0: none)

The folder is named from a hash of the user id (ids may hold any character), and every
card names its ``owner``: a hub hands a user's cards to that user alone
(:meth:`~persona_plugin.preferences.hub.PreferenceHub.owned_cards`), and forgetting the
user removes the folder (:meth:`OwnedCards.delete_user`). Versions are numbered by
creating the card file exclusively, so two processes promoting at once get two numbers
rather than one overwritten file; ``serving.json`` is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persona_plugin._cache import write_atomically
from persona_plugin._yaml import dump_yaml, load_yaml
from persona_plugin.errors import PersonaNotFoundError, PersonaValidationError
from persona_plugin.persona import validate_user_id

#: the kinds of artefact a user can own
OWNED_KINDS = ("preference", "adapter")
#: how the id of a user's own artefact starts (no shared card may use it)
OWNED_PREFIX = "own-"


def owner_digest(user_id: str) -> str:
    """The user's folder name: a hash of the id."""
    return hashlib.sha256(validate_user_id(user_id).encode()).hexdigest()[:24]


def owned_id(user_id: str, kind: str) -> str:
    """The card id of the user's own artefact of ``kind`` (one id across its versions)."""
    short = {"preference": "prefs", "adapter": "lora"}[kind]
    return f"{OWNED_PREFIX}{short}-{owner_digest(user_id)}"


class OwnedCards:
    """The per-user artefact folders under ``root`` (default ``$PERSONA_HOME/owned``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self._read: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any = None) -> OwnedCards:
        if settings is None:
            from persona_plugin.config import Settings

            settings = Settings.load()
        return cls(Path(settings.home) / "owned")

    def __repr__(self) -> str:
        return f"OwnedCards({str(self.root)!r})"

    def folder(self, user_id: str, kind: str) -> Path:
        if kind not in OWNED_KINDS:
            raise PersonaValidationError(
                "kind", "", f"{kind!r} is not a kind of owned artefact", f"Use {OWNED_KINDS}."
            )
        return self.root / owner_digest(user_id) / kind

    # -- reading ----------------------------------------------------------------------------

    def versions(self, user_id: str, kind: str) -> list[dict[str, Any]]:
        """Every version's card as data (oldest first), each with ``version``."""
        folder = self.folder(user_id, kind)
        found = []
        for path in folder.glob("v*.yaml") if folder.is_dir() else ():
            number = path.stem[1:]
            if number.isdigit():
                card = load_yaml(path.read_text(encoding="utf-8"), source=str(path))
                if isinstance(card, dict):
                    found.append({**card, "version": int(number)})
        return sorted(found, key=lambda c: c["version"])

    def serving(self, user_id: str, kind: str) -> int:
        """The version serving the user now (0: none)."""
        pointer = self.folder(user_id, kind) / "serving.json"
        try:
            return int(json.loads(pointer.read_text(encoding="utf-8"))["version"])
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return 0

    def serving_card(self, user_id: str, kind: str) -> Path | None:
        """The card file of the version serving the user (None: none serves)."""
        version = self.serving(user_id, kind)
        path = self.folder(user_id, kind) / f"v{version}.yaml"
        return path if version and path.is_file() else None

    def serving_cards(self, user_id: str, kind: str, load: Callable[[Path], Any]) -> list[Any]:
        """The card serving ``user_id`` (read with ``load``, re-read only when the file
        changed), in a list: empty when none serves. A card whose ``owner`` is not the user
        (a hand-edited file) is not theirs and not returned."""
        path = self.serving_card(user_id, kind)
        card = self._load(path, load) if path is not None else None
        return [card] if card is not None and getattr(card, "owner", None) == user_id else []

    def _load(self, path: Path, load: Callable[[Path], Any]) -> Any:
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._read.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        card = load(path)
        with self._lock:
            self._read[path] = (stamp, card)
        return card

    def find(self, card_id: str, kind: str, load: Callable[[Path], Any]) -> Any:
        """The card of a versioned own id (``own-lora-<hash>-v<N>``), whoever's it is: a
        backend resolving an id it was asked to serve (ownership is checked where the
        request is made). None if there is no such version."""
        digest, _, version = card_id.removeprefix(OWNED_PREFIX).partition("-")[2].rpartition("-v")
        if not version.isdigit() or not re.fullmatch(r"[0-9a-f]{24}", digest):
            return None
        path = self.root / digest / kind / f"v{int(version)}.yaml"
        if not path.is_file():
            return None
        card = self._load(path, load)
        return card if getattr(card, "id", None) == card_id else None

    # -- writing ----------------------------------------------------------------------------

    def add_version(
        self,
        user_id: str,
        kind: str,
        card: Mapping[str, Any],
        *,
        write_model: Callable[[Path], None] | None = None,
        model_suffix: str = ".npz",
        promote: bool,
        versioned_id: bool = False,
    ) -> int:
        """Write a new version (its card, and its model through ``write_model(path)`` when
        given) and, when ``promote``, serve it; its number. ``card["location"]`` is set to
        the model's file (or folder) name; ``versioned_id`` appends ``-v<N>`` to the card's
        id (an adapter's: a backend that loaded version 2 under its id must not serve it
        for version 3)."""
        folder = self.folder(user_id, kind)
        folder.mkdir(parents=True, exist_ok=True)
        version = max((v["version"] for v in self.versions(user_id, kind)), default=0) + 1
        while True:
            model_name = f"v{version}{model_suffix}"
            data = dict(card)
            if versioned_id:
                data["id"] = f"{card['id']}-v{version}"
            if write_model is not None:
                data["location"] = f"./{model_name}"  # beside the card
            text = dump_yaml(data)
            if write_atomically(folder / f"v{version}.yaml", text, exclusive=True):
                break
            version += 1  # another process took this number meanwhile
        try:
            if write_model is not None:
                write_model(folder / model_name)
        except BaseException:
            (folder / f"v{version}.yaml").unlink(missing_ok=True)
            raise
        if promote:
            self._point(user_id, kind, version, "promoted")
        return version

    def update_training(
        self, user_id: str, kind: str, version: int, training: Mapping[str, Any], *, promote: bool
    ) -> None:
        """Rewrite a version's ``training`` record (the gate's verdict), and serve it when
        ``promote``."""
        path = self.folder(user_id, kind) / f"v{version}.yaml"
        card = load_yaml(path.read_text(encoding="utf-8"), source=str(path))
        write_atomically(path, dump_yaml({**card, "training": dict(training)}))
        if promote:
            self._point(user_id, kind, version, "promoted")

    def remove_model(self, user_id: str, kind: str, version: int) -> None:
        """Drop a version's model file or folder (a rejected candidate's), keeping its card."""
        for path in self.folder(user_id, kind).glob(f"v{version}.*"):
            if path.suffix not in (".yaml",):
                path.unlink()
        folder = self.folder(user_id, kind) / f"v{version}"
        if folder.is_dir():
            shutil.rmtree(folder)

    def _point(self, user_id: str, kind: str, version: int, why: str) -> None:
        pointer = {"version": version, "since": datetime.now(UTC).isoformat(), "by": why}
        write_atomically(self.folder(user_id, kind) / "serving.json", json.dumps(pointer))

    def rollback(self, user_id: str, kind: str, version: int) -> None:
        """Serve ``version`` (a promoted one whose model is still there), or none (0)."""
        if not self.versions(user_id, kind):
            raise PersonaNotFoundError(
                f"user {user_id!r} has no {kind} versions to roll back to (none trained yet)."
            )
        if version != 0:
            card = next((v for v in self.versions(user_id, kind) if v["version"] == version), None)
            if card is None:
                known = [v["version"] for v in self.versions(user_id, kind)]
                raise PersonaNotFoundError(
                    f"user {user_id!r} has no {kind} version {version} (versions: "
                    f"{known or 'none'}). See `persona adapt history {user_id}`."
                )
            status = (card.get("training") or {}).get("status")
            if status != "promoted":
                raise PersonaValidationError(
                    "rollback",
                    "version",
                    f"{kind} version {version} was {status or 'not promoted'} by the gate",
                    "Roll back to a version the gate promoted, or to 0 (none).",
                )
        self._point(user_id, kind, version, "rollback")

    def delete_user(self, user_id: str) -> int:
        """Remove every artefact of the user, files included; how many versions went."""
        folder = self.root / owner_digest(user_id)
        if not folder.exists():
            return 0
        count = sum(len(self.versions(user_id, kind)) for kind in OWNED_KINDS)
        shutil.rmtree(folder)
        return count

    def export_user(self, user_id: str) -> dict[str, Any]:
        """Each kind's versions (cards) and the version serving, for the user's export."""
        return {
            kind: {"serving": self.serving(user_id, kind), "versions": versions}
            for kind in OWNED_KINDS
            if (versions := self.versions(user_id, kind))
        }
