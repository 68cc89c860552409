"""Chroma clients from the addresses a user writes: a server URL or a folder.

Long-term memory and knowledge bases both name a Chroma store by address: an ``http(s)://``
URL is a Chroma server (``chroma run``), checked with a heartbeat so a wrong URL fails at
start-up with the URL in the message, not on the first query; anything else is the folder
of an embedded ``PersistentClient``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from persona_plugin.errors import PersonaConfigError


def http_client(url: str) -> Any:
    """A client of the Chroma server at ``url``, checked reachable."""
    import chromadb

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PersonaConfigError(
            f"memory URL {url!r} is not an http(s) URL. Use e.g. http://127.0.0.1:8000."
        )
    try:
        client = chromadb.HttpClient(
            host=parsed.hostname,
            port=parsed.port or (443 if parsed.scheme == "https" else 80),
            ssl=parsed.scheme == "https",
        )
        client.heartbeat()
    except Exception as exc:
        raise PersonaConfigError(
            f"cannot reach the Chroma server at {url}: {exc}. Start it (`chroma run --host "
            "127.0.0.1 --port 8000`) or fix PERSONA_MEMORY_URL."
        ) from None
    return client


def client_for(address: str) -> Any:
    """A Chroma server's client for an http(s) URL, else an embedded store in that folder."""
    import chromadb

    if address.startswith(("http://", "https://")):
        return http_client(address)
    return chromadb.PersistentClient(path=str(Path(address).expanduser()))
