"""The OpenAI-compatible persona server, over real HTTP.

Every test runs the app with uvicorn on a free loopback port and talks to it the way
apps do: chat completions through the official ``openai`` client (non-streaming and
streaming), auth, errors and the persona routes through httpx. The upstream model is a
recording chat model (it keeps what reached it and streams its reply in pieces); the
store is a real SQLite file and the memory a real Chroma directory with MiniLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field

from persona_plugin.config import Settings
from persona_plugin.embeddings.minilm import MiniLMEmbeddingFunction
from persona_plugin.errors import PersonaConfigError
from persona_plugin.graph import build_persona_graph
from persona_plugin.interactions import InteractionLog
from persona_plugin.memory.long_term import LongTermMemory
from persona_plugin.persona import Persona
from persona_plugin.reflection.reflector import Reflector
from persona_plugin.server.app import create_app, create_app_from_settings
from persona_plugin.server.protocol import USER_HEADER
from persona_plugin.store import PersonaStore
from tests.fakes import FeedbackReflection, ScriptedChatModel
from tests.paths import REPO

ROOT = REPO
TOK_A = "tok-a-0123456789"  # alice and bob
TOK_T = "tok-t-0123456789"  # tenant acme
TOKENS: dict[str, Any] = {TOK_A: {"users": ["alice", "bob"]}, TOK_T: {"tenant": "acme"}}
REPLY = "Sure, Alice: here is a short answer with the key points first."


class RecordingChatModel(BaseChatModel):
    """Records every call's messages and parameters; streams ``reply`` in word pieces."""

    reply: str = REPLY
    fail: bool = False
    delay: float = 0.0
    yielded: int = 0
    calls: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "recording"

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Iterator[ChatGenerationChunk]:
        self.calls.append({"messages": list(messages), "stop": stop, "params": kw})
        pieces = re.findall(r"\S+\s*", self.reply)
        for index, piece in enumerate(pieces):
            if self.fail and index == 2:
                raise RuntimeError("upstream broke mid-stream at /secret/path")
            time.sleep(self.delay)
            self.yielded += 1
            last = index == len(pieces) - 1
            usage = {"input_tokens": 321, "output_tokens": 12, "total_tokens": 333}
            chunk = ChatGenerationChunk(
                message=AIMessageChunk(content=piece, usage_metadata=usage if last else None)
            )
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kw))


class GatedReflectionModel(FakeMessagesListChatModel):
    """Scripted reflection answers that cite the turn in the prompt; waits for ``gate``."""

    gate: Any = None
    started: Any = None

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        result = super()._generate(messages, *args, **kwargs)
        turn = re.search(r"\[turn ([^\]]+)\]", messages[-1].text).group(1)
        text = result.generations[0].message.text.replace("TURN", turn)
        result.generations[0].message = AIMessage(content=text)
        return result


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedding_function() -> MiniLMEmbeddingFunction:
    return MiniLMEmbeddingFunction()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PersonaStore]:
    with PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}") as s:
        yield s


@pytest.fixture
def memory(tmp_path: Path, embedding_function: MiniLMEmbeddingFunction) -> LongTermMemory:
    return LongTermMemory(tmp_path / "memory", embedding_function=embedding_function)


@pytest.fixture
def upstream() -> RecordingChatModel:
    return RecordingChatModel()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields the base URL; shuts down (lifespan)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def _app(store: PersonaStore, memory: LongTermMemory, upstream: RecordingChatModel) -> Any:
    return create_app(
        models={"recorder": upstream, "persona-echo": _echo()},
        store=store,
        memory=memory,
        tokens=TOKENS,
        # answers that are no reflection: the persona stays as the test made it
        reflector=Reflector(FakeMessagesListChatModel(responses=[AIMessage(content="{}")])),
        debounce_s=0.0,
    )


@pytest.fixture
def server(store: PersonaStore, memory: LongTermMemory, upstream: RecordingChatModel):
    """A server of the test's own (its store, memory and upstream model)."""
    with running(_app(store, memory, upstream)) as url:
        yield url


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, embedding_function: MiniLMEmbeddingFunction
) -> Iterator[tuple[str, PersonaStore]]:
    """One server for the tests of rejections (they leave nothing that matters behind)."""
    tmp = tmp_path_factory.mktemp("shared-server")
    with PersonaStore(f"sqlite:///{tmp / 'personas.db'}") as store:
        memory = LongTermMemory(tmp / "memory", embedding_function=embedding_function)
        with running(_app(store, memory, RecordingChatModel())) as url:
            yield url, store


@pytest.fixture
def shared_url(shared: tuple[str, PersonaStore]) -> str:
    return shared[0]


def _echo() -> Any:
    from persona_plugin.chat_models.registry import EchoChatModel

    return EchoChatModel()


def _client(url: str, token: str = TOK_A, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, **kwargs)


def _seed_alice(store: PersonaStore) -> None:
    persona = Persona.new("alice")
    persona.identity.name = "Alice"
    persona.preference.style = ["concise, key points first"]
    persona.demographics.location = "Lisbon"
    store.create("alice", persona)


HISTORY = [
    {"role": "system", "content": "You are HelpBot for Example Corp."},
    {"role": "user", "content": "What is a good trail near me?"},
    {"role": "assistant", "content": "Try the coastal trail."},
    {"role": "user", "content": "And one for a rainy day?"},
]


def _check_persona_reached(upstream: RecordingChatModel, call: int = -1) -> list[BaseMessage]:
    sent = upstream.calls[call]["messages"]
    system = sent[0]
    assert system.type == "system"
    # the app's system message stays first, the persona block after it, in one message
    assert system.text.startswith("You are HelpBot for Example Corp.")
    assert "Alice" in system.text and "Lisbon" in system.text and "key points first" in system.text
    assert sum(1 for m in sent if m.type == "system") == 1
    # the app's history reaches the model as the conversation, in order
    assert [(m.type, m.text) for m in sent[1:]] == [
        ("human", "What is a good trail near me?"),
        ("ai", "Try the coastal trail."),
        ("human", "And one for a rainy day?"),
    ]
    return sent


# -- chat completions through the official client ----------------------------------------


def test_chat_completion_carries_the_users_persona(
    server: str, store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    completion = _client(server).chat.completions.create(
        model="recorder", messages=HISTORY, user="alice", temperature=0.3, max_tokens=50
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "recorder"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (321, 12, 333)
    _check_persona_reached(upstream)
    # the sampling parameters reach the upstream model
    assert upstream.calls[-1]["params"] == {"temperature": 0.3, "max_tokens": 50}


def test_streaming_sends_the_upstream_tokens_as_they_come(
    server: str, store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    stream = _client(server).chat.completions.create(
        model="recorder",
        messages=HISTORY,
        user="alice",
        stream=True,
        stream_options={"include_usage": True},
        stop="END",
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) == len(REPLY.split())  # one SSE chunk per upstream chunk
    assert "".join(pieces) == REPLY
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 321
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == 333
    _check_persona_reached(upstream)
    assert upstream.calls[-1]["stop"] == ["END"]


def test_stream_ends_with_done(server: str, store: PersonaStore) -> None:
    body = {"model": "recorder", "messages": HISTORY, "user": "alice", "stream": True}
    headers = {"Authorization": f"Bearer {TOK_A}"}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert "usage" not in payloads[0]  # only with stream_options.include_usage


def test_default_echo_model_and_model_list(shared_url: str) -> None:
    client = _client(shared_url)
    assert {m.id for m in client.models.list()} == {"recorder", "persona-echo"}
    assert client.models.retrieve("persona-echo").id == "persona-echo"
    completion = client.chat.completions.create(
        model="persona-echo", messages=[{"role": "user", "content": "hi there"}], user="bob"
    )
    assert completion.choices[0].message.content.startswith('You said: "hi there"')
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    # streamed from a model that does not stream: one piece
    pieces = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(
            model="persona-echo",
            messages=[{"role": "user", "content": "hi again"}],
            user="bob",
            stream=True,
        )
        if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces).startswith('You said: "hi again"')


def test_header_selects_the_persona_and_content_parts_are_text(
    server: str, store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    messages: list[Any] = [dict(m) for m in HISTORY]
    messages[-1]["content"] = [
        {"type": "text", "text": "And one for"},
        {"type": "text", "text": "a rainy day?"},
    ]
    client = _client(server, default_headers={"X-Persona-User": "alice"})
    completion = client.chat.completions.create(model="recorder", messages=messages)
    assert completion.choices[0].message.content == REPLY
    sent = upstream.calls[-1]["messages"]
    assert "Alice" in sent[0].text
    assert sent[-1].text == "And one for\na rainy day?"


def test_a_chat_turn_creates_the_persona_and_remembers_the_turn(
    server: str, store: PersonaStore, memory: LongTermMemory
) -> None:
    _client(server, TOK_T).chat.completions.create(
        model="recorder",
        messages=[{"role": "user", "content": "I keep bees on my balcony."}],
        user="acme:dave",
    )
    assert store.current_version("acme:dave") == 1
    texts = [item.text for item in memory.get("acme:dave")]
    assert "user: I keep bees on my balcony." in texts
    assert f"assistant: {REPLY}" in texts


def test_upstream_failure_is_an_openai_error_without_internals(
    server: str, upstream: RecordingChatModel
) -> None:
    upstream.fail = True
    client = _client(server)
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="recorder", messages=messages, user="alice")
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "server_error"
    assert "secret" not in info.value.response.text and "Traceback" not in info.value.response.text
    # streaming: the failure comes after the first tokens, as an error event
    with pytest.raises(openai.APIError) as streamed:
        list(
            client.chat.completions.create(
                model="recorder", messages=messages, user="alice", stream=True
            )
        )
    assert "secret" not in str(streamed.value)


def test_a_client_gone_mid_stream_stops_the_run(
    server: str, store: PersonaStore, upstream: RecordingChatModel
) -> None:
    upstream.delay = 0.1
    stream = _client(server).chat.completions.create(
        model="recorder", messages=[{"role": "user", "content": "hi"}], user="bob", stream=True
    )
    for index, _chunk in enumerate(stream):
        if index == 2:
            stream.close()
            break
    time.sleep(1.5)  # the whole reply would take 1.3 s
    assert upstream.yielded < len(REPLY.split())
    assert not store.exists("bob")  # the turn was not finished, so nothing was saved


def test_a_prebuilt_graph_serves_its_models(
    store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    graph = build_persona_graph(
        _echo(), store=store, models={"recorder": upstream}, reflection="off"
    )
    with running(create_app(graph, tokens=TOKENS)) as url:
        client = _client(url)
        assert [m.id for m in client.models.list()] == ["recorder"]
        completion = client.chat.completions.create(
            model="recorder", messages=HISTORY, user="alice", seed=7, top_p=0.5
        )
    assert completion.choices[0].message.content == REPLY
    _check_persona_reached(upstream)
    assert upstream.calls[-1]["params"] == {"seed": 7, "top_p": 0.5}


# -- auth ---------------------------------------------------------------------------------

CHAT = {"model": "recorder", "messages": [{"role": "user", "content": "hello"}]}


def _routes(user: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("POST", "/v1/chat/completions", {**CHAT, "user": user}),
        ("GET", f"/v1/personas/{user}", None),
        ("GET", f"/v1/personas/{user}/history", None),
        ("GET", f"/v1/personas/{user}/export", None),
        ("DELETE", f"/v1/personas/{user}", None),
    ]


def _call(
    url: str, method: str, path: str, body: Any = None, token: str | None = TOK_A, **kw: Any
) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, url + path, json=body, headers=headers, timeout=30, **kw)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("method", "path", "body"), [*_routes("alice"), ("GET", "/v1/models", None)]
)
def test_missing_or_unknown_token_is_401(
    shared_url: str, method: str, path: str, body: Any
) -> None:
    missing = _call(shared_url, method, path, body, token=None)
    assert _error(missing, 401)["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert _error(_call(shared_url, method, path, body, token="tok-wrong-000"), 401)["code"] == (
        "invalid_api_key"
    )
    basic = _call(shared_url, method, path, body, token=None, headers={"Authorization": "Basic x"})
    _error(basic, 401)


@pytest.mark.parametrize(("method", "path", "body"), _routes("carol"))
def test_a_token_acting_on_a_foreign_user_is_403(
    shared: tuple[str, PersonaStore], method: str, path: str, body: Any
) -> None:
    url, store = shared
    if not store.exists("carol"):
        store.create("carol")
    error = _error(_call(url, method, path, body), 403)
    assert error["code"] == "user_not_permitted" and error["type"] == "permission_error"
    assert store.current_version("carol") == 1  # nothing happened to carol


def test_chat_through_the_header_is_authorized_too(shared_url: str) -> None:
    response = _call(
        shared_url, "POST", "/v1/chat/completions", CHAT, headers={"X-Persona-User": "carol"}
    )
    assert _error(response, 403)["param"] == "user"


@pytest.mark.parametrize(
    ("user", "status"),
    [
        ("acme:dave", 200),
        ("acme:team:erin", 200),
        ("acme", 403),
        ("acme:", 403),
        ("acmecorp:dave", 403),
        ("other:acme:dave", 403),
        ("alice", 403),
    ],
)
def test_tenant_token_acts_on_its_prefix_only(shared_url: str, user: str, status: int) -> None:
    response = _call(
        shared_url, "POST", "/v1/chat/completions", {**CHAT, "user": user}, token=TOK_T
    )
    if status == 200:
        assert response.status_code == 200, response.text
        assert _call(shared_url, "GET", f"/v1/personas/{user}", token=TOK_T).status_code == 200
    else:
        _error(response, status)
        _error(_call(shared_url, "GET", f"/v1/personas/{user}", token=TOK_T), status)


def test_user_token_cannot_act_on_tenant_users(shared_url: str) -> None:
    _error(_call(shared_url, "POST", "/v1/chat/completions", {**CHAT, "user": "acme:dave"}), 403)


def test_health_needs_no_token(shared_url: str) -> None:
    response = httpx.get(f"{shared_url}/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- bad input ----------------------------------------------------------------------------


def _chat(url: str, body: Any, **kw: Any) -> httpx.Response:
    return _call(url, "POST", "/v1/chat/completions", body, **kw)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "recorder", "user": "alice"}, "messages", "missing_required_parameter"),
        ({**CHAT, "user": "alice", "messages": []}, "messages", "invalid_value"),
        ({**CHAT, "user": "alice", "messages": "hello"}, "messages", "invalid_type"),
        ({"messages": CHAT["messages"], "user": "alice"}, "model", "missing_required_parameter"),
        (
            {**CHAT, "user": "alice", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        (
            {**CHAT, "user": "alice", "messages": [{"content": "x"}]},
            "messages[0].role",
            "missing_required_parameter",
        ),
        (
            {**CHAT, "user": "alice", "messages": [{"role": "user", "content": "   "}]},
            "messages[0].content",
            "empty_content",
        ),
        (
            {**CHAT, "user": "alice", "messages": [{"role": "user", "content": None}]},
            "messages[0].content",
            "missing_required_parameter",
        ),
        (
            {**CHAT, "user": "alice", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "invalid_type",
        ),
        (
            {
                **CHAT,
                "user": "alice",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            {
                **CHAT,
                "user": "alice",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ],
            },
            "messages[1].role",
            "invalid_value",
        ),
        (
            {**CHAT, "user": "alice", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
            "unsupported_value",
        ),
        ({**CHAT, "user": "alice", "n": 2}, "n", "invalid_value"),
        ({**CHAT, "user": "alice", "temperature": 3}, "temperature", "invalid_value"),
        ({**CHAT, "user": "alice", "temperature": "hot"}, "temperature", "invalid_type"),
        ({**CHAT, "user": "alice", "tools": [{"type": "function"}]}, "tools", None),
        ({**CHAT}, "user", "missing_required_parameter"),
        ({**CHAT, "user": "not a user id!"}, "user", "invalid_user"),
        (
            {**CHAT, "user": "alice", "response_format": {"type": "json_object"}},
            "response_format",
            "unsupported_value",
        ),
    ],
)
def test_malformed_requests_are_400_naming_the_param(
    shared_url: str, body: Any, param: str, code: str | None
) -> None:
    error = _error(_chat(shared_url, body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code


def test_invalid_json_and_non_object_bodies_are_400(shared_url: str) -> None:
    headers = {"Authorization": f"Bearer {TOK_A}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"\xff\xfe", b""):
        response = httpx.post(
            f"{shared_url}/v1/chat/completions", content=raw, headers=headers, timeout=10
        )
        assert _error(response, 400)["code"] == "invalid_json"
    assert _error(_chat(shared_url, [CHAT]), 400)["code"] == "invalid_type"


def test_unknown_model_is_404_model_not_found(shared_url: str) -> None:
    error = _error(_chat(shared_url, {**CHAT, "user": "alice", "model": "gpt-17"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        _client(shared_url).chat.completions.create(
            model="gpt-17", messages=CHAT["messages"], user="alice"
        )
    assert _error(_call(shared_url, "GET", "/v1/models/gpt-17"), 404)["code"] == "model_not_found"


def test_oversize_messages_are_400_naming_the_message(shared_url: str) -> None:
    long = "x" * 16001  # the graph's max_message_chars is 16000
    body = {
        **CHAT,
        "user": "alice",
        "messages": [{"role": "user", "content": long}, {"role": "user", "content": "hi"}],
    }
    error = _error(_chat(shared_url, body), 400)
    assert error["param"] == "messages[0].content" and "16000" in error["message"]
    many = {**CHAT, "user": "alice", "messages": [{"role": "user", "content": "hi"}] * 501}
    assert _error(_chat(shared_url, many), 400)["param"] == "messages"
    huge = {**CHAT, "user": "alice", "messages": [{"role": "user", "content": "y" * 5_000_000}]}
    assert _error(_chat(shared_url, huge), 413)["code"] == "request_too_large"


def test_conflicting_user_and_header_is_400(shared_url: str) -> None:
    response = _chat(shared_url, {**CHAT, "user": "alice"}, headers={"X-Persona-User": "bob"})
    assert _error(response, 400)["param"] == "user"


def test_fastapi_validation_errors_come_in_openai_shape(shared: tuple[str, PersonaStore]) -> None:
    server, store = shared
    if not store.exists("alice"):
        store.create("alice")
    response = _call(server, "GET", "/v1/personas/alice/history?limit=lots")
    error = _error(response, 400)
    assert error["param"] == "limit" and error["code"] == "invalid_type"
    _error(_call(server, "GET", "/v1/personas/alice/history?limit=0"), 400)
    assert _error(_call(server, "GET", "/v1/nothing-here"), 404)["code"] == "not_found"
    _error(_call(server, "PUT", "/v1/chat/completions", CHAT), 405)


# -- persona routes -----------------------------------------------------------------------


def test_persona_routes(server: str, store: PersonaStore, memory: LongTermMemory) -> None:
    _seed_alice(store)
    _client(server).chat.completions.create(model="recorder", messages=HISTORY, user="alice")
    persona = _call(server, "GET", "/v1/personas/alice").json()
    assert persona["object"] == "persona" and persona["version"] == 1
    assert persona["document"]["identity"]["name"] == "Alice"

    store.update("alice", lambda p: setattr(p.demographics, "location", "Porto"))
    history = _call(server, "GET", "/v1/personas/alice/history").json()
    assert [r["version"] for r in history["data"]] == [1, 2]
    last = _call(server, "GET", "/v1/personas/alice/history?limit=1").json()
    assert [r["version"] for r in last["data"]] == [2]

    export = _call(server, "GET", "/v1/personas/alice/export").json()
    assert [v["version"] for v in export["versions"]] == [1, 2]
    assert any("rainy day" in item["text"] for item in export["memory"])

    deleted = _call(server, "DELETE", "/v1/personas/alice")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["versions"] == 2 and deleted.json()["memory_items"] >= 2
    assert not store.exists("alice") and memory.count("alice") == 0
    for path in ("", "/history", "/export"):
        assert _error(_call(server, "GET", f"/v1/personas/alice{path}"), 404)["code"] == (
            "persona_not_found"
        )
    _error(_call(server, "DELETE", "/v1/personas/alice"), 404)
    assert _error(_call(server, "GET", "/v1/personas/bad%20id"), 400)["param"] == "user_id"


# -- background reflection ----------------------------------------------------------------

REFLECTION = json.dumps(
    {
        "loss": {"revealed": ["Alice likes bullet points"], "missed": [], "score": 0.8},
        "gradients": [],
        "operations": [
            {
                "op": "append",
                "path": "preference.format",
                "value": "bullet points",
                "confidence": 0.9,
                "evidence": ["TURN"],
            }
        ],
        "memories": [],
    }
)


def test_reflection_runs_after_the_reply_and_shutdown_drains_it(
    store: PersonaStore, memory: LongTermMemory, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    gate, started = threading.Event(), threading.Event()
    reflection_model = GatedReflectionModel(
        responses=[AIMessage(content=REFLECTION)], gate=gate, started=started
    )
    app = create_app(
        models={"recorder": upstream},
        store=store,
        memory=memory,
        tokens=TOKENS,
        reflector=Reflector(reflection_model),
        debounce_s=0.0,
    )
    with running(app) as url:
        completion = _client(url).chat.completions.create(
            model="recorder",
            messages=[{"role": "user", "content": "Please answer in bullet points."}],
            user="alice",
        )
        assert completion.choices[0].message.content == REPLY
        # the reply came back while the reflection is still waiting at the gate
        assert started.wait(10), "the reflection did not start"
        assert store.current_version("alice") == 1
        gate.set()
    # the lifespan's shutdown waited for the reflection
    persona = store.get("alice")
    assert persona.meta.version == 2
    assert "bullet points" in persona.preference.format
    assert store.get_version("alice").source == f"reflection turn {completion.id}"


def test_shutdown_runs_reflections_still_waiting_for_their_debounce(
    store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    reflection_model = GatedReflectionModel(responses=[AIMessage(content=REFLECTION)])
    app = create_app(
        models={"recorder": upstream},
        store=store,
        tokens=TOKENS,
        reflector=Reflector(reflection_model),
        debounce_s=600.0,  # would not reflect during the test but for the drain
    )
    with running(app) as url:
        _client(url).chat.completions.create(
            model="recorder", messages=[{"role": "user", "content": "Bullets, please."}], user="bob"
        )
        assert store.current_version("bob") == 1
    assert store.current_version("bob") == 2
    assert store.get("bob").preference.format == ["bullet points"]


# -- configuration ------------------------------------------------------------------------


def test_tokens_come_from_settings_and_are_checked(
    monkeypatch: pytest.MonkeyPatch, store: PersonaStore
) -> None:
    monkeypatch.setenv("PERSONA_SERVER_TOKENS", json.dumps({TOK_T: {"tenant": "acme"}}))
    assert Settings.load().server_tokens == {TOK_T: {"tenant": "acme"}}
    app = create_app(store=store, settings=Settings.load())
    with running(app) as url:
        assert _call(url, "GET", "/v1/models", token=TOK_T).status_code == 200
        _error(_call(url, "GET", "/v1/models", token=TOK_A), 401)
    for bad in ({}, {"short": {"users": ["a"]}}, {TOK_A: {}}, {TOK_A: {"users": ["bad id!"]}}):
        with pytest.raises(PersonaConfigError):
            create_app(store=store, tokens=bad)
    with pytest.raises(PersonaConfigError):
        create_app(store=store, tokens={TOK_A: {"tenant": "acme", "admin": True}})
    monkeypatch.delenv("PERSONA_SERVER_TOKENS")
    with pytest.raises(PersonaConfigError, match="PERSONA_SERVER_TOKENS"):
        create_app_from_settings()


def test_the_integration_app_is_built_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``uvicorn integrations.openai_server.app:app`` serves what the settings say."""
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PERSONA_SERVER_TOKENS", json.dumps(TOKENS))
    path = ROOT / "integrations" / "openai_server" / "app.py"
    spec = importlib.util.spec_from_file_location("persona_integration_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with running(module.app) as url:
        client = _client(url, TOK_T)
        assert [m.id for m in client.models.list()] == ["persona-echo"]
        completion = client.chat.completions.create(
            model="persona-echo", messages=[{"role": "user", "content": "ping"}], user="acme:x"
        )
        assert completion.choices[0].message.content.startswith('You said: "ping"')
    store = PersonaStore(f"sqlite:///{tmp_path / 'home' / 'personas.db'}")
    assert store.current_version("acme:x") == 1
    store.close()


def test_persona_serve_runs_the_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")},
        "PERSONA_HOME": str(tmp_path / "home"),
        "PERSONA_SERVER_TOKENS": json.dumps(TOKENS),
    }
    command = [str(Path(sys.executable).parent / "persona"), "serve", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        completion = _client(f"http://127.0.0.1:{port}").chat.completions.create(
            model="persona-echo", messages=[{"role": "user", "content": "ping"}], user="bob"
        )
        assert completion.choices[0].message.content.startswith('You said: "ping"')
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    # uvicorn re-raises the SIGTERM it handled, after a graceful shutdown
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output and "Traceback" not in output


def test_persona_serve_without_tokens_says_what_to_set(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")},
        "PERSONA_HOME": str(tmp_path / "home"),
    }
    command = [str(Path(sys.executable).parent / "persona"), "serve", "--port", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PERSONA_SERVER_TOKENS" in done.stderr and "Traceback" not in done.stderr


# -- feedback -----------------------------------------------------------------------------


def test_a_bad_rating_through_the_server_reaches_the_persona(
    store: PersonaStore, upstream: RecordingChatModel
) -> None:
    _seed_alice(store)
    before = store.get("alice").preference.style
    reflection = FeedbackReflection(
        lambda line: (
            {"ops": [{"op": "append", "path": "preference.style", "value": "concise"}]}
            if "too long" in line
            else None
        )
    )
    app = create_app(
        models={"recorder": upstream},
        store=store,
        tokens=TOKENS,
        # the turn itself teaches nothing here (no feedback lines yet): only the feedback
        reflector=Reflector(ScriptedChatModel(default=reflection), structured="json"),
        reflection="inline",
        debounce_s=0.0,
    )
    with running(app) as url:
        completion = _client(url).chat.completions.create(
            model="recorder",
            messages=[{"role": "user", "content": "Explain heat pumps."}],
            user="alice",
        )
        bad = _call(
            url,
            "POST",
            "/v1/feedback",
            {
                "user": "alice",
                "turn_id": completion.id,
                "kind": "rating",
                "rating": -1,
                "comment": "too long",
            },
        )
        assert bad.status_code == 200, bad.text
    # the shutdown drained the worker: the feedback became a preference, citing the event
    assert store.get("alice").preference.style == [*before, "concise"]
    record = store.get_version("alice")
    assert record.source == f"reflection turn {completion.id} (feedback fb{bad.json()['id']})"
    assert '(-1); comment: "too long"' in reflection.prompts[-1]


def test_feedback_on_a_completion_is_logged_for_its_user(server: str, store: PersonaStore) -> None:
    _seed_alice(store)
    completion = _client(server).chat.completions.create(
        model="recorder", messages=HISTORY, user="alice"
    )
    log = InteractionLog.on(store)
    (turn,) = log.turns("alice")
    # the completion's id is the turn's id, and the turn says what produced the reply
    assert turn.turn_id == completion.id and turn.reply_text == REPLY
    assert turn.model == "recorder" and turn.persona_version == 1
    good = _call(
        server,
        "POST",
        "/v1/feedback",
        {
            "user": "alice",
            "turn_id": completion.id,
            "kind": "rating",
            "rating": 1,
            "comment": "great",
        },
    )
    assert good.status_code == 200, good.text
    assert good.json()["object"] == "feedback" and good.json()["rating"] == 1
    edit = _call(
        server,
        "POST",
        "/v1/feedback",
        {"turn_id": completion.id, "kind": "edit", "text": "Shorter."},
        headers={USER_HEADER: "alice"},
    )
    assert edit.status_code == 200, edit.text
    assert [(e.kind, e.text) for e in log.feedback("alice")] == [
        ("rating", None),
        ("edit", "Shorter."),
    ]

    # another user's turn: 403 (bob may be served by the same token); unknown: 404
    other = _call(
        server,
        "POST",
        "/v1/feedback",
        {"user": "bob", "turn_id": completion.id, "kind": "regenerate"},
    )
    assert _error(other, 403)["code"] == "turn_not_owned"
    unknown = _call(
        server,
        "POST",
        "/v1/feedback",
        {"user": "alice", "turn_id": "chatcmpl-nope", "kind": "regenerate"},
    )
    assert _error(unknown, 404)["code"] == "turn_not_found"
    # a token that does not serve the user: 403 before anything is looked up
    foreign = _call(
        server,
        "POST",
        "/v1/feedback",
        {"user": "alice", "turn_id": completion.id, "kind": "regenerate"},
        token=TOK_T,
    )
    assert foreign.status_code == 403
    # malformed feedback names the field; nothing more is written
    for body, param in (
        ({"kind": "rating", "rating": 3}, "rating"),
        ({"kind": "rating", "rating": "1"}, "rating"),
        ({"kind": "like"}, "kind"),
        ({"kind": "edit"}, "text"),
    ):
        bad = _call(
            server, "POST", "/v1/feedback", {"user": "alice", "turn_id": completion.id, **body}
        )
        assert _error(bad, 400)["param"] == param, bad.text
    assert len(log.feedback("alice")) == 2
    # deleting the user takes the log with it
    assert _call(server, "DELETE", "/v1/personas/alice").status_code == 200
    assert log.turns("alice") == [] and log.feedback("alice") == []
