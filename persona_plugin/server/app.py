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
  ``persona-echo`` is the offline :class:`~persona_plugin.chat_models.registry.EchoChatModel`.
* **Auth**: bearer tokens, each granted a list of users and/or a tenant (a tenant token
  acts on user ids ``<tenant>:...``). Unknown or missing token: 401; a user the token
  does not own: 403. The persona routes (``/v1/personas/{user_id}``, ``/history``,
  ``/export``, ``DELETE``, and the writes: ``PUT``, ``PATCH``, ``/rollback`` with
  ``If-Match`` compare-and-set, :mod:`~persona_plugin.server.persona_writes`) sit behind
  the same auth.
* **Errors**: OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, never
  a traceback.

``create_app_from_settings()`` builds the store, memory, model and tokens from
``PERSONA_*`` settings (tokens: ``PERSONA_SERVER_TOKENS``, JSON); ``persona serve`` runs
it with uvicorn.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from langchain_core.runnables import RunnableConfig
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from persona_plugin.config import Settings
from persona_plugin.errors import (
    PersonaConfigError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.interactions import TurnNotFoundError, TurnOwnedElsewhereError
from persona_plugin.persona import validate_user_id
from persona_plugin.prompt import token_counter_for
from persona_plugin.server.auth import Authenticated, TokenGrant, parse_tokens
from persona_plugin.server.errors import (
    OpenAIError,
    _bad,
    _deadline_passed,
    _from_persona_error,
    _model_not_found,
    _validation_error,
)
from persona_plugin.server.persona_writes import add_persona_write_routes
from persona_plugin.server.protocol import (
    _CREATED,
    PARAMS_KEY,
    USER_HEADER,
    ChatCompletionRequest,
    FeedbackRequest,
    _check_supported,
    _finish_reason,
    _params_aware,
    _read_json,
    to_langchain_messages,
)
from persona_plugin.server.streaming import _Run, _stream_response

log = logging.getLogger(__name__)

#: the model name that asks the server to route the user to the model they prefer
AUTO_MODEL = "auto"
DEFAULT_MODEL = "persona-echo"


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
    request_timeout: float = 120.0,
    max_concurrent_per_model: int = 16,
    adaptation: Any = None,
    **graph_options: Any,
) -> FastAPI:
    """The OpenAI-compatible persona server.

    Either pass a compiled persona ``graph`` (from ``build_persona_graph``; its models are
    served under their names, or its chat model as ``default_model``), or the parts:
    ``models`` (served name -> chat model; default ``{"persona-echo": EchoChatModel()}``),
    ``store`` (default from ``settings``), ``memory`` (default none), ``reflector`` and
    further ``graph_options`` for :class:`~persona_plugin.graph.PersonaGraph`.
    ``tokens`` maps bearer tokens to grants (``{"users": [...]}``, ``{"tenant": "acme"}``);
    default ``settings.server_tokens``. A chat completion (streamed or not) has
    ``request_timeout`` seconds in all (then a 504, which clients retry), and at most
    ``max_concurrent_per_model`` run at
    once per served model (the rest wait, within their deadline): a hung upstream ties up
    that many worker threads, never the ones the health and persona routes answer from.
    The app takes over the graph: it registers its
    models to accept per-request sampling parameters, and its shutdown drains pending
    background reflections (``graph.close()``). ``adaptation``: an
    :class:`~persona_plugin.adaptation.schedule.AdaptationScheduler` the app runs in the
    background while it serves (slow adaptation, off the request path).
    """
    from persona_plugin.chat_models.registry import EchoChatModel
    from persona_plugin.graph import build_persona_graph

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
            options.setdefault("debounce_s", settings.reflection_debounce_s)
        graph = build_persona_graph(
            served[default_model],
            store=store,
            memory=memory,
            reflector=reflector,
            reflection=reflection,
            models=served,
            **options,
        )
    else:
        served = dict(graph.models) or {default_model: graph.chat_model}
    nodes = graph
    nodes.models = {name: _params_aware(model, name) for name, model in served.items()}
    counters = {name: token_counter_for(model) for name, model in served.items()}
    limits = {
        "max_message_chars": nodes.max_message_chars,
        "max_messages": max_messages,
        "max_total_chars": max_total_chars,
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if nodes.background is not None and nodes.reflection != "off":
            # resume what an earlier process left queued (a crash, a restart)
            nodes.background.start()
        if adaptation is not None:
            adaptation.start()
        try:
            yield
        finally:
            if adaptation is not None:
                await anyio.to_thread.run_sync(adaptation.stop, close_timeout)
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

    # one limiter per served model: its requests run on threads of their own allowance
    limiters = {name: anyio.CapacityLimiter(max_concurrent_per_model) for name in served}
    app.state.limiters, app.state.request_timeout = limiters, request_timeout

    @app.get("/health")
    async def health() -> dict[str, Any]:  # async: no worker thread, so never starved
        return {"status": "ok", "models": len(served)}

    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": _CREATED, "owned_by": "persona-plugin"}

    routed = getattr(nodes, "router", None) is not None
    listed = [*served, *([AUTO_MODEL] if routed else [])]

    @app.get("/v1/models")
    def list_models(_grant: Authenticated) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in listed]}

    @app.get("/v1/models/{model}")
    def get_model(model: str, _grant: Authenticated) -> dict[str, Any]:
        if model not in listed:
            raise _model_not_found(model)
        return _model_card(model)

    def _routed(user_id: str) -> dict[str, Any]:
        """The router's pick for ``model: "auto"`` (the user's persona: their stated models)."""
        try:
            persona = nodes.store.get(user_id)
        except PersonaNotFoundError:
            persona = None
        return nodes.router.route(user_id, persona).to_metadata()

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
        route = None
        if req.model == AUTO_MODEL and routed:
            route = await anyio.to_thread.run_sync(_routed, user_id)
            req = req.model_copy(update={"model": route["model"]})
        if req.model not in served:
            raise _model_not_found(req.model)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        config: RunnableConfig = {
            "configurable": {
                "user_id": user_id,
                "model": req.model,
                "reflection": reflection,
                "turn_id": completion_id,
                # an OpenAI request carries its whole conversation: it is a thread of its
                # own (a graph with a checkpointer would otherwise refuse it)
                "thread_id": completion_id,
                PARAMS_KEY: req.sampling_params(),
                **({"route": route} if route is not None else {}),
            },
            "run_name": "persona_openai_chat",
        }
        run = _Run(graph, {"messages": messages}, config, counters[req.model])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream_response(
                run,
                completion_id,
                req.model,
                include_usage,
                timeout=request_timeout,
                limiter=limiters[req.model],
            )
        try:
            with anyio.fail_after(request_timeout):
                state = await anyio.to_thread.run_sync(
                    run.invoke, limiter=limiters[req.model], abandon_on_cancel=True
                )
        except TimeoutError:
            # the worker may still be waiting on the upstream; the client is answered now
            raise _deadline_passed(request_timeout) from None
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
            # which model a "model": "auto" request was routed to, and why (an extension)
            **({"persona_route": route} if route is not None else {}),
        }

    @app.post("/v1/feedback")
    async def record_feedback(request: Request, grant: Authenticated) -> dict[str, Any]:
        """Feedback on a turn: ``rating`` (+1/-1, ``comment``), ``edit`` (``text``: the
        corrected reply), ``regenerate``, ``choice`` (the index of an MBR candidate). The
        turn id is the completion's ``id``."""
        body = await _read_json(request, max_body_bytes)
        try:
            req = FeedbackRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc.errors(include_url=False)) from None
        user_id = req.user or request.headers.get(USER_HEADER)
        if not user_id:
            raise _bad(
                f"Missing required parameter: 'user' (or the {USER_HEADER} header).",
                "user",
                "missing_required_parameter",
            )
        authorize(grant, user_id, "user")
        if nodes.interactions is None:
            raise OpenAIError(404, "This server keeps no interaction log.", type="not_found_error")
        fields = req.model_dump(include={"rating", "comment", "text", "choice"})
        try:
            event = await anyio.to_thread.run_sync(
                lambda: nodes.record_feedback(user_id, req.turn_id, req.kind, **fields)
            )
        except TurnOwnedElsewhereError:
            raise OpenAIError(
                403,
                f"Turn {req.turn_id!r} is not one of {user_id!r}'s turns.",
                type="permission_error",
                param="turn_id",
                code="turn_not_owned",
            ) from None
        except TurnNotFoundError as exc:
            raise OpenAIError(
                404, str(exc), type="not_found_error", param="turn_id", code="turn_not_found"
            ) from None
        except PersonaValidationError as exc:
            raise _from_persona_error(exc) from None
        return {"object": "feedback", **event.model_dump(mode="json")}

    # -- persona routes -------------------------------------------------------------------

    @app.get("/v1/personas/{user_id}")
    def get_persona(user_id: str, grant: Authenticated, response: Response) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        try:
            persona = nodes.store.get(user_id)
        except PersonaNotFoundError as exc:
            raise _from_persona_error(exc) from None
        # the version to send back in If-Match with a change (persona_writes)
        response.headers["ETag"] = f'"{persona.meta.version}"'
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
        try:
            data = graph.export(user_id)
        except PersonaNotFoundError as exc:
            raise _from_persona_error(exc) from None
        return json.loads(json.dumps(data, default=str))

    add_persona_write_routes(app, graph=graph, authorize=authorize, max_body_bytes=max_body_bytes)

    @app.delete("/v1/personas/{user_id}")
    def delete_persona(user_id: str, grant: Authenticated) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        gone = graph.forget(user_id)
        if not gone:
            raise _from_persona_error(
                PersonaNotFoundError(f"user '{user_id}' has no persona to delete.")
            )
        versions, memory_items = gone.versions, gone.memory_items
        return {
            "object": "persona.deleted",
            "user_id": user_id,
            "deleted": True,
            "versions": versions,
            "memory_items": memory_items,
            "threads": gone.threads,
        }

    return app


# -- from settings ------------------------------------------------------------------------


def served_models_from_settings(settings: Settings) -> dict[str, Any]:
    """``persona-echo`` always; the configured ``PERSONA_CHAT_MODEL`` (if not echo) under
    its full name (``openai:gpt-4o-mini``) and its bare name (``gpt-4o-mini``), first."""
    from persona_plugin.chat_models.registry import EchoChatModel, resolve_chat_model

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
    from persona_plugin.memory.long_term import LongTermMemory
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
    adaptation = None
    if settings.adapt_interval_s:
        from persona_plugin.adaptation.schedule import AdaptationScheduler
        from persona_plugin.interactions import InteractionLog
        from persona_plugin.preferences.hub import PreferenceHub

        adaptation = AdaptationScheduler(
            store=store,
            log=InteractionLog.on(store),
            hub=PreferenceHub.from_settings(settings),
            interval_s=settings.adapt_interval_s,
            min_pairs=settings.adapt_min_pairs,
        )
    return create_app(
        models=models,
        store=store,
        memory=memory,
        settings=settings,
        tokens=tokens,
        default_model=next(iter(models)),
        reflection=reflection,
        close_resources=store.close,
        request_timeout=settings.server_request_timeout,
        max_concurrent_per_model=settings.server_max_concurrent,
        adaptation=adaptation,
        routing=settings.routing,
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
