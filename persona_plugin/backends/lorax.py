"""LoRAX: many LoRA adapters on one base model, merged per request.

LoRAX loads adapters on demand (from the Hugging Face hub, a local path, S3, ...) and
merges a mixture per request: ``parameters.merged_adapters = {ids, weights,
merge_strategy, density}`` on ``/generate`` and ``/generate_stream``. So a retrieved
mixture is served as it is (``served_by="merged"``); one adapter goes as ``adapter_id``
(LoRAX refuses both at once).

Chat messages go to the same routes as ``inputs`` holding the messages as JSON with
``parameters.apply_chat_template = true``, which makes LoRAX apply the model's chat
template; its OpenAI-style chat route has no ``merged_adapters``.

``merge_strategy``: ``linear`` (a weighted sum; ``density`` unused), ``ties``,
``dare_linear`` or ``dare_ties`` (which keep a ``density`` fraction of each adapter's
weights, 0.5 unless set; the spec's default of 0 would drop them all).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import httpx

from persona_plugin.backends._http import HttpBackend, parse_event, stream_ended_early
from persona_plugin.backends._retry import (
    Failure,
    RetryPolicy,
    astream_with_retries,
    stream_with_retries,
)
from persona_plugin.backends.base import check_streamable
from persona_plugin.backends.types import (
    SERVED_ADAPTER,
    SERVED_BASE,
    SERVED_MERGED,
    AdapterNotServedError,
    BackendProtocolError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    merge_results,
)
from persona_plugin.cards.owned import OWNED_PREFIX
from persona_plugin.errors import PersonaConfigError, PersonaValidationError

if TYPE_CHECKING:
    from persona_plugin.lora.hub import LoraHub

MergeStrategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
MERGE_STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5
MAX_STOP_SEQUENCES = 4


class LoRAXBackend(HttpBackend):
    """A LoRAX server.

    ``adapters``: None (any hub id is sent as the LoRAX adapter id), or the hub ids it may
    serve, or a mapping hub id -> LoRAX adapter id (a hub repo or a path on the server).
    ``sources``: hub id -> ``adapter_source`` (``hub``, ``local``, ``s3``, ``pbase``);
    ``adapter_source`` is the default for the rest (None: the server's default).
    :meth:`from_hub` maps every card to its location and source.
    """

    name = "lorax"

    def __init__(
        self,
        base_url: str,
        *,
        adapters: Mapping[str, str] | Iterable[str] | None = None,
        sources: Mapping[str, str] | None = None,
        adapter_source: str | None = None,
        merge_strategy: MergeStrategy = "linear",
        density: float | None = None,
        majority_sign_method: Literal["total", "frequency"] | None = None,
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
        if adapters is None:
            self.served: dict[str, str] | None = None
        else:
            self.served = (
                dict(adapters) if isinstance(adapters, Mapping) else {a: a for a in adapters}
            )
        self.sources = dict(sources or {})
        self.adapter_source = adapter_source
        if merge_strategy not in MERGE_STRATEGIES:
            raise PersonaConfigError(
                f"merge_strategy {merge_strategy!r} is not one of {', '.join(MERGE_STRATEGIES)}."
            )
        if density is not None and not 0 < density <= 1:
            raise PersonaConfigError(f"density must be in (0, 1], not {density!r}.")
        if majority_sign_method not in (None, "total", "frequency"):
            raise PersonaConfigError(
                f"majority_sign_method {majority_sign_method!r} is not 'total' or 'frequency'."
            )
        self.merge_strategy = merge_strategy
        self.density = density
        self.majority_sign_method = majority_sign_method
        # users' own adapters (slow adaptation): found through the hub by their versioned
        # ids and sent as their folders with source "local" (LoRAX loads an adapter on its
        # first request; the server must see this machine's disk, e.g. a shared volume)
        self.lora_hub = lora_hub

    @classmethod
    def from_hub(cls, hub: LoraHub, base_url: str, **kwargs: Any) -> LoRAXBackend:
        """Every non-merged card, sent as its location with source ``local`` or ``hub``."""
        cards = [c for c in hub.cards() if not c.is_premerged]
        return cls(
            base_url,
            adapters={c.id: c.resolved_location for c in cards},
            sources={c.id: "local" if c.location_is_local else "hub" for c in cards},
            lora_hub=hub,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"LoRAXBackend({self.base_url!r}, merge_strategy={self.merge_strategy!r})"

    @property
    def adapter_ids(self) -> frozenset[str] | None:
        return None if self.served is None else frozenset(self.served)

    @property
    def serves_owned_adapters(self) -> bool:
        """Whether users' own adapters can be served (a hub to find their folders in)."""
        return self.lora_hub is not None

    def _own_path(self, adapter_id: str) -> str | None:
        if self.lora_hub is None or not adapter_id.startswith(OWNED_PREFIX):
            return None
        card = self.lora_hub.owned_card(adapter_id)
        return card.resolved_location if card is not None else None

    # -- request bodies -------------------------------------------------------------------

    def _name(self, adapter_id: str) -> str:
        own = self._own_path(adapter_id)
        if own is not None:
            return own
        if self.served is None:
            return adapter_id
        return self.served[adapter_id]

    def _source(self, ids: list[str]) -> str | None:
        sources = {
            "local" if self._own_path(a) else self.sources.get(a, self.adapter_source) for a in ids
        }
        if len(sources) > 1:
            raise PersonaValidationError(
                "GenerationRequest",
                "adapters",
                f"the adapters {ids} come from different sources {sorted(map(str, sources))}",
                "LoRAX merges adapters of one source only: put them in one place.",
            )
        return sources.pop()

    def body(self, request: GenerationRequest, seed: int | None) -> tuple[dict[str, Any], str]:
        """The JSON body of ``/generate`` for ``request``, and how it will be served."""
        if len(request.stop) > MAX_STOP_SEQUENCES:
            raise PersonaValidationError(
                "GenerationRequest",
                "stop",
                f"{len(request.stop)} stop sequences",
                f"LoRAX accepts at most {MAX_STOP_SEQUENCES}.",
            )
        ids = [a for a, _ in request.adapters]
        if self.served is not None:
            missing = [a for a in ids if a not in self.served and self._own_path(a) is None]
            if missing:
                raise AdapterNotServedError(
                    f"adapter(s) {', '.join(map(repr, missing))} are not configured for the "
                    f"LoRAX server at {self.base_url} (configured: "
                    f"{', '.join(sorted(self.served)) or 'none'}). Add their cards to the hub "
                    "or pass them in adapters=.",
                    backend=self.name,
                )
        params: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "details": True,
            "decoder_input_details": False,  # LoRAX's default is true: prefill we never read
            "do_sample": not request.greedy,
        }
        if not request.greedy:
            params["temperature"] = request.temperature
        if request.nucleus is not None:
            params["top_p"] = request.nucleus
        if seed is not None:
            params["seed"] = seed
        if request.stop:
            params["stop"] = list(request.stop)
        if request.messages is not None:
            inputs = json.dumps(list(request.messages), ensure_ascii=False)
            params["apply_chat_template"] = True
        else:
            inputs = request.prompt or ""
        served_by = SERVED_BASE
        if len(ids) == 1:
            params["adapter_id"] = self._name(ids[0])
            served_by = SERVED_ADAPTER
        elif ids:
            merged: dict[str, Any] = {
                "ids": [self._name(a) for a in ids],
                "weights": [w for _, w in request.adapters],
                "merge_strategy": self.merge_strategy,
            }
            if self.merge_strategy != "linear":
                merged["density"] = self.density if self.density is not None else DEFAULT_DENSITY
            if self.majority_sign_method and self.merge_strategy in ("ties", "dare_ties"):
                merged["majority_sign_method"] = self.majority_sign_method
            params["merged_adapters"] = merged
            served_by = SERVED_MERGED
        if ids:
            source = self._source(ids)
            if source is not None:
                params["adapter_source"] = source
        return {"inputs": inputs, "parameters": params}, served_by

    def _result(
        self,
        request: GenerationRequest,
        served_by: str,
        text: str,
        details: Mapping[str, Any] | None,
    ) -> GenerationResult:
        details = details or {}
        return GenerationResult(
            texts=(text,),
            finish_reasons=(details.get("finish_reason"),),
            backend=self.name,
            served_by=served_by,
            adapters=request.adapters,
            requested_adapters=request.adapters,
            model=",".join(self._name(a) for a, _ in request.adapters) or None,
            prompt_tokens=details.get("prompt_tokens"),
            completion_tokens=details.get("generated_tokens"),
            details={"merge_strategy": self.merge_strategy} if served_by == SERVED_MERGED else {},
        )

    def _from_response(
        self, request: GenerationRequest, served_by: str, body: Mapping[str, Any]
    ) -> GenerationResult:
        text = body.get("generated_text")
        if not isinstance(text, str):
            raise BackendProtocolError(
                f"LoRAX at {self.base_url} answered without the documented shape: no "
                f"generated_text in {body!r:.120}",
                backend=self.name,
            )
        details = body.get("details")
        return self._result(
            request, served_by, text, details if isinstance(details, Mapping) else None
        )

    # -- generate -------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationResult:
        results = []
        for seed in request.seeds():
            body, served_by = self.body(request, seed)
            response = self.post_json("/generate", body)
            results.append(self._from_response(request, served_by, response))
        return merge_results(results)

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        async def one(seed: int | None) -> GenerationResult:
            body, served_by = self.body(request, seed)
            response = await self.apost_json("/generate", body)
            return self._from_response(request, served_by, response)

        return merge_results(await asyncio.gather(*(one(s) for s in request.seeds())))

    # -- stream ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        check_streamable(request, self.name)
        body, served_by = self.body(request, request.seed)

        def open_stream() -> Iterator[GenerationChunk]:
            tracker = _Stream(self, request, served_by)
            for data in self.sse_events("/generate_stream", body):
                yield tracker.chunk(data)
            yield tracker.finish()

        return stream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        )

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        check_streamable(request, self.name)
        body, served_by = self.body(request, request.seed)

        async def open_stream() -> AsyncIterator[GenerationChunk]:
            tracker = _Stream(self, request, served_by)
            async for data in self.asse_events("/generate_stream", body):
                yield tracker.chunk(data)
            yield tracker.finish()

        async for chunk in astream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        ):
            yield chunk


class _Stream:
    """Token events (``StreamResponse``); the last one holds ``generated_text`` and
    ``details``, and an ``{"error": ...}`` event reports a failure mid-stream."""

    def __init__(self, backend: LoRAXBackend, request: GenerationRequest, served_by: str) -> None:
        self.backend, self.request, self.served_by = backend, request, served_by
        self.tokens = 0
        self.result: GenerationResult | None = None

    def chunk(self, data: str) -> GenerationChunk:
        if data.strip() == "[DONE]":
            return GenerationChunk("")
        event = parse_event(data)
        if event.get("error") is not None:
            error_type = event.get("error_type")
            transient = error_type in ("overloaded", "incomplete_generation")
            raise Failure(
                f"error event ({error_type}): {event['error']}",
                retryable=transient,
                error_type=error_type,
                kind="cut" if transient else "status",
            )
        token = event.get("token") or {}
        self.tokens += 1
        text = "" if token.get("special") else str(token.get("text", ""))
        if event.get("generated_text") is not None and event.get("details") is not None:
            self.result = self.backend._result(
                self.request, self.served_by, event["generated_text"], event["details"]
            )
        return GenerationChunk(text)

    def finish(self) -> GenerationChunk:
        if self.result is None:
            raise stream_ended_early(self.tokens)
        return GenerationChunk("", self.result)
