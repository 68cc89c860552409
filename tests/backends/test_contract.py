"""Contract tests of the remote backends against stand-in servers on 127.0.0.1.

TGI and LoRAX cannot run here, so their stand-ins speak their published OpenAPI specs
(``../shared/specs``): every request body a backend sends is validated against the
spec's schema for that route, and every reply (JSON bodies, each SSE event, error bodies)
is built from the spec's response schemas and validated against them too. A violation on
either side fails the test. vLLM's stand-in speaks the OpenAI completions shape and
``/v1/load_lora_adapter``.

The specs are OpenAPI 3.0: ``nullable`` and LoRAX's boolean ``exclusiveMinimum`` are
rewritten into JSON Schema 2020-12 before validating (:func:`openapi_to_jsonschema`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from persona_plugin.backends import (
    AdapterNotServedError,
    Backend,
    BackendError,
    BackendProtocolError,
    BackendRequestError,
    BackendStreamError,
    BackendUnavailableError,
    BaseBackend,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    LoRAXBackend,
    RetryPolicy,
    TGIBackend,
    VLLMBackend,
)
from persona_plugin.cards.owned import OwnedCards, owned_id
from persona_plugin.chat_models import MultiLoraChatModel
from persona_plugin.errors import PersonaConfigError, PersonaValidationError
from persona_plugin.lora.hub import LoraHub, parse_card
from persona_plugin.lora.retrieval import LoraRetriever
from persona_plugin.persona import Persona
from tests.paths import SHARED

SPECS = SHARED / "specs"
if not (SPECS / "tgi-openapi.json").is_file():  # pragma: no cover - the specs live beside
    # in CI the specs are always beside the clone: a missing one is a failure, not a skip
    if os.environ.get("CI"):
        raise RuntimeError(f"the OpenAPI specs are not at {SPECS}")
    pytest.skip(f"the OpenAPI specs are not at {SPECS}", allow_module_level=True)


# -- OpenAPI 3.0 -> JSON Schema -----------------------------------------------------------


def openapi_to_jsonschema(node: Any, *, names: bool = False) -> Any:
    """Rewrite OpenAPI 3.0 schema keywords JSON Schema does not know.

    ``nullable: true`` becomes a ``null`` alternative; a boolean ``exclusiveMinimum`` (the
    draft-4 style LoRAX's spec uses) becomes the numeric bound. ``names``: ``node`` maps
    names (properties, schemas, paths) to schemas, so its keys are left alone.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {key: openapi_to_jsonschema(value) for key, value in node.items()}
    out = {
        key: openapi_to_jsonschema(
            value, names=key in ("properties", "schemas", "paths", "responses", "content")
        )
        for key, value in node.items()
        if key != "nullable"
    }
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), bool):
            del out[exclusive]
            if node[exclusive] and bound in node:
                out[exclusive] = out.pop(bound)
    if node.get("nullable") is True:
        if "type" in out and isinstance(out["type"], str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


class Spec:
    """An OpenAPI document whose component schemas validate instances."""

    def __init__(self, path: Path) -> None:
        self.doc = openapi_to_jsonschema(json.loads(path.read_text()))
        self.uri = f"urn:spec:{path.stem}"
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(self.uri, resource)
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def validator(self, schema_name: str) -> jsonschema.Draft202012Validator:
        if schema_name not in self._validators:
            assert schema_name in self.doc["components"]["schemas"], schema_name
            self._validators[schema_name] = jsonschema.Draft202012Validator(
                {"$ref": f"{self.uri}#/components/schemas/{schema_name}"}, registry=self.registry
            )
        return self._validators[schema_name]

    def errors(self, schema_name: str, instance: Any) -> list[str]:
        return [
            f"{schema_name} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in self.validator(schema_name).iter_errors(instance)
        ]

    @staticmethod
    def _name(schema: dict[str, Any]) -> str:
        return schema["$ref"].rsplit("/", 1)[1]

    def request_schema(self, path: str) -> str | None:
        op = self.doc["paths"].get(path, {}).get("post")
        if op is None:
            return None
        return self._name(op["requestBody"]["content"]["application/json"]["schema"])

    def response_schema(self, path: str, status: int, content_type: str) -> str:
        responses = self.doc["paths"][path]["post"]["responses"]
        return self._name(responses[str(status)]["content"][content_type]["schema"])


@pytest.fixture(scope="module")
def tgi_spec() -> Spec:
    return Spec(SPECS / "tgi-openapi.json")


@pytest.fixture(scope="module")
def lorax_spec() -> Spec:
    return Spec(SPECS / "lorax-openapi.json")


# vLLM has no spec here: the OpenAI shapes it accepts, as this project uses them
_SAMPLING = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer"},
    "stop": {"type": "array", "items": {"type": "string"}},
    "n": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
VLLM_SCHEMAS = {
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {**_SAMPLING, "prompt": {"type": "string"}},
        "additionalProperties": False,
    },
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_SAMPLING,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                },
            },
        },
        "additionalProperties": False,
    },
    "/v1/load_lora_adapter": {
        "type": "object",
        "required": ["lora_name", "lora_path"],
        "properties": {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}},
        "additionalProperties": False,
    },
}


# -- the stand-in server ------------------------------------------------------------------


@dataclass
class Call:
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class StandIn:
    """A threaded HTTP server on 127.0.0.1 playing TGI, LoRAX or vLLM.

    Replies are scripted with :meth:`then` (one action per request, in order; then
    success): ``{"status": 429, "headers": {...}}`` an error reply, ``{"malformed": body}``
    a 200 with a body off the spec, ``{"sleep": s}`` a
    slow reply, ``{"cut_after": k}`` a stream that stops after k token events,
    ``{"garble_after": k}`` one cut mid-event, ``{"error_after": k}`` an error event.
    """

    flavor: str  # tgi | lorax | vllm
    spec: Spec | None = None
    base_model: str = "base-model"
    loaded: dict[str, str] = field(default_factory=dict)  # vllm: lora_name -> path
    # vllm: VLLM_ALLOW_RUNTIME_LORA_UPDATING; off, the load route does not exist
    runtime_updates: bool = True
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    actions: deque[dict[str, Any]] = field(default_factory=deque)
    backends: list[Any] = field(default_factory=list)  # closed with the server

    def __post_init__(self) -> None:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed ACK between headers and body

            def do_POST(self) -> None:
                stand_in._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.lock = threading.Lock()
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def then(self, *actions: dict[str, Any]) -> StandIn:
        self.actions.extend(actions)
        return self

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.httpd.shutdown()
        self.httpd.server_close()

    def track(self, backend: Any) -> Any:
        self.backends.append(backend)
        return backend

    def paths(self) -> list[str]:
        return [c.path for c in self.calls]

    # -- checks ---------------------------------------------------------------------------

    def _check_request(self, path: str, body: Any) -> list[str]:
        if self.spec is None:
            schema = VLLM_SCHEMAS.get(path)
            if schema is None:
                return [f"unknown route {path}"]
            validator = jsonschema.Draft202012Validator(schema)
            return [f"{path}: {e.message}" for e in validator.iter_errors(body)]
        name = self.spec.request_schema(path)
        if name is None:
            return [f"{path} is not a route of the spec"]
        return self.spec.errors(name, body)

    def _check_response(self, path: str, status: int, content_type: str, body: Any) -> None:
        if self.spec is None:
            return
        name = self.spec.response_schema(path, status, content_type)
        with self.lock:
            self.problems.extend(f"response: {e}" for e in self.spec.errors(name, body))

    # -- replies --------------------------------------------------------------------------

    def _send_json(
        self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str]
    ) -> None:
        raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(raw)

    def _start_sse(self, h: BaseHTTPRequestHandler, status: int = 200, **headers: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        h.close_connection = True

    @staticmethod
    def _event(h: BaseHTTPRequestHandler, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        h.wfile.write(f"data: {data}\n\n".encode())
        h.wfile.flush()

    def _error(self, h: BaseHTTPRequestHandler, path: str, action: dict[str, Any]) -> None:
        status = action["status"]
        headers = action.get("headers", {})
        if self.flavor == "vllm":
            body = {"object": "error", "message": f"status {status}", "type": "Error"}
            self._send_json(h, status, body, headers)
            return
        types = {422: "validation", 424: "generation", 429: "overloaded"}
        body = {"error": f"stand-in error {status}", "error_type": types.get(status, "internal")}
        if path == "/generate_stream":  # the spec's error replies on this route are SSE
            self._check_response(path, status, "text/event-stream", body)
            self._start_sse(h, status, **headers)
            self._event(h, body)
            return
        self._check_response(path, status, "application/json", body)
        self._send_json(h, status, body, headers)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = h.path.split("?")[0]
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        errors = self._check_request(path, body)
        with self.lock:
            self.calls.append(Call(path, body, dict(h.headers)))
            self.problems.extend(f"request {path}: {e}" for e in errors)
            action = self.actions.popleft() if self.actions else {}
        if errors:
            payload = {"error": "; ".join(errors), "error_type": "validation"}
            self._send_json(h, 422, payload, {})
            return
        if action.get("sleep"):
            time.sleep(action["sleep"])
        if "status" in action:
            self._error(h, path, action)
            return
        if "malformed" in action:  # a 200 whose body breaks the documented shape
            self._send_json(h, 200, action["malformed"], {})
            return
        getattr(self, f"_{self.flavor}")(h, path, body, action)

    # -- TGI ------------------------------------------------------------------------------

    @staticmethod
    def _tokens(text: str, first_id: int = 5) -> list[dict[str, Any]]:
        words = text.split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        return [
            {"id": first_id + i, "text": p, "logprob": -0.25, "special": False}
            for i, p in enumerate(pieces)
        ]

    def _tgi(self, h: BaseHTTPRequestHandler, path: str, body: Any, action: dict) -> None:
        if path in ("/generate", "/generate_stream"):
            params = body.get("parameters") or {}
            text = f"reply from {params.get('adapter_id') or 'base'}"
            tokens = self._tokens(text)
            if path == "/generate":
                reply = {
                    "generated_text": text,
                    "details": {
                        "finish_reason": "length",
                        "generated_tokens": len(tokens),
                        "prefill": [],
                        "tokens": tokens,
                        "seed": params.get("seed"),
                    },
                }
                self._check_response(path, 200, "application/json", reply)
                self._send_json(h, 200, reply, {})
                return
            eos = {"id": 2, "text": "</s>", "logprob": -0.01, "special": True}
            events = [
                {"index": i, "token": t, "generated_text": None, "details": None}
                for i, t in enumerate(tokens)
            ]
            events.append(
                {
                    "index": len(tokens),
                    "token": eos,
                    "generated_text": text,
                    "details": {
                        "finish_reason": "eos_token",
                        "generated_tokens": len(tokens) + 1,
                        "input_length": 7,
                        "seed": params.get("seed"),
                    },
                }
            )
            self._stream(h, path, events, action, "StreamResponse-ish")
            return
        if path == "/v1/chat/completions":
            who = body.get("model") if body.get("model") not in (None, "tgi") else "base"
            self._chat(h, path, body, action, f"reply from {who}", who or "base")
            return
        raise AssertionError(path)

    def _chat(
        self, h: BaseHTTPRequestHandler, path: str, body: Any, action: dict, text: str, model: str
    ) -> None:
        head = {"id": "chatcmpl-1", "created": 1700000000, "model": model}
        if self.flavor == "tgi":
            head["system_fingerprint"] = "3.3.6-native"
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        n = 1 if body.get("stream") else body.get("n", 1) if self.flavor == "vllm" else 1
        if not body.get("stream"):
            reply = {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": f"{text} #{i}" if n > 1 else text,
                        },
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                    for i in range(n)
                ],
                "usage": usage,
            }
            if self.flavor == "tgi":
                del reply["object"]
            self._check_response(path, 200, "application/json", reply)
            self._send_json(h, 200, reply, {})
            return
        events: list[Any] = []
        pieces = [t["text"] for t in self._tokens(text)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            events.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": piece},
                            "finish_reason": "stop" if last else None,
                            "logprobs": None,
                        }
                    ],
                    "usage": None,
                }
            )
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**head, "choices": [], "usage": usage})
        self._stream(h, path, events, action, "chat", done=True)

    def _stream(
        self,
        h: BaseHTTPRequestHandler,
        path: str,
        events: list[Any],
        action: dict,
        kind: str,
        done: bool = False,
    ) -> None:
        self._start_sse(h)
        for i, event in enumerate(events):
            if action.get("cut_after") == i:
                return  # the connection closes: no final event
            if action.get("garble_after") == i:
                h.wfile.write(b'data: {"index": 3, "tok')
                return
            if action.get("error_after") == i:
                error = {"error": "CUDA out of memory", "error_type": "generation"}
                self._event(h, error)
                return
            if self.spec is not None:
                self._check_response(path, 200, "text/event-stream", event)
            self._event(h, event)
        if done:
            self._event(h, "[DONE]")

    # -- LoRAX ----------------------------------------------------------------------------

    def _lorax(self, h: BaseHTTPRequestHandler, path: str, body: Any, action: dict) -> None:
        params = body.get("parameters") or {}
        merged = params.get("merged_adapters")
        who = "+".join(merged["ids"]) if merged else params.get("adapter_id") or "base"
        text = f"reply from {who}"
        tokens = self._tokens(text)
        if path == "/generate":
            reply = {
                "generated_text": text,
                "details": {
                    "finish_reason": "length",
                    "prompt_tokens": 11,
                    "generated_tokens": len(tokens),
                    "prefill": [],
                    "tokens": tokens,
                    "seed": None,
                },
            }
            self._check_response(path, 200, "application/json", reply)
            self._send_json(h, 200, reply, {})
            return
        events = [{"token": t, "generated_text": None, "details": None} for t in tokens]
        events[-1]["generated_text"] = text
        events[-1]["details"] = {
            "finish_reason": "eos_token",
            "prompt_tokens": 11,
            "generated_tokens": len(tokens),
            "seed": None,
        }
        self._stream(h, path, events, action, "lorax")

    # -- vLLM -----------------------------------------------------------------------------

    def _vllm(self, h: BaseHTTPRequestHandler, path: str, body: Any, action: dict) -> None:
        if path == "/v1/load_lora_adapter" and not self.runtime_updates:
            self._send_json(h, 404, {"detail": "Not Found"}, {})  # FastAPI: no such route
            return
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.loaded:
                msg = f"The lora adapter '{name}' has already been loaded."
                self._send_json(h, 400, {"object": "error", "message": msg, "code": 400}, {})
                return
            self.loaded[name] = body["lora_path"]
            raw = f"Success: LoRA adapter '{name}' added successfully.".encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
            return
        model = body["model"]
        if model != self.base_model and model not in self.loaded:
            msg = f"The model `{model}` does not exist."
            error = {"object": "error", "message": msg, "type": "NotFoundError", "code": 404}
            self._send_json(h, 404, error, {})
            return
        who = "base" if model == self.base_model else model
        text = f"reply from {who}"
        if path == "/v1/chat/completions":
            self._chat(h, path, body, action, text, model)
            return
        n = body.get("n", 1)
        head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model}
        usage = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        if not body.get("stream"):
            choices = [
                {"index": i, "text": f"{text} #{i}", "finish_reason": "length", "logprobs": None}
                for i in range(n)
            ]
            self._send_json(h, 200, {**head, "choices": choices, "usage": usage}, {})
            return
        pieces = [t["text"] for t in self._tokens(text)]
        events: list[Any] = [
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "text": p,
                        "finish_reason": "length" if i == len(pieces) - 1 else None,
                    }
                ],
            }
            for i, p in enumerate(pieces)
        ]
        events.append({**head, "choices": [], "usage": usage})
        self._stream(h, path, events, action, "vllm", done=True)


@pytest.fixture
def tgi_server(tgi_spec: Spec) -> Iterator[StandIn]:
    server = StandIn("tgi", tgi_spec)
    yield server
    server.close()
    assert server.problems == []


@pytest.fixture
def lorax_server(lorax_spec: Spec) -> Iterator[StandIn]:
    server = StandIn("lorax", lorax_spec)
    yield server
    server.close()
    assert server.problems == []


@pytest.fixture
def vllm_server() -> Iterator[StandIn]:
    server = StandIn("vllm", None, loaded={"formal": "/loras/formal"})
    yield server
    server.close()
    assert server.problems == []


class Sleeps(list):
    """Records the waits of a RetryPolicy instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def policy(sleeps: Sleeps, **changes: Any) -> RetryPolicy:
    values = {"max_retries": 2, "backoff": 0.01, "jitter": 0.0, "timeout": 5.0}
    return RetryPolicy(**{**values, **changes}, sleep=sleeps, asleep=sleeps.asleep)


def tgi(server: StandIn, sleeps: Sleeps, **kwargs: Any) -> TGIBackend:
    backend = TGIBackend(
        server.url,
        adapters=["formal", "casual", "kb", "formal-kb"],
        premerged={"formal-kb": {"formal": 0.7, "kb": 0.3}},
        retry=kwargs.pop("retry", None) or policy(sleeps),
        **kwargs,
    )
    return server.track(backend)


def prompt(**kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt="Write to the board.", max_new_tokens=16, **kwargs)


def chat(**kwargs: Any) -> GenerationRequest:
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    return GenerationRequest(messages=messages, max_new_tokens=16, **kwargs)


# -- requests -----------------------------------------------------------------------------


def test_generation_requests_normalise_and_validate() -> None:
    request = GenerationRequest(prompt="x", adapters={"kb": 1, "formal": 3, "off": 0})
    assert request.adapters == (("formal", 0.75), ("kb", 0.25))  # zero weights dropped
    assert GenerationRequest(prompt="x", adapters="formal").adapters == (("formal", 1.0),)
    messages = GenerationRequest(messages=[("user", "hi")]).messages
    assert messages == ({"role": "user", "content": "hi"},)
    assert GenerationRequest(prompt="x", seed=3, n=3).seeds() == [3, 4, 5]
    assert GenerationRequest(prompt="x", top_p=1.0).nucleus is None
    for bad, field_name in (
        ({"prompt": "x", "messages": [("user", "x")]}, "prompt"),
        ({}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"prompt": "x", "adapters": [("a", 1), ("a", 2)]}, "adapters"),
        ({"prompt": "x", "adapters": [("a", -1)]}, "adapters"),
        ({"prompt": "x", "adapters": [("a", "heavy")]}, "adapters"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "seed": 0}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "n": 0}, "n"),
    ):
        with pytest.raises(PersonaValidationError) as info:
            GenerationRequest(**bad)
        assert info.value.path == field_name, bad
    with pytest.raises(PersonaValidationError, match="at most 4"):
        TGIBackend("http://127.0.0.1:9").generate(
            GenerationRequest(prompt="x", stop=["a", "b", "c", "d", "e"])
        )


# -- the validator itself -----------------------------------------------------------------


def test_the_spec_validator_is_not_vacuous(tgi_spec: Spec, lorax_spec: Spec) -> None:
    good = {"inputs": "x", "parameters": {"adapter_id": None, "max_new_tokens": 5, "seed": 3}}
    assert tgi_spec.errors("GenerateRequest", good) == []
    assert lorax_spec.errors("GenerateRequest", good) == []
    for bad in (
        {"parameters": {}},  # no inputs
        {"inputs": "x", "parameters": {"top_p": 1.5}},
        {"inputs": "x", "parameters": {"seed": 0}},  # exclusiveMinimum 0
        {"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
        {"inputs": "x", "parameters": {"adapter_id": 3}},
    ):
        assert tgi_spec.errors("GenerateRequest", bad), bad
        assert lorax_spec.errors("GenerateRequest", bad), bad
    merged = {"ids": ["a"], "weights": [1.0], "merge_strategy": "mean"}
    assert lorax_spec.errors("AdapterParameters", merged)
    assert lorax_spec.errors(
        "GenerateRequest", {"inputs": "x", "parameters": {"merged_adapters": None}}
    )
    assert tgi_spec.errors("ErrorResponse", {"error": "x"})  # error_type is required


def test_canned_replies_follow_the_specs(tgi_spec: Spec, lorax_spec: Spec) -> None:
    """The stand-ins' reply builders, checked once more outside a request."""
    server = StandIn("tgi", tgi_spec)
    tokens = server._tokens("a b c")
    server.close()
    assert tgi_spec.errors("Token", tokens[0]) == []
    details = {"finish_reason": "length", "generated_tokens": 3, "prefill": [], "tokens": tokens}
    assert (
        tgi_spec.errors("GenerateResponse", {"generated_text": "a b c", "details": details}) == []
    )
    assert (
        tgi_spec.errors(
            "StreamResponse",
            {"index": 0, "token": tokens[0], "generated_text": None, "details": None},
        )
        == []
    )
    assert (
        lorax_spec.errors(
            "GenerateResponse",
            {"generated_text": "a b c", "details": {**details, "prompt_tokens": 4}},
        )
        == []
    )
    for spec in (tgi_spec, lorax_spec):
        assert spec.errors("ErrorResponse", {"error": "busy", "error_type": "overloaded"}) == []


# -- TGI ----------------------------------------------------------------------------------


def test_tgi_generate_serves_the_adapter_and_validates(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    assert isinstance(backend, Backend)
    result = backend.generate(prompt(adapters=[("formal", 1.0)]))
    assert result.text == "reply from formal"
    assert (result.served_by, result.adapters, result.model) == (
        "adapter",
        (("formal", 1.0),),
        "formal",
    )
    assert result.finish_reason == "length" and result.completion_tokens == 3
    call = tgi_server.calls[-1]
    assert call.path == "/generate"
    params = call.body["parameters"]
    assert params["adapter_id"] == "formal" and params["details"] is True
    assert params["do_sample"] is False and "temperature" not in params  # greedy
    assert call.headers.get("authorization", "") == ""  # no Hugging Face token leaks out


def test_tgi_sampling_parameters_and_n_candidates(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    request = prompt(
        adapters=[("casual", 1)], temperature=0.7, top_p=0.9, seed=5, stop=["\n\n"], n=2
    )
    result = backend.generate(request)
    assert result.texts == ("reply from casual", "reply from casual")
    assert result.completion_tokens == 6
    sent = [c.body["parameters"] for c in tgi_server.calls]
    assert [p["seed"] for p in sent] == [5, 6]
    assert all(p["do_sample"] and p["temperature"] == 0.7 and p["top_p"] == 0.9 for p in sent)
    assert sent[0]["stop"] == ["\n\n"]
    # top_p=1.0 cuts nothing, and TGI rejects it: left out
    backend.generate(prompt(temperature=1.0, top_p=1.0))
    assert "top_p" not in tgi_server.calls[-1].body["parameters"]


def test_tgi_base_model_without_adapters(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    result = backend.generate(prompt())
    assert (result.text, result.served_by, result.adapters) == ("reply from base", "base", ())
    assert "adapter_id" not in tgi_server.calls[-1].body["parameters"]
    result = backend.generate(chat())
    assert tgi_server.calls[-1].body["model"] == "tgi"
    assert tgi_server.calls[-1].body["temperature"] == 0.0  # greedy on TGI's chat route
    assert result.text == "reply from base"


def test_tgi_refuses_an_adapter_it_was_not_started_with(
    tgi_server: StandIn, sleeps: Sleeps
) -> None:
    backend = tgi(tgi_server, sleeps)
    with pytest.raises(AdapterNotServedError, match="silently with the base model") as info:
        backend.generate(prompt(adapters=[("pirate", 1.0)]))
    assert "'pirate'" in str(info.value) and "formal" in str(info.value)
    with pytest.raises(AdapterNotServedError):
        list(backend.stream(chat(adapters=[("formal", 0.5), ("pirate", 0.5)])))
    assert tgi_server.calls == []  # refused before sending anything
    assert backend.adapter_ids == frozenset({"formal", "casual", "kb"})


def test_tgi_serves_a_mixture_by_premerged_adapter_or_top(
    tgi_server: StandIn, sleeps: Sleeps
) -> None:
    backend = tgi(tgi_server, sleeps)
    # weights close to the pre-merged card's 0.7 / 0.3: its adapter serves the mixture
    result = backend.generate(prompt(adapters=[("kb", 0.32), ("formal", 0.68)]))
    assert result.text == "reply from formal-kb"
    assert (result.served_by, result.adapters) == ("premerged", (("formal-kb", 1.0),))
    assert result.requested_adapters == (("formal", 0.68), ("kb", 0.32))
    # no pre-merged adapter for this mixture: its heaviest adapter serves it alone
    result = backend.generate(chat(adapters=[("kb", 0.2), ("casual", 0.8)]))
    assert tgi_server.calls[-1].body["model"] == "casual"
    assert (result.served_by, result.adapters) == ("top", (("casual", 1.0),))
    strict = tgi(tgi_server, sleeps, mixture_policy="strict")
    with pytest.raises(AdapterNotServedError, match="strict"):
        strict.generate(prompt(adapters=[("kb", 0.2), ("casual", 0.8)]))
    top_only = tgi(tgi_server, sleeps, mixture_policy="top")
    result = top_only.generate(prompt(adapters=[("formal", 0.7), ("kb", 0.3)]))
    assert result.served_by == "top" and result.adapters == (("formal", 1.0),)
    with pytest.raises(PersonaConfigError):
        tgi(tgi_server, sleeps, mixture_policy="average")


def test_tgi_stream_prompt_and_chat(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    chunks = list(backend.stream(prompt(adapters=[("formal", 1.0)], seed=9)))
    assert tgi_server.calls[-1].path == "/generate_stream"
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == result.text == "reply from formal"  # no </s>
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "eos_token",
        7,
        4,
    )
    chunks = list(backend.stream(chat(adapters=[("kb", 1.0)])))
    call = tgi_server.calls[-1]
    assert call.path == "/v1/chat/completions" and call.body["stream"] is True
    assert call.body["model"] == "kb"
    result = chunks[-1].result
    assert result is not None and result.text == "reply from kb" == "".join(c.text for c in chunks)
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("stop", 9, 3)
    with pytest.raises(PersonaValidationError, match="n=2"):
        list(backend.stream(prompt(n=2, temperature=0.5)))


def test_tgi_async_generate_and_stream(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)

    async def main() -> tuple[GenerationResult, GenerationResult, list[GenerationChunk]]:
        one = await backend.agenerate(chat(adapters=[("formal", 1.0)], n=2, temperature=0.5))
        two = await backend.agenerate(prompt(adapters=[("casual", 1.0)]))
        chunks = [c async for c in backend.astream(prompt(adapters=[("kb", 1.0)]))]
        await backend.aclose()
        return one, two, chunks

    one, two, chunks = asyncio.run(main())
    assert one.texts == ("reply from formal", "reply from formal")
    assert two.text == "reply from casual"
    assert chunks[-1].result is not None and chunks[-1].result.text == "reply from kb"

    async def again() -> str:
        try:
            return (await backend.agenerate(prompt())).text
        finally:
            await backend.aclose()

    assert asyncio.run(again()) == "reply from base"  # a new event loop, new connections


@pytest.mark.parametrize("status", [422, 424])
def test_tgi_rejections_are_not_retried(tgi_server: StandIn, sleeps: Sleeps, status: int) -> None:
    backend = tgi(tgi_server, sleeps)
    tgi_server.then({"status": status})
    with pytest.raises(BackendRequestError, match=f"HTTP {status}") as info:
        backend.generate(prompt())
    assert info.value.status == status and "not retried" in str(info.value)
    assert len(tgi_server.calls) == 1 and sleeps == []


def test_tgi_429_honours_retry_after(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    tgi_server.then({"status": 429, "headers": {"Retry-After": "7"}})
    assert backend.generate(prompt()).text == "reply from base"
    assert sleeps == [7.0] and len(tgi_server.calls) == 2
    # a wait beyond max_retry_after fails at once
    tgi_server.then({"status": 429, "headers": {"Retry-After": "120"}})
    with pytest.raises(BackendUnavailableError, match="retry after 120 s") as info:
        backend.generate(prompt())
    assert info.value.status == 429 and sleeps == [7.0]


def test_tgi_5xx_backs_off_then_gives_up(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    tgi_server.then({"status": 500}, {"status": 503})
    assert backend.generate(prompt(adapters=[("kb", 1)])).text == "reply from kb"
    assert sleeps == [0.01, 0.02]  # exponential backoff
    sleeps.clear()
    tgi_server.then({"status": 503}, {"status": 502}, {"status": 500})
    with pytest.raises(BackendUnavailableError, match="failed 3 times") as info:
        backend.generate(chat())
    assert info.value.attempts == 3 and info.value.status == 500
    assert sleeps == [0.01, 0.02]


def test_tgi_timeouts_are_retried(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps, retry=policy(sleeps, timeout=0.2, max_retries=1))
    tgi_server.then({"sleep": 0.6})
    assert backend.generate(prompt()).text == "reply from base"
    tgi_server.then({"sleep": 0.6}, {"sleep": 0.6})
    with pytest.raises(BackendUnavailableError, match="timed out"):
        backend.generate(prompt())


def test_tgi_stream_cut_midway_is_an_error(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    received: list[str] = []
    tgi_server.then({"cut_after": 2})
    with pytest.raises(BackendStreamError, match="stream broke") as info:
        for chunk in backend.stream(prompt(adapters=[("formal", 1.0)])):
            received.append(chunk.text)
            assert chunk.result is None  # nothing ever claims to be complete
    assert info.value.partial_text == "reply from" == "".join(received)
    assert len(tgi_server.calls) == 1  # text went out: never retried
    for action in ({"garble_after": 1}, {"error_after": 2}):
        tgi_server.then(action)
        with pytest.raises(BackendStreamError):
            list(backend.stream(chat(adapters=[("kb", 1.0)])))


def test_tgi_stream_retries_until_its_first_token(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    tgi_server.then({"status": 429, "headers": {"Retry-After": "1"}}, {"cut_after": 0})
    chunks = list(backend.stream(prompt()))
    assert chunks[-1].result is not None and chunks[-1].result.text == "reply from base"
    assert len(tgi_server.calls) == 3 and sleeps == [1.0, 0.02]


def test_tgi_from_hub(tmp_path: Path, tgi_server: StandIn, sleeps: Sleeps) -> None:
    hub = LoraHub(tmp_path)
    base = {"base_model": "m", "kind": "style", "rank": 8, "target_modules": ["q_proj"]}
    hub.add(
        parse_card(
            {
                "id": "formal",
                "description": "d",
                "location": "o/f",
                **base,
                "servers": {"tgi-a": "acme/formal"},
            }
        )
    )
    hub.add(
        parse_card(
            {"id": "kb", "description": "d", "location": "o/k", **base, "servers": ["tgi-a"]}
        )
    )
    hub.add(
        parse_card(
            {"id": "other", "description": "d", "location": "o/o", **base, "servers": ["tgi-b"]}
        )
    )
    hub.add(
        parse_card(
            {
                "id": "formal-kb",
                "description": "d",
                "location": "o/fk",
                **base,
                "servers": ["tgi-a"],
                "merge_of": [{"id": "formal", "weight": 2}, {"id": "kb", "weight": 1}],
            }
        )
    )
    backend = TGIBackend.from_hub(hub, "tgi-a", tgi_server.url, retry=policy(sleeps))
    assert backend.adapter_ids == frozenset({"formal", "kb"})
    assert backend.generate(prompt(adapters=[("formal", 1)])).text == "reply from acme/formal"
    result = backend.generate(prompt(adapters=[("formal", 0.66), ("kb", 0.34)]))
    assert result.served_by == "premerged" and result.text == "reply from formal-kb"
    with pytest.raises(AdapterNotServedError):
        backend.generate(prompt(adapters=[("other", 1)]))


# -- LoRAX --------------------------------------------------------------------------------


def lorax(server: StandIn, sleeps: Sleeps, **kwargs: Any) -> LoRAXBackend:
    return server.track(LoRAXBackend(server.url, retry=policy(sleeps), **kwargs))


def test_lorax_merges_a_mixture_per_request(lorax_server: StandIn, sleeps: Sleeps) -> None:
    backend = lorax(lorax_server, sleeps, merge_strategy="ties", density=0.4)
    result = backend.generate(prompt(adapters=[("kb", 1.0), ("formal", 3.0)], seed=3))
    assert result.text == "reply from formal+kb"
    assert result.served_by == "merged"
    assert result.adapters == result.requested_adapters == (("formal", 0.75), ("kb", 0.25))
    assert (result.prompt_tokens, result.completion_tokens) == (11, 3)
    params = lorax_server.calls[-1].body["parameters"]
    assert params["merged_adapters"] == {
        "ids": ["formal", "kb"],
        "weights": [0.75, 0.25],
        "merge_strategy": "ties",
        "density": 0.4,
    }
    assert "adapter_id" not in params  # LoRAX refuses both at once
    linear = lorax(lorax_server, sleeps)
    linear.generate(prompt(adapters=[("a", 1), ("b", 1)]))
    merged = lorax_server.calls[-1].body["parameters"]["merged_adapters"]
    assert merged["merge_strategy"] == "linear" and "density" not in merged
    dare = lorax(lorax_server, sleeps, merge_strategy="dare_ties", majority_sign_method="frequency")
    dare.generate(prompt(adapters=[("a", 1), ("b", 1)]))
    merged = lorax_server.calls[-1].body["parameters"]["merged_adapters"]
    assert merged["density"] == 0.5 and merged["majority_sign_method"] == "frequency"


def test_lorax_single_adapter_base_and_chat(lorax_server: StandIn, sleeps: Sleeps) -> None:
    backend = lorax(
        lorax_server, sleeps, adapters={"formal": "/data/formal"}, sources={"formal": "local"}
    )
    result = backend.generate(prompt(adapters=[("formal", 1.0)]))
    params = lorax_server.calls[-1].body["parameters"]
    assert (params["adapter_id"], params["adapter_source"]) == ("/data/formal", "local")
    assert result.served_by == "adapter" and result.text == "reply from /data/formal"
    assert backend.generate(prompt()).served_by == "base"
    assert "adapter_id" not in lorax_server.calls[-1].body["parameters"]
    backend.generate(chat(adapters=[("formal", 1.0)]))
    body = lorax_server.calls[-1].body
    assert body["parameters"]["apply_chat_template"] is True
    assert json.loads(body["inputs"])[1] == {"role": "user", "content": "Hi"}
    with pytest.raises(AdapterNotServedError):
        backend.generate(prompt(adapters=[("kb", 1.0)]))
    with pytest.raises(PersonaValidationError, match="sources"):
        lorax(lorax_server, sleeps, sources={"a": "hub", "b": "s3"}).generate(
            prompt(adapters=[("a", 1), ("b", 1)])
        )


def test_lorax_stream_and_faults(lorax_server: StandIn, sleeps: Sleeps) -> None:
    backend = lorax(lorax_server, sleeps)
    chunks = list(backend.stream(prompt(adapters=[("a", 1), ("b", 1)])))
    assert lorax_server.calls[-1].path == "/generate_stream"
    assert chunks[-1].result is not None and chunks[-1].result.text == "reply from a+b"
    assert "".join(c.text for c in chunks) == "reply from a+b"
    lorax_server.then({"cut_after": 1})
    with pytest.raises(BackendStreamError) as info:
        list(backend.stream(prompt()))
    assert info.value.partial_text == "reply"
    lorax_server.then({"error_after": 1})
    with pytest.raises(BackendStreamError, match="CUDA out of memory"):
        list(backend.stream(prompt()))
    lorax_server.then({"status": 422})
    with pytest.raises(BackendRequestError, match="stand-in error 422"):
        list(backend.stream(prompt()))
    lorax_server.then({"status": 429, "headers": {"Retry-After": "2"}}, {"status": 500})
    assert backend.generate(prompt()).text == "reply from base"
    assert sleeps == [2.0, 0.02]
    lorax_server.then(*[{"status": 503}] * 3)

    async def unavailable() -> None:
        try:
            await backend.agenerate(prompt())
        finally:
            await backend.aclose()

    with pytest.raises(BackendUnavailableError):
        asyncio.run(unavailable())


def test_lorax_async(lorax_server: StandIn, sleeps: Sleeps) -> None:
    backend = lorax(lorax_server, sleeps)

    async def main() -> tuple[GenerationResult, list[GenerationChunk]]:
        result = await backend.agenerate(prompt(adapters=[("a", 1)], n=3, temperature=0.8))
        chunks = [c async for c in backend.astream(chat(adapters=[("a", 1), ("b", 1)]))]
        await backend.aclose()
        return result, chunks

    result, chunks = asyncio.run(main())
    assert result.texts == ("reply from a",) * 3
    assert chunks[-1].result is not None and chunks[-1].result.served_by == "merged"


def test_lorax_configuration_errors(lorax_server: StandIn) -> None:
    with pytest.raises(PersonaConfigError, match="merge_strategy"):
        LoRAXBackend(lorax_server.url, merge_strategy="mean")  # type: ignore[arg-type]
    with pytest.raises(PersonaConfigError, match="density"):
        LoRAXBackend(lorax_server.url, merge_strategy="ties", density=0.0)


# -- vLLM ---------------------------------------------------------------------------------


def vllm(server: StandIn, sleeps: Sleeps, **kwargs: Any) -> VLLMBackend:
    kwargs.setdefault("adapters", ["formal"])
    return server.track(VLLMBackend(server.url, model="base-model", retry=policy(sleeps), **kwargs))


def test_vllm_adapter_as_model(vllm_server: StandIn, sleeps: Sleeps) -> None:
    backend = vllm(vllm_server, sleeps)
    result = backend.generate(prompt(adapters=[("formal", 1.0)], n=3, temperature=0.9, seed=4))
    assert result.texts == ("reply from formal #0", "reply from formal #1", "reply from formal #2")
    body = vllm_server.calls[-1].body
    assert (body["model"], body["n"], body["seed"]) == ("formal", 3, 4)
    assert vllm_server.paths() == ["/v1/completions"]  # n candidates in one request
    assert (result.prompt_tokens, result.completion_tokens) == (4, 3)
    result = backend.generate(chat())
    assert vllm_server.calls[-1].body["model"] == "base-model"
    assert result.text == "reply from base" and result.served_by == "base"
    with pytest.raises(AdapterNotServedError, match="runtime loading is off"):
        backend.generate(prompt(adapters=[("casual", 1.0)]))


def test_vllm_loads_a_premerged_adapter_at_run_time(vllm_server: StandIn, sleeps: Sleeps) -> None:
    backend = vllm(
        vllm_server,
        sleeps,
        adapters=["formal", "kb"],
        premerged={"formal-kb": [("formal", 0.6), ("kb", 0.4)]},
        paths={"formal-kb": "/loras/formal-kb"},
        allow_runtime_loading=True,
    )
    vllm_server.loaded["kb"] = "/loras/kb"
    result = backend.generate(prompt(adapters=[("formal", 0.6), ("kb", 0.4)]))
    assert vllm_server.paths() == ["/v1/load_lora_adapter", "/v1/completions"]
    assert vllm_server.calls[0].body == {"lora_name": "formal-kb", "lora_path": "/loras/formal-kb"}
    assert result.served_by == "premerged" and result.text == "reply from formal-kb #0"
    backend.generate(prompt(adapters=[("formal", 0.6), ("kb", 0.4)]))
    assert vllm_server.paths().count("/v1/load_lora_adapter") == 1  # loaded once
    # the server restarted and lost it: reloaded, and the request sent again
    del vllm_server.loaded["formal-kb"]
    assert backend.generate(prompt(adapters=[("formal", 0.6), ("kb", 0.4)])).served_by == (
        "premerged"
    )
    assert vllm_server.paths()[-3:] == [
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/completions",
    ]
    # not allowed to load, and not started with it: the mixture's top adapter serves it
    fixed = vllm(
        vllm_server,
        sleeps,
        adapters=["formal", "kb"],
        premerged={"formal-kb": {"formal": 0.6, "kb": 0.4}},
    )
    result = fixed.generate(prompt(adapters=[("kb", 0.45), ("formal", 0.55)]))
    assert (result.served_by, result.adapters) == ("top", (("formal", 1.0),))
    started_with_it = vllm(
        vllm_server,
        sleeps,
        adapters=["formal", "kb", "formal-kb"],
        premerged={"formal-kb": {"formal": 0.6, "kb": 0.4}},
    )
    result = started_with_it.generate(prompt(adapters=[("kb", 0.45), ("formal", 0.55)]))
    assert (result.served_by, result.adapters) == ("premerged", (("formal-kb", 1.0),))


def test_vllm_merger_and_single_adapter_loading(vllm_server: StandIn, sleeps: Sleeps) -> None:
    merged: list[Any] = []

    def merger(mixture: Any) -> str:
        merged.append(mixture)
        return "/tmp/merged-adapter"

    backend = vllm(
        vllm_server,
        sleeps,
        paths={"casual": "/loras/casual"},
        allow_runtime_loading=True,
        merger=merger,
    )
    result = backend.generate(chat(adapters=[("casual", 1.0)]))
    assert result.text == "reply from casual" and vllm_server.loaded["casual"] == "/loras/casual"
    result = backend.generate(prompt(adapters=[("casual", 0.5), ("formal", 0.5)]))
    assert result.served_by == "merged"
    assert result.adapters == (("casual", 0.5), ("formal", 0.5))
    assert result.model is not None and result.model.startswith("merged-")
    assert vllm_server.loaded[result.model] == "/tmp/merged-adapter"
    backend.generate(prompt(adapters=[("casual", 0.5), ("formal", 0.5)]))
    assert len(merged) == 1
    assert "casual" in backend.adapter_ids


def test_vllm_stream_and_cut(vllm_server: StandIn, sleeps: Sleeps) -> None:
    backend = vllm(vllm_server, sleeps)
    chunks = list(backend.stream(prompt(adapters=[("formal", 1)])))
    body = vllm_server.calls[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    result = chunks[-1].result
    assert result is not None and result.text == "reply from formal" and result.prompt_tokens == 4
    chunks = list(backend.stream(chat(adapters=[("formal", 1)])))
    assert chunks[-1].result is not None and chunks[-1].result.finish_reason == "stop"
    vllm_server.then({"cut_after": 2})
    with pytest.raises(BackendStreamError):
        list(backend.stream(prompt()))

    async def main() -> list[GenerationChunk]:
        chunks = [c async for c in backend.astream(prompt(adapters=[("formal", 1)]))]
        await backend.aclose()
        return chunks

    assert asyncio.run(main())[-1].result is not None


def test_vllm_from_hub(tmp_path: Path, vllm_server: StandIn, sleeps: Sleeps) -> None:
    hub = LoraHub(tmp_path)
    base = {"base_model": "base-model", "kind": "style", "rank": 8, "target_modules": ["q"]}
    hub.add(
        parse_card(
            {
                "id": "formal",
                "description": "d",
                "location": "/loras/formal",
                **base,
                "servers": ["vllm-1"],
            }
        )
    )
    hub.add(parse_card({"id": "casual", "description": "d", "location": "/loras/casual", **base}))
    backend = VLLMBackend.from_hub(
        hub, "vllm-1", vllm_server.url, allow_runtime_loading=True, retry=policy(sleeps)
    )
    assert backend.model == "base-model"
    assert backend.generate(prompt(adapters=[("casual", 1)])).text == "reply from casual #0"
    assert vllm_server.calls[0].body == {"lora_name": "casual", "lora_path": "/loras/casual"}


# -- MultiLoraChatModel -------------------------------------------------------------------


class FakeBackend(BaseBackend):
    """Echoes the adapters it was asked for; fails as told."""

    name = "fake"

    def __init__(self, fail: BaseException | None = None, cut: bool = False) -> None:
        self.fail = fail
        self.cut = cut
        self.requests: list[GenerationRequest] = []

    @property
    def adapter_ids(self) -> frozenset[str]:
        return frozenset({"formal", "casual", "cooking"})

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if self.fail:
            raise self.fail
        text = (
            "reply via " + ",".join(a for a, _ in request.adapters) if request.adapters else "base"
        )
        return GenerationResult(
            texts=(text,) * request.n,
            finish_reasons=("stop",) * request.n,
            backend=self.name,
            served_by="adapter" if request.adapters else "base",
            adapters=request.adapters,
            requested_adapters=request.adapters,
            prompt_tokens=5,
            completion_tokens=2 * request.n,
        )

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        result = self.generate(request)
        words = result.text.split(" ")
        for i, word in enumerate(words):
            if self.cut and i == 2:
                raise BackendStreamError("cut", backend=self.name, partial_text="reply via")
            yield GenerationChunk(word if i == 0 else f" {word}")
        yield GenerationChunk("", result)


class KeywordEmbedder:
    """A deterministic bag-of-words embedder, enough to rank three cards."""

    VOCAB = ("formal", "concise", "casual", "playful", "recipe", "cooking", "json")

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        rows = np.zeros((len(texts), len(self.VOCAB) + 1), dtype=np.float32)
        for i, text in enumerate(texts):
            lower = text.lower()
            for j, word in enumerate(self.VOCAB):
                rows[i, j] = lower.count(word)
            rows[i, -1] = 0.1
        return rows


def _cards() -> list[Any]:
    base = {"base_model": "m", "rank": 8, "target_modules": ["q_proj"], "location": "o/x"}
    return [
        parse_card({"id": "formal", "kind": "style", "description": "formal concise", **base}),
        parse_card({"id": "casual", "kind": "style", "description": "casual playful", **base}),
        parse_card({"id": "cooking", "kind": "knowledge", "description": "cooking recipe", **base}),
        parse_card({"id": "elsewhere", "kind": "style", "description": "formal formal", **base}),
    ]


def test_chat_model_adapters_from_kwargs_and_config() -> None:
    backend = FakeBackend()
    model = MultiLoraChatModel(backend=backend, max_new_tokens=32)
    reply = model.invoke("hello", adapters=[("formal", 0.25), ("casual", 0.75)])
    assert reply.content == "reply via casual,formal"
    meta = reply.response_metadata
    assert meta["adapters"] == [["casual", 0.75], ["formal", 0.25]] and meta["backend"] == "fake"
    assert reply.usage_metadata == {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    assert backend.requests[-1].max_new_tokens == 32
    assert backend.requests[-1].messages == ({"role": "user", "content": "hello"},)
    reply = model.invoke("hello", config={"configurable": {"adapters": [("cooking", 1)]}})
    assert reply.content == "reply via cooking"
    bound = model.bind(adapters=[("formal", 1)])
    assert bound.invoke("hi").content == "reply via formal"
    assert model.invoke("hi").response_metadata["served_by"] == "base"
    results = model.batch(["a", "b"], config={"configurable": {"adapters": [("casual", 1)]}})
    assert [r.content for r in results] == ["reply via casual"] * 2
    with pytest.raises(PersonaConfigError, match="does not take"):
        model.invoke("hi", tools=[])


def test_chat_model_retrieves_adapters_for_the_persona() -> None:
    backend = FakeBackend()
    retriever = LoraRetriever(_cards(), embedder=KeywordEmbedder(), top_k=2, temperature=0.05)
    model = MultiLoraChatModel(backend=backend, retriever=retriever)
    persona = Persona.new("alice")
    persona.preference.style = ["formal", "concise"]
    persona = persona.with_meta(version=1, user_id="alice")
    reply = model.invoke(
        [SystemMessage("Be helpful."), HumanMessage("any recipe?")],
        config={"configurable": {"persona": persona}},
    )
    retrieved = reply.response_metadata["retrieved"]
    # "elsewhere" matches best but the backend cannot serve it: never retrieved
    assert [r[0] for r in retrieved] == ["formal", "cooking"]
    assert backend.requests[-1].adapters[0][0] == "formal"
    playful = persona.model_copy(deep=True)
    playful.preference.style = ["casual", "playful"]
    reply = model.invoke("hello there", persona=playful.with_meta(version=2, user_id="alice"))
    assert reply.response_metadata["retrieved"][0][0] == "casual"
    assert (
        MultiLoraChatModel(backend=backend, retriever=retriever, persona="formal")
        .invoke("x")
        .response_metadata["adapters"][0][0]
        == "formal"
    )


def test_chat_model_falls_back_when_the_backend_is_down() -> None:
    down = FakeBackend(fail=BackendUnavailableError("tgi is down", backend="tgi"))
    fallback = FakeListChatModel(responses=["fallback says hi"] * 4)
    model = MultiLoraChatModel(backend=down, fallback=fallback)
    reply = model.invoke("hello", adapters=[("formal", 1)])
    assert reply.content == "fallback says hi" and reply.response_metadata["fallback"] is True
    text = "".join(str(c.content) for c in model.stream("hello"))
    assert text == "fallback says hi"
    assert asyncio.run(model.ainvoke("hello")).content == "fallback says hi"
    with pytest.raises(BackendUnavailableError):
        MultiLoraChatModel(backend=down).invoke("hello")
    rejected = FakeBackend(fail=BackendRequestError("bad", backend="tgi", status=422))
    with pytest.raises(BackendRequestError):  # a rejected request is not papered over
        MultiLoraChatModel(backend=rejected, fallback=fallback).invoke("hello")


def test_chat_model_streams_and_never_passes_a_cut_stream_off() -> None:
    model = MultiLoraChatModel(backend=FakeBackend())
    chunks = list(model.stream("hello", adapters=[("formal", 1)]))
    assert "".join(str(c.content) for c in chunks) == "reply via formal"
    final = chunks[0]
    for chunk in chunks[1:]:
        final = final + chunk
    assert final.response_metadata["adapters"] == [["formal", 1.0]]
    assert final.usage_metadata is not None and final.usage_metadata["total_tokens"] == 7
    cut = MultiLoraChatModel(
        backend=FakeBackend(cut=True), fallback=FakeListChatModel(responses=["x"])
    )
    with pytest.raises(BackendStreamError):
        list(cut.stream("hello", adapters=[("formal", 1)]))

    async def main() -> str:
        return "".join(
            [str(c.content) async for c in model.astream("hi", adapters=[("casual", 1)])]
        )

    assert asyncio.run(main()) == "reply via casual"


def test_chat_model_over_tgi_end_to_end(tgi_server: StandIn, sleeps: Sleeps) -> None:
    model = MultiLoraChatModel(backend=tgi(tgi_server, sleeps), max_new_tokens=20, n=2)
    result = model.generate([[HumanMessage("hi")]], adapters=[("formal", 0.7), ("kb", 0.3)])
    generations = result.generations[0]
    assert [g.text for g in generations] == ["reply from formal-kb"] * 2
    meta = generations[0].message.response_metadata
    assert meta["served_by"] == "premerged" and meta["adapters"] == [["formal-kb", 1.0]]
    assert meta["requested_adapters"] == [["formal", 0.7], ["kb", 0.3]]
    streamed = "".join(str(c.content) for c in model.stream("hi", adapters=[("casual", 1)]))
    assert streamed == "reply from casual"
    tgi_server.then({"cut_after": 1})
    with pytest.raises(BackendStreamError):
        list(model.stream("hi"))


def test_backend_error_types_share_a_base() -> None:
    for cls in (AdapterNotServedError, BackendRequestError, BackendUnavailableError):
        assert issubclass(cls, BackendError)
    assert issubclass(BackendStreamError, BackendError)


# -- answers off the spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": "nope"},
        {"choices": [1, 2]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "message": "text"}]},
        {"choices": [{"index": None, "text": None}]},
    ],
)
def test_vllm_answers_off_the_spec_are_protocol_errors(
    vllm_server: StandIn, sleeps: Sleeps, body: dict[str, Any]
) -> None:
    backend = vllm(vllm_server, sleeps)
    vllm_server.then({"malformed": body})
    request = chat() if "message" in str(body) else prompt()
    with pytest.raises(BackendProtocolError, match="documented shape"):
        backend.generate(request)


@pytest.mark.parametrize(
    "body", [{}, {"generated_text": None}, {"generated_text": 5}, [1, 2], "text"]
)
def test_lorax_answers_off_the_spec_are_protocol_errors(
    lorax_server: StandIn, sleeps: Sleeps, body: Any
) -> None:
    backend = lorax(lorax_server, sleeps)
    lorax_server.then({"malformed": body})
    with pytest.raises(BackendProtocolError):
        backend.generate(prompt())


def test_tgi_content_null_is_no_reply(tgi_server: StandIn, sleeps: Sleeps) -> None:
    backend = tgi(tgi_server, sleeps)
    null = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "tgi",
        "system_fingerprint": "3.3.0",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
    }
    tgi_server.then({"malformed": null})
    with pytest.raises(BackendProtocolError, match="content: null"):
        backend.generate(chat())


# -- users' own adapters (slow adaptation), loaded at run time -----------------------------


def _own_adapter(tmp_path: Path, user: str) -> tuple[LoraHub, str, Path]:
    owned = OwnedCards(tmp_path / "owned")
    card = {
        "id": owned_id(user, "adapter"),
        "base_model": "base-model",
        "description": "How this user likes to be answered.",
        "kind": "preference",
        "rank": 4,
        "target_modules": ["q_proj", "v_proj"],
        "owner": user,
    }
    version = owned.add_version(
        user,
        "adapter",
        card,
        write_model=Path.mkdir,
        model_suffix="",
        promote=True,
        versioned_id=True,
    )
    own = f"{owned_id(user, 'adapter')}-v{version}"
    return LoraHub(tmp_path / "lora", owned=owned), own, owned.folder(user, "adapter") / "v1"


def test_vllm_loads_a_users_own_adapter_at_run_time_for_that_user_alone(
    vllm_server: StandIn, sleeps: Sleeps, tmp_path: Path
) -> None:
    hub, own, folder = _own_adapter(tmp_path, "ana")
    backend = vllm(vllm_server, sleeps, allow_runtime_loading=True, lora_hub=hub)
    assert backend.serves_owned_adapters
    chat = MultiLoraChatModel(backend=backend, retriever=LoraRetriever(hub))
    reply = chat.invoke("hi", persona=Persona.new("ana"))
    assert vllm_server.paths() == ["/v1/load_lora_adapter", "/v1/chat/completions"]
    assert vllm_server.calls[0].body == {"lora_name": own, "lora_path": str(folder)}
    assert reply.content == f"reply from {own}"
    assert chat.invoke("hi", persona=Persona.new("bob")).content == "reply from base"
    chat.invoke("hi again", persona=Persona.new("ana"))
    assert vllm_server.paths().count("/v1/load_lora_adapter") == 1  # loaded once


def test_vllm_without_runtime_updates_serves_the_user_without_their_own_adapter(
    sleeps: Sleeps, tmp_path: Path
) -> None:
    server = StandIn("vllm", None, runtime_updates=False)
    try:
        hub, _, _ = _own_adapter(tmp_path, "ana")
        backend = server.track(
            VLLMBackend(
                server.url,
                model="base-model",
                retry=policy(sleeps),
                allow_runtime_loading=True,
                lora_hub=hub,
            )
        )
        chat = MultiLoraChatModel(backend=backend, retriever=LoraRetriever(hub))
        reply = chat.invoke("hi", persona=Persona.new("ana"))
        assert reply.content == "reply from base"  # not an error: served without it
        assert server.paths() == ["/v1/load_lora_adapter", "/v1/chat/completions"]
        assert backend.serves_owned_adapters is False  # learned once
        chat.invoke("hi", persona=Persona.new("ana"))
        assert server.paths().count("/v1/load_lora_adapter") == 1
        with pytest.raises(AdapterNotServedError, match="does not allow runtime LoRA updates"):
            VLLMBackend(
                server.url,
                model="base-model",
                retry=policy(sleeps),
                allow_runtime_loading=True,
                paths={"kb": "/loras/kb"},
            ).generate(prompt(adapters=[("kb", 1.0)]))
    finally:
        server.close()
    assert server.problems == []


def test_lorax_sends_a_users_own_adapter_as_its_local_folder(
    lorax_server: StandIn, sleeps: Sleeps, tmp_path: Path
) -> None:
    hub, own, folder = _own_adapter(tmp_path, "ana")
    backend = lorax(lorax_server, sleeps, adapters=["formal"], lora_hub=hub)
    assert backend.serves_owned_adapters
    chat = MultiLoraChatModel(backend=backend, retriever=LoraRetriever(hub))
    reply = chat.invoke("hi", persona=Persona.new("ana"))
    params = lorax_server.calls[-1].body["parameters"]
    assert (params["adapter_id"], params["adapter_source"]) == (str(folder), "local")
    assert reply.content == f"reply from {folder}"
    assert reply.response_metadata["adapters"] == [[own, 1.0]]
    assert chat.invoke("hi", persona=Persona.new("bob")).content == "reply from base"
