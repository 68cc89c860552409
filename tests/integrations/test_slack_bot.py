"""The Slack bot template, driven the way Slack drives it.

Requests are Slack's own payloads (Events API ``event_callback`` JSON, the form-encoded
slash command), signed with the signing secret, through Bolt's request handling
(``BoltRequest`` + ``App.dispatch``). The Web API (``auth.test``, ``chat.postMessage``) and
the slash command's ``response_url`` are a local HTTP server standing in for Slack,
which records what the bot sent. Store, memory and graph are the real ones (SQLite,
Chroma, LangGraph); the chat model is LangChain's fake with scripted replies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from slack_bolt.request import BoltRequest
from slack_sdk import WebClient

from integrations.slack.app import code_block, create_slack_app, persona_user_id
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.graph import build_persona_graph
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.reflection.reflector import Reflector
from persona_plugin.store import PersonaStore
from tests.fakes import ScriptedReflection

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM, BOT_USER, BOT_ID = "T0001", "UBOT0001", "BBOT0001"
ALICE, BOB = "U0ALICE01", "U0BOB0001"


# -- Slack's side ------------------------------------------------------------------------


class FakeSlack(ThreadingHTTPServer):
    """The Web API and response URLs on 127.0.0.1: records every request, answers ok."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlackHandler)
        self.requests: list[dict[str, Any]] = []
        #: what the fake answered to each chat.postMessage (with the ts it gave the post)
        self.replies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests if r["path"] == path]

    @property
    def posts(self) -> list[dict[str, Any]]:
        return self.calls("/api/chat.postMessage")


class _SlackHandler(BaseHTTPRequestHandler):
    server: FakeSlack

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            body = json.loads(raw or "{}")
        else:
            body = dict(parse_qsl(raw))
        with self.server.lock:
            self.server.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": body}
            )
        answer: dict[str, Any] = {"ok": True}
        if self.path == "/api/auth.test":
            answer |= {
                "url": "https://example.slack.com/",
                "team": "Example",
                "user": "persona",
                "team_id": TEAM,
                "user_id": BOT_USER,
                "bot_id": BOT_ID,
                "is_enterprise_install": False,
            }
        elif self.path == "/api/chat.postMessage":
            answer |= {"channel": body.get("channel"), "ts": f"{time.time():.6f}"}
            with self.server.lock:
                self.server.replies.append(answer)
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def signed(body: str, *, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    """Slack's request signature: v0=HMAC-SHA256(secret, "v0:{timestamp}:{body}")."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


_counter = iter(range(1, 10**6))


def event_body(event: dict[str, Any], event_id: str | None = None) -> str:
    """An Events API ``event_callback`` request body, as Slack sends it."""
    return json.dumps(
        {
            "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
            "team_id": TEAM,
            "context_team_id": TEAM,
            "context_enterprise_id": None,
            "api_app_id": "A0PERSONA1",
            "event": {"team": TEAM, "event_ts": event["ts"], **event},
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(_counter):08d}",
            "event_time": int(float(event["ts"])),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": TEAM,
                    "user_id": BOT_USER,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
            "event_context": "4-eyJldCI6Im1lc3NhZ2UiLCJ0aWQiOiJUMDAwMSJ9",
        }
    )


def new_ts() -> str:
    return f"{1_700_000_000 + next(_counter)}.000100"


def dm(user: str, text: str, *, ts: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``message.im`` event: a user writes to the bot in their DM channel."""
    return {
        "client_msg_id": f"c{next(_counter):08d}-0000-4000-8000-000000000000",
        "type": "message",
        "text": text,
        "user": user,
        "ts": ts or new_ts(),
        "blocks": [{"type": "rich_text", "block_id": "b1", "elements": []}],
        "channel": f"D{user[1:]}",
        "channel_type": "im",
        **extra,
    }


def mention(user: str, text: str, *, channel: str = "C0GENERAL", **extra: Any) -> dict[str, Any]:
    """An ``app_mention`` event: a user mentions the bot in a channel."""
    return {
        "client_msg_id": f"c{next(_counter):08d}-0000-4000-8000-000000000000",
        "type": "app_mention",
        "text": text,
        "user": user,
        "ts": new_ts(),
        "blocks": [],
        "channel": channel,
        **extra,
    }


def slash_body(user: str, text: str, response_path: str) -> str:
    """The form-encoded ``/persona`` request Slack posts to the app."""
    return urlencode(
        {
            "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
            "team_id": TEAM,
            "team_domain": "example",
            "channel_id": "C0GENERAL",
            "channel_name": "general",
            "user_id": user,
            "user_name": user.lower(),
            "command": "/persona",
            "text": text,
            "api_app_id": "A0PERSONA1",
            "is_enterprise_install": "false",
            "response_url": response_path,
            "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        }
    )


# -- models ------------------------------------------------------------------------------


REPLIES = [f"Scripted reply number {i}." for i in range(1, 20)]


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedding_function() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    server = FakeSlack()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


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


@pytest.fixture
def app(parts, slack: FakeSlack) -> Any:
    return make_app(*parts, slack)


def make_app(graph: Any, store: PersonaStore, memory: LongTermMemory, slack: FakeSlack) -> Any:
    client = WebClient(token="xoxb-test-token", base_url=f"{slack.url}/api/")
    return create_slack_app(
        graph,
        store,
        memory,
        token="xoxb-test-token",
        signing_secret=SECRET,
        client=client,
        process_before_response=True,
    )


def send(app: Any, body: str, *, form: bool = False, **sign: Any) -> Any:
    headers = {
        "Content-Type": "application/x-www-form-urlencoded" if form else "application/json",
        **signed(body, **sign),
    }
    return app.dispatch(BoltRequest(body=body, headers=headers))


def command(app: Any, slack: FakeSlack, user: str, text: str) -> str:
    """Run ``/persona <text>`` as ``user``; the text the bot sent to the response_url."""
    path = f"/commands/{TEAM}/{next(_counter)}/secret"
    response = send(app, slash_body(user, text, f"{slack.url}{path}"), form=True)
    assert response.status == 200
    (answer,) = slack.calls(path)
    assert answer["response_type"] == "ephemeral"
    return answer["text"]


def uid(slack_user: str) -> str:
    return persona_user_id(TEAM, slack_user)


# -- tests -------------------------------------------------------------------------------


def test_a_dm_is_answered_and_the_persona_learns_in_the_background(app, parts, slack) -> None:
    graph, store, memory = parts
    event = dm(ALICE, "Hi! I love sailing &amp; the sea.")
    response = send(app, event_body(event))
    assert response.status == 200
    (post,) = slack.posts
    assert post["channel"] == event["channel"]
    assert "Scripted reply number 1." in post["text"]
    assert post.get("thread_ts") is None  # a DM is answered in the DM, not in a thread
    # the reply is out; the reflection is still queued
    assert graph.background.drain(timeout=30)
    persona = store.get(uid(ALICE))
    assert persona.personality.interests == ["sailing"]
    texts = [item.text for item in memory.items(uid(ALICE))]
    assert "user: Hi! I love sailing & the sea." in texts  # unescaped for the model
    assert "The user loves sailing." in texts
    assert uid(ALICE) == f"slack:{TEAM}:{ALICE}"


def test_a_mention_is_answered_in_its_thread_without_the_mention(app, parts, slack) -> None:
    _, _, memory = parts
    first = mention(ALICE, f"<@{BOT_USER}> what should I read next?")
    assert send(app, event_body(first)).status == 200
    in_thread = mention(ALICE, f"and something short <@{BOT_USER}>", thread_ts="1699999999.000200")
    assert send(app, event_body(in_thread)).status == 200
    one, two = slack.posts
    assert (one["channel"], one["thread_ts"]) == ("C0GENERAL", first["ts"])  # a new thread
    assert (two["channel"], two["thread_ts"]) == ("C0GENERAL", "1699999999.000200")
    assert "Scripted reply number 1." in one["text"]
    assert "Scripted reply number 2." in two["text"]
    said = [item.text for item in memory.items(uid(ALICE)) if item.speaker == "user"]
    assert sorted(said) == ["user: and something short", "user: what should I read next?"]


def test_bots_edits_joins_and_plain_channel_messages_are_ignored(app, parts, slack) -> None:
    _, store, _ = parts
    ignored = [
        dm(ALICE, "hello from a bot", bot_id="B0OTHER01"),
        dm(BOT_USER, "my own reply"),  # the bot's own message in the DM
        dm(
            ALICE,
            "",
            subtype="message_changed",
            message={"type": "message", "user": ALICE, "text": "edited", "ts": new_ts()},
        ),
        dm(ALICE, "", subtype="message_deleted", previous_message={"text": "gone"}),
        {**dm(ALICE, f"<@{ALICE}> has joined the channel"), "subtype": "channel_join"},
        {**dm(ALICE, "just chatting"), "channel": "C0GENERAL", "channel_type": "channel"},
        mention(ALICE, f"<@{BOT_USER}> echo", bot_id="B0OTHER01"),
    ]
    for event in ignored:
        assert send(app, event_body(event)).status == 200
    assert slack.posts == []
    assert store.users() == []


def test_a_redelivered_event_is_answered_once(app, slack) -> None:
    body = event_body(dm(BOB, "are you there?"), event_id="Ev0REPEAT1")
    assert send(app, body).status == 200
    retry = {
        "Content-Type": "application/json",
        "X-Slack-Retry-Num": "1",
        "X-Slack-Retry-Reason": "http_timeout",
        **signed(body),
    }
    assert app.dispatch(BoltRequest(body=body, headers=retry)).status == 200
    assert len(slack.posts) == 1


def test_slash_persona_shows_the_persona_as_a_code_block(app, parts, slack) -> None:
    graph, _, _ = parts
    assert command(app, slack, ALICE, "").startswith("I have no persona for you yet")
    send(app, event_body(dm(ALICE, "I love climbing")))
    graph.background.drain(timeout=30)
    shown = command(app, slack, ALICE, "show")
    assert shown.startswith("Your persona (version ")
    block = shown[shown.index("```") :]
    assert block.startswith("```\n") and block.endswith("\n```")
    assert "- climbing" in block and f"user_id: slack:{TEAM}:{ALICE}" in block
    assert command(app, slack, ALICE, "") == shown
    assert command(app, slack, ALICE, "dance").startswith("Usage: `/persona`")


def test_slash_persona_forget_deletes_persona_and_memory(app, parts, slack) -> None:
    graph, store, memory = parts
    send(app, event_body(dm(ALICE, "I love chess")))
    assert store.exists(uid(ALICE)) and memory.count(uid(ALICE)) > 0
    # the reflection of that turn is still queued: forgetting must not be undone by it
    answer = command(app, slack, ALICE, "forget")
    assert answer.startswith("Done: I forgot your persona (")
    assert graph.background.drain(timeout=30)
    assert not store.exists(uid(ALICE))
    assert memory.count(uid(ALICE)) == 0
    assert command(app, slack, ALICE, "show").startswith("I have no persona for you yet")
    assert command(app, slack, ALICE, "forget").startswith("I had nothing stored about you")


def test_two_slack_users_never_see_each_others_persona(app, parts, slack) -> None:
    graph, store, memory = parts
    send(app, event_body(dm(ALICE, "I love sailing")))
    send(app, event_body(mention(BOB, f"<@{BOT_USER}> I love chess")))
    assert graph.background.drain(timeout=30)
    assert store.get(uid(ALICE)).personality.interests == ["sailing"]
    assert store.get(uid(BOB)).personality.interests == ["chess"]
    alice_sees, bob_sees = command(app, slack, ALICE, ""), command(app, slack, BOB, "")
    assert "sailing" in alice_sees and "chess" not in alice_sees and BOB not in alice_sees
    assert "chess" in bob_sees and "sailing" not in bob_sees and ALICE not in bob_sees
    assert all("chess" not in item.text for item in memory.items(uid(ALICE)))
    command(app, slack, ALICE, "forget")
    assert store.get(uid(BOB)).personality.interests == ["chess"]
    assert memory.count(uid(BOB)) > 0


@pytest.mark.parametrize(
    "sign",
    [
        {"secret": "not-the-signing-secret"},
        {"timestamp": int(time.time()) - 6 * 60},  # older than Slack's 5 minutes
    ],
    ids=["wrong-secret", "stale-timestamp"],
)
def test_unsigned_or_stale_requests_are_rejected(app, parts, slack, sign) -> None:
    _, store, _ = parts
    assert send(app, event_body(dm(ALICE, "I love forgery")), **sign).status == 401
    path = "/commands/forged"
    body = slash_body(ALICE, "forget", f"{slack.url}{path}")
    assert send(app, body, form=True, **sign).status == 401
    unsigned = app.dispatch(BoltRequest(body=body, headers={"Content-Type": "text/plain"}))
    assert unsigned.status == 401
    assert slack.posts == [] and slack.calls(path) == []
    assert store.users() == []


def test_url_verification_is_answered(app) -> None:
    body = json.dumps(
        {
            "token": "x",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        }
    )
    response = send(app, body)
    assert response.status == 200
    assert "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in response.body


def test_replies_cannot_ping_or_link_and_long_personas_are_cut(parts, slack) -> None:
    _, store, memory = parts
    graph = build_persona_graph(
        FakeListChatModel(responses=["Hey <!channel> & <@U0BOB0001>, see <https://x.io|this>"]),
        store=store,
        memory=memory,
        reflection="off",
    )
    try:
        send(make_app(graph, store, memory, slack), event_body(dm(ALICE, "say hi to all")))
    finally:
        graph.close(timeout=30)
    (post,) = slack.posts
    assert post["text"] == (
        "Hey &lt;!channel&gt; &amp; &lt;@U0BOB0001&gt;, see &lt;https://x.io|this&gt;"
    )
    block = code_block("a: <!here>\nb: ```x```\n" + "c" * 50, limit=40)
    assert "<" not in block and "&lt;!here&gt;" in block
    assert block.count("```") == 2 and block.startswith("```\n") and block.endswith("\n```")
    assert "(cut: " in block


def reaction(user: str, reaction: str, channel: str, ts: str) -> dict[str, Any]:
    """A ``reaction_added`` event: ``user`` reacted to the message at ``ts``."""
    return {
        "type": "reaction_added",
        "user": user,
        "reaction": reaction,
        "item": {"type": "message", "channel": channel, "ts": ts},
        "item_user": BOT_USER,
        "ts": new_ts(),
    }


def test_reactions_and_better_answers_are_feedback_on_the_turn(app, parts, slack) -> None:
    graph, _store, _memory = parts
    event = dm(ALICE, "What should I cook tonight?")
    assert send(app, event_body(event)).status == 200
    turn_id = f"slack-{event['channel']}-{event['ts']}"
    (logged,) = graph.interactions.turns(uid(ALICE))
    assert logged.turn_id == turn_id and logged.user_text == "What should I cook tonight?"
    ts = _posted_ts(slack)
    # 👍 then 👎 (with a skin tone) by Alice rate her turn; Bob's reaction rates nothing
    for user, name in ((ALICE, "+1"), (ALICE, "-1::skin-tone-2"), (BOB, "+1"), (ALICE, "tada")):
        assert send(app, event_body(reaction(user, name, event["channel"], ts))).status == 200
    assert [e.rating for e in graph.interactions.feedback(uid(ALICE))] == [1, -1]
    assert graph.interactions.feedback(uid(BOB)) == []
    # a better answer in the same DM is an edit of the last reply there, with no new turn
    better = dm(ALICE, "better: Risotto with peas, 25 minutes.")
    assert send(app, event_body(better)).status == 200
    assert "noted your better answer" in slack.posts[-1]["text"]
    edits = graph.interactions.feedback(uid(ALICE), kind="edit")
    assert [(e.turn_id, e.text) for e in edits] == [(turn_id, "Risotto with peas, 25 minutes.")]
    assert len(graph.interactions.turns(uid(ALICE))) == 1


def _posted_ts(slack: FakeSlack) -> str:
    """The ts the fake Slack gave the bot's last post (it answers with the time)."""
    return slack.replies[-1]["ts"]
