"""Bearer-token auth for the persona server: which users' personas a token may act on.

Each token is granted a :class:`TokenGrant`: a list of users and/or a tenant (a tenant token
acts on user ids ``<tenant>:...``). :func:`parse_tokens` checks the configuration
(``PERSONA_SERVER_TOKENS``, JSON) up front, so a malformed grant stops the server at start
rather than failing requests later. It keys the grants by the tokens' SHA-256 digests, so the
app's state holds no token in plain text. :func:`authenticate` (the FastAPI dependency behind
:data:`Authenticated`) answers a missing or unknown token with 401; the routes answer a user
the token does not own with 403.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona_plugin.errors import (
    PersonaConfigError,
    PersonaValidationError,
)
from persona_plugin.persona import validate_user_id
from persona_plugin.server.errors import OpenAIError

log = logging.getLogger(__name__)


# -- tokens -------------------------------------------------------------------------------


class TokenGrant(BaseModel):
    """What one bearer token may act on: listed users, and/or a tenant's users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: frozenset[str] = Field(default_factory=frozenset)
    tenant: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]{0,63}$")

    def allows(self, user_id: str) -> bool:
        if user_id in self.users:
            return True
        prefix = f"{self.tenant}:" if self.tenant else None
        return prefix is not None and user_id.startswith(prefix) and len(user_id) > len(prefix)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_tokens(tokens: Mapping[str, Any] | None) -> dict[str, TokenGrant]:
    """The grants by token digest; a malformed configuration is a PersonaConfigError."""
    grants: dict[str, TokenGrant] = {}
    for index, (token, spec) in enumerate((tokens or {}).items()):
        where = f"server token #{index + 1}"
        if not isinstance(token, str) or len(token) < 8 or token != token.strip():
            raise PersonaConfigError(
                f"{where} is not a usable bearer token: use at least 8 characters without "
                "surrounding spaces (PERSONA_SERVER_TOKENS)."
            )
        try:
            grant = spec if isinstance(spec, TokenGrant) else TokenGrant.model_validate(spec)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise PersonaConfigError(
                f"{where}: {'.'.join(map(str, err['loc'])) or 'grant'}: {err['msg']}. A grant "
                'is {"users": ["alice", ...]} and/or {"tenant": "acme"} (PERSONA_SERVER_TOKENS).'
            ) from None
        if not grant.users and not grant.tenant:
            raise PersonaConfigError(f"{where} grants nothing: give it users or a tenant.")
        for user in grant.users:
            try:
                validate_user_id(user, source=f"{where} users")
            except PersonaValidationError as exc:
                raise PersonaConfigError(str(exc)) from None
        grants[_digest(token)] = grant
    return grants


async def authenticate(request: Request) -> TokenGrant:
    """The grant of the request's bearer token (401 if missing or unknown)."""
    grants: dict[str, TokenGrant] = request.app.state.grants
    header = request.headers.get("authorization")
    if not header:
        raise OpenAIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <token>'.",
            type="authentication_error",
            code="missing_api_key",
        )
    scheme, _, token = header.partition(" ")
    grant = grants.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
    if grant is None:
        raise OpenAIError(
            401,
            "Incorrect API key provided.",
            type="authentication_error",
            code="invalid_api_key",
        )
    return grant


Authenticated = Annotated[TokenGrant, Depends(authenticate)]
