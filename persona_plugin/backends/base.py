"""The protocol every inference backend speaks, and what the remote ones share.

A backend turns a :class:`GenerationRequest` (a prompt or chat messages, a mixture of
LoRA adapters as ``[(adapter id, weight), ...]``, sampling parameters) into a
:class:`GenerationResult` (the texts, token counts, finish reasons, and the adapters that
*actually* served it: a server that cannot merge serves a mixture some other way, and
says so). Adapter ids are the LoRA hub's card ids; each backend maps them to the names
its server knows.

Faults: a timeout, a refused connection, a 429 (its ``Retry-After`` honoured) or a 5xx
is retried with exponential backoff (:class:`RetryPolicy`), then raised as
:class:`BackendUnavailableError`. A request the server rejects (422, 424, other 4xx) is
raised at once as :class:`BackendRequestError`. A stream is retried only until its first
token; once text has been handed out, a cut raises :class:`BackendStreamError`: a partial
reply is never passed off as a complete one.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import httpx

from persona_plugin.errors import PersonaConfigError, PersonaError, PersonaValidationError
from persona_plugin.lora_hub import mixture_matches

logger = logging.getLogger("persona_plugin.backends")

T = TypeVar("T")

#: ``((adapter id, weight), ...)``, weights summing to 1, heaviest first
Mixture = tuple[tuple[str, float], ...]

#: how a result was served (:attr:`GenerationResult.served_by`)
SERVED_BASE = "base"  # no adapter
SERVED_ADAPTER = "adapter"  # the one adapter asked for
SERVED_MERGED = "merged"  # the mixture, merged by the server per request (LoRAX)
SERVED_PREMERGED = "premerged"  # a pre-merged adapter whose card lists the mixture
SERVED_TOP = "top"  # the mixture's heaviest adapter alone


# -- errors -------------------------------------------------------------------------------


class BackendError(PersonaError):
    """Base class of the errors backends raise."""

    def __init__(self, message: str, *, backend: str = "") -> None:
        self.backend = backend
        super().__init__(message)


class AdapterNotServedError(BackendError):
    """An adapter id the server was not configured with: refused before any request."""

    exit_code = 2


class BackendRequestError(BackendError):
    """The server rejected the request (422 validation, 424 generation, other 4xx)."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        backend: str = "",
        status: int | None = None,
        error_type: str | None = None,
    ) -> None:
        self.status = status
        self.error_type = error_type
        super().__init__(message, backend=backend)


class BackendUnavailableError(BackendError):
    """Timeouts, 429s, 5xx or connection failures outlasted the retries."""

    def __init__(
        self,
        message: str,
        *,
        backend: str = "",
        attempts: int = 0,
        status: int | None = None,
    ) -> None:
        self.attempts = attempts
        self.status = status
        super().__init__(message, backend=backend)


class BackendStreamError(BackendError):
    """A stream broke after text was handed out; ``partial_text`` is what arrived."""

    def __init__(self, message: str, *, backend: str = "", partial_text: str = "") -> None:
        self.partial_text = partial_text
        super().__init__(message, backend=backend)


# -- requests and results -----------------------------------------------------------------


def _reject(field_name: str, problem: str, hint: str) -> PersonaValidationError:
    return PersonaValidationError("GenerationRequest", field_name, problem, hint)


_ADAPTERS_HINT = "Pass adapters as [(adapter_id, weight), ...], e.g. [('formal', 0.7), ('kb', 0.3)]"


def normalize_mixture(adapters: Any) -> Mixture:
    """``[(id, weight), ...]``, a mapping, a :class:`LoraMixture` or None -> a :data:`Mixture`.

    Zero weights are dropped, the rest scaled to sum to 1 and sorted heaviest first (ties
    keep their order). An id listed twice is an error, not a silent sum.
    """
    if adapters is None:
        return ()
    if isinstance(adapters, str):  # one adapter id
        adapters = [adapters]
    if hasattr(adapters, "pairs") and callable(adapters.pairs):  # a LoraMixture
        adapters = adapters.pairs()
    items = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
    pairs: list[tuple[str, float]] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            item = (item, 1.0)
        if not isinstance(item, Sequence) or len(item) != 2:
            raise _reject(
                "adapters", f"{item!r} is not an (adapter id, weight) pair", _ADAPTERS_HINT
            )
        adapter_id, weight = item
        if not isinstance(adapter_id, str) or not adapter_id:
            raise _reject("adapters", f"adapter id {adapter_id!r} is not a string", _ADAPTERS_HINT)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise _reject(
                "adapters", f"weight {weight!r} of {adapter_id!r} is not a number", _ADAPTERS_HINT
            )
        if not math.isfinite(weight) or weight < 0:
            raise _reject(
                "adapters", f"weight {weight!r} of {adapter_id!r}", "Use a finite weight >= 0."
            )
        if adapter_id in seen:
            raise _reject("adapters", f"adapter {adapter_id!r} is listed twice", _ADAPTERS_HINT)
        seen.add(adapter_id)
        if weight > 0:
            pairs.append((adapter_id, float(weight)))
    total = sum(w for _, w in pairs)
    ordered = sorted(pairs, key=lambda p: -p[1])
    return tuple((a, w / total) for a, w in ordered)


def _message_dict(message: Any) -> dict[str, str]:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    elif isinstance(message, Sequence) and not isinstance(message, str) and len(message) == 2:
        role, content = message  # (role, content)
    else:
        role = content = None
    if not isinstance(role, str) or not role or not isinstance(content, str):
        raise _reject(
            "messages",
            f"{message!r} is not a message",
            "Each message is {'role': 'user' | 'assistant' | 'system', 'content': '...'}.",
        )
    return {"role": role, "content": content}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: a ``prompt`` *or* chat ``messages``, adapters and sampling.

    ``temperature`` None or 0 means greedy decoding; ``top_p`` None or 1 means no nucleus
    cut; ``seed`` is a positive integer (TGI and LoRAX reject 0); ``n`` > 1 asks for that
    many candidates (for MBR decoding), drawn with seeds ``seed, seed+1, ...`` where the
    server cannot draw them in one call.
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    adapters: Mixture = ()
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if (self.prompt is None) == (self.messages is None):
            raise _reject(
                "prompt", "give a prompt or messages, and not both", "Pass exactly one of them."
            )
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise _reject("prompt", f"prompt is a {type(self.prompt).__name__}", "Pass a string.")
        if self.messages is not None:
            messages = tuple(_message_dict(m) for m in self.messages)
            if not messages:
                raise _reject("messages", "no messages", "Pass at least one message.")
            set_(self, "messages", messages)
        set_(self, "adapters", normalize_mixture(self.adapters))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise _reject(
                "max_new_tokens", f"{self.max_new_tokens!r} is not an integer", "Use one >= 1."
            )
        if self.max_new_tokens < 1:
            raise _reject("max_new_tokens", f"{self.max_new_tokens} < 1", "Use an integer >= 1.")
        if self.temperature is not None and (
            not math.isfinite(self.temperature) or self.temperature < 0
        ):
            raise _reject(
                "temperature",
                f"{self.temperature!r} is not a temperature",
                "Use None or 0 (greedy) or a value > 0.",
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise _reject("top_p", f"{self.top_p!r} is not in (0, 1]", "Use None or (0, 1].")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 1
        ):
            raise _reject(
                "seed", f"{self.seed!r} is not a positive integer", "TGI and LoRAX reject 0."
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise _reject("stop", f"{stop!r} holds a non-string or an empty string", "Fix it.")
        set_(self, "stop", stop)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 64:
            raise _reject("n", f"{self.n!r} candidates", "Ask for 1 to 64.")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def nucleus(self) -> float | None:
        """``top_p`` if it cuts anything (servers refuse 1.0), else None."""
        return self.top_p if self.top_p is not None and self.top_p < 1 else None

    def seeds(self) -> list[int | None]:
        """One seed per candidate: ``seed, seed+1, ...`` (all None if no seed was given)."""
        return [None if self.seed is None else self.seed + i for i in range(self.n)]

    def replace(self, **changes: Any) -> GenerationRequest:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What came back: ``texts`` (``n`` of them) and how it was served.

    ``adapters`` is what served the request, in hub ids: the mixture itself when merged,
    ``((premerged_id, 1.0),)`` for a pre-merged adapter, ``((top_id, 1.0),)`` when only the
    heaviest adapter served, ``()`` for the base model. ``served_by`` names which.
    """

    texts: tuple[str, ...]
    finish_reasons: tuple[str | None, ...]
    backend: str
    served_by: str = SERVED_BASE
    adapters: Mixture = ()
    requested_adapters: Mixture = ()
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0]

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of a streamed reply; the last chunk carries the whole :class:`GenerationResult`."""

    text: str
    result: GenerationResult | None = None


def merge_results(results: Sequence[GenerationResult]) -> GenerationResult:
    """``n`` single-candidate results of one request as one result."""
    first = results[0]

    def total(name: str) -> int | None:
        values = [getattr(r, name) for r in results]
        return None if any(v is None for v in values) else sum(values)

    prompt = first.prompt_tokens if all(r.prompt_tokens is not None for r in results) else None
    return replace(
        first,
        texts=tuple(t for r in results for t in r.texts),
        finish_reasons=tuple(f for r in results for f in r.finish_reasons),
        prompt_tokens=prompt,
        completion_tokens=total("completion_tokens"),
    )


# -- the protocol -------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """What :class:`MultiLoraChatModel` (and MBR decoding) need from an inference backend.

    ``adapter_ids`` are the hub ids the backend can serve (None: any id, e.g. LoRAX loads
    adapters on demand); retrieval is limited to them. ``stream`` serves ``n == 1``.
    ``generate_batch`` serves several requests, each with its own adapters, and returns
    their results in order.
    """

    name: str

    @property
    def adapter_ids(self) -> frozenset[str] | None: ...

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    async def agenerate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]: ...


class BaseBackend(ABC):
    """Defaults for a backend: async versions that run the sync ones in a thread.

    A local backend (transformers + peft) only has to implement :meth:`generate` and
    :meth:`stream`; the remote ones override the async methods with real async I/O.
    """

    name: str = "backend"

    @property
    def adapter_ids(self) -> frozenset[str] | None:
        return None

    @abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve ``requests`` (each with its own adapters); their results, in order.

        This default serves them one by one with :meth:`generate`: a remote server batches
        concurrent requests on its side (continuous batching), so one call per request
        loses nothing there. The local backend overrides it to run requests with different
        adapters in one ``model.generate`` call. The first error is raised as is.
        """
        return [self.generate(request) for request in requests]

    async def agenerate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self.generate, request)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        iterator = self.stream(request)
        done = object()
        while True:
            chunk = await asyncio.to_thread(next, iterator, done)
            if chunk is done:
                return
            yield chunk  # type: ignore[misc]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (remote backends)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_streamable(request: GenerationRequest, backend: str) -> None:
    if request.n != 1:
        raise PersonaValidationError(
            "GenerationRequest",
            "n",
            f"a stream serves one candidate, not n={request.n}",
            f"Use generate() for several candidates ({backend}).",
        )


MixturePolicy = Literal["premerged_or_top", "top", "strict"]
MIXTURE_POLICIES: tuple[str, ...] = ("premerged_or_top", "top", "strict")


def check_policy(policy: str, tolerance: float) -> None:
    if policy not in MIXTURE_POLICIES:
        raise PersonaConfigError(
            f"mixture_policy {policy!r} is not one of {', '.join(MIXTURE_POLICIES)}."
        )
    if not 0 <= tolerance < 1:
        raise PersonaConfigError(f"merge_tolerance must be in [0, 1), not {tolerance!r}.")


@dataclass(frozen=True, slots=True)
class Served:
    """How a mixture will be served by a one-adapter-per-request server."""

    name: str | None  # the id sent to the server; None for the base model
    adapters: Mixture  # in hub ids
    served_by: str


def serve_one_adapter(
    mixture: Mixture,
    *,
    served: Mapping[str, str],
    premerged: Mapping[str, Mapping[str, float]],
    policy: str,
    tolerance: float,
    unknown: Callable[[list[str]], BackendError],
) -> Served:
    """Serve ``mixture`` with one adapter: itself, a pre-merged adapter, or its top adapter.

    Every id must be one the server serves, unless the whole mixture is served by a
    pre-merged adapter (whose parts need not be loaded). ``unknown`` builds the error.
    """
    if not mixture:
        return Served(None, (), SERVED_BASE)
    missing = [a for a, _ in mixture if a not in served]
    if len(mixture) == 1:
        if missing:
            raise unknown(missing)
        return Served(served[mixture[0][0]], ((mixture[0][0], 1.0),), SERVED_ADAPTER)
    wanted = dict(mixture)
    for merged_id, weights in premerged.items() if policy != "top" else ():
        if merged_id in served and mixture_matches(wanted, weights, tolerance=tolerance):
            return Served(served[merged_id], ((merged_id, 1.0),), SERVED_PREMERGED)
    if missing:
        raise unknown(missing)
    if policy == "strict":
        raise AdapterNotServedError(
            f"no pre-merged adapter on this server matches the mixture "
            f"{[(a, round(w, 3)) for a, w in mixture]} (tolerance {tolerance}), and "
            "mixture_policy='strict' forbids serving its top adapter alone. Register a "
            "pre-merged adapter (a card with merge_of) or use mixture_policy='premerged_or_top'."
        )
    top = mixture[0][0]
    return Served(served[top], ((top, 1.0),), SERVED_TOP)


# -- retries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for transient failures.

    Retry ``k`` (1-based) waits ``backoff * backoff_factor**(k-1)`` seconds, at most
    ``max_backoff``, plus up to ``jitter`` of it at random, unless the server sent
    ``Retry-After``, which is honoured as is; a ``Retry-After`` longer than
    ``max_retry_after`` fails at once rather than block the turn. ``timeout`` bounds each
    attempt (seconds; for a stream, the wait for each read).
    """

    max_retries: int = 3
    backoff: float = 0.5
    backoff_factor: float = 2.0
    max_backoff: float = 8.0
    jitter: float = 0.1
    max_retry_after: float = 30.0
    timeout: float = 60.0
    retry_statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
    sleep: Callable[[float], None] = time.sleep
    asleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        base = min(self.max_backoff, self.backoff * self.backoff_factor ** (retry - 1))
        return base + base * self.jitter * random.random()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Failure(Exception):
    """A failed attempt, classified: retry it or not, and what to tell the caller."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        error_type: str | None = None,
        kind: str = "status",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.error_type = error_type
        self.kind = kind  # status | timeout | connect | protocol | cut


def error_message(body: Any) -> tuple[str, str | None]:
    """(message, error_type) from an error body: TGI/LoRAX, OpenAI/vLLM or FastAPI shape."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        text = body.strip()
        if text.startswith("data:"):  # an SSE error event (TGI's /generate_stream)
            text = text[5:].strip().split("\n", 1)[0]
        try:
            body = json.loads(text)
        except ValueError:
            return text[:300], None
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):  # {"error": {"message": ..., "type": ...}}
            return str(err.get("message", err))[:500], err.get("type")
        message = err or body.get("message") or body.get("detail") or body
        return str(message)[:500], body.get("error_type") or body.get("type")
    return str(body)[:300], None


def status_failure(
    status: int,
    headers: Mapping[str, str] | None,
    body: Any,
    policy: RetryPolicy,
) -> Failure:
    message, error_type = error_message(body)
    retry_after = parse_retry_after((headers or {}).get("retry-after"))
    return Failure(
        f"HTTP {status}: {message}",
        retryable=status in policy.retry_statuses,
        status=status,
        retry_after=retry_after if status in (429, 503) else None,
        error_type=error_type,
    )


_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "aiohttp")


def transport_failure(exc: BaseException) -> Failure | None:
    """A Failure for a timeout or a connection problem of any HTTP library, else None."""
    name = type(exc).__name__
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, httpx.TimeoutException | TimeoutError) or "Timeout" in name:
        return Failure(f"timed out ({name})", retryable=True, kind="timeout")
    if isinstance(exc, httpx.TransportError | ConnectionError) or (
        module in _TRANSPORT_MODULES and any(w in name for w in ("Connect", "Protocol", "Network"))
    ):
        return Failure(f"connection failed ({name}: {exc})", retryable=True, kind="connect")
    return None


class _Retrier:
    """The retry loop, shared by the sync, async and streaming paths."""

    def __init__(self, policy: RetryPolicy, backend: str, where: str) -> None:
        self.policy = policy
        self.backend = backend
        self.where = where
        self.attempt = 0

    def next_delay(self, failure: Failure) -> float:
        """The wait before the next attempt, or raise the error that ends the call."""
        self.attempt += 1
        what = f"{self.backend} at {self.where}"
        if not failure.retryable:
            if failure.kind in ("protocol", "cut"):
                raise BackendError(f"{what}: {failure.message}", backend=self.backend)
            raise BackendRequestError(
                f"{what} rejected the request: {failure.message}. This is not retried: fix "
                "the request (adapter ids, sampling parameters, input length).",
                backend=self.backend,
                status=failure.status,
                error_type=failure.error_type,
            )
        if failure.retry_after is not None and failure.retry_after > self.policy.max_retry_after:
            raise BackendUnavailableError(
                f"{what} is overloaded ({failure.message}) and asks to retry after "
                f"{failure.retry_after:.0f} s, more than max_retry_after="
                f"{self.policy.max_retry_after:.0f} s. Try later, or configure a fallback.",
                backend=self.backend,
                attempts=self.attempt,
                status=failure.status,
            )
        if self.attempt > self.policy.max_retries:
            raise BackendUnavailableError(
                f"{what} failed {self.attempt} times; last: {failure.message}. Check that the "
                "server is up and not overloaded, raise RetryPolicy.max_retries or timeout, "
                "or give MultiLoraChatModel a fallback chat model.",
                backend=self.backend,
                attempts=self.attempt,
                status=failure.status,
            )
        delay = self.policy.delay(self.attempt, failure.retry_after)
        logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2f s",
            what,
            self.attempt,
            failure.message,
            delay,
        )
        return delay


Classifier = Callable[[BaseException], Failure | None]


def call_with_retries(
    fn: Callable[[], T], policy: RetryPolicy, classify: Classifier, backend: str, where: str
) -> T:
    retrier = _Retrier(policy, backend, where)
    while True:
        try:
            return fn()
        except BackendError:
            raise
        except Exception as exc:
            failure = exc if isinstance(exc, Failure) else classify(exc)
            if failure is None:
                raise
            try:
                delay = retrier.next_delay(failure)
            except BackendError as final:
                raise final from exc
        policy.sleep(delay)


async def acall_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    classify: Classifier,
    backend: str,
    where: str,
) -> T:
    retrier = _Retrier(policy, backend, where)
    while True:
        try:
            return await fn()
        except BackendError:
            raise
        except Exception as exc:
            failure = exc if isinstance(exc, Failure) else classify(exc)
            if failure is None:
                raise
            try:
                delay = retrier.next_delay(failure)
            except BackendError as final:
                raise final from exc
        await policy.asleep(delay)


def _cut(backend: str, where: str, exc: BaseException, partial: str) -> BackendStreamError:
    message = exc.message if isinstance(exc, Failure) else f"{type(exc).__name__}: {exc}"
    return BackendStreamError(
        f"{backend} at {where}: the stream broke after {len(partial)} characters of the "
        f"reply ({message}). The partial reply was not used; retry the turn.",
        backend=backend,
        partial_text=partial,
    )


def _stream_retry_delay(
    exc: Exception,
    partial: list[str],
    retrier: _Retrier,
    classify: Classifier,
    backend: str,
    where: str,
) -> float:
    """How long to wait before reopening a failed stream; raises if it must not be retried."""
    if partial:
        raise _cut(backend, where, exc, "".join(partial)) from exc
    failure = exc if isinstance(exc, Failure) else classify(exc)
    if failure is None:
        raise exc
    try:
        return retrier.next_delay(failure)
    except BackendError as final:
        raise final from exc


def stream_with_retries(
    open_stream: Callable[[], Iterator[GenerationChunk]],
    policy: RetryPolicy,
    classify: Classifier,
    backend: str,
    where: str,
) -> Iterator[GenerationChunk]:
    """Retry until the first chunk; after it, any failure is a :class:`BackendStreamError`."""
    retrier = _Retrier(policy, backend, where)
    while True:
        partial: list[str] = []
        try:
            for chunk in open_stream():
                partial.append(chunk.text)
                yield chunk
            return
        except BackendError:
            raise
        except Exception as exc:
            delay = _stream_retry_delay(exc, partial, retrier, classify, backend, where)
        policy.sleep(delay)


async def astream_with_retries(
    open_stream: Callable[[], AsyncIterator[GenerationChunk]],
    policy: RetryPolicy,
    classify: Classifier,
    backend: str,
    where: str,
) -> AsyncIterator[GenerationChunk]:
    retrier = _Retrier(policy, backend, where)
    while True:
        partial: list[str] = []
        try:
            async for chunk in open_stream():
                partial.append(chunk.text)
                yield chunk
            return
        except BackendError:
            raise
        except Exception as exc:
            delay = _stream_retry_delay(exc, partial, retrier, classify, backend, where)
        await policy.asleep(delay)


# -- server-sent events -------------------------------------------------------------------


class SSEParser:
    """Feeds lines, returns complete ``data`` payloads (multi-line data joined by newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    parser = SSEParser()
    for line in lines:
        data = parser.feed(line)
        if data is not None:
            yield data
    tail = parser.flush()  # a last event without its blank line
    if tail is not None:
        yield tail


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    parser = SSEParser()
    async for line in lines:
        data = parser.feed(line)
        if data is not None:
            yield data
    tail = parser.flush()
    if tail is not None:
        yield tail


def parse_event(data: str) -> dict[str, Any]:
    """One SSE payload as JSON; a malformed one is a cut (a stream broken mid-event)."""
    try:
        event = json.loads(data)
    except ValueError:
        raise Failure(f"malformed event {data[:80]!r}", retryable=True, kind="cut") from None
    if not isinstance(event, dict):
        raise Failure(f"unexpected event {data[:80]!r}", retryable=True, kind="cut")
    return event


def stream_ended_early(received: int) -> Failure:
    return Failure(
        f"the stream ended before its final event ({received} tokens received)",
        retryable=True,
        kind="cut",
    )


# -- httpx-based backends -----------------------------------------------------------------


class HttpBackend(BaseBackend):
    """Shared plumbing of the httpx backends: clients, JSON posts and SSE streams with retries."""

    def __init__(
        self,
        base_url: str,
        *,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport
        self._async_transport = async_transport
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._client_lock = threading.Lock()

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.retry.timeout, connect=min(self.retry.timeout, 10.0))

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = httpx.Client(
                        base_url=self.base_url,
                        headers=self._headers,
                        timeout=self._timeout(),
                        transport=self._transport,
                    )
        return self._client

    @property
    def aclient(self) -> httpx.AsyncClient:
        """One async client per event loop: pooled connections belong to the loop that
        opened them, and a client reused from a finished loop fails on its first request."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=self._timeout(),
                transport=self._async_transport,
            )
            self._aclient_loop = loop
        return self._aclient

    def close(self) -> None:
        """Close the sync client (call :meth:`aclose` from async code for the async one)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._aclient = None  # its loop closes its connections

    async def aclose(self) -> None:
        if self._aclient is not None and self._aclient_loop is asyncio.get_running_loop():
            await self._aclient.aclose()
        self._aclient = None

    def _classify(self, exc: BaseException) -> Failure | None:
        return transport_failure(exc)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise status_failure(
                response.status_code, response.headers, response.content, self.retry
            )

    def post_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            response = self.client.post(path, json=body)
            self._check(response)
            return _json_body(response)

        return call_with_retries(attempt, self.retry, self._classify, self.name, self.base_url)

    async def apost_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            response = await self.aclient.post(path, json=body)
            self._check(response)
            return _json_body(response)

        return await acall_with_retries(
            attempt, self.retry, self._classify, self.name, self.base_url
        )

    def sse_events(self, path: str, body: Mapping[str, Any]) -> Iterator[str]:
        """The ``data`` payloads of one streamed POST (no retries: the caller's loop has them)."""
        with self.client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            yield from iter_sse(response.iter_lines())

    async def asse_events(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[str]:
        async with self.aclient.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                self._check(response)
            async for data in aiter_sse(response.aiter_lines()):
                yield data


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise Failure(
            f"HTTP {response.status_code} with a body that is not JSON: {response.text[:120]!r}",
            retryable=False,
            kind="protocol",
        ) from None
    if isinstance(body, list) and len(body) == 1:  # TGI's "/" wraps one result in a list
        body = body[0]
    if not isinstance(body, dict):
        raise Failure(f"unexpected response {body!r:.120}", retryable=False, kind="protocol")
    return body
