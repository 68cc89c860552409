"""The versioned persona store: SQLite by default, PostgreSQL at scale, one code path.

Every save appends version N+1 with its source, reason, time and the change from N;
nothing is ever rewritten in place, so history is an audit trail and a rollback is just
a new version equal to an old one. Saves are compare-and-set: the primary key
``(user_id, version)`` makes two writers of the same N+1 collide in the database itself,
and the loser gets :class:`PersonaConflictError`. :meth:`PersonaStore.update` re-reads
and retries for callers that just want their change applied.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from persona_plugin._db import reading, writing
from persona_plugin.config import Settings
from persona_plugin.diff import Change, diff_documents
from persona_plugin.errors import (
    PersonaConfigError,
    PersonaConflictError,
    PersonaNotFoundError,
    PersonaValidationError,
)
from persona_plugin.persona import (
    DEFAULT_LIMITS,
    Persona,
    PersonaLimits,
    parse_persona,
    utc_now,
    validate_user_id,
)

#: what :meth:`PersonaStore.save` runs in the transaction of a version: ``(conn, version)``
WriteHook = Callable[[sa.Connection, int], None]

_NO_CAPS = PersonaLimits(max_value_chars=2**31, max_document_bytes=2**31)

log = logging.getLogger(__name__)
_metadata = sa.MetaData()

versions_table = sa.Table(
    "persona_versions",
    _metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("change", sa.JSON, nullable=False),
    # free-form facts about the save, e.g. a reflection's token use
    sa.Column("details", sa.JSON, nullable=False),
)


class VersionRecord(BaseModel):
    """One saved version of a user's persona and how it came to be."""

    user_id: str
    version: int
    created_at: str
    source: str
    reason: str = ""
    change: list[Change] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    persona: Persona | None = Field(None, description="left out by history()")


class PersonaStore:
    """Versioned, concurrency-safe persona storage behind a SQLAlchemy URL.

    ``PersonaStore("sqlite:///personas.db")`` or
    ``PersonaStore("postgresql+psycopg://host:5432/db")``; :meth:`from_settings` uses
    ``PERSONA_STORE_URL`` (default: a SQLite file under ``PERSONA_HOME``).
    """

    def __init__(
        self, url: str, *, limits: PersonaLimits = DEFAULT_LIMITS, create: bool = True
    ) -> None:
        """``create=False``: a SQLite file that does not exist is an error, not a new empty
        store (a mistyped path must not look like a store without users)."""
        self.url = url
        self.limits = limits
        self.engine = _make_engine(url, create=create)
        try:
            _metadata.create_all(self.engine, checkfirst=True)
        except OperationalError as exc:
            raise PersonaConfigError(
                f"cannot open the persona store at {_redact(url)}: {exc.orig}. Check "
                "PERSONA_STORE_URL and that the database is reachable."
            ) from None

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, create: bool = True
    ) -> PersonaStore:
        settings = settings or Settings.load()
        if settings.store_url is None and create:
            settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.resolved_store_url, limits=settings.limits, create=create)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> PersonaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------

    def current_version(self, user_id: str) -> int:
        """The user's latest version number, 0 if they have no persona."""
        validate_user_id(user_id)
        with self.engine.connect() as conn:
            return _current_version(conn, user_id)

    def exists(self, user_id: str) -> bool:
        return self.current_version(user_id) > 0

    def get(self, user_id: str, version: int | None = None) -> Persona:
        """The current persona (or ``version``); ``meta.version`` says which it is."""
        record = self.get_version(user_id, version)
        assert record.persona is not None
        return record.persona

    def get_version(self, user_id: str, version: int | None = None) -> VersionRecord:
        validate_user_id(user_id)
        t = versions_table
        query = sa.select(t).where(t.c.user_id == user_id)
        if version is None:
            query = query.order_by(t.c.version.desc()).limit(1)
        else:
            query = query.where(t.c.version == version)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
            if row is None:
                current = _current_version(conn, user_id)
        if row is None:
            if current == 0:
                raise PersonaNotFoundError(
                    f"user '{user_id}' has no persona. Create one with `persona init "
                    f"{user_id}` or PersonaStore.create()."
                )
            raise PersonaNotFoundError(
                f"user '{user_id}' has no version {version}; versions run from 1 to {current}."
            )
        return self._record(row, with_persona=True)

    def history(self, user_id: str) -> list[VersionRecord]:
        """Every version's record, oldest first, without the documents."""
        validate_user_id(user_id)
        t = versions_table
        columns = [c for c in t.c if c.name != "document"]
        query = sa.select(*columns).where(t.c.user_id == user_id).order_by(t.c.version)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        if not rows:
            raise PersonaNotFoundError(f"user '{user_id}' has no persona, so no history.")
        return [self._record(row, with_persona=False) for row in rows]

    def diff(self, user_id: str, old_version: int, new_version: int) -> list[Change]:
        """Field-level changes from ``old_version`` to ``new_version``."""
        old = self.get(user_id, old_version)
        new = self.get(user_id, new_version)
        return diff_documents(old.content_dict(), new.content_dict())

    def users(self) -> list[str]:
        t = versions_table
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.select(t.c.user_id).distinct().order_by(t.c.user_id)).scalars()
            )

    # -- writing --------------------------------------------------------------------------

    def create(
        self,
        user_id: str,
        persona: Persona | None = None,
        *,
        source: str = "create",
        reason: str = "",
    ) -> VersionRecord:
        """Save the first version; a conflict if the user already has a persona."""
        persona = persona or Persona.new(user_id)
        return self.save(user_id, persona, expected_version=0, source=source, reason=reason)

    def create_first(
        self, user_id: str, persona: Persona, *, memory: Any = None, reason: str = ""
    ) -> bool:
        """Version 1 (source ``first turn``) for a user a chat turn served from a cold start
        and nothing saved, linked to ``memory`` (its ``link()``) when given; whether this
        call created it (False: they have one, or another writer made it first)."""
        if self.exists(user_id):
            return False
        persona = persona.model_copy(deep=True)
        if memory is not None:
            persona.memory.long_term = memory.link()
        try:
            self.create(user_id, persona, source="first turn", reason=reason)
        except PersonaConflictError:
            log.info("persona of %s created concurrently", user_id)
            return False
        return True

    def save(
        self,
        user_id: str,
        persona: Persona,
        *,
        expected_version: int | None = None,
        source: str = "user edit",
        reason: str = "",
        details: dict[str, Any] | None = None,
        connection: sa.Connection | None = None,
        also: WriteHook | None = None,
    ) -> VersionRecord:
        """Save ``persona`` as the next version, if the store is still at ``expected_version``.

        ``expected_version`` defaults to ``persona.meta.version``: a persona read from
        the store and saved back fails with :class:`PersonaConflictError` if someone
        saved in between. The document is validated (types and size caps) first; a
        rejected document leaves the store untouched.

        ``also(conn, version)`` runs in the transaction that writes the version, so what
        it writes (e.g. the interaction log's "reflected") commits with the version or not
        at all; if it raises, the version is not written. ``connection``: write in the
        caller's open transaction (inside a savepoint) and leave the commit to the caller.
        """
        validate_user_id(user_id)
        expected = persona.meta.version if expected_version is None else expected_version
        if not source or len(source) > 200:
            raise PersonaValidationError(
                "save", "source", "source must be 1-200 characters", "Name what made the change."
            )
        # re-validate from plain data: assignments may have bypassed the caps
        persona = parse_persona(
            persona.to_dict(), source=f"persona of '{user_id}'", limits=self.limits
        )
        owner = persona.identity.user_id
        if owner is not None and owner != user_id:
            raise PersonaValidationError(
                f"persona of '{user_id}'",
                "identity.user_id",
                f"names user '{owner}', not '{user_id}'",
                "Save it under its own user id, or correct identity.user_id.",
            )
        t = versions_table
        with reading(self.engine, connection) as conn:
            current = _current_version(conn, user_id)
            if current != expected:
                raise PersonaConflictError(user_id, expected, current)
            previous: dict[str, Any] = {}
            if current:
                doc = conn.execute(
                    sa.select(t.c.document).where(t.c.user_id == user_id, t.c.version == current)
                ).scalar_one()
                previous = Persona.model_validate(doc).content_dict()
        version = expected + 1
        stamped = persona.with_meta(user_id=user_id, version=version, updated_at=utc_now())
        change = diff_documents(previous, stamped.content_dict())
        row = {
            "user_id": user_id,
            "version": version,
            "created_at": stamped.meta.updated_at,
            "source": source,
            "reason": reason,
            "document": stamped.to_dict(),
            "change": [c.model_dump(mode="json") for c in change],
            "details": details or {},
        }
        try:
            with writing(self.engine, connection) as conn:
                conn.execute(t.insert().values(**row))
                if also is not None:
                    also(conn, version)
        except IntegrityError:
            # another writer took this version number first
            raise PersonaConflictError(user_id, expected, self.current_version(user_id)) from None
        return VersionRecord(
            **{k: v for k, v in row.items() if k not in ("document", "change")},
            change=change,
            persona=stamped,
        )

    def update(
        self,
        user_id: str,
        fn: Callable[[Persona], Persona | None],
        *,
        source: str = "user edit",
        reason: str = "",
        details: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
        create_missing: bool = False,
        skip_unchanged: bool = False,
        max_attempts: int = 200,
        connection: sa.Connection | None = None,
        also: WriteHook | None = None,
    ) -> VersionRecord:
        """Apply ``fn`` to the current persona and save, retrying on conflicts.

        ``fn`` gets a private copy; it may change it in place (returning ``None``) or
        return a new persona. It may run several times, so it should only compute.
        ``details`` may be a callable, called after each run of ``fn``, for details that
        depend on what ``fn`` found. ``skip_unchanged``: when ``fn`` changed nothing, no
        version is written and the current version's record is returned (a version is a
        change someone can read). ``connection`` and ``also`` as for :meth:`save`; when
        nothing is written, ``also`` runs with the current version, in a transaction of
        its own (or the caller's).
        """
        delay = 0.002
        for _attempt in range(max_attempts):
            try:
                persona = self.get(user_id)
            except PersonaNotFoundError:
                if not create_missing:
                    raise
                persona = Persona.new(user_id)
            before = persona.content_dict() if skip_unchanged and persona.meta.version else None
            result = fn(persona)
            updated = persona if result is None else result
            if before is not None and updated.content_dict() == before:
                if also is not None:
                    with writing(self.engine, connection) as conn:
                        also(conn, persona.meta.version)
                return self.get_version(user_id, persona.meta.version)
            try:
                return self.save(
                    user_id,
                    updated,
                    expected_version=persona.meta.version,
                    source=source,
                    reason=reason,
                    details=details() if callable(details) else details,
                    connection=connection,
                    also=also,
                )
            except PersonaConflictError:
                # jittered backoff keeps many writers from colliding in lockstep
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.2)
        raise PersonaConflictError(user_id, persona.meta.version, self.current_version(user_id))

    def rollback(self, user_id: str, to_version: int, *, reason: str = "") -> VersionRecord:
        """A new version whose content equals ``to_version``'s."""
        target = self.get(user_id, to_version)

        def restore(_current: Persona) -> Persona:
            return target.model_copy(deep=True)

        return self.update(
            user_id,
            restore,
            source=f"rollback to version {to_version}",
            reason=reason,
            details={"rollback_to": to_version},
        )

    # -- per-user data rights -------------------------------------------------------------

    def export(self, user_id: str) -> dict[str, Any]:
        """Everything stored for the user: every version with its record."""
        validate_user_id(user_id)
        t = versions_table
        with self.engine.connect() as conn:
            rows = (
                conn.execute(sa.select(t).where(t.c.user_id == user_id).order_by(t.c.version))
                .mappings()
                .all()
            )
        if not rows:
            raise PersonaNotFoundError(f"user '{user_id}' has no persona to export.")
        return {
            "user_id": user_id,
            "exported_at": utc_now(),
            "versions": [dict(row) for row in rows],
        }

    def delete(self, user_id: str) -> int:
        """Remove every version of the user's persona; returns how many rows went."""
        validate_user_id(user_id)
        t = versions_table
        with self.engine.begin() as conn:
            deleted = conn.execute(t.delete().where(t.c.user_id == user_id)).rowcount
        if deleted and self.engine.dialect.name == "sqlite":
            # the old pages live on in the write-ahead log until it is checkpointed
            with self.engine.connect() as conn:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            if busy and busy[0]:  # a reader held the log: its old pages stay until later
                log.warning("the WAL of %s was busy after deleting %s", _redact(self.url), user_id)
        if not deleted:
            raise PersonaNotFoundError(f"user '{user_id}' has no persona to delete.")
        return deleted

    # -- helpers --------------------------------------------------------------------------

    def _record(self, row: Any, *, with_persona: bool) -> VersionRecord:
        persona = None
        if with_persona:
            # validate again so a corrupted row is reported, not served; but not against
            # today's caps: lowering a cap must not lock users out of what they have (the
            # caps apply again when the persona is next saved)
            persona = parse_persona(
                row["document"],
                source=f"store ({row['user_id']} v{row['version']})",
                limits=_NO_CAPS,
            )
        return VersionRecord(
            user_id=row["user_id"],
            version=row["version"],
            created_at=row["created_at"],
            source=row["source"],
            reason=row["reason"] or "",
            change=[Change.model_validate(c) for c in row["change"]],
            details=row["details"] or {},
            persona=persona,
        )


def _current_version(conn: sa.Connection, user_id: str) -> int:
    t = versions_table
    return conn.execute(
        sa.select(sa.func.coalesce(sa.func.max(t.c.version), 0)).where(t.c.user_id == user_id)
    ).scalar_one()


def _redact(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def _make_engine(url: str, *, create: bool = True) -> Engine:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise PersonaConfigError(
            f"store URL {url!r} is not a database URL. Use e.g. sqlite:///path/personas.db "
            "or postgresql+psycopg://host:5432/dbname."
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")
        if not in_memory:
            file = Path(parsed.database).expanduser()
            if not create and not file.exists():
                raise PersonaConfigError(
                    f"there is no persona store at {file}: check the path (--store, "
                    "PERSONA_STORE_URL), or create one with `persona init USER`."
                )
            file.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 60, "check_same_thread": False}
        # every connection to :memory: is a database of its own: one shared connection
        # keeps the tables (async callers run on other threads)
        pool = {"poolclass": StaticPool} if in_memory else {}
        engine = sa.create_engine(parsed, connect_args=connect_args, **pool)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL: readers never block the writer; a killed writer leaves the last commit
            cursor.execute("PRAGMA journal_mode=WAL")
            # in WAL mode NORMAL syncs at checkpoints, not at every commit: a killed process
            # loses nothing, a power cut may lose the last commits (never the file's
            # consistency). A commit's fsync was most of what the interaction log added to a
            # turn; a deployment that needs every commit on disk uses PostgreSQL
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            # a deleted user's text must not stay readable in the file's free pages
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, pool_pre_ping=True)
    raise PersonaConfigError(
        f"store URL scheme '{parsed.drivername}' is not supported. Use sqlite:/// or "
        "postgresql+psycopg://."
    )
