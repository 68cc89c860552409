"""Retries for the remote backends: which failures are transient, and how long to wait.

A timeout, a refused connection, or a status in ``retry_statuses`` (408, 429, 500, 502, 503,
504) is retried with exponential backoff and jitter (:class:`RetryPolicy`), honouring a
``Retry-After`` header (:func:`parse_retry_after`). When the retries run out, it is raised as
:class:`~persona_plugin.backends.types.BackendUnavailableError`. A ``Retry-After`` over
``max_retry_after`` fails at once rather than block the turn. A request the server rejects
(422, 424, other 4xx) is raised at once as
:class:`~persona_plugin.backends.types.BackendRequestError`, since a retry would fail the same
way. Each failure is first classified as a :class:`Failure` (:func:`status_failure`,
:func:`transport_failure`), so the same loop works for every HTTP library. The loop runs as
:func:`call_with_retries` or :func:`acall_with_retries`. :func:`stream_with_retries` retries
only until the first chunk, and a cut after it raises
:class:`~persona_plugin.backends.types.BackendStreamError`: a partial reply is never passed
off as a complete one.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from persona_plugin.backends.types import (
    BackendError,
    BackendProtocolError,
    BackendRequestError,
    BackendStreamError,
    BackendUnavailableError,
    GenerationChunk,
)

logger = logging.getLogger("persona_plugin.backends")

T = TypeVar("T")


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
            if failure.kind == "protocol":
                raise BackendProtocolError(
                    f"{what} answered without the documented shape: {failure.message}",
                    backend=self.backend,
                )
            if failure.kind == "cut":
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
