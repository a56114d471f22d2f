"""The database schema's version: Alembic migrations (contracts/store/migrations), applied at start.

Every process that opens the store calls `upgrade(engine)`: when the database is already at the
newest revision this is one query; otherwise the migrations run under a lock (a PostgreSQL advisory
lock, or a lock file next to a SQLite database) so an API and several workers starting together
migrate once. A database created before migrations existed (tables but no `alembic_version`) is
adopted: stamped at the revision its columns match, then upgraded.

    alembic revision: add a file under contracts/store/migrations/versions/ (copy the newest one's shape).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

_LOCK_ID = zlib.crc32(b"qvq-queue schema") & 0x7FFFFFFF


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "contracts.store:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (the newest by default); safe to call from many processes."""
    target = head_revision() if revision == "head" else revision
    with engine.connect() as conn:
        if current_revision(conn) == target:
            return
    with _migration_lock(engine), engine.begin() as conn:
        if current_revision(conn) == target:  # another process did it while we waited
            return
        legacy = _legacy_revision(conn)
        config = alembic_config(conn)
        if legacy is not None:
            command.stamp(config, legacy)
        command.upgrade(config, target)


def _legacy_revision(conn: Connection) -> str | None:
    """The revision a pre-migration database matches, or None (a new database, or already versioned)."""
    inspector = sa.inspect(conn)
    tables = set(inspector.get_table_names())
    if "alembic_version" in tables or "qvq_tasks" not in tables:
        return None
    columns = {column["name"] for column in inspector.get_columns("qvq_tasks")}
    return "0002" if "retry_base" in columns else "0001"


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
                conn.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(_lock_path(database), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock_path(database: str) -> Path:
    """The lock file of one SQLite database's migrations: in the temporary directory (never beside the
    database, where it would be left in the user's working tree), named after the database's real path."""
    digest = hashlib.sha256(str(Path(database).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"qvq-migrate-{digest}.lock"
