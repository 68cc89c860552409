"""A Slack bot on the persona graph: every Slack user gets a persona of their own.

``create_slack_app(graph, store, memory, token=..., signing_secret=...)`` returns a
``slack_bolt.App`` that

- answers direct messages (``message`` events with ``channel_type: im``) and mentions
  (``app_mention`` events) through the persona graph; a mention is answered in its
  thread (a new thread under the message when it was not in one), a DM where it was sent;
- reflects in the background (the graph's ``reflection="background"`` mode), so the reply
  does not wait for the persona update;
- offers ``/persona`` (or ``/persona show``): the user's persona as a YAML code block,
  visible only to them, and ``/persona forget``: deletes their persona (every version) and
  their long-term memory, and confirms;
- takes feedback into the interaction log: a 👍 (``+1``) or 👎 (``-1``) reaction of the
  user on the bot's reply is a rating of that turn; a message starting with ``better:``
  (in the DM, or a mention in the thread) is the user's better answer to the last reply
  there (an ``edit``). Only the user a reply was for can rate it; which reply answered
  which turn is kept in memory for the last 4,096 replies, so a restart forgets it;
- ignores bot messages, its own messages and every message subtype (edits, deletions,
  joins, file shares, ...), so it never answers itself, and answers a message once even
  when Slack redelivers the event.

Identity: the Slack user ``U123`` of workspace ``T456`` is the persona user
``slack:T456:U123`` (see :func:`persona_user_id`). The conversation (LangGraph
``thread_id``) is the Slack channel and thread, per user:
``slack:T456:C789:<thread ts or "main">:U123``, so users who talk in one Slack thread never
share graph state (with a checkpointer that would mean each other's history).

Run it (HTTP, Bolt's built-in server on ``$PORT``, default 3000, path ``/slack/events``)::

    SLACK_BOT_TOKEN=xoxb-... SLACK_SIGNING_SECRET=... python -m integrations.slack.app

or over Socket Mode (no public URL) with ``SLACK_APP_TOKEN=xapp-...`` set as well. The
graph is built from the ``PERSONA_*`` settings (store, memory, ``PERSONA_CHAT_MODEL``,
checkpointer); see ``integrations/slack/README.md``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from typing import Any

from slack_bolt import App
from slack_sdk import WebClient

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

#: Slack cuts a message's text at 40,000 characters; stay under it with room for a note
MAX_TEXT_CHARS = 39_000

USAGE = (
    "Usage: `/persona` or `/persona show` shows what I know about you; "
    "`/persona forget` deletes it (your persona and my long-term memory of you)."
)


def persona_user_id(team_id: str | None, slack_user_id: str) -> str:
    """The persona user id of a Slack user: ``slack:<team id>:<user id>``."""
    return validate_user_id(f"slack:{team_id or 'T0'}:{slack_user_id}", source="Slack user")


def escape(text: str) -> str:
    """Slack's three control characters escaped, so text cannot ping or link anyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def clean_text(text: str, bot_user_id: str | None) -> str:
    """A Slack message's text for the model: the bot's mentions removed, unescaped."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", " ", text)
    return re.sub(r"[ \t]{2,}", " ", unescape(text)).strip()


def code_block(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` as a Slack code block, escaped, cut (with a note) to fit one message."""
    body = escape(text).replace("```", "`\u200b``")
    if len(body) > limit:
        body = body[:limit] + f"\n… (cut: {len(body) - limit} more characters)"
    return f"```\n{body}\n```"


def _team(context: Any) -> str | None:
    """The workspace (or, for org-wide installs, the Enterprise Grid org) of a request."""
    return context.team_id or context.enterprise_id


class _Seen:
    """The last ``size`` keys seen: answers each message once, however often it arrives."""

    def __init__(self, size: int = 2048) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def first_time(self, key: str) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)
            return True


def show_persona(store: Any, user_id: str) -> str:
    """The ``/persona show`` answer."""
    try:
        persona = store.get(user_id)
    except PersonaNotFoundError:
        return "I have no persona for you yet. Talk to me and I'll start learning."
    return (
        f"Your persona (version {persona.meta.version}), visible only to you:\n"
        f"{code_block(persona.to_yaml())}"
    )


def forget_user(graph: Any, store: Any, memory: Any, user_id: str) -> str:
    """Delete the user's persona and long-term memory; the ``/persona forget`` answer."""
    return forget(graph, store, memory, user_id)


def create_slack_app(
    graph: Any,
    store: Any,
    memory: Any,
    *,
    token: str | None,
    signing_secret: str,
    client: WebClient | None = None,
    reflection: str = "background",
    **app_options: Any,
) -> App:
    """A Bolt app that answers DMs and mentions through ``graph`` and serves ``/persona``.

    ``graph`` is a compiled :func:`persona_plugin.graph.build_persona_graph` graph on
    ``store`` and ``memory``. ``client`` replaces the Web API client Bolt would make from
    ``token`` (e.g. one with another ``base_url``); ``app_options`` go to ``App``
    (``process_before_response=True`` for FaaS, ``token_verification_enabled``, ...).
    """
    if client is not None and client.token is None:
        client.token = token
    app = App(
        name="persona-slack",
        token=token if client is None else None,
        client=client,
        signing_secret=signing_secret,
        **app_options,
    )
    seen = _Seen()
    turns = RecentTurns()  # which turn each reply answered; each conversation's last

    def respond_to(event: dict[str, Any], context: Any, client: WebClient, *, thread: bool) -> None:
        slack_user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not slack_user or not channel or not ts:
            return
        team = _team(context)
        if not seen.first_time(f"{team}:{channel}:{ts}"):
            return  # a redelivery, or the DM that also came as a mention
        text = clean_text(event.get("text") or "", context.bot_user_id)
        thread_ts = event.get("thread_ts") or (ts if thread else None)
        user_id = persona_user_id(team, slack_user)
        conversation = f"slack:{team}:{channel}:{thread_ts or 'main'}:{slack_user}"
        turn: tuple[str, str] | None = None
        if not text:
            reply = "Hi! Write your message after the mention. " + USAGE
        elif text.lower().startswith(EDIT_PREFIX):
            reply = better_answer(graph, turns, conversation, text)
        else:
            turn = (user_id, f"slack-{channel}-{ts}")
            reply = answer(
                graph,
                user_id=user_id,
                thread_id=conversation,
                turn_id=turn[1],
                text=text,
                reflection=reflection,
            )
        reply = escape(reply)
        if len(reply) > MAX_TEXT_CHARS:
            reply = reply[:MAX_TEXT_CHARS] + " …"
        try:
            posted = client.chat_postMessage(channel=channel, text=reply, thread_ts=thread_ts)
        except Exception:
            log.exception("could not post the reply in %s", channel)
            return
        if turn is not None:
            turns.answered(conversation, turn)
            if posted.get("ts"):
                turns.posted(f"{channel}:{posted['ts']}", turn)

    def is_from_a_person(event: dict[str, Any]) -> bool:
        return not (event.get("subtype") or event.get("bot_id") or event.get("bot_profile"))

    @app.event("message")
    def on_message(event: dict[str, Any], context: Any, client: WebClient) -> None:
        # channel messages reach the bot only as app_mention; group DMs too
        if event.get("channel_type") == "im" and is_from_a_person(event):
            respond_to(event, context, client, thread=False)

    @app.event("app_mention")
    def on_mention(event: dict[str, Any], context: Any, client: WebClient) -> None:
        if is_from_a_person(event):
            respond_to(event, context, client, thread=True)

    @app.event("reaction_added")
    def on_reaction(event: dict[str, Any], context: Any) -> None:
        rating = rating_of(str(event.get("reaction", "")))
        item = event.get("item") or {}
        turn = turns.reply(f"{item.get('channel')}:{item.get('ts')}")
        if rating is None or turn is None or not event.get("user"):
            return
        # only the user a reply was for rates it
        if persona_user_id(_team(context), event["user"]) == turn[0]:
            feedback(graph, *turn, "rating", rating=rating)

    @app.command("/persona")
    def on_persona(ack: Any, command: dict[str, Any], context: Any, respond: Any) -> None:
        ack()  # within Slack's 3 s; the answer follows through the response_url
        action = (command.get("text") or "").strip().lower()
        user_id = persona_user_id(_team(context), command["user_id"])
        if action in ("", "show"):
            text = show_persona(store, user_id)
        elif action == "forget":
            text = forget_user(graph, store, memory, user_id)
        else:
            text = USAGE
        respond(text=text, response_type="ephemeral")

    return app


def main() -> None:
    """Run the bot from the environment (see the module doc)."""
    from persona_plugin import Settings, build_persona_graph_from_settings, make_checkpointer

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
    token = os.environ.get("SLACK_BOT_TOKEN")
    app_token = os.environ.get("SLACK_APP_TOKEN")
    signing_secret = os.environ.get("SLACK_SIGNING_SECRET", "")
    if not token or not (signing_secret or app_token):
        raise SystemExit(
            "Set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (HTTP), or SLACK_BOT_TOKEN and "
            "SLACK_APP_TOKEN (Socket Mode); see integrations/slack/README.md."
        )
    settings = Settings.load()
    graph = build_persona_graph_from_settings(
        settings, checkpointer=make_checkpointer(settings.resolved_checkpointer_url)
    )
    app = create_slack_app(
        graph,
        graph.store,
        graph.memory,
        token=token,
        signing_secret=signing_secret,
    )
    try:
        if app_token:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            SocketModeHandler(app, app_token).start()
        else:
            app.start(port=int(os.environ.get("PORT", "3000")))
    finally:
        graph.close(timeout=30)


if __name__ == "__main__":
    main()
