"""Text Generation Inference (TGI 3.x) with multi-LoRA, through ``huggingface_hub``.

Routes: a prompt goes to ``/generate`` (``/generate_stream`` when streamed) with
``parameters.adapter_id``; chat messages go to ``/v1/chat/completions`` with
``model=<adapter id>`` (``"tgi"`` for the base model), which TGI reads as the adapter.

What TGI cannot do, and how this backend copes:

* It loads adapters at start-up only (``LORA_ADAPTERS=id,name=path,...``) and answers an
  ``adapter_id`` it was not started with **silently with the base model**. So the backend
  is given the server's adapter list (``adapters=``, or :meth:`TGIBackend.from_hub` reads
  the cards whose ``servers`` name this server) and refuses any other id itself, before a
  request is sent (:class:`AdapterNotServedError`).
* It serves one adapter per request: no merging. A mixture is served by a pre-merged
  adapter registered at start-up whose card's ``merge_of`` lists exactly that mixture
  (same adapters, weights within ``merge_tolerance``), else by its heaviest adapter
  alone (``mixture_policy="premerged_or_top"``, the default; ``"top"`` skips the
  pre-merged lookup, ``"strict"`` refuses instead). The result's ``adapters`` and
  ``served_by`` say which happened.
* ``n`` candidates are ``n`` requests (seeds ``seed, seed+1, ...``): TGI's chat route
  ignores ``n`` and ``best_of`` returns only the best sequence.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import (
    HfHubHTTPError,
    IncompleteGenerationError,
    InferenceTimeoutError,
    OverloadedError,
    TextGenerationError,
)

from persona_plugin.backends._http import stream_ended_early
from persona_plugin.backends._retry import (
    Failure,
    RetryPolicy,
    acall_with_retries,
    astream_with_retries,
    call_with_retries,
    status_failure,
    stream_with_retries,
    transport_failure,
)
from persona_plugin.backends.base import (
    BaseBackend,
    MixturePolicy,
    Served,
    check_policy,
    check_streamable,
    serve_one_adapter,
)
from persona_plugin.backends.types import (
    AdapterNotServedError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    merge_results,
)
from persona_plugin.errors import PersonaValidationError

if TYPE_CHECKING:
    from persona_plugin.lora.hub import LoraHub

#: TGI's chat route reads ``model`` as the adapter id, except this name for the base model
BASE_MODEL_NAME = "tgi"
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences, and the spec's maxItems

_TG_PARAMS = inspect.signature(InferenceClient.text_generation).parameters
_CHAT_PARAMS = inspect.signature(InferenceClient.chat_completion).parameters
# huggingface_hub renamed stop_sequences to stop; support both sides of the rename
_STOP = "stop" if "stop" in _TG_PARAMS else "stop_sequences"


class TGIBackend(BaseBackend):
    """A TGI server with LoRA adapters loaded at start-up.

    ``adapters``: the hub ids the server serves, or a mapping hub id -> the id the server
    knows it by. ``premerged``: pre-merged adapter id -> the mixture it stands for (its
    id must be in ``adapters`` too). :meth:`from_hub` fills both from the LoRA hub.
    ``token``: sent as a bearer token; without one, no token is sent (huggingface_hub
    would otherwise send your Hugging Face token to this server).
    """

    name = "tgi"

    def __init__(
        self,
        base_url: str,
        *,
        adapters: Mapping[str, str] | Iterable[str] = (),
        premerged: Mapping[str, Mapping[str, float] | Sequence[tuple[str, float]]] | None = None,
        mixture_policy: MixturePolicy = "premerged_or_top",
        merge_tolerance: float = 0.05,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_policy(mixture_policy, merge_tolerance)
        self.base_url = base_url.rstrip("/")
        self.served = dict(adapters) if isinstance(adapters, Mapping) else {a: a for a in adapters}
        self.premerged = {
            k: dict(v.items() if isinstance(v, Mapping) else v)
            for k, v in (premerged or {}).items()
        }
        self.mixture_policy = mixture_policy
        self.merge_tolerance = merge_tolerance
        self.retry = retry or RetryPolicy()
        self._headers = dict(headers or {})
        if token is None:
            self._headers.setdefault("authorization", "")  # never the caller's HF token
        self._token = token
        self._client = self._new_client()
        self._aclient: AsyncInferenceClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_hub(cls, hub: LoraHub, server: str, base_url: str, **kwargs: Any) -> TGIBackend:
        """The adapters (and pre-merged adapters) whose cards list ``server``."""
        return cls(
            base_url,
            adapters=hub.served_on(server),
            premerged=hub.premerged_on(server),
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"TGIBackend({self.base_url!r}, adapters={sorted(self.served)})"

    @property
    def adapter_ids(self) -> frozenset[str]:
        return frozenset(a for a in self.served if a not in self.premerged)

    def _new_client(self) -> InferenceClient:
        return InferenceClient(
            base_url=self.base_url,
            timeout=self.retry.timeout,
            headers=self._headers,
            api_key=self._token,
        )

    def _async_client(self) -> AsyncInferenceClient:
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = AsyncInferenceClient(
                base_url=self.base_url,
                timeout=self.retry.timeout,
                headers=self._headers,
                api_key=self._token,
            )
            self._aclient_loop = loop
        return self._aclient

    def close(self) -> None:
        close = getattr(self._client, "close", None)  # older huggingface_hub has none
        if close is not None:
            close()

    async def aclose(self) -> None:
        """Close the async client of the running event loop (call before the loop ends)."""
        client, self._aclient = self._aclient, None
        if client is not None and self._aclient_loop is asyncio.get_running_loop():
            close = getattr(client, "close", None)
            if close is not None:
                await close()

    # -- adapters -------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> Served:
        """Which adapter serves ``request`` (raises for ids the server was not started with)."""
        return serve_one_adapter(
            request.adapters,
            served=self.served,
            premerged=self.premerged,
            policy=self.mixture_policy,
            tolerance=self.merge_tolerance,
            unknown=self._unknown,
        )

    def _unknown(self, ids: list[str]) -> AdapterNotServedError:
        known = ", ".join(sorted(self.served)) or "none"
        return AdapterNotServedError(
            f"adapter(s) {', '.join(map(repr, ids))} are not loaded on the TGI server at "
            f"{self.base_url} (it serves: {known}). TGI loads adapters only at start-up and "
            "would answer an unknown id silently with the base model, so the request was "
            "not sent. Add the adapter to the server's LORA_ADAPTERS and to the card's "
            "`servers`, or ask for one it serves.",
            backend=self.name,
        )

    def _check(self, request: GenerationRequest) -> Served:
        if len(request.stop) > MAX_STOP_SEQUENCES:
            raise PersonaValidationError(
                "GenerationRequest",
                "stop",
                f"{len(request.stop)} stop sequences",
                f"TGI accepts at most {MAX_STOP_SEQUENCES}.",
            )
        return self.resolve(request)

    # -- call arguments -------------------------------------------------------------------

    def _generate_kwargs(
        self, request: GenerationRequest, served: Served, seed: int | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "details": True,
            "max_new_tokens": request.max_new_tokens,
            "do_sample": not request.greedy,
        }
        if served.name is not None:
            kwargs["adapter_id"] = served.name
        if not request.greedy:
            kwargs["temperature"] = request.temperature
        if request.nucleus is not None:
            kwargs["top_p"] = request.nucleus
        if seed is not None:
            kwargs["seed"] = seed
        if request.stop:
            kwargs[_STOP] = list(request.stop)
        return kwargs

    def _chat_kwargs(
        self, request: GenerationRequest, served: Served, seed: int | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": served.name or BASE_MODEL_NAME,
            "max_tokens": request.max_new_tokens,  # TGI's chat default is 100
            # TGI's chat route samples unless temperature is exactly 0
            "temperature": request.temperature or 0.0,
        }
        if request.nucleus is not None:
            kwargs["top_p"] = request.nucleus
        if seed is not None:
            kwargs["seed"] = seed
        if request.stop:
            kwargs["stop"] = list(request.stop)
        return kwargs

    def _result(
        self,
        request: GenerationRequest,
        served: Served,
        text: str,
        finish: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> GenerationResult:
        return GenerationResult(
            texts=(text,),
            finish_reasons=(finish,),
            backend=self.name,
            served_by=served.served_by,
            adapters=served.adapters,
            requested_adapters=request.adapters,
            model=served.name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _from_generate(
        self, request: GenerationRequest, served: Served, output: Any
    ) -> GenerationResult:
        details = getattr(output, "details", None)
        if details is None:
            raise Failure("the response has no details", retryable=False, kind="protocol")
        prefill = len(details.prefill) if details.prefill else None
        return self._result(
            request,
            served,
            output.generated_text,
            str(details.finish_reason),
            prefill,
            details.generated_tokens,
        )

    def _from_chat(
        self, request: GenerationRequest, served: Served, output: Any
    ) -> GenerationResult:
        if not output.choices:
            raise Failure("the response has no choices", retryable=False, kind="protocol")
        choice = output.choices[0]
        if choice.message.content is None:  # content: null is no reply, not an empty one
            raise Failure("the reply has no text (content: null)", retryable=False, kind="protocol")
        usage = output.usage
        return self._result(
            request,
            served,
            choice.message.content,
            choice.finish_reason,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )

    # -- generate -------------------------------------------------------------------------

    def _classify(self, exc: BaseException) -> Failure | None:
        return classify_hf_error(exc, self.retry)

    def _one(
        self, request: GenerationRequest, served: Served, seed: int | None
    ) -> GenerationResult:
        if request.prompt is not None:
            kwargs = self._generate_kwargs(request, served, seed)

            def attempt() -> GenerationResult:
                out = self._client.text_generation(
                    request.prompt, model=f"{self.base_url}/generate", **kwargs
                )
                return self._from_generate(request, served, out)
        else:
            kwargs = self._chat_kwargs(request, served, seed)

            def attempt() -> GenerationResult:
                out = self._client.chat_completion(list(request.messages or ()), **kwargs)
                return self._from_chat(request, served, out)

        return call_with_retries(attempt, self.retry, self._classify, self.name, self.base_url)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        served = self._check(request)
        return merge_results([self._one(request, served, seed) for seed in request.seeds()])

    async def _aone(
        self, request: GenerationRequest, served: Served, seed: int | None
    ) -> GenerationResult:
        client = self._async_client()
        if request.prompt is not None:
            kwargs = self._generate_kwargs(request, served, seed)

            async def attempt() -> GenerationResult:
                out = await client.text_generation(
                    request.prompt, model=f"{self.base_url}/generate", **kwargs
                )
                return self._from_generate(request, served, out)
        else:
            kwargs = self._chat_kwargs(request, served, seed)

            async def attempt() -> GenerationResult:
                out = await client.chat_completion(list(request.messages or ()), **kwargs)
                return self._from_chat(request, served, out)

        return await acall_with_retries(
            attempt, self.retry, self._classify, self.name, self.base_url
        )

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        served = self._check(request)
        results = await asyncio.gather(*(self._aone(request, served, s) for s in request.seeds()))
        return merge_results(results)

    # -- stream ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        check_streamable(request, self.name)
        served = self._check(request)

        def open_stream() -> Iterator[GenerationChunk]:
            # a client per stream: huggingface_hub keeps a streamed response open until its
            # client is closed, so a long-lived one would pile up broken streams
            with self._new_client() as client:
                if request.prompt is not None:
                    events = client.text_generation(
                        request.prompt,
                        model=f"{self.base_url}/generate_stream",
                        stream=True,
                        **self._generate_kwargs(request, served, request.seed),
                    )
                    yield from self._generate_chunks(request, served, events)
                else:
                    events = client.chat_completion(
                        list(request.messages or ()),
                        stream=True,
                        **self._chat_stream_kwargs(request, served),
                    )
                    yield from self._chat_chunks(request, served, events)

        return stream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        )

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        check_streamable(request, self.name)
        served = self._check(request)

        async def open_stream() -> AsyncIterator[GenerationChunk]:
            client = AsyncInferenceClient(
                base_url=self.base_url,
                timeout=self.retry.timeout,
                headers=self._headers,
                api_key=self._token,
            )
            async with client:
                if request.prompt is not None:
                    events = await client.text_generation(
                        request.prompt,
                        model=f"{self.base_url}/generate_stream",
                        stream=True,
                        **self._generate_kwargs(request, served, request.seed),
                    )
                    tracker = _GenerateStream(self, request, served)
                    async for event in events:
                        yield tracker.chunk(event)
                    yield tracker.finish()
                else:
                    events = await client.chat_completion(
                        list(request.messages or ()),
                        stream=True,
                        **self._chat_stream_kwargs(request, served),
                    )
                    chat = _ChatStream(self, request, served)
                    async for event in events:
                        chunk = chat.chunk(event)
                        if chunk is not None:
                            yield chunk
                    yield chat.finish()

        async for chunk in astream_with_retries(
            open_stream, self.retry, self._classify, self.name, self.base_url
        ):
            yield chunk

    def _chat_stream_kwargs(self, request: GenerationRequest, served: Served) -> dict[str, Any]:
        kwargs = self._chat_kwargs(request, served, request.seed)
        if "stream_options" in _CHAT_PARAMS:
            kwargs["stream_options"] = {"include_usage": True}
        return kwargs

    def _generate_chunks(
        self, request: GenerationRequest, served: Served, events: Iterable[Any]
    ) -> Iterator[GenerationChunk]:
        tracker = _GenerateStream(self, request, served)
        for event in events:
            yield tracker.chunk(event)
        yield tracker.finish()

    def _chat_chunks(
        self, request: GenerationRequest, served: Served, events: Iterable[Any]
    ) -> Iterator[GenerationChunk]:
        chat = _ChatStream(self, request, served)
        for event in events:
            chunk = chat.chunk(event)
            if chunk is not None:
                yield chunk
        yield chat.finish()


class _GenerateStream:
    """Token events of ``/generate_stream``; the last one holds ``generated_text`` and
    ``details``. A stream that ends without it was cut."""

    def __init__(self, backend: TGIBackend, request: GenerationRequest, served: Served) -> None:
        self.backend, self.request, self.served = backend, request, served
        self.tokens = 0
        self.result: GenerationResult | None = None

    def chunk(self, event: Any) -> GenerationChunk:
        self.tokens += 1
        token = event.token
        text = "" if token.special else token.text  # the final text leaves special tokens out
        details = event.details
        if event.generated_text is not None and details is not None:
            self.result = self.backend._result(
                self.request,
                self.served,
                event.generated_text,
                str(details.finish_reason),
                details.input_length,
                details.generated_tokens,
            )
        return GenerationChunk(text)

    def finish(self) -> GenerationChunk:
        if self.result is None:
            raise stream_ended_early(self.tokens)
        return GenerationChunk("", self.result)


class _ChatStream:
    """Chunks of a streamed chat completion; complete once a choice has a finish reason."""

    def __init__(self, backend: TGIBackend, request: GenerationRequest, served: Served) -> None:
        self.backend, self.request, self.served = backend, request, served
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Any = None

    def chunk(self, event: Any) -> GenerationChunk | None:
        if getattr(event, "usage", None) is not None:
            self.usage = event.usage
        if not event.choices:
            return None
        choice = event.choices[0]
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        text = getattr(choice.delta, "content", None) or ""
        self.parts.append(text)
        return GenerationChunk(text) if text else None

    def finish(self) -> GenerationChunk:
        if self.finish_reason is None:
            raise stream_ended_early(len(self.parts))
        usage = self.usage
        return GenerationChunk(
            "",
            self.backend._result(
                self.request,
                self.served,
                "".join(self.parts),
                self.finish_reason,
                usage.prompt_tokens if usage else None,
                usage.completion_tokens if usage else None,
            ),
        )


def _response_text(response: Any) -> str:
    try:
        return str(response.text)
    except Exception:  # a streamed response that was never read
        return ""


def classify_hf_error(exc: BaseException, policy: RetryPolicy) -> Failure | None:
    """A :class:`Failure` for what ``huggingface_hub`` raises, else None."""
    if isinstance(exc, InferenceTimeoutError):
        return Failure(f"timed out ({exc})", retryable=True, kind="timeout")
    http = exc if isinstance(exc, HfHubHTTPError) else exc.__cause__
    response = getattr(http, "response", None) if isinstance(http, HfHubHTTPError) else None
    if response is not None:
        body = _response_text(response) or str(exc).split("\n")[0]
        return status_failure(response.status_code, response.headers, body, policy)
    if isinstance(exc, TextGenerationError):  # an error event inside a 200 stream
        transient = isinstance(exc, OverloadedError | IncompleteGenerationError)
        return Failure(
            f"{type(exc).__name__}: {exc}",
            retryable=transient,
            error_type=type(exc).__name__,
            kind="status" if not transient else "cut",
        )
    if isinstance(exc, json.JSONDecodeError):  # an event cut in the middle
        return Failure(f"malformed event ({exc})", retryable=True, kind="cut")
    failure = transport_failure(exc)
    if failure is not None:
        return failure
    if isinstance(exc, KeyError | TypeError | AttributeError | ValueError):
        return Failure(f"malformed response ({exc!r})", retryable=False, kind="protocol")
    return None
