"""The persona server in a process of its own, for tests that kill it: ``python -m
tests.processes.reflecting_server STORE_URL RECORD_FILE PORT DEBOUNCE_S [DELAY]``.

It serves an echoing model in background-reflection mode; its reflection model is
:class:`tests.fakes.TurnReflector`, which records each call in RECORD_FILE. Bearer token
``tok-0123456789``, users ``u0`` ... ``u9``.
"""

from __future__ import annotations

import sys

import uvicorn

from persona_plugin.server.app import create_app
from persona_plugin.store import PersonaStore
from tests.fakes import ScriptedChatModel, TurnReflector


def main(url: str, record_to: str, port: str, debounce_s: str, delay: str = "0") -> None:
    store = PersonaStore(url)
    app = create_app(
        models={"echo": ScriptedChatModel(default="noted")},
        store=store,
        tokens={"tok-0123456789": {"users": [f"u{n}" for n in range(10)]}},
        reflector=TurnReflector(record_to, delay=float(delay)),
        reflection="background",
        debounce_s=float(debounce_s),
        close_resources=store.close,
    )
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main(*sys.argv[1:])
