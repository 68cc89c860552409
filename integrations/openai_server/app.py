"""The OpenAI-compatible persona server, configured from ``PERSONA_*`` settings.

Run it with ``uvicorn integrations.openai_server.app:app`` (from the repository root) or
``persona serve``; see README.md next to this file.
"""

from persona_plugin.server import create_app_from_settings

app = create_app_from_settings()
