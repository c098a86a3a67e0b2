"""Issue 10, finding 5: the audit chain's lock must survive a savepoint rollback (PostgreSQL).

The group-commit writer runs each unit in a SAVEPOINT, and ``ROLLBACK TO SAVEPOINT`` releases every lock
taken after it, advisory transaction locks included. An agent can make a unit fail at will (an idempotency
key reused for another action, a cancel of a proposal that is not pending); when that unit was the first of
its batch to take the chain's lock, the rest of the batch used to append and count limits without it. Two
replicas then appended the same ``seq`` (other agents got UNAVAILABLE) and a retry storm got one decision
more than its limit.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    BackgroundServer,
    ServeProcess,
    fresh_database,
    server_config,
    signing_key,
    start_serve,
)
from execution import executor_config
from execution import write_bundle as execution_bundle
from sqlalchemy import Connection, select, text
from test_audit_chain import assert_chain_intact, public_key
from test_limits import PREFIX, write_bundle

from executor.config import load
from executor.main import build
from pdp.audit import chain
from pdp.audit.verify import verify
from pdp.client import PdpClient, PdpClientError
from pdp.errors import FailedPrecondition
from pdp.identity.agents import add_agent
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events
from pdp.store.writer import GroupCommitWriter
from pdp.v1 import pdp_pb2

WAIT = 60.0  # seconds: a bound for futures and threads, never an expectation about speed


def other_session_can_take_the_chain_lock(database_url: str) -> bool:
    """From a connection of its own, as another replica would: is the main chain's lock free right now?"""
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:  # a try-lock at transaction level, released at once by the rollback
            free = conn.execute(
                text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": chain.advisory_key(chain.MAIN_CHAIN)}
            ).scalar_one()
            conn.rollback()
    finally:
        engine.dispose()
    return bool(free)


def event(n: int) -> chain.Event:
    return chain.Event(type="test.event", actor="test", occurred_at=datetime.now(UTC), data={"n": n})


def hold_a_batch_open(writer: GroupCommitWriter, database_url: str) -> bool:
    """A batch whose first unit takes the chain lock and then fails (what a refused cancel or a reused
    idempotency key does), followed by a unit that appends and waits. Returns whether another session could
    take the chain lock while that second unit was inside the open transaction."""
    started, release = threading.Event(), threading.Event()
    inside, leave = threading.Event(), threading.Event()

    def blocker(conn: Connection) -> None:  # holds the writer thread so the next units queue into one batch
        started.set()
        assert release.wait(WAIT)

    def refused(conn: Connection) -> None:
        chain.lock_chain(conn)
        raise FailedPrecondition("proposal is not pending approval")

    def appends_and_waits(conn: Connection) -> int:
        appended = chain.append(conn, event(1))
        inside.set()
        assert leave.wait(WAIT)
        return appended.seq

    first = writer.submit(blocker)
    assert started.wait(WAIT)
    failing, appending = writer.submit(refused), writer.submit(appends_and_waits)
    release.set()
    first.result(WAIT)
    try:
        assert inside.wait(WAIT)
        free = other_session_can_take_the_chain_lock(database_url)
    finally:
        leave.set()
    with pytest.raises(FailedPrecondition):
        failing.result(WAIT)
    assert appending.result(WAIT) >= 1
    return free


@pytest.mark.backend("postgres")
def test_the_pdp_writer_keeps_the_chain_lock_after_a_failed_first_unit(database_url: str) -> None:
    """The server's own writer: after the batch's first unit failed, the unit that appends holds the lock."""
    config = replace(server_config(database_url), checkpoint_every="1000000", checkpoint_interval="3600")
    background = BackgroundServer(config)  # its checkpointer stays out of the way of the batch under test
    try:
        assert not hold_a_batch_open(background.running.writer, database_url), (
            "another replica could take the chain lock while this batch was appending"
        )
    finally:
        background.stop()


@pytest.mark.backend("postgres")
def test_the_executor_writer_keeps_the_chain_lock_after_a_failed_first_unit(database_url: str, tmp_path: Path) -> None:
    """The executor's writer, built as `pdp-executor` builds it (not started: no claim loop competes)."""
    token_file = tmp_path / "target.token"
    token_file.write_text("never-used-in-this-test")
    config = executor_config(
        tmp_path,
        database_url=database_url,
        policy_dir=execution_bundle(tmp_path / "bundle", "http://127.0.0.1:9/"),
        signing_key=signing_key(),
        token_file=token_file,
    )
    executor = build(load(config, env={}))
    try:
        writes = executor._writes  # the writer every claim, finish and recovery transaction goes through
        assert not hold_a_batch_open(writes, database_url), (
            "another executor could take the chain lock while this batch was appending"
        )
    finally:
        executor.stop()


@pytest.mark.backend("postgres")
def test_lock_chain_refuses_to_start_inside_a_savepoint(database_url: str) -> None:
    """A lock taken inside a savepoint would be dropped by its rollback: lock_chain refuses rather than
    hand out a lock that may vanish, so a writer built without the chain lock cannot append."""
    engine = create_db_engine(database_url, writer=True, pool_size=1)
    try:
        with engine.begin() as conn:
            savepoint = conn.begin_nested()
            with pytest.raises(chain.ChainLockError, match="savepoint"):
                chain.append(conn, event(1))
            savepoint.rollback()
        bare = GroupCommitWriter(engine)  # no chain lock before its savepoints
        try:
            with pytest.raises(chain.ChainLockError):
                bare.submit(lambda conn: chain.append(conn, event(2))).result(WAIT)
        finally:
            bare.close()
        with engine.begin() as conn:  # outside any savepoint it takes the lock, once per transaction
            chain.lock_chain(conn)
            savepoint = conn.begin_nested()
            chain.append(conn, event(3))
            savepoint.rollback()  # the lock was taken before the savepoint: still held
            assert not other_session_can_take_the_chain_lock(database_url)
            chain.append(conn, event(4))
        with engine.connect() as conn:
            rows = conn.execute(select(audit_events.c.seq, audit_events.c.body)).all()
        assert [(seq, '"n":4' in body) for seq, body in rows] == [(1, True)]
    finally:
        engine.dispose()


# --- two replicas, a failing unit in every batch --------------------------------------------------------

ROUNDS = 12
STORM = 10  # identical denied proposals per round; the limit lets exactly REPEATS be decided
REPEATS = 5
FAILING_THREADS = 4
NORMAL_THREADS = 3
CALLS = 12  # per failing or normal thread and round


@pytest.fixture
def replicas(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[tuple[str, list[ServeProcess]]]:
    storm = {"repeats": REPEATS, "window": "1h", "quarantine": "1h"}
    limits = [{"id": "storm", "scope": "agent", "retry_storm": storm}]
    bundle = write_bundle(tmp_path / "bundle", limits)
    with fresh_database("postgres", tmp_path) as url:
        upgrade(url)
        started: list[ServeProcess] = []
        try:
            for n in range(2):
                started.append(start_serve(url, tmp_path, cli_env, f"replica-{n}", policy_dir=bundle))
            yield url, started
        finally:
            for replica in started:
                replica.stop()


class Outcomes:
    """What every call got, by kind; anything unexpected is kept with its details."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def record(self, kind: str, expected: bool, detail: str) -> None:
        with self.lock:
            self.seen[kind] += 1
            if not expected:
                self.unexpected.append(f"{kind}: {detail}")


def run_threads(targets: list[Callable[[], None]]) -> None:
    start = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            start.wait(WAIT)
            target()
        except BaseException as exc:  # reported below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
        assert not thread.is_alive()
    assert not errors, errors


def expect_error(outcomes: Outcomes, kind: str, code: grpc.StatusCode, call: Callable[[], Any]) -> None:
    try:
        call()
    except PdpClientError as exc:
        outcomes.record(kind, exc.code == code, f"{exc.code.name} {exc.details}")
    else:
        outcomes.record(kind, False, "succeeded")


@pytest.mark.backend("postgres")
def test_failing_units_in_every_batch_cannot_break_the_chain_or_the_limits(
    replicas: tuple[str, list[ServeProcess]],
) -> None:
    url, servers = replicas
    addresses = [s.address for s in servers]
    engine = create_db_engine(url)

    def client(agent_id: str, n: int) -> PdpClient:
        return PdpClient(addresses[n % 2], add_agent(engine, agent_id, "owner", ("support",)), timeout=WAIT)

    # Agents whose every call fails inside its unit, after the unit took the chain lock.
    saboteurs = [client(f"saboteur-{n}", n) for n in range(FAILING_THREADS)]
    denied = []
    for n, saboteur in enumerate(saboteurs):
        saboteur.propose("svc", "POST", PREFIX + "reused", "t", idempotency_key=f"key-{n}")
        refused = saboteur.propose("svc", "POST", PREFIX + f"{n}/forbidden", "t")
        assert refused.state == pdp_pb2.DENIED
        denied.append(refused.proposal_id)
    workers = [client(f"worker-{n}", n) for n in range(NORMAL_THREADS)]
    outcomes = Outcomes()
    storms: list[Counter[str]] = []

    def sabotage(n: int, round_: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(CALLS):
                if (i + n) % 2:
                    expect_error(
                        outcomes,
                        "reused key",
                        grpc.StatusCode.ALREADY_EXISTS,
                        functools.partial(
                            saboteurs[n].propose,
                            "svc",
                            "POST",
                            PREFIX + f"other/{round_}/{i}",
                            "t",
                            idempotency_key=f"key-{n}",
                        ),
                    )
                else:
                    expect_error(
                        outcomes,
                        "cancel denied",
                        grpc.StatusCode.FAILED_PRECONDITION,
                        lambda: saboteurs[n].cancel(denied[n]),
                    )

        return run

    def work(n: int, round_: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(CALLS):
                try:
                    response = workers[n].propose("svc", "POST", PREFIX + f"{round_}/{n}/{i}", "t")
                except PdpClientError as exc:
                    outcomes.record("propose", False, f"{exc.code.name} {exc.details}")
                else:
                    outcomes.record("propose", response.decision.outcome == pdp_pb2.ALLOW, str(response.decision))

        return run

    try:
        for round_ in range(ROUNDS):
            token = add_agent(engine, f"stormer-{round_}", "owner", ("support",))
            stormers = [PdpClient(address, token, timeout=WAIT) for address in addresses]  # through both replicas
            decided: Counter[str] = Counter()

            def storm(n: int, stormers: list[PdpClient] = stormers, decided: Counter[str] = decided) -> None:
                for i in range(STORM // 2):
                    try:
                        response = stormers[(n + i) % 2].propose("svc", "POST", PREFIX + "forbidden", "t")
                    except PdpClientError as exc:
                        outcomes.record("storm", False, f"{exc.code.name} {exc.details}")
                        continue
                    with outcomes.lock:
                        decided[response.decision.reasons[0].rule_id] += 1

            targets = [sabotage(n, round_) for n in range(FAILING_THREADS)]
            targets += [work(n, round_) for n in range(NORMAL_THREADS)]
            targets += [lambda: storm(0), lambda: storm(1)]
            run_threads(targets)
            storms.append(decided)
            for stormer in stormers:
                stormer.close()
    finally:
        for c in saboteurs + workers:
            c.close()

    try:
        # Exactly N identical denials decided, every round; the rest refused by the quarantine.
        exact = Counter({"rule:forbidden": REPEATS, "limit:storm": STORM - REPEATS})
        wrong_storms = [dict(decided) for decided in storms if decided != exact]
        assert not outcomes.unexpected and not wrong_storms, (
            f"{len(outcomes.unexpected)} unexpected answers of {sum(outcomes.seen.values())}, e.g. "
            f"{outcomes.unexpected[:3]}; storms decided other than {REPEATS}: {wrong_storms}"
        )
        assert outcomes.seen["propose"] == ROUNDS * NORMAL_THREADS * CALLS
        assert len(storms) == ROUNDS
        assert_chain_intact(engine)  # seq 1, 2, 3, … with every link
        report = verify(engine, public_key=public_key())
        assert report.intact, report
    finally:
        engine.dispose()
