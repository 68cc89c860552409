"""What every ``persona`` command shares: the consoles, the global options' state, common
arguments, and the one error reporter.

Every command group reports a :class:`~persona_plugin.errors.PersonaError` the same way
(:func:`report_error`): one red line, no traceback unless ``PERSONA_DEBUG`` is set, and the
error's exit status (2 rejected input, 1 failure), whether it runs under ``persona``'s
``main`` or on its own (:func:`reports_errors`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from persona_plugin.config import Settings
from persona_plugin.errors import PersonaError
from persona_plugin.persona import Persona, load, loads

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliState:
    config_file: Path | None = None
    store_url: str | None = None

    def settings(self) -> Settings:
        overrides = {"store_url": self.store_url} if self.store_url else {}
        return Settings.load(self.config_file, **overrides)

    def store(self, *, create: bool = True) -> Any:
        """The persona store; ``create=False`` for commands that only read or change an
        existing persona, so a mistyped ``--store`` path is an error, not an empty store."""
        from persona_plugin.store import PersonaStore

        settings = self.settings()
        # the default store under PERSONA_HOME is created on first use; a path the user
        # named (--store, PERSONA_STORE_URL) must already exist to be read
        return PersonaStore.from_settings(settings, create=create or settings.store_url is None)

    def memory(self) -> Any:
        """Long-term memory as configured (None when its embedded folder does not exist)."""
        from persona_plugin.memory.long_term import LongTermMemory

        settings = self.settings()
        if not settings.memory_url and not settings.resolved_memory_path.exists():
            return None
        return LongTermMemory.from_settings(settings)

    def checkpointer(self) -> Any:
        """The LangGraph checkpointer as configured (None when its SQLite file does not
        exist: no conversation was ever checkpointed there)."""
        from persona_plugin.graph import make_checkpointer

        url = self.settings().resolved_checkpointer_url
        if (
            url.startswith("sqlite:///")
            and not Path(url.removeprefix("sqlite:///")).expanduser().exists()
        ):
            return None
        return make_checkpointer(url)


state = CliState()

UserArg = Annotated[str, typer.Argument(help="the user's id", show_default=False)]
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="output format: yaml or json", case_sensitive=False)
]


def check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in ("yaml", "json"):
        raise typer.BadParameter(
            f"{fmt!r} is not a format; use yaml or json", param_hint="--format"
        )
    return fmt


def read_document(file: str, settings: Settings) -> Persona:
    if file == "-":
        return loads(sys.stdin.buffer.read(), source="<stdin>", limits=settings.limits)
    return load(file, limits=settings.limits)


F = TypeVar("F", bound=Callable[..., Any])


def report_error(exc: PersonaError) -> int:
    """Print ``exc`` as one red line (re-raise it under ``PERSONA_DEBUG``); its exit status."""
    if os.environ.get("PERSONA_DEBUG"):
        raise exc
    err.print(Text(f"error: {exc}", style="red"))
    return exc.exit_code


def reports_errors(fn: F) -> F:
    """``fn`` with a :class:`PersonaError` reported by :func:`report_error` and turned into
    its exit status, for commands that may run outside ``persona``'s ``main``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonaError as exc:
            raise SystemExit(report_error(exc)) from None

    return wrapper  # type: ignore[return-value]
