"""OpenAI's Chat Completions request as the persona server reads it, and the parts of its reply.

:class:`ChatCompletionRequest` models only the fields the server reads and ignores the rest,
so a client written for OpenAI works unchanged. :func:`to_langchain_messages` turns
``messages`` into LangChain messages and refuses what the persona graph cannot answer (tool
and function calls, non-text parts, a history that does not end on a user message, text over
the caps) with a 400 naming the param, as OpenAI does. The app sends the whole history each
time: the server keeps no thread state.

The sampling parameters in :data:`PASSED_PARAMS` travel per request under
``config["configurable"][PARAMS_KEY]`` and are bound to the upstream model at call time, so
one compiled graph serves every request. Usage is the upstream model's own count when it
reports one; otherwise the texts are counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Request
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.runnables import RunnableConfig, RunnableLambda
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from persona_plugin.server.errors import _bad, _too_large

log = logging.getLogger(__name__)
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


# -- the request --------------------------------------------------------------------------


class _StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """The part of OpenAI's request this server reads; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1)
    # strict: OpenAI refuses "stream": "yes", and so must a drop-in replacement
    stream: StrictBool = False
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
    logprobs: StrictBool | None = None
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
    except RecursionError:
        raise _bad(
            "The JSON body of your request is nested too deeply.", None, "invalid_json"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
            "invalid_json",
        ) from None
    except ValueError as exc:  # a number of thousands of digits
        raise _bad(f"The JSON body holds a number that cannot be read: {exc}", None) from None


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: feedback on one turn (a completion's ``id`` is its turn id)."""

    model_config = ConfigDict(extra="forbid")

    turn_id: str = Field(min_length=1, max_length=200)
    kind: Literal["rating", "edit", "regenerate", "choice"]
    rating: StrictInt | None = None
    comment: str | None = None
    text: str | None = None
    choice: StrictInt | None = None
    user: str | None = None
