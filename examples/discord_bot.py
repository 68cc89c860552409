"""A Discord bot on the persona graph, built from the ``PERSONA_*`` settings and a token.

Run: DISCORD_BOT_TOKEN=... .venv/bin/python examples/discord_bot.py
It answers DMs and mentions and serves ``/persona``; ``DISCORD_GUILD_ID`` registers the
command in that server at once. Without a token it prints what to set and exits 0. The
graph (store, memory, chat model) comes from the settings, e.g. ``PERSONA_HOME`` and
``PERSONA_CHAT_MODEL``; for the Discord app's setup, see integrations/discord/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from persona_plugin import Settings, build_persona_graph_from_settings

# integrations/ is a template in this repository, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_bot(settings: Settings, guild_id: int | None = None) -> Any:
    """The discord.py ``PersonaBot`` on a persona graph built from ``settings`` (offline)."""
    from integrations.discord.bot import PersonaBot

    graph = build_persona_graph_from_settings(settings)
    return PersonaBot(graph, graph.store, graph.memory, guild_id=guild_id)


def main() -> None:
    token = os.environ.get("DISCORD_BOT_TOKEN")
    if not token:
        print("Set DISCORD_BOT_TOKEN to run the Discord bot (see the docstring).")
        return
    guild = os.environ.get("DISCORD_GUILD_ID")
    bot = build_bot(Settings.load(), int(guild) if guild else None)
    bot.run(token)  # closing the bot drains background reflections (PersonaBot.close)


if __name__ == "__main__":
    main()
