"""A Discord bot on the persona graph: every Discord user gets a persona of their own.

The logic is in plain functions that take what discord.py hands over, so it is tested
without a connection:

- :func:`handle_message` answers a direct message, or a server message that mentions the
  bot (the mention removed from the text), through the persona graph, with background
  reflection; it ignores bots (itself included), system messages (joins, pins, ...) and
  server messages that do not mention the bot, and returns the reply text or ``None``;
- feedback goes to the interaction log: a 👍 or 👎 reaction of the user on the bot's reply
  rates that turn (:func:`handle_reaction`), and a message starting with ``better:`` is
  the user's better answer to the last reply in that channel (an ``edit``). Which reply
  answered which turn is kept in memory (:class:`~integrations.common.RecentTurns`);
- :func:`handle_persona_command` serves ``/persona show`` (the persona as a YAML code
  block, or as an attached file when it does not fit a message) and ``/persona forget``
  (deletes the persona, every version, and the long-term memory, and confirms).

:class:`PersonaBot` is the thin discord.py wiring: intents, ``on_message``, the ``/persona``
app command (answered ephemerally, only the caller sees it).

Identity: the Discord user ``123`` is the persona user ``discord:123`` (Discord user ids
are global, so the persona follows the user across servers and DMs). The conversation
(LangGraph ``thread_id``) is ``discord:<channel id>:<user id>``: per channel (a Discord
thread is a channel) and per user, so users of one channel never share graph state.

Run it: ``DISCORD_BOT_TOKEN=... python -m integrations.discord.bot`` (``DISCORD_GUILD_ID``
registers ``/persona`` in that server at once, instead of globally); the graph is built
from the ``PERSONA_*`` settings. See ``integrations/discord/README.md``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import discord
from discord import app_commands

from integrations.common import (
    EDIT_PREFIX,
    RecentTurns,
    answer,
    better_answer,
    feedback,
    forget,
    rating_of,
)
from persona_plugin import PersonaNotFoundError
from persona_plugin.persona import validate_user_id

log = logging.getLogger(__name__)

#: Discord's limit on a message's content
MAX_MESSAGE_CHARS = 2000

#: message types written by people (everything else is a system message: joins, pins, ...)
PERSON_MESSAGE_TYPES = (discord.MessageType.default, discord.MessageType.reply)

USAGE = (
    "Use `/persona show` to see what I know about you, or `/persona forget` to delete it "
    "(your persona and my long-term memory of you)."
)


def persona_user_id(discord_user_id: int | str) -> str:
    """The persona user id of a Discord user: ``discord:<user id>``."""
    if not str(discord_user_id).isdigit():
        raise ValueError(f"{discord_user_id!r} is not a Discord user id (a snowflake)")
    return validate_user_id(f"discord:{discord_user_id}", source="Discord user")


def is_direct_message(message: Any) -> bool:
    """A DM: a message outside any server."""
    return message.guild is None


def mentions_bot(message: Any, bot_user_id: int) -> bool:
    """The bot is mentioned by name (a reply to the bot that pings it counts too)."""
    return any(user.id == bot_user_id for user in message.mentions)


def strip_mentions(content: str, bot_user_id: int) -> str:
    """``content`` without the bot's mentions (``<@id>`` and the old ``<@!id>``)."""
    text = re.sub(rf"<@!?{bot_user_id}>", " ", content)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def should_answer(message: Any, bot_user_id: int) -> bool:
    """A person wrote to the bot: a DM, or a server message that mentions it."""
    if message.author.bot or message.author.id == bot_user_id:
        return False
    if getattr(message, "webhook_id", None) is not None:
        return False
    if getattr(message, "type", discord.MessageType.default) not in PERSON_MESSAGE_TYPES:
        return False
    return is_direct_message(message) or mentions_bot(message, bot_user_id)


async def handle_message(
    graph: Any,
    message: Any,
    bot_user_id: int,
    *,
    reflection: str = "background",
    turns: RecentTurns | None = None,
) -> str | None:
    """The reply to a ``discord.Message``, or ``None`` when the bot should stay silent.

    Reads ``message.author.id``/``.bot``, ``.content``, ``.guild`` (``None`` in a DM),
    ``.mentions``, ``.type``, ``.webhook_id``, ``.id`` and ``.channel.id``. The graph runs
    in a worker thread, so the event loop stays free.
    """
    if not should_answer(message, bot_user_id):
        return None
    text = strip_mentions(message.content or "", bot_user_id)
    if not text:
        return "Hi! Write your message after the mention. " + USAGE
    conversation = f"discord:{message.channel.id}:{message.author.id}"
    if turns is not None and text.lower().startswith(EDIT_PREFIX):
        return await asyncio.to_thread(better_answer, graph, turns, conversation, text)
    turn = (persona_user_id(message.author.id), f"discord-{message.id}")
    reply = await asyncio.to_thread(
        answer,
        graph,
        user_id=turn[0],
        thread_id=conversation,
        turn_id=turn[1],
        text=text,
        reflection=reflection,
    )
    if turns is not None:
        turns.answered(conversation, turn)
    return reply


def remember_reply(turns: RecentTurns, message: Any, sent: list[Any]) -> None:
    """Note that the messages ``sent`` are the reply to ``message``'s turn (when it was one:
    a hint or a ``better:`` answer is not), so reactions on them rate it."""
    turn = turns.last(f"discord:{message.channel.id}:{message.author.id}")
    if turn is not None and turn[1] == f"discord-{message.id}":
        for piece in sent:
            if getattr(piece, "id", None) is not None:
                turns.posted(str(piece.id), turn)


def handle_reaction(
    graph: Any, turns: RecentTurns, user_id: int, message_id: int, emoji: str
) -> bool:
    """A reaction on a message: a 👍/👎 of the user on the bot's reply to them rates that
    turn. Whether it was recorded."""
    rating = rating_of(emoji)
    turn = turns.reply(str(message_id))
    if rating is None or turn is None or persona_user_id(user_id) != turn[0]:
        return False
    return feedback(graph, *turn, "rating", rating=rating)


@dataclass
class CommandReply:
    """A ``/persona`` answer: the text, and a file when the persona does not fit it."""

    text: str
    file_name: str | None = None
    file_content: str | None = None


def _code_block(text: str, language: str = "") -> str:
    body = text.replace("```", "`\u200b``")  # a fence inside would end the block
    return f"```{language}\n{body}\n```"


def show_persona(store: Any, user_id: str) -> CommandReply:
    try:
        persona = store.get(user_id)
    except PersonaNotFoundError:
        return CommandReply("I have no persona for you yet. Talk to me and I'll start learning.")
    heading = f"Your persona (version {persona.meta.version}):"
    document = persona.to_yaml()
    text = f"{heading}\n{_code_block(document, 'yaml')}"
    if len(text) <= MAX_MESSAGE_CHARS:
        return CommandReply(text)
    return CommandReply(
        f"{heading} it is {len(document)} characters, so it is attached as a file.",
        file_name="persona.yaml",
        file_content=document,
    )


def forget_user(store: Any, memory: Any, user_id: str, graph: Any = None) -> CommandReply:
    return CommandReply(forget(graph, store, memory, user_id))


def handle_persona_command(
    store: Any, memory: Any, user_id: int | str, action: str, *, graph: Any = None
) -> CommandReply:
    """``/persona show|forget`` for the Discord user ``user_id`` (their snowflake).

    Blocking (database and memory calls): run it in a worker thread from async code.
    Pass ``graph`` so that ``forget`` first finishes its queued background reflections.
    """
    persona_id = persona_user_id(user_id)
    action = (action or "show").strip().lower()
    if action == "show":
        return show_persona(store, persona_id)
    if action == "forget":
        return forget_user(store, memory, persona_id, graph)
    return CommandReply(USAGE)


def split_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at line ends where possible."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = text.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(text[:cut])
        text = text[cut:].lstrip("\n ")
    if text:
        pieces.append(text)
    return pieces


async def deliver(message: Any, reply: str) -> list[Any]:
    """Send ``reply`` as a reply to ``message`` (more messages if it is long); what was sent."""
    sent = []
    for index, piece in enumerate(split_message(reply)):
        if index == 0:
            sent.append(await message.reply(piece, mention_author=False))
        else:
            sent.append(await message.channel.send(piece))
    return sent


class PersonaBot(discord.Client):
    """The discord.py client: DMs and mentions through the graph, and ``/persona``.

    Needs no privileged intent: the content of DMs and of messages that mention the bot
    reaches it without ``message_content``. Nothing it sends can ping anyone.
    """

    def __init__(
        self,
        graph: Any,
        store: Any,
        memory: Any,
        *,
        guild_id: int | None = None,
        reflection: str = "background",
    ) -> None:
        intents = discord.Intents.default()  # guild_messages and dm_messages included
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none())
        self.graph, self.store, self.memory = graph, store, memory
        self.guild_id = guild_id
        self.reflection = reflection
        self.turns = RecentTurns()
        self.tree = app_commands.CommandTree(self)

        @self.tree.command(name="persona", description="See or delete what the bot knows about you")
        @app_commands.describe(action="show: see your persona; forget: delete it and your memory")
        async def persona(
            interaction: discord.Interaction, action: Literal["show", "forget"] = "show"
        ) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            reply = await asyncio.to_thread(
                handle_persona_command,
                self.store,
                self.memory,
                interaction.user.id,
                action,
                graph=self.graph,
            )
            extra: dict[str, Any] = {}
            if reply.file_content is not None:
                data = io.BytesIO(reply.file_content.encode())
                extra["file"] = discord.File(data, filename=reply.file_name or "persona.yaml")
            await interaction.followup.send(reply.text, ephemeral=True, **extra)

    async def setup_hook(self) -> None:
        if self.guild_id:
            guild = discord.Object(id=self.guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)  # at once, in that server
        else:
            await self.tree.sync()  # global: may take a while to appear

    async def on_message(self, message: discord.Message) -> None:
        if self.user is None or not should_answer(message, self.user.id):
            return
        async with message.channel.typing():
            reply = await handle_message(
                self.graph, message, self.user.id, reflection=self.reflection, turns=self.turns
            )
        if reply:
            remember_reply(self.turns, message, await deliver(message, reply))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await asyncio.to_thread(
            handle_reaction,
            self.graph,
            self.turns,
            payload.user_id,
            payload.message_id,
            str(payload.emoji),
        )

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await asyncio.to_thread(self.graph.close, 30)


def main() -> None:
    """Run the bot from the environment (see the module doc)."""
    from persona_plugin import Settings, build_persona_graph_from_settings, make_checkpointer

    token = os.environ.get("DISCORD_BOT_TOKEN")
    if not token:
        raise SystemExit("Set DISCORD_BOT_TOKEN; see integrations/discord/README.md.")
    guild = os.environ.get("DISCORD_GUILD_ID")
    settings = Settings.load()
    graph = build_persona_graph_from_settings(
        settings, checkpointer=make_checkpointer(settings.resolved_checkpointer_url)
    )
    bot = PersonaBot(
        graph,
        graph.store,
        graph.memory,
        guild_id=int(guild) if guild else None,
    )
    bot.run(token, log_level=logging.getLevelName(os.environ.get("LOG_LEVEL", "INFO")))


if __name__ == "__main__":
    main()
