"""The server cannot be knocked over by a body, and says when the model upstream failed.

A hostile body is a 400 in OpenAI's shape (never a 500 with a traceback); a failure of
the model behind the server is a 502, 503 or 504, which OpenAI's clients retry, not a 500.
The upstream failures are raised by a real backend client (:class:`VLLMBackend` through
:class:`MultiLoraChatModel`) against a local HTTP stand-in that times out or answers 503.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi.testclient import TestClient
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from persona_plugin import MultiLoraChatModel, PersonaStore, create_app
from persona_plugin.backends import RetryPolicy
from persona_plugin.backends.vllm import VLLMBackend
from persona_plugin.chat_models import EchoChatModel
from persona_plugin.errors import PersonaError
from tests.server.test_server import running

TOKEN = "tok-robust-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PersonaStore]:
    with PersonaStore(f"sqlite:///{tmp_path / 'personas.db'}") as s:
        yield s


def client_for(store: PersonaStore, model: Any) -> TestClient:
    app = create_app(
        models={"m": model}, store=store, tokens={TOKEN: {"users": ["ana"]}}, reflection="off"
    )
    return TestClient(app)


def chat(client: TestClient, **body: Any) -> Any:
    payload = {"model": "m", "user": "ana", "messages": [{"role": "user", "content": "hi"}]}
    return client.post("/v1/chat/completions", headers=AUTH, json=payload | body)


def test_a_deeply_nested_body_is_a_400(store: PersonaStore) -> None:
    nested = '{"model": "m", "user": "ana", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with client_for(store, EchoChatModel()) as client:
        reply = client.post(
            "/v1/chat/completions",
            headers=AUTH | {"Content-Type": "application/json"},
            content=nested,
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "invalid_json"
        assert chat(client).status_code == 200  # and the server still answers


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", "yes"), ("stream", 1), ("stream_options", {"include_usage": "true"})],
)
def test_booleans_are_booleans(store: PersonaStore, field: str, value: Any) -> None:
    with client_for(store, EchoChatModel()) as client:
        reply = chat(client, **{field: value})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith(field)


class Upstream(BaseHTTPRequestHandler):
    """vLLM's OpenAI-compatible route: answers after ``delay`` with ``status``."""

    delay = 0.0
    status = 200
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        self.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        time.sleep(self.delay)
        if self.status == 200:
            choice = {"index": 0, "finish_reason": "stop"}
            choice["message"] = {"role": "assistant", "content": "fine, thanks"}
            answer: dict[str, Any] = {"object": "chat.completion", "choices": [choice]}
        else:
            answer = {"error": {"message": "overloaded"}}
        body = json.dumps(answer).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[tuple[str, type[Upstream]]]:
    handler = type("Handler", (Upstream,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def vllm_model(url: str) -> MultiLoraChatModel:
    policy = RetryPolicy(max_retries=0, timeout=0.5)
    backend = VLLMBackend(url, model="base", retry=policy)
    return MultiLoraChatModel(backend=backend)


@pytest.mark.parametrize(
    ("delay", "status", "expected", "code"),
    [(2.0, 200, 504, "upstream_timeout"), (0.0, 503, 503, "upstream_unavailable")],
    ids=["timeout", "unavailable"],
)
def test_an_upstream_failure_is_a_retryable_status(
    store: PersonaStore,
    upstream: tuple[str, type[Upstream]],
    delay: float,
    status: int,
    expected: int,
    code: str,
) -> None:
    url, handler = upstream
    handler.delay, handler.status = delay, status
    with client_for(store, vllm_model(url)) as client:
        reply = chat(client)
    assert reply.status_code == expected, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "server_error"
    assert "127.0.0.1" not in error["message"]  # internals stay in the server log


def test_our_own_failure_stays_a_500(store: PersonaStore) -> None:
    class Broken(FakeListChatModel):
        def _call(self, *args: Any, **kwargs: Any) -> str:
            raise PersonaError("a bug of ours")

    with client_for(store, Broken(responses=["x"])) as client:
        reply = chat(client)
    assert reply.status_code == 500 and reply.json()["error"]["code"] == "internal_error"


def test_openai_sampling_parameters_reach_a_multi_lora_backend(
    store: PersonaStore, upstream: tuple[str, type[Upstream]]
) -> None:
    url, handler = upstream
    with client_for(store, vllm_model(url)) as client:
        reply = chat(
            client, max_tokens=7, stop="END", presence_penalty=0.5, temperature=0.2, seed=3
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "fine, thanks"
    sent = handler.requests[-1]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["seed"]) == (
        7,
        ["END"],
        0.2,
        3,
    )


def test_a_number_too_long_to_read_is_a_400(store: PersonaStore) -> None:
    body = '{"model": "m", "user": "ana", "seed": ' + "9" * 5000 + ', "messages": []}'
    with client_for(store, EchoChatModel()) as client:
        reply = client.post(
            "/v1/chat/completions",
            headers=AUTH | {"Content-Type": "application/json"},
            content=body,
        )
    assert reply.status_code == 400, reply.text


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConnectionRefusedError("refused"), 503),
        (type("APIStatusError", (Exception,), {"status_code": 529})("overloaded"), 503),
        (type("InternalServerError", (Exception,), {"status_code": 500})("boom"), 502),
        (TimeoutError("slow"), 504),
    ],
)
def test_upstream_failures_of_any_client_map_to_retryable_statuses(
    exc: Exception, status: int
) -> None:
    from persona_plugin.server.errors import _from_persona_error

    assert _from_persona_error(exc).status == status


def test_the_servers_own_database_timeout_is_not_blamed_on_the_upstream() -> None:
    import sqlalchemy.exc

    from persona_plugin.server.errors import _from_persona_error

    assert _from_persona_error(sqlalchemy.exc.TimeoutError("pool")).status == 500


class SlowModel(FakeListChatModel):
    """An upstream that takes ``delay`` seconds per answer (a hung one, for the test)."""

    delay: float = 3.0

    def _call(self, *args: Any, **kwargs: Any) -> str:
        time.sleep(self.delay)
        return "late"

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        time.sleep(self.delay)
        yield from super()._stream(*args, **kwargs)


def test_a_hung_upstream_gets_a_deadline_and_cannot_starve_the_other_routes(
    store: PersonaStore,
) -> None:
    store.create("ana")
    app = create_app(
        models={"m": SlowModel(responses=["x"], delay=3.0)},
        store=store,
        tokens={TOKEN: {"users": ["ana"]}},
        reflection="off",
        request_timeout=0.5,
        max_concurrent_per_model=2,
    )
    body = {"model": "m", "user": "ana", "messages": [{"role": "user", "content": "hi"}]}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        statuses: list[int] = []

        def ask() -> None:
            statuses.append(
                client.post("/v1/chat/completions", headers=AUTH, json=body).status_code
            )

        started = time.monotonic()
        askers = [threading.Thread(target=ask) for _ in range(8)]
        for asker in askers:
            asker.start()
        time.sleep(0.2)  # the chat requests are in flight (two running, six waiting)
        quick = time.monotonic()
        assert client.get("/health").status_code == 200
        assert client.get("/v1/personas/ana", headers=AUTH).status_code == 200
        assert time.monotonic() - quick < 1.0  # not queued behind the hung upstream
        for asker in askers:
            asker.join(30)
        assert statuses == [504] * 8
        assert time.monotonic() - started < 3.0  # each answered at its deadline, not 3 s on


def test_a_stream_gets_the_same_deadline_and_gives_its_allowance_back(
    store: PersonaStore,
) -> None:
    slow = create_app(
        models={"m": SlowModel(responses=["x"], delay=3.0)},
        store=store,
        tokens={TOKEN: {"users": ["ana"]}},
        reflection="off",
        request_timeout=0.5,
    )
    with TestClient(slow) as client:
        started = time.monotonic()
        reply = chat(client, stream=True)
        assert reply.status_code == 504, reply.text
        assert time.monotonic() - started < 2.5
    quick = create_app(
        models={"m": EchoChatModel()},
        store=store,
        tokens={TOKEN: {"users": ["ana"]}},
        reflection="off",
        max_concurrent_per_model=1,
    )
    with TestClient(quick) as client:
        for _ in range(3):  # one at a time, each handing the allowance back when done
            reply = chat(client, stream=True)
            assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")


def test_the_deadline_and_the_allowance_come_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from persona_plugin.config import Settings
    from persona_plugin.errors import PersonaConfigError
    from persona_plugin.server import create_app_from_settings

    monkeypatch.setenv("PERSONA_SERVER_TOKENS", json.dumps({TOKEN: {"users": ["ana"]}}))
    monkeypatch.setenv("PERSONA_SERVER_REQUEST_TIMEOUT", "7.5")
    monkeypatch.setenv("PERSONA_SERVER_MAX_CONCURRENT", "3")
    app = create_app_from_settings()
    assert app.state.request_timeout == 7.5
    assert [lim.total_tokens for lim in app.state.limiters.values()] == [3]
    monkeypatch.setenv("PERSONA_SERVER_MAX_CONCURRENT", "0")
    with pytest.raises(PersonaConfigError, match="server_max_concurrent"):
        Settings.load()
