"""vLLM's OpenAI-compatible server with LoRA adapters (``vllm serve --enable-lora``).

An adapter is addressed as a model: ``model=<adapter name>`` on ``/v1/completions`` (a
prompt) or ``/v1/chat/completions`` (messages); ``model=<base model>`` for no adapter.
``n`` candidates come from one request.

vLLM serves one adapter per request and does not merge. A mixture is served by a
pre-merged adapter whose card's ``merge_of`` matches it, else by its heaviest adapter
(``mixture_policy`` as for TGI). When the server allows it
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and ``allow_runtime_loading=True`` here, an
adapter that is not loaded yet, a pre-merged one included, is loaded first with
``POST /v1/load_lora_adapter {lora_name, lora_path}``; and a ``merger`` (mixture -> path
of a merged adapter written on the server's disk, e.g. by the local peft backend) lets a
mixture no card lists be merged, loaded and served as such (``served_by="merged"``).
Users' own adapters (slow adaptation) are loaded the same way from their folders, found
through ``lora_hub`` by their versioned ids; whether the server allows runtime updates is
asked once (:attr:`VLLMBackend.serves_owned_adapters`), and a server that does not is
served without them.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from persona_plugin.backends._http import HttpBackend, parse_event, stream_ended_early
from persona_plugin.backends._retry import (
    Failure,
    RetryPolicy,
    acall_with_retries,
    astream_with_retries,
    call_with_retries,
    stream_with_retries,
)
from persona_plugin.backends.base import (
    MixturePolicy,
    Served,
    check_policy,
    check_streamable,
    serve_one_adapter,
)
from persona_plugin.backends.types import (
    SERVED_MERGED,
    AdapterNotServedError,
    BackendProtocolError,
    BackendRequestError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Mixture,
)
from persona_plugin.cards.owned import OWNED_PREFIX
from persona_plugin.errors import PersonaConfigError
from persona_plugin.lora.hub import mixture_matches

if TYPE_CHECKING:
    from persona_plugin.lora.hub import LoraHub

Merger = Callable[[Mixture], str]


class RuntimeUpdatesRefusedError(AdapterNotServedError):
    """The vLLM server has no runtime LoRA loading (``/v1/load_lora_adapter`` is absent)."""


class VLLMBackend(HttpBackend):
    """A vLLM server.

    ``model``: the base model's name on the server. ``adapters``: hub ids loaded there, or
    hub id -> ``lora_name``. ``premerged``: pre-merged id -> its mixture. ``paths``: hub id
    -> ``lora_path`` for loading at run time (only with ``allow_runtime_loading``).
    """

    name = "vllm"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        adapters: Mapping[str, str] | Iterable[str] = (),
        premerged: Mapping[str, Mapping[str, float] | Sequence[tuple[str, float]]] | None = None,
        paths: Mapping[str, str] | None = None,
        allow_runtime_loading: bool = False,
        merger: Merger | None = None,
        mixture_policy: MixturePolicy = "premerged_or_top",
        merge_tolerance: float = 0.05,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        lora_hub: LoraHub | None = None,
    ) -> None:
        super().__init__(
            base_url,
            retry=retry,
            headers=headers,
            api_key=api_key,
            transport=transport,
            async_transport=async_transport,
        )
        check_policy(mixture_policy, merge_tolerance)
        self.model = model
        served = dict(adapters) if isinstance(adapters, Mapping) else {a: a for a in adapters}
        self.served = served
        self.premerged = {
            k: dict(v.items() if isinstance(v, Mapping) else v)
            for k, v in (premerged or {}).items()
        }
        self.paths = dict(paths or {})
        self.allow_runtime_loading = allow_runtime_loading
        self.merger = merger
        self.mixture_policy = mixture_policy
        self.merge_tolerance = merge_tolerance
        self._load_lock = threading.Lock()
        self.loaded: dict[str, str] = {}  # hub id -> lora_name, loaded by this backend
        self.merged: set[str] = set()  # names of mixtures merged by `merger` and loaded
        # users' own adapters (slow adaptation) are found through the hub by id, and loaded
        # at run time: whether this server allows that is learned from it once
        self.lora_hub = lora_hub
        self.runtime_updates: bool | None = None

    @classmethod
    def from_hub(
        cls, hub: LoraHub, server: str, base_url: str, *, model: str | None = None, **kwargs: Any
    ) -> VLLMBackend:
        """Adapters whose cards list ``server``; every pre-merged card and every location,
        for runtime loading. ``model`` defaults to the cards' base model."""
        cards = hub.cards()
        if model is None:
            bases = {c.base_model for c in cards if server in c.servers}
            if len(bases) != 1:
                raise PersonaConfigError(
                    f"cannot tell the base model of vLLM server {server!r} from the hub "
                    f"(found {sorted(bases) or 'none'}): pass model=."
                )
            model = bases.pop()
        return cls(
            base_url,
            model=model,
            adapters=hub.served_on(server),
            premerged=hub.premerged_on(None),
            paths={c.id: c.resolved_location for c in cards},
            lora_hub=hub,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"VLLMBackend({self.base_url!r}, model={self.model!r})"

    @property
    def adapter_ids(self) -> frozenset[str]:
        ids = set(self.served) | set(self.loaded)
        if self.allow_runtime_loading:
            ids |= set(self.paths)
        return frozenset(ids - set(self.premerged))

    # -- adapters -------------------------------------------------------------------------

    def _available(self) -> dict[str, str]:
        return {**self.served, **self.loaded}

    def _path(self, adapter_id: str) -> str | None:
        """Where the server finds the adapter: a given path, or a user's own adapter's
        folder (the server must see this machine's disk, e.g. a shared volume)."""
        if adapter_id in self.paths:
            return self.paths[adapter_id]
        if self.lora_hub is not None and adapter_id.startswith(OWNED_PREFIX):
            card = self.lora_hub.owned_card(adapter_id)
            return card.resolved_location if card is not None else None
        return None

    def _loadable(self, adapter_id: str) -> bool:
        return (
            self.allow_runtime_loading
            and self.runtime_updates is not False
            and self._path(adapter_id) is not None
        )

    @property
    def serves_owned_adapters(self) -> bool:
        """Whether users' own adapters can be served: runtime loading on here, a hub to
        find them in, and a server not known to refuse runtime LoRA updates (vLLM has
        ``/v1/load_lora_adapter`` only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``;
        the first load it refuses teaches this backend so)."""
        return (
            self.allow_runtime_loading
            and self.lora_hub is not None
            and self.runtime_updates is not False
        )

    def _without_own(self, mixture: Mixture) -> Mixture:
        """``mixture`` less users' own adapters, renormalised (a server that cannot load
        them serves the rest)."""
        rest = [(a, w) for a, w in mixture if not a.startswith(OWNED_PREFIX)]
        total = sum(w for _, w in rest)
        return tuple((a, w / total) for a, w in rest) if total else ()

    def _unknown(self, ids: list[str]) -> AdapterNotServedError:
        loadable = "" if self.allow_runtime_loading else " (runtime loading is off)"
        return AdapterNotServedError(
            f"adapter(s) {', '.join(map(repr, ids))} are not loaded on the vLLM server at "
            f"{self.base_url} (loaded: {', '.join(sorted(self._available())) or 'none'}) and "
            f"cannot be loaded{loadable}. Start vLLM with --lora-modules, or allow runtime "
            "loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server, "
            "allow_runtime_loading=True and the adapter's path here).",
            backend=self.name,
        )

    def _plan(self, mixture: Mixture) -> tuple[Served, list[tuple[str, str, str]]]:
        """How to serve ``mixture``, and the adapters to load first (id, name, path)."""
        available = self._available()
        if len(mixture) > 1 and self.mixture_policy != "top":
            wanted = dict(mixture)
            for merged_id, weights in self.premerged.items():
                if not mixture_matches(wanted, weights, tolerance=self.merge_tolerance):
                    continue
                if merged_id in available:
                    served = Served(available[merged_id], ((merged_id, 1.0),), "premerged")
                    return served, []
                if self._loadable(merged_id):
                    served = Served(merged_id, ((merged_id, 1.0),), "premerged")
                    return served, [(merged_id, merged_id, self._path(merged_id) or "")]
            if (
                self.merger is not None
                and self.allow_runtime_loading
                and self.runtime_updates is not False
            ):
                digest = hashlib.sha256(repr([(a, round(w, 4)) for a, w in mixture]).encode())
                name = f"merged-{digest.hexdigest()[:12]}"
                served = Served(name, mixture, SERVED_MERGED)
                if name in self.merged:
                    return served, []
                return served, [(name, name, "")]  # path made by the merger when loading
        loadable = {a: a for a, _ in mixture if a not in available and self._loadable(a)}
        served = serve_one_adapter(
            mixture,
            served={**available, **loadable},
            premerged={},
            policy=self.mixture_policy,
            tolerance=self.merge_tolerance,
            unknown=self._unknown,
        )
        return served, [(a, a, self._path(a) or "") for a, _ in served.adapters if a in loadable]

    def _load_body(self, adapter_id: str, name: str, path: str, mixture: Mixture) -> dict[str, str]:
        if not path:
            assert self.merger is not None
            path = self.merger(mixture)
        return {"lora_name": name, "lora_path": path}

    def _loaded_ok(self, response: httpx.Response) -> bool:
        if response.status_code < 400:
            return True
        # vLLM answers 400 for an adapter that is already loaded: what we wanted
        return response.status_code == 400 and "already" in response.text.lower()

    def _refused(self, response: httpx.Response) -> None:
        """A server without the load route (runtime updates off): learn it, and say so."""
        if response.status_code not in (404, 405):
            self.runtime_updates = True
            return
        try:
            shaped = response.json().get("object") == "error"  # vLLM's own error: a route
        except (ValueError, AttributeError):
            shaped = False
        if shaped:
            return
        self.runtime_updates = False
        raise RuntimeUpdatesRefusedError(
            f"the vLLM server at {self.base_url} does not allow runtime LoRA updates (no "
            "/v1/load_lora_adapter): start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, "
            "or with --lora-modules naming the adapter.",
            backend=self.name,
        )

    def _plan_and_load(self, mixture: Mixture) -> Served:
        served, loads = self._plan(mixture)
        try:
            self._load(loads, mixture)
        except RuntimeUpdatesRefusedError:
            if not any(a.startswith(OWNED_PREFIX) for a, _ in mixture):
                raise
            rest = self._without_own(mixture)
            served, loads = self._plan(rest)
            self._load(loads, rest)
        return served

    async def _aplan_and_load(self, mixture: Mixture) -> Served:
        served, loads = self._plan(mixture)
        try:
            await self._aload(loads, mixture)
        except RuntimeUpdatesRefusedError:
            if not any(a.startswith(OWNED_PREFIX) for a, _ in mixture):
                raise
            rest = self._without_own(mixture)
            served, loads = self._plan(rest)
            await self._aload(loads, rest)
        return served

    def _record(self, adapter_id: str, name: str, path: str) -> None:
        if path:
            self.loaded[adapter_id] = name
        else:
            self.merged.add(name)

    def _load(self, loads: list[tuple[str, str, str]], mixture: Mixture) -> None:
        with self._load_lock:
            for adapter_id, name, path in loads:
                if adapter_id in self.loaded or adapter_id in self.merged:
                    continue
                body = self._load_body(adapter_id, name, path, mixture)

                def attempt(body: dict[str, str] = body) -> None:
                    response = self.client.post("/v1/load_lora_adapter", json=body)
                    self._refused(response)
                    if not self._loaded_ok(response):
                        self._check(response)

                call_with_retries(attempt, self.retry, self._classify, self.name, self.base_url)
                self._record(adapter_id, name, path)

    async def _aload(self, loads: list[tuple[str, str, str]], mixture: Mixture) -> None:
        for adapter_id, name, path in loads:
            if adapter_id in self.loaded or adapter_id in self.merged:
                continue
            body = await asyncio.to_thread(self._load_body, adapter_id, name, path, mixture)

            async def attempt(body: dict[str, str] = body) -> None:
                response = await self.aclient.post("/v1/load_lora_adapter", json=body)
                self._refused(response)
                if not self._loaded_ok(response):
                    self._check(response)

            await acall_with_retries(attempt, self.retry, self._classify, self.name, self.base_url)
            self._record(adapter_id, name, path)

    # -- requests -------------------------------------------------------------------------

    def body(self, request: GenerationRequest, served: Served, stream: bool) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": served.name or self.model,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature or 0.0,  # 0: greedy
            "n": 1 if stream else request.n,
            "stream": stream,
        }
        if request.nucleus is not None:
            body["top_p"] = request.nucleus
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            body["messages"] = list(request.messages)
            return "/v1/chat/completions", body
        body["prompt"] = request.prompt
        return "/v1/completions", body

    def _protocol_error(self, problem: str) -> BackendProtocolError:
        return BackendProtocolError(
            f"vLLM at {self.base_url} answered without the documented shape: {problem}",
            backend=self.name,
        )

    def _result(
        self,
        request: GenerationRequest,
        served: Served,
        texts: list[str],
        finishes: list[str | None],
        usage: Mapping[str, Any] | None,
    ) -> GenerationResult:
        usage = usage or {}
        return GenerationResult(
            texts=tuple(texts),
            finish_reasons=tuple(finishes),
            backend=self.name,
            served_by=served.served_by,
            adapters=served.adapters,
            requested_adapters=request.adapters,
            model=served.name or self.model,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    def _from_response(
        self, request: GenerationRequest, served: Served, body: Mapping[str, Any]
    ) -> GenerationResult:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise self._protocol_error(f"no choices in {body!r:.120}")
        if not all(isinstance(c, dict) for c in choices):
            raise self._protocol_error(f"choices that are not objects in {body!r:.120}")
        choices = sorted(choices, key=lambda c: c.get("index") or 0)
        texts = []
        for choice in choices:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if not isinstance(text, str):  # content: null, or no text at all
                raise self._protocol_error(f"a choice without text ({choice!r:.120})")
            texts.append(text)
        finishes = [c.get("finish_reason") for c in choices]
        return self._result(request, served, texts, finishes, body.get("usage"))

    def _forget_if_lost(self, exc: BackendRequestError, served: Served) -> bool:
        """A 404 for an adapter this backend loaded: the server restarted and lost it."""
        if exc.status != 404:
            return False
        lost = [a for a, name in self.loaded.items() if name == served.name]
        for adapter_id in lost:
            del self.loaded[adapter_id]
        if served.name in self.merged:
            self.merged.discard(served.name)
            lost.append(served.name)
        return bool(lost)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for reloaded in (False, True):
            served = self._plan_and_load(request.adapters)
            path, body = self.body(request, served, stream=False)
            try:
                return self._from_response(request, served, self.post_json(path, body))
            except BackendRequestError as exc:
                if reloaded or not self._forget_if_lost(exc, served):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        for reloaded in (False, True):
            served = await self._aplan_and_load(request.adapters)
            path, body = self.body(request, served, stream=False)
            try:
                response = await self.apost_json(path, body)
                return self._from_response(request, served, response)
            except BackendRequestError as exc:
                if reloaded or not self._forget_if_lost(exc, served):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- stream ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        check_streamable(request, self.name)
        served = self._plan_and_load(request.adapters)
        path, body = self.body(request, served, stream=True)

        def open_stream() -> Iterator[GenerationChunk]:
            tracker = _Stream(self, request, served)
            for data in self.sse_events(path, body):
                chunk = tracker.chunk(data)
                if chunk is not None:
                    yield chunk
            yield tracker.finish()

        return stream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        )

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        check_streamable(request, self.name)
        served = await self._aplan_and_load(request.adapters)
        path, body = self.body(request, served, stream=True)

        async def open_stream() -> AsyncIterator[GenerationChunk]:
            tracker = _Stream(self, request, served)
            async for data in self.asse_events(path, body):
                chunk = tracker.chunk(data)
                if chunk is not None:
                    yield chunk
            yield tracker.finish()

        async for chunk in astream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        ):
            yield chunk


class _Stream:
    """OpenAI-style chunks: text deltas, a finish reason, a usage chunk, ``[DONE]``."""

    def __init__(self, backend: VLLMBackend, request: GenerationRequest, served: Served) -> None:
        self.backend, self.request, self.served = backend, request, served
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.done = False

    def chunk(self, data: str) -> GenerationChunk | None:
        if data.strip() == "[DONE]":
            self.done = True
            return None
        event = parse_event(data)
        if event.get("object") == "error" or "error" in event:
            message = event.get("message") or event.get("error")
            raise Failure(f"error event: {message}", retryable=False, kind="status")
        if event.get("usage"):
            self.usage = event["usage"]
        choices = event.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        text = (delta.get("content") or "") if isinstance(delta, dict) else choice.get("text", "")
        self.parts.append(text)
        return GenerationChunk(text) if text else None

    def finish(self) -> GenerationChunk:
        if self.finish_reason is None:
            raise stream_ended_early(len(self.parts))
        result = self.backend._result(
            self.request, self.served, ["".join(self.parts)], [self.finish_reason], self.usage
        )
        return GenerationChunk("", result)
