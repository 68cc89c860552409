"""The Discord bot template's logic, with the data discord.py hands it.

``discord.Message`` cannot be built without a gateway connection, so messages are plain
objects with the attributes the bot reads (author.id/.bot, content, guild, channel.id,
mentions, type, id), and Discord's own enums. Store, memory and graph are the real ones
(SQLite, Chroma, LangGraph); the chat model is LangChain's fake with scripted replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import discord
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from integrations.common import RecentTurns
from integrations.discord.bot import (
    MAX_MESSAGE_CHARS,
    PersonaBot,
    deliver,
    handle_message,
    handle_persona_command,
    handle_reaction,
    persona_user_id,
    remember_reply,
    split_message,
)
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.graph import build_persona_graph
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.persona import Persona
from persona_plugin.reflection.reflector import Reflector
from persona_plugin.store import PersonaStore
from tests.fakes import ScriptedReflection

BOT = 1100000000000000001
ALICE, BOB = 2200000000000000002, 3300000000000000003
GUILD, GENERAL = 4400000000000000004, 5500000000000000005

_ids = iter(range(6600000000000000000, 6700000000000000000))


def message(
    author: int,
    content: str,
    *,
    dm: bool = False,
    mentions: tuple[int, ...] = (),
    bot: bool = False,
    kind: discord.MessageType = discord.MessageType.default,
    channel: int | None = None,
) -> SimpleNamespace:
    """A stand-in for ``discord.Message`` with what the bot reads."""
    return SimpleNamespace(
        id=next(_ids),
        content=content,
        author=SimpleNamespace(id=author, bot=bot, name=f"user{author % 1000}"),
        guild=None if dm else SimpleNamespace(id=GUILD),
        channel=SimpleNamespace(
            id=channel or (author + 1 if dm else GENERAL),
            type=discord.ChannelType.private if dm else discord.ChannelType.text,
        ),
        mentions=[SimpleNamespace(id=m, bot=m == BOT) for m in mentions],
        type=kind,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- models ------------------------------------------------------------------------------


REPLIES = [f"Scripted reply number {i}." for i in range(1, 20)]


@pytest.fixture(scope="session")
def embedding_function() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


@pytest.fixture
def parts(tmp_path, embedding_function) -> Iterator[tuple[Any, PersonaStore, LongTermMemory]]:
    store = PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}")
    memory = LongTermMemory(tmp_path / "memory", embedding_function=embedding_function)
    graph = build_persona_graph(
        FakeListChatModel(responses=REPLIES),
        store=store,
        memory=memory,
        reflector=Reflector(ScriptedReflection(), structured="json", limits=store.limits),
        reflection="inline",  # the bot asks for "background" on every call
        debounce_s=60.0,  # reflections wait for drain(), so tests see the queue
    )
    try:
        yield graph, store, memory
    finally:
        graph.close(timeout=30)
        store.close()


def uid(discord_user: int) -> str:
    return persona_user_id(discord_user)


# -- messages ----------------------------------------------------------------------------


def test_a_dm_is_answered_and_the_persona_learns_in_the_background(parts) -> None:
    graph, store, memory = parts
    reply = run(handle_message(graph, message(ALICE, "Hi! I love sailing.", dm=True), BOT))
    assert reply == "Scripted reply number 1."
    assert uid(ALICE) == f"discord:{ALICE}"
    assert graph.background.drain(timeout=30)
    assert store.get(uid(ALICE)).personality.interests == ["sailing"]
    texts = [item.text for item in memory.items(uid(ALICE))]
    assert "user: Hi! I love sailing." in texts and "The user loves sailing." in texts


def test_a_mention_in_a_server_is_answered_without_the_mention(parts) -> None:
    graph, _, memory = parts
    first = message(ALICE, f"<@{BOT}> what should I read next?", mentions=(BOT,))
    old_style = message(ALICE, f"and something short <@!{BOT}>", mentions=(BOT,))
    assert run(handle_message(graph, first, BOT)) == "Scripted reply number 1."
    assert run(handle_message(graph, old_style, BOT)) == "Scripted reply number 2."
    said = sorted(item.text for item in memory.items(uid(ALICE)) if item.speaker == "user")
    assert said == ["user: and something short", "user: what should I read next?"]


def test_a_bare_mention_gets_a_hint_not_a_graph_call(parts) -> None:
    graph, store, _ = parts
    reply = run(handle_message(graph, message(ALICE, f"<@{BOT}>", mentions=(BOT,)), BOT))
    assert reply is not None and "/persona show" in reply
    assert store.users() == []


def test_bots_system_messages_and_unaddressed_messages_are_ignored(parts) -> None:
    graph, store, _ = parts
    ignored = [
        message(ALICE, "just chatting in #general"),  # no mention
        message(ALICE, f"hey <@{BOB}>", mentions=(BOB,)),  # someone else mentioned
        message(BOB, f"<@{BOT}> I am a bot", mentions=(BOT,), bot=True),
        message(BOT, "my own reply", dm=True, bot=True),
        message(ALICE, "", dm=True, kind=discord.MessageType.pins_add),
        message(ALICE, f"<@{BOT}>", mentions=(BOT,), kind=discord.MessageType.new_member),
        message(ALICE, "thread", kind=discord.MessageType.thread_created, mentions=(BOT,)),
        SimpleNamespace(
            **{**vars(message(ALICE, f"<@{BOT}> hook", mentions=(BOT,))), "webhook_id": 7}
        ),
    ]
    for msg in ignored:
        assert run(handle_message(graph, msg, BOT)) is None
    assert store.users() == []


def test_a_graph_failure_becomes_an_apology(parts) -> None:
    graph, _, _ = parts
    huge = message(ALICE, "x" * 20_000, dm=True)  # over the graph's message cap
    assert run(handle_message(graph, huge, BOT)).startswith("Sorry, I can't answer that")

    class Broken:
        def invoke(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("model down")

    reply = run(handle_message(Broken(), message(ALICE, "hello", dm=True), BOT))
    assert reply.startswith("Sorry, something went wrong")


# -- /persona ----------------------------------------------------------------------------


def test_persona_show(parts) -> None:
    graph, store, memory = parts
    assert handle_persona_command(store, memory, ALICE, "show").text.startswith(
        "I have no persona for you yet"
    )
    run(handle_message(graph, message(ALICE, "I love climbing", dm=True), BOT))
    graph.background.drain(timeout=30)
    shown = handle_persona_command(store, memory, str(ALICE), "show")
    assert shown.file_content is None
    assert shown.text.startswith("Your persona (version ")
    block = shown.text[shown.text.index("```") :]
    assert block.startswith("```yaml\n") and block.endswith("\n```")
    assert "- climbing" in block and f"user_id: discord:{ALICE}" in block
    assert len(shown.text) <= MAX_MESSAGE_CHARS
    assert handle_persona_command(store, memory, ALICE, "dance").text.startswith("Use `/persona")
    with pytest.raises(ValueError, match="not a Discord user id"):
        handle_persona_command(store, memory, f"discord:{ALICE}", "show")


def test_a_persona_too_long_for_a_message_comes_as_a_file(parts) -> None:
    _, store, memory = parts
    persona = Persona.new(uid(BOB))
    persona.personality.interests = [f"interest number {i} of many" for i in range(150)]
    store.create(uid(BOB), persona)
    shown = handle_persona_command(store, memory, BOB, "show")
    assert len(shown.text) <= MAX_MESSAGE_CHARS and "attached" in shown.text
    assert shown.file_name == "persona.yaml"
    assert "- interest number 149 of many" in shown.file_content


def test_persona_forget_deletes_persona_and_memory(parts) -> None:
    graph, store, memory = parts
    run(handle_message(graph, message(ALICE, "I love chess", dm=True), BOT))
    assert store.exists(uid(ALICE)) and memory.count(uid(ALICE)) > 0
    # the turn's reflection is still queued: it must not bring the persona back
    done = handle_persona_command(store, memory, ALICE, "forget", graph=graph)
    assert done.text.startswith("Done: I forgot your persona (")
    assert graph.background.drain(timeout=30)
    assert not store.exists(uid(ALICE))
    assert memory.count(uid(ALICE)) == 0
    again = handle_persona_command(store, memory, ALICE, "forget", graph=graph)
    assert again.text.startswith("I had nothing stored about you")


def test_two_discord_users_never_see_each_others_persona(parts) -> None:
    graph, store, memory = parts
    run(handle_message(graph, message(ALICE, "I love sailing", dm=True), BOT))
    run(handle_message(graph, message(BOB, f"<@{BOT}> I love chess", mentions=(BOT,)), BOT))
    assert graph.background.drain(timeout=30)
    assert store.get(uid(ALICE)).personality.interests == ["sailing"]
    assert store.get(uid(BOB)).personality.interests == ["chess"]
    alice_sees = handle_persona_command(store, memory, ALICE, "show").text
    bob_sees = handle_persona_command(store, memory, BOB, "show").text
    assert "sailing" in alice_sees and "chess" not in alice_sees and str(BOB) not in alice_sees
    assert "chess" in bob_sees and "sailing" not in bob_sees and str(ALICE) not in bob_sees
    assert all("chess" not in item.text for item in memory.items(uid(ALICE)))
    handle_persona_command(store, memory, ALICE, "forget", graph=graph)
    assert store.get(uid(BOB)).personality.interests == ["chess"]
    assert memory.count(uid(BOB)) > 0


# -- sending and wiring ------------------------------------------------------------------


def test_long_replies_are_split_to_fit_discord() -> None:
    text = "\n".join(f"line {i} " + "word " * 30 for i in range(100))
    pieces = split_message(text)
    assert all(len(p) <= MAX_MESSAGE_CHARS for p in pieces) and len(pieces) > 1
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert split_message("x" * 4500) == ["x" * 2000, "x" * 2000, "x" * 500]
    assert split_message("short") == ["short"]


def test_deliver_replies_then_continues_in_the_channel() -> None:
    sent: list[tuple[str, str, dict[str, Any]]] = []

    async def reply(content: str, **kwargs: Any) -> None:
        sent.append(("reply", content, kwargs))

    async def send(content: str, **kwargs: Any) -> None:
        sent.append(("send", content, kwargs))

    msg = SimpleNamespace(reply=reply, channel=SimpleNamespace(send=send))
    run(deliver(msg, "a" * 2500))
    assert [(kind, len(text)) for kind, text, _ in sent] == [("reply", 2000), ("send", 500)]
    assert sent[0][2] == {"mention_author": False}


def test_the_client_registers_persona_and_answers_the_command(parts) -> None:
    graph, store, memory = parts
    bot = PersonaBot(graph, store, memory, guild_id=GUILD)
    assert not bot.intents.message_content  # DMs and mentions need no privileged intent
    assert bot.intents.dm_messages and bot.intents.guild_messages
    assert bot.allowed_mentions is not None and not bot.allowed_mentions.everyone
    command = bot.tree.get_command("persona")
    (action,) = command.parameters
    assert [c.value for c in action.choices] == ["show", "forget"]

    store.create(uid(ALICE), Persona.new(uid(ALICE)))
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    async def defer(**kwargs: Any) -> None:
        calls.append(("defer", None, kwargs))

    async def send(content: str, **kwargs: Any) -> None:
        calls.append(("send", content, kwargs))

    interaction = SimpleNamespace(
        user=SimpleNamespace(id=ALICE),
        response=SimpleNamespace(defer=defer),
        followup=SimpleNamespace(send=send),
    )
    run(command.callback(interaction, action="forget"))
    assert calls[0] == ("defer", None, {"ephemeral": True, "thinking": True})
    assert calls[1][0] == "send" and calls[1][1].startswith("Done: I forgot your persona")
    assert calls[1][2] == {"ephemeral": True}
    assert not store.exists(uid(ALICE))


def test_reactions_and_better_answers_are_feedback_on_the_turn(parts) -> None:
    graph, _store, _memory = parts
    turns = RecentTurns()
    asked = message(ALICE, "What should I cook tonight?", dm=True)
    assert run(handle_message(graph, asked, BOT, turns=turns)) == REPLIES[0]
    reply = SimpleNamespace(id=next(_ids))
    remember_reply(turns, asked, [reply])
    (logged,) = graph.interactions.turns(uid(ALICE))
    assert logged.turn_id == f"discord-{asked.id}"
    # 👍 and 👎🏽 by Alice rate her turn; Bob's reaction, other emoji, other messages do not
    assert handle_reaction(graph, turns, ALICE, reply.id, "\U0001f44d")
    assert handle_reaction(graph, turns, ALICE, reply.id, "\U0001f44e\U0001f3fd")
    assert not handle_reaction(graph, turns, BOB, reply.id, "\U0001f44d")
    assert not handle_reaction(graph, turns, ALICE, reply.id, "\U0001f389")
    assert not handle_reaction(graph, turns, ALICE, asked.id, "\U0001f44d")
    assert [e.rating for e in graph.interactions.feedback(uid(ALICE))] == [1, -1]
    # a better answer is an edit of the last reply in the channel, with no graph call
    better = message(ALICE, "better: Risotto with peas.", dm=True, channel=asked.channel.id)
    answer = run(handle_message(graph, better, BOT, turns=turns))
    assert answer == "Thanks: I noted your better answer."
    edits = graph.interactions.feedback(uid(ALICE), kind="edit")
    assert [(e.turn_id, e.text) for e in edits] == [(logged.turn_id, "Risotto with peas.")]
    assert len(graph.interactions.turns(uid(ALICE))) == 1
    # a better answer where nothing was answered yet is refused politely
    elsewhere = message(BOB, "better: something", dm=True)
    assert "no reply of mine" in run(handle_message(graph, elsewhere, BOT, turns=turns))
