"""SSE streaming of a persona-graph turn, in OpenAI's ``chat.completion.chunk`` format.

The graph is synchronous, so ``_Run`` drives it in a worker thread and hands its events to
the response through an asyncio queue. Only the ``generate`` node's tokens are streamed: the
persona the other nodes assemble stays on the server. ``_stream_response`` waits for the
first event before it starts the response, so an error before any token still gets a real
status code; an error after that can only be sent as an error event in the stream. When the
client goes away, the upstream model is stopped at its next token (``_StopWhenGone``) and the
run at its next event. The unfinished turn is not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessageChunk,
    BaseMessage,
)
from langchain_core.runnables import RunnableConfig

from persona_plugin.server.errors import OpenAIError, _deadline_passed, _from_persona_error
from persona_plugin.server.protocol import _finish_reason, _usage

log = logging.getLogger(__name__)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


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


async def _stream_response(
    run: _Run,
    completion_id: str,
    model: str,
    include_usage: bool,
    *,
    timeout: float = 120.0,
    limiter: anyio.CapacityLimiter | None = None,
) -> Any:
    """The completion as server-sent events. ``timeout`` bounds the whole stream (a 504
    before the first token, an error event after it); ``limiter`` is the model's allowance
    of runs at once, held from before the run starts until its worker ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()
    deadline = loop.time() + timeout
    owner = object()
    if limiter is not None:
        try:
            with anyio.fail_after(timeout):
                await limiter.acquire_on_behalf_of(owner)
        except TimeoutError:
            raise _deadline_passed(timeout) from None

    def release() -> None:
        if limiter is not None:
            limiter.release_on_behalf_of(owner)

    def emit(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shut down): nobody listens
            stop.set()

    def work() -> None:
        try:
            run.stream(emit, stop)
        finally:  # the allowance is the loop's to give back
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(release)

    async def next_item() -> tuple[str, Any]:
        return await asyncio.wait_for(queue.get(), timeout=max(deadline - loop.time(), 0))

    worker = threading.Thread(target=work, name="persona-openai-stream", daemon=True)
    try:
        worker.start()
    except BaseException:
        release()
        raise
    try:
        first = await next_item()
    except TimeoutError:
        stop.set()
        raise _deadline_passed(timeout) from None
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
                try:
                    item = await next_item()
                except TimeoutError:
                    yield _sse(_deadline_passed(timeout).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a client gone mid-stream stops the run at the next chunk

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
