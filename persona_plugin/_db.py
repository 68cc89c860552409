"""Connections for code that may run inside a caller's transaction or in one of its own.

The reflection worker writes a persona version and marks the log's queued work reflected
in ONE transaction (and on PostgreSQL keeps the queued rows locked in it while the
reflection runs), so the store and the log accept a caller's connection; without one
they open their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa


@contextmanager
def reading(engine: sa.Engine, conn: sa.Connection | None) -> Iterator[sa.Connection]:
    """``conn`` itself, or a connection of the engine's for the block."""
    if conn is not None:
        yield conn
    else:
        with engine.connect() as own:
            yield own


@contextmanager
def writing(engine: sa.Engine, conn: sa.Connection | None) -> Iterator[sa.Connection]:
    """A transaction of its own, or a savepoint in the caller's (a failed write then
    undoes only itself, and the caller's transaction stays usable)."""
    if conn is not None:
        with conn.begin_nested():
            yield conn
    else:
        with engine.begin() as own:
            yield own
