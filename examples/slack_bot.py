"""A Slack bot on the persona graph, built from the ``PERSONA_*`` settings and Slack tokens.

Run: SLACK_BOT_TOKEN=xoxb-... SLACK_SIGNING_SECRET=... .venv/bin/python examples/slack_bot.py
It serves Slack's Events API on ``$PORT`` (default 3000, path ``/slack/events``). Without
the tokens it prints what to set and exits 0. The graph (store, memory, chat model) comes
from the settings, e.g. ``PERSONA_HOME`` and ``PERSONA_CHAT_MODEL``; for Socket Mode and the
Slack app's setup, see integrations/slack/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from persona_plugin import Settings, build_persona_graph_from_settings

# integrations/ is a template in this repository, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEEDED = ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET")


def build_app(settings: Settings, token: str, signing_secret: str, **app_options: Any) -> Any:
    """The Bolt app on a persona graph built from ``settings``."""
    from integrations.slack.app import create_slack_app

    graph = build_persona_graph_from_settings(settings)
    return create_slack_app(
        graph,
        graph.store,
        graph.memory,
        token=token,
        signing_secret=signing_secret,
        **app_options,  # e.g. token_verification_enabled=False, to build it offline
    )


def main() -> None:
    missing = [name for name in NEEDED if not os.environ.get(name)]
    if missing:
        print(f"Set {' and '.join(missing)} to run the Slack bot (see the docstring).")
        return
    app = build_app(
        Settings.load(), os.environ["SLACK_BOT_TOKEN"], os.environ["SLACK_SIGNING_SECRET"]
    )
    app.start(port=int(os.environ.get("PORT", "3000")))


if __name__ == "__main__":
    main()
