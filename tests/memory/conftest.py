"""The memory tests' shared fixtures: one embedder, embedded Chroma and a ``chroma run``
server per session, and :class:`Backend`, which opens memories on either."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chromadb
import pytest

from persona_plugin.embeddings.minilm import as_embedding_function
from persona_plugin.memory.long_term import LongTermMemory


@pytest.fixture(scope="session")
def embedding_function() -> Any:
    """The default (offline MiniLM) embedding function, loaded once for every test."""
    ef = as_embedding_function(None)
    ef(["warm up"])
    return ef


@pytest.fixture(scope="session")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the Chroma stores live: RAM (/dev/shm) where there is one.

    Chroma fsyncs every write; on a tmpfs that costs nothing, which keeps the 1,000-user
    test and the server fast. Elsewhere the pytest temporary directory is used.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="persona-test-", dir=shm))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("chroma")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ChromaServer:
    url: str
    host: str
    port: int
    path: Path


@pytest.fixture(scope="session")
def chroma_server(scratch_root: Path) -> Iterator[ChromaServer]:
    """One ``chroma run`` subprocess for the session, on a free port; killed at the end."""
    exe = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
    if not Path(exe).exists():
        pytest.fail("the `chroma` CLI is not installed (pip install chromadb)")
    path = scratch_root / "server"
    path.mkdir()
    log = scratch_root / "server.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"chroma run did not answer in 60 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield ChromaServer(f"http://127.0.0.1:{port}", "127.0.0.1", port, path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Backend:
    """Opens memories on one Chroma backend (embedded directory or server URL)."""

    mode: str
    embedding_function: Any
    path: Path | None = None
    server: ChromaServer | None = None
    collection: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:16]}")
    opened: list[LongTermMemory] = field(default_factory=list)

    @property
    def url(self) -> str | None:
        return self.server.url if self.server else None

    @property
    def sqlite_file(self) -> Path:
        """The chroma.sqlite3 holding this backend's data (the server's own, in server mode)."""
        base = self.server.path if self.server else self.path
        assert base is not None
        return base / "chroma.sqlite3"

    def open(self, collection: str | None = None, embedding_function: Any = None) -> LongTermMemory:
        memory = LongTermMemory(
            self.path,
            url=self.url,
            collection=collection or self.collection,
            embedding_function=embedding_function or self.embedding_function,
        )
        self.opened.append(memory)
        return memory

    def raw_client(self) -> Any:
        if self.server:
            return chromadb.HttpClient(host=self.server.host, port=self.server.port)
        return chromadb.PersistentClient(path=str(self.path))

    def cleanup(self) -> None:
        if self.server:  # the server outlives the test: drop what it created
            prefixes = {f"{m.collection_name}-" for m in self.opened}
            client = self.raw_client()
            for collection in client.list_collections():
                name = getattr(collection, "name", collection)
                if any(name.startswith(prefix) for prefix in prefixes):
                    with contextlib.suppress(Exception):
                        client.delete_collection(name)


@pytest.fixture(params=["embedded", "server"])
def backend(
    request: pytest.FixtureRequest, scratch_root: Path, embedding_function: Any
) -> Iterator[Backend]:
    if request.param == "server":
        server = request.getfixturevalue("chroma_server")
        backend = Backend("server", embedding_function, server=server)
    else:
        path = scratch_root / f"embedded-{uuid.uuid4().hex[:12]}"
        backend = Backend("embedded", embedding_function, path=path)
    try:
        yield backend
    finally:
        backend.cleanup()
        if backend.path:
            shutil.rmtree(backend.path, ignore_errors=True)


@pytest.fixture
def memory(backend: Backend) -> LongTermMemory:
    return backend.open()


@pytest.fixture
def embedded(scratch_root: Path, embedding_function: Any) -> Iterator[LongTermMemory]:
    """A memory in an embedded store of its own (the tests of one backend's behaviour)."""
    path = scratch_root / f"embedded-{uuid.uuid4().hex[:12]}"
    try:
        yield LongTermMemory(path, embedding_function=embedding_function)
    finally:
        shutil.rmtree(path, ignore_errors=True)
