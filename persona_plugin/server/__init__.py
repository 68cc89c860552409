"""The OpenAI-compatible persona server (FastAPI): ``persona serve``.

:func:`create_app` (or :func:`create_app_from_settings`) serves ``/v1/chat/completions``
(streaming included) and ``/v1/personas/...`` through the persona graph, with bearer-token
grants per user or tenant and OpenAI-style errors.

:mod:`~persona_plugin.server.mcp` is the MCP server (``persona mcp``, the official ``mcp``
SDK): :func:`~persona_plugin.server.mcp.create_mcp_server` gives MCP clients a user's
persona and memory as tools, over stdio for one bound user or over streamable HTTP with
the same tokens. It is imported on its own (``persona_plugin.create_mcp_server``), so the
OpenAI-compatible server does not load the SDK.
"""

from persona_plugin.server.app import create_app, create_app_from_settings
from persona_plugin.server.auth import TokenGrant

__all__ = ["TokenGrant", "create_app", "create_app_from_settings"]
