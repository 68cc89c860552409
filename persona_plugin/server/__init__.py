"""The OpenAI-compatible persona server (FastAPI): ``persona serve``.

:func:`create_app` (or :func:`create_app_from_settings`) serves ``/v1/chat/completions``
(streaming included) and ``/v1/personas/...`` through the persona graph, with bearer-token
grants per user or tenant and OpenAI-style errors.
"""

from persona_plugin.server.app import create_app, create_app_from_settings
from persona_plugin.server.auth import TokenGrant

__all__ = ["TokenGrant", "create_app", "create_app_from_settings"]
