"""Settings: one object, read from ``PERSONA_*`` environment variables and a config file.

Precedence, highest first: keyword arguments to :meth:`Settings.load`, environment
variables, the config file, defaults. The config file is ``PERSONA_CONFIG`` if set, else
``$PERSONA_HOME/config.toml`` / ``config.yaml`` when present. Everything the plugin keeps
on disk lives under ``PERSONA_HOME`` (default ``~/.persona-plugin``) unless a setting
points elsewhere.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from persona_plugin.errors import PersonaConfigError
from persona_plugin.persona import PersonaLimits

DEFAULT_HOME = Path("~/.persona-plugin")
#: what ships inside the package: bundled adapters, preference models, the reflection gate
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

#: higher survives a tight token budget longer
DEFAULT_SECTION_PRIORITIES: dict[str, int] = {
    "identity": 100,
    "preference": 90,
    "personality": 80,
    "demographics": 70,
    "pattern": 60,
    "memory": 50,
    "extensions": 40,
    "context": 45,  # tool results of the turn (memory recall, knowledge base)
    "tools": 30,
}


class Settings(BaseSettings):
    """All of persona-plugin's settings. Build with :meth:`Settings.load`."""

    model_config = SettingsConfigDict(env_prefix="PERSONA_", extra="forbid")

    home: Path = Field(DEFAULT_HOME, description="data directory (store, memory, caches)")
    store_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the persona store; default sqlite:///$PERSONA_HOME/"
        "personas.db (e.g. postgresql+psycopg://host:5432/db)",
    )
    max_value_chars: int = Field(2000, ge=1, description="cap on any one value in a persona")
    max_document_bytes: int = Field(65536, ge=256, description="cap on a persona, as JSON")
    token_budget: int = Field(1024, ge=16, description="tokens the assembled persona may use")
    section_priorities: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_SECTION_PRIORITIES),
        description="which sections survive a tight budget (JSON in the environment)",
    )
    templates_dir: Path | None = Field(
        None, description="directory of <section>.j2 templates overriding the built-in ones"
    )
    cold_start: bool = Field(
        False, description="serve unknown users with an empty persona instead of an error"
    )
    cache_dir: Path | None = Field(
        None, description="built models (the fast embedder); default $PERSONA_HOME/cache"
    )
    memory_path: Path | None = Field(
        None, description="embedded Chroma directory; default $PERSONA_HOME/memory"
    )
    memory_url: str | None = Field(
        None, description="Chroma server URL (chroma run); overrides memory_path"
    )
    memory_collection: str = Field(
        "persona_memory", min_length=3, max_length=63, description="Chroma collection name"
    )
    chat_model: str = Field(
        "echo",
        description="chat model of deployable graphs: 'local' (the in-process model with "
        "LoRA adapters), 'echo' or 'provider:model'",
    )
    reflection: Literal["inline", "background", "every_n_turns", "off"] = Field(
        "inline", description="when the persona graph reflects on a turn"
    )
    reflection_debounce_s: float = Field(
        1.0,
        ge=0,
        le=86400,
        description="background reflection waits until a user's newest queued turn is this "
        "old, so a burst of turns becomes one reflection",
    )
    routing: bool = Field(
        False,
        description="`persona serve` answers model 'auto' with the served model each user "
        "prefers (stated in their persona, then measured from their ratings)",
    )
    adapt_interval_s: float | None = Field(
        None,
        gt=0,
        description="`persona serve` adapts users with new feedback (their own preference "
        "models) this often, in the background; empty: off",
    )
    adapt_min_pairs: int = Field(
        8,
        ge=6,
        le=10000,
        description="preference pairs a user needs for a model of their own (at least 6: "
        "4 to train on, 2 held out)",
    )
    adapt_min_examples: int = Field(
        32,
        ge=4,
        le=100000,
        description="endorsed replies (rated +1, or edited) a user needs for an adapter of "
        "their own on the local model",
    )
    checkpointer_url: str | None = Field(
        None,
        description="LangGraph checkpointer: sqlite:///path or postgresql://...; "
        "default sqlite:///$PERSONA_HOME/checkpoints.db",
    )
    short_term_window: int = Field(
        10, ge=0, le=200, description="recent turns kept in the persona's memory section"
    )
    log: bool = Field(
        True,
        description="keep the interaction log (every turn and its feedback) in the store's "
        "database",
    )
    log_retention_days: float | None = Field(
        None,
        gt=0,
        description="drop logged turns and their feedback after this many days; empty: keep",
    )
    history_tokens: int = Field(
        2000,
        ge=0,
        description="tokens of the thread's earlier messages sent with each turn; older "
        "ones stay in the checkpoint, and long-term memory recalls them when they matter",
    )
    server_tokens: dict[str, dict[str, list[str] | str]] = Field(
        default_factory=dict,
        description="bearer tokens of `persona serve` (the OpenAI-compatible server), JSON: "
        '{"<token>": {"users": ["alice", "bob"]}, "<token>": {"tenant": "acme"}}; a tenant '
        "token acts on user ids acme:...",
    )
    server_request_timeout: float = Field(
        120.0, gt=0, description="seconds a chat completion of `persona serve` has in all"
    )
    server_max_concurrent: int = Field(
        16,
        ge=1,
        description="chat completions of `persona serve` running at once per model; the rest "
        "wait, within their deadline",
    )
    lora_dir: Path | None = Field(
        None, description="LoRA hub: directory of adapter cards; default $PERSONA_HOME/lora"
    )
    prefs_dir: Path | None = Field(
        None,
        description="preference-model hub: directory of cards; default $PERSONA_HOME/prefs",
    )
    mbr_n: int = Field(
        0,
        ge=0,
        le=32,
        description="MBR decoding: candidates sampled per reply and scored by the persona's "
        "preference models; 0 = off",
    )

    @field_validator("home", "templates_dir", "memory_path", "lora_dir", "prefs_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("section_priorities")
    @classmethod
    def _known_sections(cls, value: dict[str, int]) -> dict[str, int]:
        known = set(DEFAULT_SECTION_PRIORITIES)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown sections {unknown}; known: {sorted(known)}")
        return {**DEFAULT_SECTION_PRIORITIES, **value}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment and the config file, with ``overrides`` on top."""
        token = _config_file_values.set(_read_config_file(config_file))
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise _config_error(exc, "arguments, environment (PERSONA_*) or config file") from None
        finally:
            _config_file_values.reset(token)

    # -- derived values -------------------------------------------------------------------

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.home / 'personas.db'}"

    @property
    def resolved_checkpointer_url(self) -> str:
        return self.checkpointer_url or f"sqlite:///{self.home / 'checkpoints.db'}"

    @property
    def resolved_memory_path(self) -> Path:
        return self.memory_path or self.home / "memory"

    @property
    def resolved_lora_dir(self) -> Path:
        return self.lora_dir or self.home / "lora"

    @property
    def limits(self) -> PersonaLimits:
        return PersonaLimits(
            max_value_chars=self.max_value_chars, max_document_bytes=self.max_document_bytes
        )


# the config file's values for the Settings being built (a ContextVar: thread-safe)
_config_file_values: ContextVar[dict[str, Any] | None] = ContextVar(
    "persona_config_file", default=None
)


class _ConfigFileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_config_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_config_file_values.get() or {})


def _config_error(exc: ValidationError, where: str) -> PersonaConfigError:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"])
    env = "PERSONA_" + str(err["loc"][0]).upper() if err["loc"] else "PERSONA_*"
    return PersonaConfigError(
        f"setting '{field}' from the {where} is invalid: {err['msg']}. Fix {env} or the "
        "config file; README.md lists every setting."
    )


def _read_config_file(config_file: str | Path | None) -> dict[str, Any]:
    path: Path | None
    if config_file is not None:
        path = Path(config_file).expanduser()
    elif os.environ.get("PERSONA_CONFIG"):
        path = Path(os.environ["PERSONA_CONFIG"]).expanduser()
    else:
        home = Path(os.environ.get("PERSONA_HOME") or DEFAULT_HOME).expanduser()
        candidates = [home / "config.toml", home / "config.yaml", home / "config.yml"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except FileNotFoundError:
        raise PersonaConfigError(
            f"config file {path} does not exist. Create it or unset PERSONA_CONFIG."
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise PersonaConfigError(f"config file {path} cannot be read: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise PersonaConfigError(f"config file {path} must hold a mapping of settings.")
    # the file may group settings under [persona] so it can share a file with other tools
    return data.get("persona", data)
