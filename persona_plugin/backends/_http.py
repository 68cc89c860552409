"""The HTTP plumbing shared by the remote backends: httpx clients, JSON posts and SSE streams.

:class:`HttpBackend` is the base of the httpx backends (vLLM, LoRAX). It holds one sync
client, and one async client per event loop, because pooled connections belong to the loop
that opened them. :meth:`HttpBackend.post_json` retries through
:mod:`persona_plugin.backends._retry`. :meth:`HttpBackend.sse_events` does not retry, because
the caller's stream loop does, and only until the first token. :class:`SSEParser`,
:func:`iter_sse` and :func:`aiter_sse` read server-sent events. A malformed event
(:func:`parse_event`) or a stream that ends before its final event
(:func:`stream_ended_early`) counts as a cut, which is retried only while no text has been
handed out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import (
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, TypeVar

import httpx

from persona_plugin.backends._retry import (
    Failure,
    RetryPolicy,
    acall_with_retries,
    call_with_retries,
    status_failure,
    transport_failure,
)
from persona_plugin.backends.base import BaseBackend

logger = logging.getLogger("persona_plugin.backends")

T = TypeVar("T")


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
