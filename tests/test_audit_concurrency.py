"""The chain under load (DESIGN §9): several client processes, two server replicas on one PostgreSQL database,
and a server killed with SIGKILL mid-load. Afterwards seq is contiguous, the chain verifies, and every
decision anybody was told about has exactly one audit event.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import BULK_CLOSE, PDP, TICKETS, BackgroundServer, server_config, signing_key, start_serve
from sqlalchemy import Engine, func, select
from test_audit_chain import CANCELLED, DECIDED, assert_chain_intact, chain_rows, public_key

from pdp.audit.chain import Event, append
from pdp.audit.checkpoints import read_file, sign_head
from pdp.audit.keys import load_private
from pdp.audit.verify import Report, verify
from pdp.client import PdpClient, PdpClientError
from pdp.identity.agents import add_agent
from pdp.store.database import create_db_engine
from pdp.store.models import audit_checkpoints, proposals

PROCESSES = 4
PER_PROCESS = 25
WAIT = 60.0


# --- client processes ----------------------------------------------------------------------------------


# The child's code runs through builtins.exec, so a spawned child imports only the client (importing this
# module would import the whole server and test machinery: a second of CPU per child).
CLIENT_PROCESS = """
from pdp.client import PdpClient
from pdp.v1 import pdp_pb2

clients = [PdpClient(target, token, timeout=wait) for target in targets]
proposed, cancelled, error = [], [], ""
try:
    start.wait(wait)  # all processes propose at the same time
    for i in range(count):
        client = clients[i % len(clients)]
        if i % 3 == 0:
            response = client.propose("tickets", "POST", tickets, f"load {i}", params={"title": f"t{i}"})
        elif i % 3 == 1:
            response = client.propose("iam", "POST", "iam://roles/admin/members", f"load {i}", params={"n": i})
        else:
            response = client.propose("tickets", "POST", bulk_close, f"load {i}", params={"count": 40})
            other = clients[(i + 1) % len(clients)]  # cancelled through the other replica, if any
            if other.cancel(response.proposal_id).state == pdp_pb2.CANCELLED:
                cancelled.append(response.proposal_id)
        proposed.append(response.proposal_id)
except Exception as exc:
    error = repr(exc)
finally:
    results.put((proposed, cancelled, error))
    for client in clients:
        client.close()
"""


def run_clients(engine: Engine, targets: list[str]) -> tuple[set[str], set[str]]:
    """PROCESSES spawned processes, PER_PROCESS proposals each; returns all proposal ids and the cancelled ones."""
    tokens = [add_agent(engine, f"load-{i}-{time.monotonic_ns()}", "tester", ("support",)) for i in range(PROCESSES)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    shared = {"targets": targets, "count": PER_PROCESS, "start": start, "results": results, "wait": WAIT}
    shared |= {"tickets": TICKETS, "bulk_close": BULK_CLOSE}
    workers = [
        context.Process(target=exec, args=(CLIENT_PROCESS, {**shared, "token": token}), daemon=True) for token in tokens
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=WAIT * 2) for _ in workers]
    finally:
        for worker in workers:
            worker.join(WAIT)
            if worker.is_alive():
                worker.kill()
    errors = [error for _, _, error in reports if error]
    assert not errors, errors
    proposed = [pid for ids, _, _ in reports for pid in ids]
    cancelled = {pid for _, ids, _ in reports for pid in ids}
    assert len(proposed) == len(set(proposed)) == PROCESSES * PER_PROCESS
    assert len(cancelled) == PROCESSES * sum(1 for i in range(PER_PROCESS) if i % 3 == 2)
    return set(proposed), cancelled


def proposal_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(proposals.c.id)).scalars())


def assert_one_event_per_transition(engine: Engine, cancelled: set[str] | None = None) -> None:
    """Exactly one proposal.decided per proposals row (and none for anything else); one
    proposal.cancelled per cancelled proposal."""
    rows = assert_chain_intact(engine)
    decided = Counter(str(r["proposal_id"]) for r in rows if r["type"] == DECIDED)
    assert set(decided) == proposal_ids(engine)
    assert set(decided.values()) <= {1}, [pid for pid, n in decided.items() if n > 1]
    with engine.connect() as conn:
        in_state = set(conn.execute(select(proposals.c.id).where(proposals.c.state == "CANCELLED")).scalars())
    cancels = Counter(str(r["proposal_id"]) for r in rows if r["type"] == CANCELLED)
    assert set(cancels) == in_state
    assert set(cancels.values()) <= {1}
    if cancelled is not None:
        assert cancelled == in_state


def test_several_processes_proposing_at_once(database_url: str) -> None:
    background = BackgroundServer(server_config(database_url))
    engine = create_db_engine(database_url)
    try:
        proposed, cancelled = run_clients(engine, [f"127.0.0.1:{background.running.port}"])
    finally:
        background.stop()
    try:
        assert proposal_ids(engine) == proposed
        assert_one_event_per_transition(engine, cancelled)
        rows = chain_rows(engine)
        assert len(rows) == len(proposed) + len(cancelled)
        report = verify(engine, public_key=public_key())
        assert report.intact, report
        assert report.events == len(rows)
    finally:
        engine.dispose()


@pytest.mark.backend("postgres")
def test_two_replicas_on_one_postgres_database(database_url: str, tmp_path: Path) -> None:
    """Two servers, each with its own writer, append to one chain: the advisory lock keeps seq gap-free and
    every append succeeds (without it, one of two concurrent appends of the same seq would fail)."""
    configs = [
        replace(
            server_config(database_url),
            checkpoint_every="7",  # both replicas also sign heads while the other appends
            checkpoint_interval="3600",
            checkpoint_file=str(tmp_path / f"replica-{n}.jsonl"),
        )
        for n in (1, 2)
    ]
    engine = create_db_engine(database_url)
    with ExitStack() as stack:
        replicas = []
        for config in configs:
            replica = BackgroundServer(config)
            stack.callback(replica.stop)
            replicas.append(replica)
        proposed, cancelled = run_clients(engine, [f"127.0.0.1:{r.running.port}" for r in replicas])
    try:
        assert proposal_ids(engine) == proposed
        assert_one_event_per_transition(engine, cancelled)
        head = len(chain_rows(engine))
        assert head == len(proposed) + len(cancelled)
        with engine.connect() as conn:
            signed = list(conn.execute(select(audit_checkpoints.c.seq).order_by(audit_checkpoints.c.seq)).scalars())
        assert signed and signed[-1] == head  # the last replica to stop signed the final head
        # Whichever replica signed a head wrote it to its own file; all of them together check out.
        files = [Path(c.checkpoint_file) for c in configs if Path(c.checkpoint_file).exists()]
        combined = tmp_path / "all-replicas.jsonl"
        combined.write_text("".join(file.read_text() for file in files))
        assert sorted(cp.seq for _, cp in read_file(combined)) == signed
        report = verify(engine, public_key=public_key(), checkpoint_file=combined)
        assert report.intact, report
        assert (report.events, report.checkpoints) == (head, 2 * len(signed))
    finally:
        engine.dispose()


# --- kill -9 under load --------------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads proposing in a loop, each recording every proposal id it got an answer for."""

    address: str
    token: str
    threads: int = 4
    received: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def _run(self, n: int) -> None:
        with PdpClient(self.address, self.token, timeout=WAIT) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    if i % 2:
                        response = client.propose("tickets", "POST", TICKETS, f"t{n}-{i}", params={"title": "x"})
                    else:
                        response = client.propose("tickets", "POST", BULK_CLOSE, f"t{n}-{i}", params={"count": 40})
                except PdpClientError as exc:  # the server died under us: the last call has no answer
                    with self._lock:
                        self.errors.append(exc)
                    return
                with self._lock:
                    self.received.append(response.proposal_id)

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(WAIT)
            assert not worker.is_alive()


def test_kill_9_under_load_loses_no_acknowledged_decision(
    database_url: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    engine = create_db_engine(database_url)
    token = add_agent(engine, "crash-agent", "tester", ("support",))
    checkpoints = Path(cli_env["PDP_CHECKPOINT_FILE"])
    env = {**cli_env, "PDP_CHECKPOINT_EVERY": "10"}
    serve = start_serve(database_url, tmp_path, env, "first")
    load = Load(serve.address, token)
    try:
        load.start()
        deadline = time.monotonic() + WAIT
        # Well into the load, and with a checkpoint behind it (the checkpointer looks once a second).
        while load.count() < 60 or not (checkpoints.exists() and checkpoints.read_text().strip()):
            assert time.monotonic() < deadline, f"only {load.count()} answers\n{serve.output()}"
            time.sleep(0.01)
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(WAIT)
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
        load.stop()
    assert serve.process.returncode == -signal.SIGKILL
    assert load.errors, "the clients were still proposing when the server died"
    received = set(load.received)
    assert len(received) == len(load.received) >= 60

    restarted = start_serve(database_url, tmp_path, env, "second")
    try:
        # Every decision a client was told about is durable, with its audit event.
        assert received <= proposal_ids(engine)
        for proposal_id in received:
            assert len(chain_rows(engine, proposal_id=proposal_id, type=DECIDED)) == 1, proposal_id
        assert_one_event_per_transition(engine)  # and nothing committed without its event either
        signed_before = [cp.seq for _, cp in read_file(checkpoints)]
        assert signed_before, "checkpoints were written during the load"
        report = verify(engine, public_key=public_key(), checkpoint_file=checkpoints)
        assert report.intact, report

        # The chain continues from where it was.
        with PdpClient(restarted.address, token) as client:
            after = client.propose("tickets", "POST", TICKETS, "after the crash", params={"title": "x"})
        event = chain_rows(engine, proposal_id=after.proposal_id)
        assert [e["seq"] for e in event] == [report.head_seq + 1]
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(WAIT) == 0, restarted.output()

    head = len(chain_rows(engine))
    assert [cp.seq for _, cp in read_file(checkpoints)][-1] == head  # signed at the clean shutdown
    verified = subprocess.run(
        [PDP, "audit", "verify", "--database-url", database_url],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=WAIT,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"events:      {head} verified" in verified.stdout
    with engine.connect() as conn:  # no cancels in this load: one decision event per proposal
        decided = len(chain_rows(engine, type=DECIDED))
        assert conn.execute(select(func.count()).select_from(proposals)).scalar_one() == decided
        # Besides decisions, only the example bundle's retry-storm limit may have spoken (identical denials).
        others = {row["type"] for row in chain_rows(engine) if row["type"] != DECIDED}
        assert others <= {"agent.quarantined"}, others
    engine.dispose()


# --- verify while the chain grows ----------------------------------------------------------------------


def test_verify_of_a_live_log_sees_no_truncation(database_url: str, tmp_path: Path) -> None:
    """The checkpoint file is a FIFO, so verify's read of it happens (deterministically) exactly while the
    writer appends and signs: the interleaving a live `pdp audit verify` meets by chance."""
    writer = create_db_engine(database_url, writer=True, pool_size=1)
    key = load_private(signing_key())
    lines: list[str] = []

    def append_and_sign(events: int) -> None:
        for i in range(events):
            with writer.begin() as conn:
                append(conn, Event(type="test.event", actor="test", occurred_at=datetime.now(UTC), data={"i": i}))
        with writer.begin() as conn:
            checkpoint = sign_head(conn, key, datetime.now(UTC))
        assert checkpoint is not None
        lines.append(checkpoint.to_line())

    append_and_sign(3)
    fifo = tmp_path / "checkpoints.fifo"
    os.mkfifo(fifo)
    reader = create_db_engine(database_url)
    reports: list[Report] = []
    verifier = threading.Thread(
        target=lambda: reports.append(verify(reader, public_key=public_key(), checkpoint_file=fifo)), daemon=True
    )
    try:
        verifier.start()
        deadline = time.monotonic() + WAIT
        while True:  # opening a FIFO without blocking succeeds once verify has opened it for reading
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert verifier.is_alive() and time.monotonic() < deadline, f"verify never read the file: {reports}"
                time.sleep(0.01)
        with os.fdopen(fd, "w") as file:
            append_and_sign(2)  # the server goes on appending and signing meanwhile
            file.write("\n".join(lines) + "\n")
        verifier.join(WAIT)
        assert reports, "verify did not finish"
        assert reports[0].first_bad_seq is None, reports[0]
        assert reports[0].head_seq in (3, 5)
    finally:
        writer.dispose()
        reader.dispose()
