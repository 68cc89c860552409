"""Shared fixtures: real SQLite files and a real PostgreSQL schema per test."""

from __future__ import annotations

import os

# torch's thread pool (one thread a core) spins against the other processes of a busy
# 2-core machine: a token of the local model then costs 3-10x more than on one thread. Set
# before torch is imported; the variable reaches the example and CLI subprocesses too.
# PERSONA_TEST_THREADS overrides it.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("PERSONA_TEST_THREADS", "1"))

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from persona_plugin.store import PersonaStore
from tests.paths import MODEL_CACHE

POSTGRES_URL = os.environ.get(
    "PERSONA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test reads or writes the real ~/.persona-plugin or the caller's PERSONA_* settings."""
    for name in list(os.environ):
        if name.startswith("PERSONA_") and not name.startswith("PERSONA_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path_factory.mktemp("persona-home")))
    # built models (the fast embedder) are cached across tests and runs, not per home
    monkeypatch.setenv("PERSONA_CACHE_DIR", str(MODEL_CACHE))


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'personas.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema of the test database, dropped after."""
    schema = f"pp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc.orig}); start it or set "
            "PERSONA_TEST_POSTGRES_URL"
        )
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs against both backends."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def store(store_url: str) -> Iterator[PersonaStore]:
    with PersonaStore(store_url) as s:
        yield s
