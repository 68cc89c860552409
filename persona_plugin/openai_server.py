"""An OpenAI-compatible persona server: point an existing chat app at it, unchanged.

``create_app(...)`` returns a FastAPI app that speaks OpenAI's Chat Completions API
(``POST /v1/chat/completions``, non-streaming and SSE streaming, ``GET /v1/models``) and
runs every request through the persona graph (:func:`persona_plugin.graph.build_persona_graph`):
the persona of the request's user is loaded, recalled memory and the assembled persona
are merged into the app's system message, the configured upstream chat model answers,
and reflection updates the persona in the background after the reply has gone.

* **Whose persona**: the request's ``user`` field, or the ``X-Persona-User`` header.
* **Conversation**: the app sends the whole history in ``messages`` (no server-side
  thread state); the app's system message stays first with the persona block after it.
* **Models**: the names in ``GET /v1/models`` map to configured chat models;
  ``persona-echo`` is the offline :class:`~persona_plugin.models.EchoChatModel`.
* **Auth**: bearer tokens, each granted a list of users and/or a tenant (a tenant token
  acts on user ids ``<tenant>:...``). Unknown or missing token: 401; a user the token
  does not own: 403. The persona routes (``/v1/personas/{user_id}``, ``/history``,
  ``/export``, ``DELETE``) sit behind the same auth.
* **Errors**: OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, never
  a traceback.

``create_app_from_settings()`` builds the store, memory, model and tokens from
``PERSONA_*`` settings (tokens: ``PERSONA_SERVER_TOKENS``, JSON); ``persona serve`` runs
it with uvicorn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, closing
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.runnables import RunnableConfig, RunnableLambda
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from persona_plugin.config import Settings
from persona_plugin.errors import (
    PersonaConfigError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import validate_user_id
from persona_plugin.prompt import token_counter_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "persona-echo"
USER_HEADER = "X-Persona-User"
#: key under config["configurable"] carrying the request's sampling parameters
PARAMS_KEY = "persona_openai_params"
#: OpenAI sampling parameters passed on to the upstream model (bound per request)
PASSED_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
_CREATED = int(time.time())


# -- errors -------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _bad(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _from_persona_error(exc: Exception) -> OpenAIError:
    """A graph or store error as the client should see it (no traceback, no internals)."""
    if isinstance(exc, PersonaValidationError):
        param = exc.path.split("[", 1)[0].split(".", 1)[0] or None
        return _bad(f"{exc.problem}. {exc.hint}", param if param != "user_id" else "user")
    if isinstance(exc, PersonaNotFoundError):
        return OpenAIError(404, str(exc), type="not_found_error", code="persona_not_found")
    log.error("persona server request failed", exc_info=exc)
    return OpenAIError(
        500,
        "The persona server failed to produce a reply; the server log has the details.",
        type="server_error",
        code="internal_error",
    )


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(errors: list[Any]) -> OpenAIError:
    first = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _loc_param(tuple(first.get("loc") or ()))
    kind = str(first.get("type") or "")
    if kind == "json_invalid":
        return _bad(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
            "invalid_json",
        )
    if kind == "missing":
        return _bad(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = str(first.get("msg") or "invalid value")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    where = f"'{param}'" if param else "the request body"
    return _bad(f"Invalid value for {where}: {msg}.", param, code)


# -- tokens -------------------------------------------------------------------------------


class TokenGrant(BaseModel):
    """What one bearer token may act on: listed users, and/or a tenant's users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: frozenset[str] = Field(default_factory=frozenset)
    tenant: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]{0,63}$")

    def allows(self, user_id: str) -> bool:
        if user_id in self.users:
            return True
        prefix = f"{self.tenant}:" if self.tenant else None
        return prefix is not None and user_id.startswith(prefix) and len(user_id) > len(prefix)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_tokens(tokens: Mapping[str, Any] | None) -> dict[str, TokenGrant]:
    """The grants by token digest; a malformed configuration is a PersonaConfigError."""
    grants: dict[str, TokenGrant] = {}
    for index, (token, spec) in enumerate((tokens or {}).items()):
        where = f"server token #{index + 1}"
        if not isinstance(token, str) or len(token) < 8 or token != token.strip():
            raise PersonaConfigError(
                f"{where} is not a usable bearer token: use at least 8 characters without "
                "surrounding spaces (PERSONA_SERVER_TOKENS)."
            )
        try:
            grant = spec if isinstance(spec, TokenGrant) else TokenGrant.model_validate(spec)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise PersonaConfigError(
                f"{where}: {'.'.join(map(str, err['loc'])) or 'grant'}: {err['msg']}. A grant "
                'is {"users": ["alice", ...]} and/or {"tenant": "acme"} (PERSONA_SERVER_TOKENS).'
            ) from None
        if not grant.users and not grant.tenant:
            raise PersonaConfigError(f"{where} grants nothing: give it users or a tenant.")
        for user in grant.users:
            try:
                validate_user_id(user, source=f"{where} users")
            except PersonaValidationError as exc:
                raise PersonaConfigError(str(exc)) from None
        grants[_digest(token)] = grant
    return grants


async def authenticate(request: Request) -> TokenGrant:
    """The grant of the request's bearer token (401 if missing or unknown)."""
    grants: dict[str, TokenGrant] = request.app.state.grants
    header = request.headers.get("authorization")
    if not header:
        raise OpenAIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <token>'.",
            type="authentication_error",
            code="missing_api_key",
        )
    scheme, _, token = header.partition(" ")
    grant = grants.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
    if grant is None:
        raise OpenAIError(
            401,
            "Incorrect API key provided.",
            type="authentication_error",
            code="invalid_api_key",
        )
    return grant


Authenticated = Annotated[TokenGrant, Depends(authenticate)]


# -- the request --------------------------------------------------------------------------


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The part of OpenAI's request this server reads; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def sampling_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name in PASSED_PARAMS:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.max_completion_tokens is not None and "max_tokens" not in params:
            params["max_tokens"] = self.max_completion_tokens
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        return params


_ROLES = ("system", "developer", "user", "assistant")


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(
                    f"Invalid content part type {kind!r} in '{param}[{index}]': the persona "
                    "server accepts text parts only.",
                    f"{param}[{index}].type",
                )
            if not isinstance(part.get("text"), str):
                raise _bad(
                    f"'{param}[{index}].text' must be a string.",
                    f"{param}[{index}].text",
                    "invalid_type",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None:
        raise _bad(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    raise _bad(f"'{param}' must be a string or a list of text parts.", param, "invalid_type")


def to_langchain_messages(
    messages: list[dict[str, Any]],
    *,
    max_message_chars: int,
    max_messages: int,
    max_total_chars: int,
) -> list[BaseMessage]:
    """OpenAI messages as LangChain messages; every problem is a 400 naming the param."""
    if len(messages) > max_messages:
        raise _bad(
            f"'messages' has {len(messages)} messages, over the cap of {max_messages}.",
            "messages",
            "too_many_messages",
        )
    out: list[BaseMessage] = []
    total = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object.", where, "invalid_type")
        role = message.get("role")
        if role is None:
            raise _bad(
                f"Missing required parameter: '{where}.role'.",
                f"{where}.role",
                "missing_required_parameter",
            )
        if (
            role in ("tool", "function")
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            raise _bad(
                f"'{where}': tool and function calls are not supported by the persona server.",
                f"{where}.role",
                "unsupported_value",
            )
        if role not in _ROLES:
            raise _bad(
                f"Invalid value for '{where}.role': {role!r}. Supported values are: "
                + ", ".join(f"'{r}'" for r in _ROLES)
                + ".",
                f"{where}.role",
            )
        text = _content_text(message.get("content"), f"{where}.content")
        if not text.strip():
            raise _bad(
                f"Invalid value for '{where}.content': the message is empty.",
                f"{where}.content",
                "empty_content",
            )
        if len(text) > max_message_chars:
            raise _bad(
                f"'{where}.content' is {len(text)} characters, over the cap of "
                f"{max_message_chars}.",
                f"{where}.content",
                "string_above_max_length",
            )
        total += len(text)
        if total > max_total_chars:
            raise _bad(
                f"'messages' hold more than {max_total_chars} characters in all; send a "
                "shorter history.",
                "messages",
                "string_above_max_length",
            )
        name = message.get("name")
        kwargs: dict[str, Any] = {"name": name} if isinstance(name, str) and name else {}
        if role in ("system", "developer"):
            out.append(SystemMessage(content=text, **kwargs))
        elif role == "user":
            out.append(HumanMessage(content=text, **kwargs))
        else:
            out.append(AIMessage(content=text, **kwargs))
    if not isinstance(out[-1], HumanMessage):
        raise _bad(
            "The last message must be a user message: the persona server answers the user.",
            f"messages[{len(out) - 1}].role",
        )
    return out


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.n not in (None, 1):
        raise _bad("Invalid value for 'n': the persona server returns 1 choice.", "n")
    if req.tools or req.functions:
        param = "tools" if req.tools else "functions"
        raise _bad(
            f"'{param}' are not supported by the persona server.", param, "unsupported_parameter"
        )
    if req.logprobs:
        raise _bad(
            "'logprobs' are not supported by the persona server.",
            "logprobs",
            "unsupported_parameter",
        )
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise _bad(
            "Only response_format {'type': 'text'} is supported by the persona server.",
            "response_format",
            "unsupported_value",
        )


# -- the app ------------------------------------------------------------------------------


def _params_aware(model: Any, name: str) -> Any:
    """``model`` as a runnable that binds the request's sampling parameters per call."""

    def call(messages: list[BaseMessage], config: RunnableConfig) -> Any:
        params = (config.get("configurable") or {}).get(PARAMS_KEY) or {}
        bound = model.bind(**params) if params else model
        return bound.invoke(messages, config)

    return RunnableLambda(call, name=f"upstream {name}")


def _usage(
    reply: BaseMessage, prompt_texts: list[str], counter: Callable[[str], int]
) -> dict[str, int]:
    usage = getattr(reply, "usage_metadata", None) or {}
    if isinstance(usage.get("input_tokens"), int) and isinstance(usage.get("output_tokens"), int):
        prompt, completion = usage["input_tokens"], usage["output_tokens"]
    else:  # the upstream model did not report usage: count the texts
        prompt = sum(counter(text) for text in prompt_texts if text)
        completion = counter(reply.text) if reply.text else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(reply: BaseMessage) -> str:
    reason = (getattr(reply, "response_metadata", None) or {}).get("finish_reason")
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(
    graph: Any = None,
    *,
    models: Mapping[str, Any] | None = None,
    store: Any = None,
    memory: Any = None,
    reflector: Any = None,
    settings: Settings | None = None,
    tokens: Mapping[str, Any] | None = None,
    default_model: str = DEFAULT_MODEL,
    reflection: Literal["background", "inline", "every_n_turns", "off"] = "background",
    max_messages: int = 500,
    max_total_chars: int = 400_000,
    max_body_bytes: int = 4 * 1024 * 1024,
    close_timeout: float | None = 60.0,
    close_resources: Callable[[], None] | None = None,
    **graph_options: Any,
) -> FastAPI:
    """The OpenAI-compatible persona server.

    Either pass a compiled persona ``graph`` (from ``build_persona_graph``; its models are
    served under their names, or its chat model as ``default_model``), or the parts:
    ``models`` (served name -> chat model; default ``{"persona-echo": EchoChatModel()}``),
    ``store`` (default from ``settings``), ``memory`` (default none), ``reflector`` and
    further ``graph_options`` for :class:`~persona_plugin.graph.PersonaGraph`.
    ``tokens`` maps bearer tokens to grants (``{"users": [...]}``, ``{"tenant": "acme"}``);
    default ``settings.server_tokens``. The app takes over the graph: it registers its
    models to accept per-request sampling parameters, and its shutdown drains pending
    background reflections (``graph.persona.close()``).
    """
    from persona_plugin.graph import build_persona_graph
    from persona_plugin.models import EchoChatModel

    if tokens is None:
        settings = settings or Settings.load()
        tokens = settings.server_tokens
    grants = parse_tokens(tokens)
    if not grants:
        raise PersonaConfigError(
            "the persona server has no bearer tokens configured, so it would refuse every "
            'request. Set PERSONA_SERVER_TOKENS, e.g. {"<token>": {"users": ["alice"]}}.'
        )

    if graph is None:
        served = dict(models or {DEFAULT_MODEL: EchoChatModel()})
        if not served:
            raise PersonaConfigError("the persona server needs at least one model.")
        if default_model not in served:
            default_model = next(iter(served))
        if store is None:
            from persona_plugin.store import PersonaStore

            store = PersonaStore.from_settings(settings or Settings.load())
        options = dict(graph_options)
        if "assembler" not in options and settings is not None:
            from persona_plugin.prompt import PromptAssembler

            options["assembler"] = PromptAssembler.from_settings(
                settings, token_counter=token_counter_for(served[default_model])
            )
        if settings is not None:
            options.setdefault("short_term_window", settings.short_term_window)
        graph = build_persona_graph(
            served[default_model],
            store=store,
            memory=memory,
            reflector=reflector,
            reflection=reflection,
            **options,
        )
    else:
        served = dict(graph.persona.models) or {default_model: graph.persona.chat_model}
    nodes = graph.persona
    nodes.models = {name: _params_aware(model, name) for name, model in served.items()}
    counters = {name: token_counter_for(model) for name, model in served.items()}
    limits = {
        "max_message_chars": nodes.max_message_chars,
        "max_messages": max_messages,
        "max_total_chars": max_total_chars,
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            finished = await anyio.to_thread.run_sync(nodes.close, close_timeout)
            if not finished:
                log.warning("shutdown: background reflections still running after the timeout")
            if close_resources is not None:
                close_resources()

    app = FastAPI(
        title="persona-plugin OpenAI-compatible server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.graph = graph
    app.state.grants = grants
    app.state.models = served

    # -- error handlers -------------------------------------------------------------------

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        error = OpenAIError(
            exc.status_code,
            str(exc.detail) if exc.status_code not in codes else f"{exc.detail}.",
            code=codes.get(exc.status_code),
        )
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _from_persona_error(exc).response()

    # -- auth -----------------------------------------------------------------------------

    def authorize(grant: TokenGrant, user_id: Any, param: str | None) -> str:
        try:
            validate_user_id(user_id)
        except PersonaValidationError as exc:
            raise _bad(f"Invalid user id {user_id!r}: {exc.hint}", param, "invalid_user") from None
        if not grant.allows(user_id):
            raise OpenAIError(
                403,
                f"This API key may not act on user '{user_id}'.",
                type="permission_error",
                param=param,
                code="user_not_permitted",
            )
        return user_id

    # -- routes ---------------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(served)}

    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": _CREATED, "owned_by": "persona-plugin"}

    @app.get("/v1/models")
    def list_models(_grant: Authenticated) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in served]}

    @app.get("/v1/models/{model}")
    def get_model(model: str, _grant: Authenticated) -> dict[str, Any]:
        if model not in served:
            raise _model_not_found(model)
        return _model_card(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, grant: Authenticated) -> Any:
        body = await _read_json(request, max_body_bytes)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc.errors(include_url=False)) from None
        _check_supported(req)
        messages = to_langchain_messages(req.messages, **limits)
        header_user = request.headers.get(USER_HEADER)
        if req.user and header_user and req.user != header_user:
            raise _bad(
                f"'user' ({req.user!r}) and the {USER_HEADER} header ({header_user!r}) name "
                "different users.",
                "user",
            )
        user_id = req.user or header_user
        if not user_id:
            raise _bad(
                f"Missing required parameter: 'user' (or the {USER_HEADER} header): the "
                "persona server needs to know whose persona to use.",
                "user",
                "missing_required_parameter",
            )
        authorize(grant, user_id, "user")
        if req.model not in served:
            raise _model_not_found(req.model)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        config: RunnableConfig = {
            "configurable": {
                "user_id": user_id,
                "model": req.model,
                "reflection": reflection,
                "turn_id": completion_id,
                PARAMS_KEY: req.sampling_params(),
            },
            "run_name": "persona_openai_chat",
        }
        run = _Run(graph, {"messages": messages}, config, counters[req.model])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream_response(run, completion_id, req.model, include_usage)
        try:
            state = await anyio.to_thread.run_sync(run.invoke)
        except OpenAIError:
            raise
        except Exception as exc:
            raise _from_persona_error(exc) from None
        reply = state["messages"][-1]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish_reason(reply),
                }
            ],
            "usage": run.usage(reply, state.get("system_prompt")),
            "system_fingerprint": None,
        }

    # -- persona routes -------------------------------------------------------------------

    @app.get("/v1/personas/{user_id}")
    def get_persona(user_id: str, grant: Authenticated) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        try:
            persona = nodes.store.get(user_id)
        except PersonaNotFoundError as exc:
            raise _from_persona_error(exc) from None
        return {
            "object": "persona",
            "user_id": user_id,
            "version": persona.meta.version,
            "document": persona.to_dict(),
        }

    @app.get("/v1/personas/{user_id}/history")
    def get_history(
        user_id: str,
        grant: Authenticated,
        limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    ) -> dict[str, Any]:
        """The persona's versions, oldest first (``limit``: only the newest that many)."""
        authorize(grant, user_id, "user_id")
        try:
            records = nodes.store.history(user_id)
        except PersonaNotFoundError as exc:
            raise _from_persona_error(exc) from None
        if limit is not None:
            records = records[-limit:]
        return {
            "object": "list",
            "user_id": user_id,
            "data": [r.model_dump(mode="json", exclude={"persona"}) for r in records],
        }

    @app.get("/v1/personas/{user_id}/export")
    def export_persona(user_id: str, grant: Authenticated) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        items = nodes.memory.get(user_id) if nodes.memory is not None else []
        try:
            data = nodes.store.export(user_id)
        except PersonaNotFoundError as exc:
            if not items:
                raise _from_persona_error(exc) from None
            data = {"user_id": user_id, "versions": []}
        data["memory"] = [item.model_dump(mode="json") for item in items]
        return json.loads(json.dumps(data, default=str))

    @app.delete("/v1/personas/{user_id}")
    def delete_persona(user_id: str, grant: Authenticated) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        # a reflection still queued for this user would re-create the persona after the
        # delete: run it first (other users' keep their debounce)
        if not nodes.background.drain(close_timeout, user_id=user_id):
            log.warning("delete of %s: background reflections still running", user_id)
        memory_items = nodes.memory.delete_user(user_id) if nodes.memory is not None else 0
        try:
            versions = nodes.store.delete(user_id)
        except PersonaNotFoundError as exc:
            if not memory_items:
                raise _from_persona_error(exc) from None
            versions = 0
        return {
            "object": "persona.deleted",
            "user_id": user_id,
            "deleted": True,
            "versions": versions,
            "memory_items": memory_items,
        }

    return app


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def _read_json(request: Request, max_bytes: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
            "invalid_json",
        ) from None


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is over the cap of {max_bytes} bytes.",
        param="messages",
        code="request_too_large",
    )


# -- running the graph --------------------------------------------------------------------


class _ClientGoneError(Exception):
    """Raised into the upstream model's token stream when the client has gone."""


class _StopWhenGone(BaseCallbackHandler):
    """Aborts the upstream model at its next token once ``stop`` is set."""

    raise_error = True  # else the callback manager would swallow the abort
    run_inline = True

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.stop.is_set():
            raise _ClientGoneError("the client closed the stream")


class _Run:
    """One request's run of the persona graph, whole or streamed from a worker thread."""

    def __init__(
        self,
        graph: Any,
        graph_input: dict[str, Any],
        config: RunnableConfig,
        counter: Callable[[str], int],
    ) -> None:
        self.graph = graph
        self.input = graph_input
        self.config = config
        self.counter = counter

    def invoke(self) -> dict[str, Any]:
        return self.graph.invoke(self.input, self.config)

    def usage(self, reply: BaseMessage, system_prompt: str | None) -> dict[str, int]:
        texts = [m.text for m in self.input["messages"]]
        return _usage(reply, [system_prompt or "", *texts], self.counter)

    def stream(self, emit: Callable[[tuple[str, Any]], None], stop: threading.Event) -> None:
        """Drive the graph; emit ("token", text) ... then ("done", (reply, prompt)) or error."""
        reply: BaseMessage | None = None
        system_prompt: str | None = None
        streamed = False
        config: RunnableConfig = {
            **self.config,
            "callbacks": [*(self.config.get("callbacks") or []), _StopWhenGone(stop)],
        }
        try:
            events = self.graph.stream(self.input, config, stream_mode=["messages", "updates"])
            # a client gone mid-stream: the upstream model is stopped at its next token
            # (_StopWhenGone), the run at the next event
            with closing(events):
                for mode, data in events:
                    if stop.is_set():
                        return
                    if mode == "messages":
                        chunk, meta = data
                        if meta.get("langgraph_node") == "generate" and isinstance(
                            chunk, AIMessageChunk
                        ):
                            text = chunk.text
                            if text:
                                streamed = True
                                emit(("token", text))
                    elif mode == "updates":
                        for node, update in (data or {}).items():
                            if node == "assemble" and update:
                                system_prompt = update.get("system_prompt")
                            elif node == "generate" and update:
                                reply = update["messages"][-1]
                                if not streamed and reply.text:
                                    # the upstream model does not stream: one piece
                                    emit(("token", reply.text))
            if reply is None:
                raise RuntimeError("the persona graph produced no reply")
            emit(("done", (reply, system_prompt)))
        except _ClientGoneError:
            log.info("client gone mid-stream: the turn was not finished and is not kept")
        except BaseException as exc:  # handed to the response, which reports it
            emit(("error", exc))


async def _stream_response(run: _Run, completion_id: str, model: str, include_usage: bool) -> Any:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def emit(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shut down): nobody listens
            stop.set()

    worker = threading.Thread(
        target=run.stream, args=(emit, stop), name="persona-openai-stream", daemon=True
    )
    worker.start()
    try:
        first = await queue.get()
    except BaseException:  # cancelled: the client went away before the first token
        stop.set()
        raise
    if first[0] == "error":
        stop.set()
        exc = first[1]
        raise exc if isinstance(exc, OpenAIError) else _from_persona_error(exc)

    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return data

    async def events() -> AsyncIterator[str]:
        item = first
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, value = item
                if kind == "token":
                    yield _sse(chunk({"content": value}))
                elif kind == "done":
                    reply, system_prompt = value
                    yield _sse(chunk({}, _finish_reason(reply)))
                    if include_usage:
                        last = chunk({})
                        last["choices"] = []
                        last["usage"] = run.usage(reply, system_prompt)
                        yield _sse(last)
                    break
                else:
                    error = value if isinstance(value, OpenAIError) else _from_persona_error(value)
                    yield _sse(error.body())
                    break
                item = await queue.get()
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a client gone mid-stream stops the run at the next chunk

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- from settings ------------------------------------------------------------------------


def served_models_from_settings(settings: Settings) -> dict[str, Any]:
    """``persona-echo`` always; the configured ``PERSONA_CHAT_MODEL`` (if not echo) under
    its full name (``openai:gpt-4o-mini``) and its bare name (``gpt-4o-mini``), first."""
    from persona_plugin.models import EchoChatModel, resolve_chat_model

    models: dict[str, Any] = {}
    if settings.chat_model != "echo":
        model = resolve_chat_model(settings.chat_model, settings)
        models[settings.chat_model] = model
        if ":" in settings.chat_model:
            models.setdefault(settings.chat_model.split(":", 1)[1], model)
    models[DEFAULT_MODEL] = EchoChatModel()
    return models


def create_app_from_settings(
    settings: Settings | None = None, *, tokens: Mapping[str, Any] | None = None
) -> FastAPI:
    """The persona server on the configured store, memory, chat model and tokens."""
    from persona_plugin.memory import LongTermMemory
    from persona_plugin.store import PersonaStore

    settings = settings or Settings.load()
    tokens = settings.server_tokens if tokens is None else tokens
    parse_tokens(tokens)  # refuse a bad token configuration before opening anything
    if not tokens:
        raise PersonaConfigError(
            "the persona server has no bearer tokens configured, so it would refuse every "
            'request. Set PERSONA_SERVER_TOKENS, e.g. {"<token>": {"users": ["alice"]}}.'
        )
    models = served_models_from_settings(settings)
    # the echo model cannot reflect (it is no language model): every try would fail
    reflection = "off" if settings.chat_model == "echo" else "background"
    store = PersonaStore.from_settings(settings)
    memory = LongTermMemory.from_settings(settings)
    return create_app(
        models=models,
        store=store,
        memory=memory,
        settings=settings,
        tokens=tokens,
        default_model=next(iter(models)),
        reflection=reflection,
        close_resources=store.close,
    )


__all__ = [
    "DEFAULT_MODEL",
    "ChatCompletionRequest",
    "OpenAIError",
    "TokenGrant",
    "create_app",
    "create_app_from_settings",
    "parse_tokens",
    "served_models_from_settings",
]
