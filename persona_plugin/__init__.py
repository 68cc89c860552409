"""persona-plugin: life-long personalization for LangChain chat apps."""

from persona_plugin.chat import with_persona
from persona_plugin.config import Settings
from persona_plugin.diff import Change, diff_documents
from persona_plugin.errors import (
    PersonaConfigError,
    PersonaConflictError,
    PersonaError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import Persona, PersonaLimits, json_schema, load, loads
from persona_plugin.prompt import AssembledPersona, PromptAssembler, estimate_tokens
from persona_plugin.store import PersonaStore, VersionRecord

__version__ = "0.1.0"

__all__ = [
    "AssembledPersona",
    "Change",
    "Persona",
    "PersonaConfigError",
    "PersonaConflictError",
    "PersonaError",
    "PersonaLimits",
    "PersonaNotFoundError",
    "PersonaStore",
    "PersonaValidationError",
    "PromptAssembler",
    "Settings",
    "VersionRecord",
    "__version__",
    "diff_documents",
    "estimate_tokens",
    "json_schema",
    "load",
    "loads",
    "with_persona",
]
