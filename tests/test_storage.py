"""Storage on real databases: migrations match the models, SQLite is durable, group commit is per caller."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, Engine, insert, inspect, select, text

from pdp.store.database import create_db_engine
from pdp.store.migrate import alembic_config, is_current, upgrade
from pdp.store.models import Base, agents
from pdp.store.writer import GroupCommitWriter

WAIT = 30  # seconds: a bound for futures, never an expectation about speed


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def writer_engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url, writer=True, pool_size=1)
    yield engine
    engine.dispose()


@pytest.fixture
def writer(writer_engine: Engine) -> Iterator[GroupCommitWriter]:
    writer = GroupCommitWriter(writer_engine)
    yield writer
    writer.close()


def agent_row(agent_id: str) -> dict[str, Any]:
    return {
        "id": agent_id,
        "owner": "tester",
        "roles": [],
        "labels": {},
        "token_hash": f"{agent_id:0>64}"[-64:],
        "created_at": datetime.now(UTC),
        "revoked_at": None,
    }


def insert_agent(agent_id: str) -> Any:
    def work(conn: Connection) -> str:
        conn.execute(insert(agents).values(agent_row(agent_id)))
        return agent_id

    return work


def stored_agents(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(agents.c.id).order_by(agents.c.id)).scalars())


# --- Migrations --------------------------------------------------------------------------------------


def test_migrations_match_the_models(database_url: str) -> None:
    """`alembic check`: autogenerate finds nothing to add, so models and migrations never drift."""
    command.check(alembic_config(database_url))


def test_upgrade_creates_every_table_and_is_current(database_url: str, engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables) | {"alembic_version"}
    assert is_current(engine)
    upgrade(database_url)  # a second upgrade is a no-op
    assert is_current(engine)


def test_fresh_database_is_not_current(empty_database_url: str) -> None:
    engine = create_db_engine(empty_database_url)
    try:
        assert not is_current(engine)
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(database_url: str, engine: Engine) -> None:
    command.downgrade(alembic_config(database_url), "base")
    assert not set(Base.metadata.tables) & set(inspect(engine).get_table_names())
    upgrade(database_url)
    assert is_current(engine)
    command.check(alembic_config(database_url))


def test_idempotency_key_is_unique_per_agent(engine: Engine) -> None:
    """The database itself enforces one proposal per (agent, idempotency key)."""
    constraints = inspect(engine).get_unique_constraints("proposals")
    assert {tuple(c["column_names"]) for c in constraints} >= {("agent_id", "idempotency_key")}


# --- SQLite durability settings ----------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(url)
    return url


@pytest.mark.parametrize("writer", [False, True], ids=["reader", "writer"])
def test_sqlite_engine_is_wal_with_full_sync(sqlite_url: str, writer: bool) -> None:
    engine = create_db_engine(sqlite_url, writer=writer)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) > 0
    finally:
        engine.dispose()


def _can_take_write_lock(path: Path) -> bool:
    """Whether another connection could start a write transaction right now (no waiting)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    else:
        other.execute("ROLLBACK")
        return True
    finally:
        other.close()


@pytest.mark.parametrize(("writer", "locks"), [(False, False), (True, True)], ids=["reader", "writer"])
def test_sqlite_writer_transactions_take_the_write_lock_at_begin(
    sqlite_url: str, tmp_path: Path, writer: bool, locks: bool
) -> None:
    """BEGIN IMMEDIATE for the writer: it never fails later upgrading a read lock to a write lock."""
    engine = create_db_engine(sqlite_url, writer=writer)
    try:
        with engine.begin():
            assert _can_take_write_lock(tmp_path / "pdp.db") is not locks
        assert _can_take_write_lock(tmp_path / "pdp.db")
    finally:
        engine.dispose()


def test_sqlite_in_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        create_db_engine("sqlite:///:memory:")


def test_sqlite_savepoints_work(sqlite_url: str) -> None:
    """SQLAlchemy controls transactions itself, so a nested rollback undoes only its own part."""
    engine = create_db_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(agents).values(agent_row("kept")))
            nested = conn.begin_nested()
            conn.execute(insert(agents).values(agent_row("undone")))
            nested.rollback()
        assert stored_agents(engine) == ["kept"]
    finally:
        engine.dispose()


# --- Group-commit writer -----------------------------------------------------------------------------


def test_failing_unit_does_not_take_its_batch_down(writer: GroupCommitWriter, engine: Engine) -> None:
    # Hold the writer thread in a unit of its own so the next units queue up and commit as one batch.
    started, release = threading.Event(), threading.Event()

    def blocker(conn: Connection) -> str:
        started.set()
        assert release.wait(WAIT)
        return "blocker"

    attempts: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    def counted(agent_id: str) -> Any:
        def work(conn: Connection) -> str:
            attempts[agent_id] += 1
            return str(insert_agent(agent_id)(conn))

        return work

    def failing(conn: Connection) -> str:
        attempts["b"] += 1
        conn.execute(insert(agents).values(agent_row("b")))  # written, then rolled back
        raise RuntimeError("unit b fails")

    first = writer.submit(blocker)
    assert started.wait(WAIT)
    a, b, c = writer.submit(counted("a")), writer.submit(failing), writer.submit(counted("c"))
    # An integrity error is a failure too: a duplicate of "a" queued in the same batch.
    duplicate = writer.submit(insert_agent("a"))
    release.set()

    assert first.result(WAIT) == "blocker"
    assert a.result(WAIT) == "a"
    assert c.result(WAIT) == "c"
    with pytest.raises(RuntimeError, match="unit b fails"):
        b.result(WAIT)
    assert duplicate.exception(WAIT) is not None
    assert stored_agents(engine) == ["a", "c"]
    # a, b, c and the duplicate were one batch: each unit ran once in its own savepoint, so b's row and
    # the duplicate were rolled back alone while a and c committed.
    assert attempts == {"a": 1, "b": 1, "c": 1}


def test_a_caller_that_gave_up_is_skipped_and_the_batch_still_answers(
    writer: GroupCommitWriter, engine: Engine
) -> None:
    """A cancelled caller (client deadline) records nothing, and the others in its batch get their results."""
    started, release = threading.Event(), threading.Event()

    def blocker(conn: Connection) -> str:
        started.set()
        assert release.wait(WAIT)
        return "blocker"

    first = writer.submit(blocker)
    assert started.wait(WAIT)
    a, gone, c = writer.submit(insert_agent("a")), writer.submit(insert_agent("gone")), writer.submit(insert_agent("c"))
    assert gone.cancel()
    release.set()

    assert first.result(WAIT) == "blocker"
    assert a.result(WAIT) is not None
    assert c.result(WAIT) is not None
    assert stored_agents(engine) == ["a", "c"]


def test_results_arrive_only_after_commit(writer: GroupCommitWriter, engine: Engine) -> None:
    observed: dict[str, Any] = {}
    future_holder: list[Future[str]] = []

    def work(conn: Connection) -> str:
        conn.execute(insert(agents).values(agent_row("durable")))
        # Inside the transaction: not yet visible elsewhere, and the caller has no answer yet.
        observed["visible_inside"] = "durable" in stored_agents(engine)
        observed["done_inside"] = future_holder[0].done() if future_holder else None
        return "durable"

    checked = threading.Event()

    def on_done(future: Future[str]) -> None:
        # Runs the moment the caller's future resolves: the row must already be committed.
        observed["visible_when_resolved"] = "durable" in stored_agents(engine)
        checked.set()

    started, release = threading.Event(), threading.Event()

    def blocker(conn: Connection) -> bool:
        started.set()
        return release.wait(WAIT)

    writer.submit(blocker)
    assert started.wait(WAIT)
    future = writer.submit(work)
    future_holder.append(future)
    future.add_done_callback(on_done)
    release.set()

    assert future.result(WAIT) == "durable"
    assert checked.wait(WAIT)
    assert observed == {"visible_inside": False, "done_inside": False, "visible_when_resolved": True}
    assert stored_agents(engine) == ["durable"]


def test_many_units_from_many_threads_all_commit(writer: GroupCommitWriter, engine: Engine) -> None:
    futures: list[Future[str]] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        for i in range(20):
            future = writer.submit(insert_agent(f"t{n:02d}-{i:02d}"))
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    results = {future.result(WAIT) for future in futures}
    assert len(results) == 160
    assert set(stored_agents(engine)) == results


def test_close_finishes_queued_work_then_refuses(writer_engine: Engine, engine: Engine) -> None:
    writer = GroupCommitWriter(writer_engine)
    futures = [writer.submit(insert_agent(f"q{i}")) for i in range(10)]
    writer.close()

    assert [f.result(0) for f in futures] == [f"q{i}" for i in range(10)]
    late = writer.submit(insert_agent("late"))
    with pytest.raises(RuntimeError, match="closed"):
        late.result(0)
    assert "late" not in stored_agents(engine)


def test_unit_results_can_be_any_value(writer: GroupCommitWriter) -> None:
    future = writer.submit(lambda conn: conn.execute(text("SELECT 41 + 1")).scalar())
    assert future.result(WAIT) == 42


@pytest.mark.backend("postgres")
def test_postgres_statements_time_out(engine: Engine) -> None:
    """A stalled database must fail a request (closed), not hang the single writer forever."""
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "10s"
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "10s"
