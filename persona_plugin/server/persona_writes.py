"""The persona server's write routes: replace, patch and roll back a persona.

* ``PUT /v1/personas/{user_id}``: ``{"document": {...}, "reason": "..."}`` replaces the
  persona (or creates it) as a new version;
* ``PATCH /v1/personas/{user_id}``: ``{"patch": {...}, "reason": "..."}`` applies a JSON
  merge patch (RFC 7396: an object merges key by key, ``null`` deletes a key, anything
  else, lists included, replaces) to the current document;
* ``POST /v1/personas/{user_id}/rollback``: ``{"version": N, "reason": "..."}`` restores
  version N as a new version, and withdraws the memory facts the rolled-back reflections
  stored (as ``persona rollback`` does).

Each takes ``If-Match: <version>`` (``"3"``, ``W/"3"``; ``0`` for "only if the user has
no persona yet") for compare-and-set: a persona that has moved on answers 409
``version_conflict`` with the current version, and nothing is written. Without it the
write applies to whatever version is current. Every answer carries the new version in
``ETag``, as ``GET`` does. A document that fails validation answers 400 naming the
field, and nothing is written; a write that changes nothing writes no version (the
answer is the current one). The same bearer tokens and user ownership as every route.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response

from persona_plugin.errors import (
    PersonaConflictError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import Persona
from persona_plugin.server.auth import Authenticated, TokenGrant
from persona_plugin.server.errors import OpenAIError, _bad, _from_persona_error
from persona_plugin.server.protocol import _read_json

#: the source of versions written through these routes
SOURCE = "api"
MAX_REASON_CHARS = 500


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with the JSON merge patch ``patch`` applied (RFC 7396); a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def expected_version(request: Request) -> int | None:
    """The version ``If-Match`` names (None: no header)."""
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit() or len(value) > 12:
        raise _bad(
            f"If-Match must be the persona version the change was made against (e.g. "
            f'If-Match: "3", the ETag of GET /v1/personas/{{user_id}}), not {raw!r}.',
            "If-Match",
            "invalid_if_match",
        )
    return int(value)


def _conflict(exc: PersonaConflictError) -> OpenAIError:
    return OpenAIError(
        409,
        f"The persona of '{exc.user_id}' is at version {exc.actual}, not {exc.expected}: it "
        "changed since you read it. GET it again and re-apply your change.",
        type="conflict_error",
        param="If-Match",
        code="version_conflict",
    )


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise _bad(f"'reason' must be text of at most {MAX_REASON_CHARS} characters.", "reason")
    return reason


def _object(body: Any, key: str, what: str) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get(key), dict):
        raise _bad(f"The body must be a JSON object with {what} under '{key}'.", key)
    return body


def add_persona_write_routes(
    app: FastAPI,
    *,
    graph: Any,
    authorize: Callable[[TokenGrant, Any, str | None], str],
    max_body_bytes: int,
) -> None:
    """Mount the write routes on ``app``; ``graph`` is the persona graph (its store, and its
    rollback, which also withdraws memory facts)."""
    store = graph.store

    def answer(record: Any, response: Response) -> dict[str, Any]:
        response.headers["ETag"] = f'"{record.version}"'
        return {
            "object": "persona",
            "user_id": record.user_id,
            "version": record.version,
            "source": record.source,
            "reason": record.reason,
            "change": [c.model_dump(mode="json") for c in record.change],
            "document": record.persona.to_dict() if record.persona is not None else None,
        }

    def write(
        user_id: str, expected: int | None, make: Callable[[Persona | None], Persona], reason: str
    ) -> Any:
        """Save ``make(current)`` as the next version, against ``expected`` (or whatever
        is current: retried on a concurrent write)."""
        if expected is None:
            return store.update(
                user_id,
                lambda current: make(current if current.meta.version else None),
                source=SOURCE,
                reason=reason,
                create_missing=True,
                skip_unchanged=True,
            )
        at = store.current_version(user_id)
        if at != expected:  # save checks again, atomically; this spares building the change
            raise PersonaConflictError(user_id, expected, at)
        current = store.get(user_id) if expected else None
        persona = make(current)
        if current is not None and persona.content_dict() == current.content_dict():
            return store.get_version(user_id, expected)  # no change, no version
        return store.save(user_id, persona, expected_version=expected, source=SOURCE, reason=reason)

    async def run(fn: Callable[[], Any]) -> Any:
        try:
            return await anyio.to_thread.run_sync(fn)
        except PersonaConflictError as exc:
            raise _conflict(exc) from None
        except (PersonaValidationError, PersonaNotFoundError) as exc:
            raise _from_persona_error(exc) from None

    @app.put("/v1/personas/{user_id}")
    async def replace_persona(
        user_id: str, request: Request, response: Response, grant: Authenticated
    ) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        body = _object(await _read_json(request, max_body_bytes), "document", "the persona")
        reason, expected = _reason(body), expected_version(request)

        def make(_current: Persona | None) -> Persona:
            return Persona.from_dict(body["document"], source="document")

        return answer(await run(lambda: write(user_id, expected, make, reason)), response)

    @app.patch("/v1/personas/{user_id}")
    async def patch_persona(
        user_id: str, request: Request, response: Response, grant: Authenticated
    ) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        body = _object(await _read_json(request, max_body_bytes), "patch", "a merge patch")
        reason, expected = _reason(body), expected_version(request)

        def make(current: Persona | None) -> Persona:
            if current is None:
                raise PersonaNotFoundError(
                    f"user '{user_id}' has no persona to patch: PUT a whole one first."
                )
            merged = merge_patch(current.to_dict(), body["patch"])
            return Persona.from_dict(merged, source="patch")

        def patch() -> Any:
            if expected is None and not store.exists(user_id):
                make(None)  # a 404, not a new persona made of a patch
            return write(user_id, expected, make, reason)

        return answer(await run(patch), response)

    @app.post("/v1/personas/{user_id}/rollback")
    async def rollback_persona(
        user_id: str, request: Request, response: Response, grant: Authenticated
    ) -> dict[str, Any]:
        authorize(grant, user_id, "user_id")
        body = await _read_json(request, max_body_bytes)
        version = body.get("version") if isinstance(body, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _bad('The body must name the version to restore: {"version": N}.', "version")
        reason, expected = _reason(body), expected_version(request)

        def roll_back() -> Any:
            current = store.current_version(user_id)
            if expected is not None and expected != current:
                raise PersonaConflictError(user_id, expected, current)
            return graph.rollback(user_id, version, reason=reason or f"rollback to v{version}")

        return answer(await run(roll_back), response)
