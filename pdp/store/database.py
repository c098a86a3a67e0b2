"""Engines for SQLite (embedded default) and PostgreSQL (production), with durable settings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

STATEMENT_TIMEOUT_MS = 10_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def normalize_url(url: str) -> URL:
    """Plain ``postgresql://`` URLs use psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


WRITE_OPTION = "pdp_write"


def write_transaction(engine: Engine) -> Any:
    """``engine.begin()`` for a transaction that reads, then writes (identity management, CLI commands).

    On SQLite it begins with ``BEGIN IMMEDIATE``: a deferred transaction that read first cannot wait for the
    write lock (SQLite refuses the upgrade at once with "database is locked" when another writer committed
    since its read), and the running server commits every second or so.
    """
    return engine.execution_options(**{WRITE_OPTION: True}).begin()


def create_db_engine(url: str, *, writer: bool = False, pool_size: int = 8) -> Engine:
    """An engine for ``url``.

    SQLite: WAL, synchronous=FULL (a committed decision survives power loss), foreign keys on, a busy
    timeout, and transactions SQLAlchemy controls itself so SAVEPOINTs work; ``writer=True`` begins
    with ``BEGIN IMMEDIATE`` so a writer never fails to upgrade a read lock.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("SQLite needs a file: an in-memory database would lose every decision")
        engine = create_engine(parsed, pool_size=pool_size, max_overflow=pool_size)
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            immediate = connection.get_execution_options().get(WRITE_OPTION)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else begin)

        return engine
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size, "pool_pre_ping": True}
    if parsed.get_backend_name() == "postgresql":
        # A stalled database must fail requests (closed), not hang the single writer forever.
        kwargs["connect_args"] = {
            "application_name": "agent-pdp",
            "connect_timeout": 10,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS}",
        }
    return create_engine(parsed, **kwargs)
