"""Errors in OpenAI's shape: what a client of the persona server sees when a request fails.

Every failure is answered as ``{"error": {"message", "type", "param", "code"}}`` by
:class:`OpenAIError`, never as a traceback, so OpenAI's client libraries raise their usual
exceptions. The helpers map the library's own errors onto it: a
:class:`~persona_plugin.errors.PersonaValidationError` is a 400 naming the param, a
:class:`~persona_plugin.errors.PersonaNotFoundError` a 404, and a body FastAPI failed to
validate a 400 worded like OpenAI's. A failure of the model upstream is a 502, 503 or 504, which
clients retry. Anything else is a 500 whose details go only to the server log, because
internals are not the client's business.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from persona_plugin.backends.types import (
    AdapterNotServedError,
    BackendError,
    BackendUnavailableError,
)
from persona_plugin.errors import (
    PersonaNotFoundError,
    PersonaValidationError,
)

log = logging.getLogger(__name__)


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
    upstream = _upstream_status(exc)
    if upstream is not None:
        log.warning("the model upstream failed: %s: %s", type(exc).__name__, exc)
        status, code, what = upstream
        return OpenAIError(
            status,
            f"The model server {what}; try again shortly.",
            type="server_error",
            code=code,
        )
    log.error("persona server request failed", exc_info=exc)
    return OpenAIError(
        500,
        "The persona server failed to produce a reply; the server log has the details.",
        type="server_error",
        code="internal_error",
    )


def _upstream_status(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, code, wording) for a failure of the model upstream, which a client should
    retry: 504 for a timeout, 503 for an overloaded or unreachable upstream, 502 for one
    that answered with an error. None for anything else (this server's own fault)."""
    if isinstance(exc, AdapterNotServedError):  # refused before any request: our config
        return None
    if type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")):
        return None  # the store's or checkpointer's trouble is this server's own
    name = type(exc).__name__
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    timed_out = isinstance(exc, BackendUnavailableError) and "timed out" in str(exc)
    if isinstance(exc, TimeoutError) or "Timeout" in name or timed_out:
        return 504, "upstream_timeout", "did not answer in time"
    overloaded = status in (429, 503, 529) or name.startswith("RateLimit")
    if isinstance(exc, BackendUnavailableError | ConnectionError) or overloaded:
        return 503, "upstream_unavailable", "is overloaded or unavailable"
    if isinstance(exc, BackendError) or (status or 0) >= 500 or "Connect" in name:
        return 502, "upstream_error", "answered with an error"
    return None


def _deadline_passed(timeout: float) -> OpenAIError:
    """The 504 of a completion that outlasted its deadline (clients retry it)."""
    return OpenAIError(
        504,
        f"The model server did not answer within {timeout:g} s; try again shortly.",
        type="server_error",
        code="upstream_timeout",
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


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is over the cap of {max_bytes} bytes.",
        param="messages",
        code="request_too_large",
    )
