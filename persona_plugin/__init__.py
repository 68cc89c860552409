"""persona-plugin: life-long personalization for LangChain chat apps.

The public face. Documents and their store: :class:`Persona` (:func:`load`, :func:`loads`),
:class:`PersonaStore`. Any chat model with a persona: :func:`with_persona`. The persona
graph (load -> recall -> assemble -> generate -> reflect -> save):
:func:`build_persona_graph`, :func:`make_checkpointer`. A LangChain v1 agent with a
persona: :class:`PersonaMiddleware`. Long-term memory:
:class:`LongTermMemory`. Reflection: :class:`Reflector`. Multi-LoRA and MBR chat models:
:class:`MultiLoraChatModel`, :class:`MBRChatModel`. The OpenAI-compatible server:
:func:`create_app`; the MCP server: :func:`create_mcp_server`. Privacy:
:func:`forget_user`, :func:`export_user`. A cold start from a chat export:
:func:`read_history`, :func:`import_history`. Settings:
:class:`Settings`. Errors: :class:`PersonaError` and its subclasses. The subpackages
(``memory``, ``lora``, ``preferences``, ``backends``, ``chat_models``, ``reflection``,
``server``) list their own factories.
"""

from typing import TYPE_CHECKING, Any

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
from persona_plugin.privacy import Forgotten, export_user, forget_user
from persona_plugin.prompt import AssembledPersona, PromptAssembler, estimate_tokens
from persona_plugin.store import PersonaStore, VersionRecord

if TYPE_CHECKING:
    from persona_plugin.chat_models.mbr import MBRChatModel
    from persona_plugin.chat_models.multi_lora import MultiLoraChatModel
    from persona_plugin.graph import (
        PersonaGraph,
        build_persona_graph,
        build_persona_graph_from_settings,
        make_checkpointer,
    )
    from persona_plugin.history import import_history, read_history
    from persona_plugin.interactions import InteractionLog, record_reply_feedback
    from persona_plugin.memory.long_term import LongTermMemory
    from persona_plugin.middleware import PersonaMiddleware
    from persona_plugin.reflection.reflector import Reflector
    from persona_plugin.server.app import create_app
    from persona_plugin.server.mcp import create_mcp_server

# imported on first use: the graph, memory, models and server pull in LangGraph, Chroma,
# numpy and FastAPI, which `import persona_plugin` (and every `persona` command) need not pay
_LAZY = {
    "MBRChatModel": "persona_plugin.chat_models.mbr",
    "MultiLoraChatModel": "persona_plugin.chat_models.multi_lora",
    "PersonaGraph": "persona_plugin.graph",
    "build_persona_graph": "persona_plugin.graph",
    "build_persona_graph_from_settings": "persona_plugin.graph",
    "make_checkpointer": "persona_plugin.graph",
    "import_history": "persona_plugin.history",
    "read_history": "persona_plugin.history",
    "InteractionLog": "persona_plugin.interactions",
    "PersonaMiddleware": "persona_plugin.middleware",
    "record_reply_feedback": "persona_plugin.interactions",
    "LongTermMemory": "persona_plugin.memory.long_term",
    "Reflector": "persona_plugin.reflection.reflector",
    "create_app": "persona_plugin.server.app",
    "create_mcp_server": "persona_plugin.server.mcp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AssembledPersona",
    "Change",
    "Forgotten",
    "InteractionLog",
    "LongTermMemory",
    "MBRChatModel",
    "MultiLoraChatModel",
    "Persona",
    "PersonaConfigError",
    "PersonaConflictError",
    "PersonaError",
    "PersonaGraph",
    "PersonaLimits",
    "PersonaMiddleware",
    "PersonaNotFoundError",
    "PersonaStore",
    "PersonaValidationError",
    "PromptAssembler",
    "Reflector",
    "Settings",
    "VersionRecord",
    "__version__",
    "build_persona_graph",
    "build_persona_graph_from_settings",
    "create_app",
    "create_mcp_server",
    "diff_documents",
    "estimate_tokens",
    "export_user",
    "forget_user",
    "import_history",
    "json_schema",
    "load",
    "loads",
    "make_checkpointer",
    "read_history",
    "record_reply_feedback",
    "with_persona",
]
