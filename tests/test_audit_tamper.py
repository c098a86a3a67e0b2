"""Tampering with the audit log (DESIGN §9), on SQLite and PostgreSQL.

First the database refuses change: UPDATE, DELETE, TRUNCATE, INSERT OR REPLACE, upserts, inserts that do not
extend the head, even under ``session_replication_role = replica``; on PostgreSQL the writer role cannot even
try and the auditor role cannot write at all. Then, with the triggers dropped by a superuser, ``verify``
detects every kind of change and names the first bad seq; a truncated tail and a rewrite with recomputed
hashes only through the checkpoint file kept outside the database.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import BACKENDS, BULK_CLOSE, TICKETS, fresh_database, running_server, signing_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from test_audit_chain import assert_chain_intact, chain_rows, decided_events, public_key

from pdp.audit import chain
from pdp.audit.checkpoints import Checkpoint, append_to_file, read_file, sign_head, stored
from pdp.audit.keys import load_private
from pdp.audit.roles import AUDIT_TABLES, AUDIT_VIEWS, AUDITED_PROPOSAL_COLUMNS, AUDITED_VOTE_COLUMNS, create_roles
from pdp.audit.verify import POSTGRES_TRIGGERS, SQLITE_TRIGGERS, Report, missing_triggers, verify
from pdp.canonical import canonical_json
from pdp.client import PdpClient
from pdp.identity.agents import add_agent
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.store.models import audit_checkpoints, audit_events
from pdp.v1 import pdp_pb2

EVENTS = 10
CHECKPOINTS_AT = (4, 10)
START = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _event(i: int) -> chain.Event:
    agent = f"agent-{i % 3}"
    return chain.Event(
        type="proposal.decided",
        actor=f"agent:{agent}",
        occurred_at=START + timedelta(seconds=i),
        proposal_id=str(uuid.UUID(int=i)),
        agent_id=agent,
        policy_version="sha256:test",
        data={
            "action": {"tool": "tickets", "operation": "POST", "resource": TICKETS, "params": {"n": i}},
            "justification": f"step {i}",
            "decision": {"outcome": "allow", "reasons": [{"rule_id": "rule:tickets-create"}]},
        },
    )


@dataclass
class Pristine:
    """The populated state, to put back after each test (PostgreSQL databases are slow to create)."""

    rows: list[dict[str, Any]]
    checkpoints: list[Checkpoint]
    ddl: list[str]  # SQLite: the triggers' CREATE statements; PostgreSQL: the trigger functions'


@dataclass
class AuditDb:
    """A database holding a 10-event chain, signed at seq 4 and 10 (in the database and in ``file``)."""

    url: str
    engine: Engine  # a superuser's connection, as the person tampering has
    file: Path
    pristine: Pristine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def verify(self, *, with_file: bool = True) -> Report:
        return verify(self.engine, public_key=public_key(), checkpoint_file=self.file if with_file else None)

    def run(self, statement: str, params: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params or {})

    def refused(self, *statements: str, params: dict[str, Any] | None = None) -> str:
        """Run ``statements`` in one transaction; they must fail. Returns the database's message."""
        with pytest.raises(DBAPIError) as error, self.engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement), params or {})
        return str(error.value.orig)

    def checkpoints(self) -> list[Checkpoint]:
        with self.engine.connect() as conn:
            return stored(conn)

    def snapshot(self) -> tuple[list[dict[str, Any]], list[Checkpoint]]:
        return chain_rows(self.engine), self.checkpoints()

    def drop_triggers(self) -> Callable[[], None]:
        """As a superuser would: drop (SQLite) or disable (PostgreSQL) every trigger; returns the undo."""
        with self.engine.begin() as conn:
            _drop_triggers(conn)
        return self.restore_triggers

    def restore_triggers(self) -> None:
        with self.engine.begin() as conn:
            _restore_triggers(conn, self.pristine.ddl)

    def reset(self) -> None:
        """Back to the populated state, whatever the test did to rows, triggers or trigger functions."""
        with self.engine.begin() as conn:
            _drop_triggers(conn)
            conn.execute(audit_events.delete())
            conn.execute(audit_checkpoints.delete())
            conn.execute(audit_events.insert(), self.pristine.rows)
            conn.execute(audit_checkpoints.insert(), [asdict(cp) for cp in self.pristine.checkpoints])
            _restore_triggers(conn, self.pristine.ddl)
        assert self.snapshot() == (self.pristine.rows, self.pristine.checkpoints)
        with self.engine.connect() as conn:
            assert missing_triggers(conn) == []


def _drop_triggers(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        for name in conn.execute(
            text(
                "SELECT name FROM sqlite_master "
                "WHERE type = 'trigger' AND tbl_name IN ('audit_events', 'audit_checkpoints')"
            )
        ).scalars():
            conn.execute(text(f"DROP TRIGGER {name}"))
    else:
        for table in AUDIT_TABLES:
            conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER ALL"))


def _restore_triggers(conn: Connection, ddl: list[str]) -> None:
    if conn.dialect.name == "sqlite":
        _drop_triggers(conn)
        for statement in ddl:
            conn.execute(text(statement))
    else:
        for statement in ddl:  # CREATE OR REPLACE FUNCTION ...: undoes a neutered function too
            conn.execute(text(statement))
        for name in POSTGRES_TRIGGERS:
            table = next(t for t in AUDIT_TABLES if name.startswith(t))
            conn.execute(text(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}"))


def _populate(url: str, file: Path) -> None:
    writer = create_db_engine(url, writer=True, pool_size=1)
    key = load_private(signing_key())
    try:
        for i in range(1, EVENTS + 1):
            with writer.begin() as conn:
                chain.append(conn, _event(i))
                signed_at = START + timedelta(seconds=i, milliseconds=500)
                checkpoint = sign_head(conn, key, signed_at) if i in CHECKPOINTS_AT else None
            if checkpoint is not None:
                append_to_file(file, checkpoint)
    finally:
        writer.dispose()


def _pristine(engine: Engine) -> Pristine:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            ddl = list(
                conn.execute(
                    text(
                        "SELECT sql FROM sqlite_master WHERE type = 'trigger' "
                        "AND tbl_name IN ('audit_events', 'audit_checkpoints') ORDER BY name"
                    )
                ).scalars()
            )
        else:
            ddl = list(
                conn.execute(
                    text(
                        "SELECT pg_get_functiondef(oid) FROM pg_proc "
                        "WHERE proname IN ('pdp_audit_refuse', 'pdp_audit_extend_head') ORDER BY proname"
                    )
                ).scalars()
            )
        assert len(ddl) == (len(SQLITE_TRIGGERS) if engine.dialect.name == "sqlite" else 2)
        rows = [dict(row) for row in conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings()]
        checkpoints = stored(conn)
    return Pristine(rows, checkpoints, ddl)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditDb]:
    directory = tmp_path_factory.mktemp(f"audit-{request.param}")
    with fresh_database(request.param, directory) as url:
        upgrade(url)
        file = directory / "checkpoints.jsonl"
        _populate(url, file)
        engine = create_db_engine(url)
        try:
            yield AuditDb(url, engine, file, _pristine(engine))
        finally:
            engine.dispose()


@pytest.fixture
def audit_db(shared_db: AuditDb, tmp_path: Path) -> Iterator[AuditDb]:
    """The shared database for one test (reset afterwards), with a checkpoint file of its own."""
    file = tmp_path / "checkpoints.jsonl"
    shutil.copyfile(shared_db.file, file)
    try:
        yield AuditDb(shared_db.url, shared_db.engine, file, shared_db.pristine)
    finally:
        shared_db.reset()


def test_the_untouched_chain_verifies(audit_db: AuditDb) -> None:
    rows = assert_chain_intact(audit_db.engine)
    assert [int(r["seq"]) for r in rows] == list(range(1, EVENTS + 1))
    assert [cp.seq for cp in audit_db.checkpoints()] == list(CHECKPOINTS_AT)
    assert [cp.seq for _, cp in read_file(audit_db.file)] == list(CHECKPOINTS_AT)
    report = audit_db.verify()
    assert report.intact, report
    assert (report.events, report.head_seq, report.head_hash) == (EVENTS, EVENTS, rows[-1]["hash"])
    assert report.checkpoints == 2 * len(CHECKPOINTS_AT)
    assert report.triggers_missing == []


# --- refused by the database ------------------------------------------------------------------------------

REFUSED_CHANGES = [
    "UPDATE audit_events SET body = body || ' ' WHERE seq = 5",
    "UPDATE audit_events SET actor = 'agent:someone-else' WHERE seq = 5",
    "UPDATE audit_events SET recorded_at = recorded_at WHERE seq = 10",
    "DELETE FROM audit_events WHERE seq = 10",
    "DELETE FROM audit_events",
    "UPDATE audit_checkpoints SET signature = 'ab' WHERE seq = 4",
    "UPDATE audit_checkpoints SET head_hash = head_hash",
    "DELETE FROM audit_checkpoints WHERE seq = 10",
    "DELETE FROM audit_checkpoints",
]


@pytest.mark.parametrize("statement", REFUSED_CHANGES)
def test_update_and_delete_are_refused(audit_db: AuditDb, statement: str) -> None:
    before = audit_db.snapshot()
    message = audit_db.refused(statement)
    assert "append-only" in message
    assert audit_db.snapshot() == before


@pytest.mark.parametrize(
    "statement",
    [
        "TRUNCATE audit_events",
        "TRUNCATE audit_checkpoints",
        "TRUNCATE audit_events, audit_checkpoints RESTART IDENTITY CASCADE",
    ],
)
@pytest.mark.backend("postgres")  # SQLite has no TRUNCATE; its DELETE-all is refused above
def test_truncate_is_refused(audit_db: AuditDb, statement: str) -> None:
    before = audit_db.snapshot()
    assert "append-only: TRUNCATE refused" in audit_db.refused(statement)
    assert audit_db.snapshot() == before


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET body = '{}' WHERE seq = 5",
        "DELETE FROM audit_events WHERE seq >= 8",
        "TRUNCATE audit_events",
        "UPDATE audit_checkpoints SET signature = 'ab'",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints",
    ],
)
@pytest.mark.backend("postgres")
def test_replica_mode_does_not_switch_the_refusal_off(audit_db: AuditDb, statement: str) -> None:
    """`session_replication_role = replica` skips ordinary triggers; ours fire ALWAYS."""
    before = audit_db.snapshot()
    with audit_db.engine.connect() as conn:
        assert conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar() is True
    message = audit_db.refused("SET LOCAL session_replication_role = replica", statement)
    assert "append-only" in message
    assert audit_db.snapshot() == before


def _row_values(row: dict[str, Any], **changes: Any) -> dict[str, Any]:
    values = {k: row[k] for k in ("chain", "seq", "event_id", "type", "proposal_id", "agent_id", "actor")}
    values |= {k: row[k] for k in ("policy_version", "body", "prev_hash", "hash")}
    return values | changes


_INSERT_EVENT = (
    "INTO audit_events (chain, seq, event_id, type, proposal_id, agent_id, actor, policy_version, body, prev_hash, "
    "hash) VALUES (:chain, :seq, :event_id, :type, :proposal_id, :agent_id, :actor, :policy_version, :body, "
    ":prev_hash, :hash)"
)


@pytest.mark.backend("sqlite")
def test_insert_or_replace_cannot_overwrite_an_event(audit_db: AuditDb) -> None:
    before = audit_db.snapshot()
    row = before[0][4]  # seq 5
    forged = _row_values(row, body=row["body"].replace("step 5", "step five"), event_id=str(uuid.uuid4()))
    for verb in ("INSERT OR REPLACE", "REPLACE"):
        assert "extend the chain head" in audit_db.refused(f"{verb} {_INSERT_EVENT}", params=forged)
    head = before[0][-1]
    assert "extend the chain head" in audit_db.refused(f"INSERT OR REPLACE {_INSERT_EVENT}", params=_row_values(head))
    checkpoint = before[1][0]
    assert "append-only" in audit_db.refused(
        "INSERT OR REPLACE INTO audit_checkpoints (chain, seq, head_hash, signed_at, key_id, signature) "
        "VALUES (:chain, :seq, :head_hash, :signed_at, :key_id, :signature)",
        params=_checkpoint_values(checkpoint),
    )
    assert audit_db.snapshot() == before


def _checkpoint_values(checkpoint: Checkpoint, **changes: Any) -> dict[str, Any]:
    values = {
        "chain": checkpoint.chain,
        "seq": checkpoint.seq,
        "head_hash": checkpoint.head_hash,
        "signed_at": checkpoint.signed_at.replace(tzinfo=None),
        "key_id": checkpoint.key_id,
        "signature": "00" * 64,
    }
    return values | changes


def test_upserts_cannot_overwrite_rows(audit_db: AuditDb) -> None:
    before = audit_db.snapshot()
    row = before[0][4]
    forged = _row_values(row, body=row["body"].replace("step 5", "step five"))
    message = audit_db.refused(
        f"INSERT {_INSERT_EVENT} ON CONFLICT (chain, seq) DO UPDATE SET body = excluded.body", params=forged
    )
    assert "append-only" in message
    message = audit_db.refused(
        "INSERT INTO audit_checkpoints (chain, seq, head_hash, signed_at, key_id, signature) "
        "VALUES (:chain, :seq, :head_hash, :signed_at, :key_id, :signature) "
        "ON CONFLICT (chain, seq) DO UPDATE SET signature = excluded.signature",
        params=_checkpoint_values(before[1][0]),
    )
    assert "append-only" in message
    assert audit_db.snapshot() == before


def test_inserts_must_extend_the_head(audit_db: AuditDb) -> None:
    rows, checkpoints = audit_db.snapshot()
    head = rows[-1]
    event_id = str(uuid.uuid4())
    forged: dict[str, Any] = {
        "event_id": event_id,
        "type": "forged",
        "actor": "x",
        "occurred_at": "2026-11-21T12:00:00.000000Z",
        "proposal_id": None,
        "agent_id": None,
        "policy_version": "",
        "data": {},
    }
    body = canonical_json(forged).decode()

    def candidate(seq: int, prev_hash: str) -> dict[str, Any]:
        return {
            "chain": chain.MAIN_CHAIN,
            "seq": seq,
            "event_id": event_id,
            "type": "forged",
            "proposal_id": None,
            "agent_id": None,
            "actor": "x",
            "policy_version": "",
            "body": body,
            "prev_hash": prev_hash,
            "hash": chain.event_hash(seq, prev_hash, body.encode()) if seq >= 0 else chain.GENESIS,
        }

    for seq, prev in [
        (EVENTS + 2, head["hash"]),  # leaves a gap
        (EVENTS + 1, rows[-2]["hash"]),  # links to the wrong event
        (EVENTS + 1, chain.GENESIS),
        (0, chain.GENESIS),
        (-1, head["hash"]),
    ]:
        assert "extend the chain head" in audit_db.refused(f"INSERT {_INSERT_EVENT}", params=candidate(seq, prev))
        assert audit_db.snapshot() == (rows, checkpoints)
    # The refusal is about linkage, not about who inserts: a well-linked insert is accepted (whoever may
    # append can append; what it says is then verify's business, see below).
    audit_db.run(f"INSERT {_INSERT_EVENT}", candidate(EVENTS + 1, head["hash"]))
    assert len(chain_rows(audit_db.engine)) == EVENTS + 1
    assert audit_db.verify().intact


def test_a_well_linked_insert_with_a_wrong_hash_is_caught_by_verify(audit_db: AuditDb) -> None:
    head = chain_rows(audit_db.engine)[-1]
    forged = _row_values(head, seq=EVENTS + 1, event_id=str(uuid.uuid4()), prev_hash=head["hash"])
    audit_db.run(f"INSERT {_INSERT_EVENT}", forged)  # links correctly, but repeats the head's hash
    report = audit_db.verify()
    assert report.first_bad_seq == EVENTS + 1
    assert "altered" in report.problem


# --- detected by verify ----------------------------------------------------------------------------------


def _expect(report: Report, seq: int, *words: str) -> None:
    assert report.first_bad_seq == seq, report
    assert not report.intact
    for word in words:
        assert word in report.problem, report.problem


def test_an_edited_body_is_detected(audit_db: AuditDb) -> None:
    audit_db.drop_triggers()
    audit_db.run("UPDATE audit_events SET body = replace(body, 'step 5', 'step five') WHERE seq = 5")
    assert "step five" in chain_rows(audit_db.engine)[4]["body"]
    report = audit_db.verify()
    _expect(report, 5, "hash does not match the body")
    assert report.events == 4  # it stops at the first break
    assert audit_db.verify(with_file=False).first_bad_seq == 5


def test_an_edited_body_with_its_hash_recomputed_breaks_the_next_link(audit_db: AuditDb) -> None:
    audit_db.drop_triggers()
    row = chain_rows(audit_db.engine)[4]
    edited = row["body"].replace("step 5", "step five")
    audit_db.run(
        "UPDATE audit_events SET body = :body, hash = :hash WHERE seq = 5",
        {"body": edited, "hash": chain.event_hash(5, row["prev_hash"], edited.encode())},
    )
    _expect(audit_db.verify(with_file=False), 6, "prev_hash")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("event_id", str(uuid.UUID(int=77))),
        ("actor", "agent:someone-else"),
        ("agent_id", "agent-9"),
        ("type", "proposal.cancelled"),
        ("proposal_id", str(uuid.UUID(int=99))),
        ("policy_version", "sha256:other"),
    ],
)
def test_an_edited_indexed_column_is_detected(audit_db: AuditDb, column: str, value: str) -> None:
    audit_db.drop_triggers()
    audit_db.run(f"UPDATE audit_events SET {column} = :value WHERE seq = 5", {"value": value})
    _expect(audit_db.verify(), 5, f"column {column!r} does not match")


def test_a_deleted_middle_row_is_detected(audit_db: AuditDb) -> None:
    audit_db.drop_triggers()
    audit_db.run("DELETE FROM audit_events WHERE seq = 5")
    _expect(audit_db.verify(), 5, "missing")
    _expect(audit_db.verify(with_file=False), 5, "missing")


def test_a_deleted_middle_row_with_the_rest_renumbered_is_detected(audit_db: AuditDb) -> None:
    audit_db.drop_triggers()
    audit_db.run("DELETE FROM audit_events WHERE seq = 5")
    for seq in range(6, EVENTS + 1):
        audit_db.run("UPDATE audit_events SET seq = :new WHERE seq = :old", {"new": seq - 1, "old": seq})
    _expect(audit_db.verify(with_file=False), 5, "prev_hash")


@pytest.mark.parametrize("how", ["contents", "positions"])
def test_swapped_rows_are_detected(audit_db: AuditDb, how: str) -> None:
    audit_db.drop_triggers()
    rows = chain_rows(audit_db.engine)
    four, six = rows[3], rows[5]
    if how == "contents":  # each row keeps its seq and link, but carries the other's body and hash
        columns = ("event_id", "type", "proposal_id", "agent_id", "actor", "policy_version", "body", "hash")
        assignments = ", ".join(f"{c} = :{c}" for c in columns)
        for target, source in ((4, six), (6, four)):
            audit_db.run(
                f"UPDATE audit_events SET {assignments} WHERE seq = :target",
                {"target": target, **{c: source[c] for c in columns}},
            )
        assert json.loads(chain_rows(audit_db.engine)[3]["body"])["data"]["justification"] == "step 6"
        words = ("hash does not match",)
    else:  # the two events trade places
        audit_db.run("UPDATE audit_events SET seq = -1 WHERE seq = 4")
        audit_db.run("UPDATE audit_events SET seq = 4 WHERE seq = 6")
        audit_db.run("UPDATE audit_events SET seq = 6 WHERE seq = -1")
        words = ("prev_hash",)
    _expect(audit_db.verify(), 4, *words)
    _expect(audit_db.verify(with_file=False), 4, *words)


def test_a_truncated_tail_is_detected_only_through_the_checkpoint_file(audit_db: AuditDb) -> None:
    restore = audit_db.drop_triggers()
    audit_db.run("DELETE FROM audit_events WHERE seq > 7")
    # While the database still holds the checkpoint at seq 10, it gives the truncation away ...
    _expect(audit_db.verify(with_file=False), 8, "removed")
    # ... so a careful attacker removes those too and puts the triggers back.
    audit_db.run("DELETE FROM audit_checkpoints WHERE seq > 7")
    restore()
    inside = audit_db.verify(with_file=False)
    assert inside.intact, inside  # the database alone looks perfect
    assert (inside.head_seq, inside.triggers_missing) == (7, [])
    _expect(audit_db.verify(), 8, "removed", "seq 10")


def test_a_rewritten_chain_is_detected_only_through_the_checkpoint_file(audit_db: AuditDb) -> None:
    """Every event re-inserted with a different body and correctly recomputed hashes and links."""
    original = chain_rows(audit_db.engine)
    restore = audit_db.drop_triggers()
    audit_db.run("DELETE FROM audit_events")
    audit_db.run("DELETE FROM audit_checkpoints")
    prev = chain.GENESIS
    for row in original:
        parsed = json.loads(row["body"])
        parsed["data"]["justification"] = "nothing to see here"
        body = canonical_json(parsed).decode()
        digest = chain.event_hash(int(row["seq"]), prev, body.encode())
        audit_db.run(f"INSERT {_INSERT_EVENT}", _row_values(row, body=body, prev_hash=prev, hash=digest))
        prev = digest
    restore()
    rewritten = assert_chain_intact(audit_db.engine)  # a perfectly consistent chain ...
    assert all("nothing to see here" in r["body"] for r in rewritten)
    assert all(a["hash"] != b["hash"] for a, b in zip(original, rewritten, strict=True))
    inside = audit_db.verify(with_file=False)
    assert inside.intact, inside  # ... that the database alone cannot tell from the original
    _expect(audit_db.verify(), CHECKPOINTS_AT[0], "rewritten")


def test_a_rollback_to_a_backup_is_detected_through_the_checkpoint_file(audit_db: AuditDb) -> None:
    """A restored older backup is a truncated tail followed by a different continuation."""
    restore = audit_db.drop_triggers()
    audit_db.run("DELETE FROM audit_events WHERE seq > 7")
    audit_db.run("DELETE FROM audit_checkpoints WHERE seq > 7")
    restore()
    writer = create_db_engine(audit_db.url, writer=True, pool_size=1)
    try:
        for i in range(8, EVENTS + 3):  # new events take the lost seqs, with different content
            with writer.begin() as conn:
                chain.append(conn, _event(100 + i))
    finally:
        writer.dispose()
    assert audit_db.verify(with_file=False).intact
    _expect(audit_db.verify(), 10, "rewritten")


def test_forged_checkpoints_are_reported(audit_db: AuditDb) -> None:
    # A file line whose signature was altered.
    line = audit_db.file.read_text().splitlines()[0]
    data = json.loads(line)
    data["signature"] = ("0" if data["signature"][0] != "0" else "1") + data["signature"][1:]
    forged_file = audit_db.file.with_name("forged.jsonl")
    forged_file.write_text(json.dumps(data) + "\n")
    report = verify(audit_db.engine, public_key=public_key(), checkpoint_file=forged_file)
    _expect(report, CHECKPOINTS_AT[0], "invalid signature", str(forged_file))

    # A file line moved to another head (signed bytes change, the signature does not).
    moved = {**json.loads(line), "seq": 7, "head_hash": chain_rows(audit_db.engine)[6]["hash"]}
    forged_file.write_text(json.dumps(moved) + "\n")
    report = verify(audit_db.engine, public_key=public_key(), checkpoint_file=forged_file)
    _expect(report, 7, "invalid signature")

    # A database checkpoint of the real head, signed by somebody else's key.
    writer = create_db_engine(audit_db.url, writer=True, pool_size=1)
    try:
        with writer.begin() as conn:
            chain.append(conn, _event(EVENTS + 1))
            assert sign_head(conn, Ed25519PrivateKey.generate(), START + timedelta(hours=1)) is not None
    finally:
        writer.dispose()
    report = audit_db.verify()
    _expect(report, EVENTS + 1, "invalid signature", "database")
    # Without a key nothing can be said about signatures, but heads are still compared.
    assert verify(audit_db.engine, public_key=None, checkpoint_file=audit_db.file).intact


def test_an_unreadable_checkpoint_file_is_a_failure(audit_db: AuditDb) -> None:
    broken = audit_db.file.with_name("broken.jsonl")
    broken.write_text(audit_db.file.read_text() + '{"chain": "main", "seq": \n')
    report = verify(audit_db.engine, public_key=public_key(), checkpoint_file=broken)
    assert not report.intact
    assert "cannot read checkpoint file" in report.problem


def test_triggers_missing_lists_the_dropped_triggers(audit_db: AuditDb) -> None:
    restore = audit_db.drop_triggers()
    report = audit_db.verify()
    expected = list(SQLITE_TRIGGERS if audit_db.dialect == "sqlite" else POSTGRES_TRIGGERS)
    assert report.triggers_missing == expected
    assert report.first_bad_seq is None  # no row was touched ...
    assert not report.intact  # ... but the log is no longer protected
    restore()
    assert audit_db.verify().intact

    # One trigger at a time: dropped, or on PostgreSQL merely demoted from ALWAYS to ORIGIN-only,
    # which session_replication_role = replica would skip.
    name = "audit_events_extend_head"
    if audit_db.dialect == "sqlite":
        audit_db.run(f"DROP TRIGGER {name}")
    else:
        audit_db.run(f"ALTER TABLE audit_events ENABLE TRIGGER {name}")
    assert audit_db.verify().triggers_missing == [name]
    if audit_db.dialect == "postgresql":
        audit_db.run("ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_no_change")
        assert audit_db.verify().triggers_missing == [name, "audit_checkpoints_no_change"]


def test_a_neutered_trigger_is_not_reported_in_place(audit_db: AuditDb) -> None:
    if audit_db.dialect == "sqlite":
        audit_db.run("DROP TRIGGER audit_events_no_update")
        audit_db.run("CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events WHEN 0 BEGIN SELECT 1; END")
    else:
        audit_db.run(
            "CREATE OR REPLACE FUNCTION pdp_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; RETURN NEW; END $$"
        )
    audit_db.run("UPDATE audit_events SET actor = actor WHERE seq = 1")  # the database no longer refuses
    report = audit_db.verify()
    assert report.triggers_missing != [], "verify reports the triggers in place"


# --- PostgreSQL roles --------------------------------------------------------------------------------


def _libpq(url: str, user: str) -> str:
    return (
        make_url(url).set(drivername="postgresql", username=user, password=None).render_as_string(hide_password=False)
    )


@dataclass
class Roles:
    writer: str
    auditor: str
    writer_login: str
    auditor_login: str


@pytest.fixture
def roles(audit_db: AuditDb) -> Iterator[Roles]:
    assert audit_db.dialect == "postgresql", 'tests using roles need @pytest.mark.backend("postgres")'
    suffix = uuid.uuid4().hex[:10]
    names = Roles(f"pdp_writer_{suffix}", f"pdp_auditor_{suffix}", f"pdp_svc_{suffix}", f"pdp_aud_{suffix}")
    admin = _libpq(audit_db.url, "postgres")
    try:
        create_roles(audit_db.engine, names.writer, names.auditor)
        with psycopg.connect(admin, autocommit=True) as conn:
            for login, group in ((names.writer_login, names.writer), (names.auditor_login, names.auditor)):
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(login), sql.Identifier(group))
                )
        yield names
    finally:
        audit_db.engine.dispose()
        everyone = [names.writer_login, names.auditor_login, names.writer, names.auditor]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)", (everyone,))
            for role in everyone:
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                if exists:
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _permission_denied(engine: Engine, statement: str) -> None:
    with pytest.raises(DBAPIError) as error, engine.begin() as conn:
        conn.execute(text(statement))
    assert isinstance(error.value.orig, psycopg.errors.InsufficientPrivilege), error.value
    message = str(error.value.orig)
    # The grants refused it, not the triggers (which raise the same SQLSTATE, saying "append-only").
    assert "permission denied" in message or "must be owner" in message, message
    assert "append-only" not in message


@pytest.mark.backend("postgres")
def test_the_writer_appends_and_the_auditor_reads(audit_db: AuditDb, roles: Roles) -> None:
    before = audit_db.snapshot()
    writer_url = make_url(audit_db.url).set(username=roles.writer_login).render_as_string(hide_password=False)
    auditor = create_engine(make_url(audit_db.url).set(username=roles.auditor_login, drivername="postgresql+psycopg"))
    try:
        # The service runs as a member of the writer role: it decides, records and appends.
        with running_server(writer_url) as server:
            with server.engine.connect() as conn:
                assert conn.execute(text("SELECT current_user")).scalar() == roles.writer_login
            # (Agents are managed by the schema owner: the writer may only read them.)
            token = add_agent(audit_db.engine, f"writer-test-{uuid.uuid4().hex[:6]}", "tester", ("support",))
            with PdpClient(server.target, token) as client:
                response = client.propose("tickets", "POST", BULK_CLOSE, "as the writer", params={"count": 40})
                assert response.state == pdp_pb2.PENDING_APPROVAL
                assert client.cancel(response.proposal_id).state == pdp_pb2.CANCELLED
            assert len(decided_events(audit_db.engine, response.proposal_id)) == 1
            writer = server.engine
            with writer.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar() == EVENTS + 2
                assert conn.execute(text("SELECT count(*) FROM audit_checkpoints")).scalar() == len(CHECKPOINTS_AT)
            for statement in (
                "UPDATE audit_events SET actor = 'x' WHERE seq = 1",
                "DELETE FROM audit_events WHERE seq = 12",
                "TRUNCATE audit_events",
                "UPDATE audit_checkpoints SET signature = 'ab'",
                "DELETE FROM audit_checkpoints",
                "TRUNCATE audit_checkpoints",
                "ALTER TABLE audit_events DISABLE TRIGGER ALL",
                "DROP TRIGGER audit_events_no_change ON audit_events",
                "DELETE FROM agents",
            ):
                _permission_denied(writer, statement)
        # At shutdown the server signed its head, as the writer.
        assert [cp.seq for cp in audit_db.checkpoints()] == [*CHECKPOINTS_AT, EVENTS + 2]

        with auditor.connect() as conn:
            assert conn.execute(text("SELECT current_user")).scalar() == roles.auditor_login
            for table in (*AUDIT_TABLES, *AUDIT_VIEWS):
                conn.execute(text(f"SELECT * FROM {table}")).all()
            assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar() == EVENTS + 2
            decided = conn.execute(
                text("SELECT outcome, justification FROM audit_decisions WHERE proposal_id = :p"),
                {"p": response.proposal_id},
            ).one()
            assert tuple(decided) == ("needs_approval", "as the writer")
            # What verify compares with the log, and nothing more: no justification, no vote comment.
            conn.execute(text(f"SELECT {', '.join(AUDITED_PROPOSAL_COLUMNS)} FROM proposals")).all()
            conn.execute(text(f"SELECT {', '.join(AUDITED_VOTE_COLUMNS)} FROM approvals")).all()
        # So `pdp audit verify` runs as an auditor, rows included: the one real proposal agrees with its events
        # (this fixture's ten synthetic decisions have no rows, and are reported so).
        report = verify(auditor, public_key=public_key(), checkpoint_file=None)
        assert report.intact and report.rows is not None and not report.rows.error, report
        assert report.rows.proposals == 1
        assert {d.proposal_id for d in report.disagreements} == {str(uuid.UUID(int=i)) for i in range(1, EVENTS + 1)}
        head = chain_rows(audit_db.engine)[-1]
        for statement in (
            "INSERT INTO audit_events (chain, seq, event_id, type, actor, policy_version, body, prev_hash, hash) "
            f"VALUES ('main', {EVENTS + 3}, 'e', 't', 'a', '', '{{}}', '{head['hash']}', 'h')",
            "INSERT INTO audit_checkpoints (chain, seq, head_hash, signed_at, key_id, signature) "
            "VALUES ('main', 99, 'h', now(), 'k', 's')",
            "UPDATE audit_events SET actor = 'x' WHERE seq = 1",
            "DELETE FROM audit_checkpoints",
            "TRUNCATE audit_events",
            "SELECT * FROM proposals",
            "SELECT justification FROM proposals",
            "SELECT idempotency_key FROM proposals",
            "SELECT comment FROM approvals",
            "UPDATE proposals SET state = 'APPROVED'",
            "SELECT * FROM agents",
            "INSERT INTO agents (id, owner, roles, labels, token_hash, created_at) "
            "VALUES ('x', 'o', '[]', '{}', 'h', now())",
        ):
            _permission_denied(auditor, statement)
    finally:
        auditor.dispose()
    after = audit_db.snapshot()
    assert after[0][:EVENTS] == before[0]
    assert_chain_intact(audit_db.engine)
    assert audit_db.verify(with_file=False).intact


def test_checkpoint_rows_survive_verification_round_trip(audit_db: AuditDb) -> None:
    """What the database returns for a checkpoint still verifies: signed_at keeps its exact form."""
    with audit_db.engine.connect() as conn:
        rows = conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq)).mappings().all()
    from_file = [cp for _, cp in read_file(audit_db.file)]
    assert [Checkpoint(**dict(r)) for r in rows] == from_file
    assert all(cp.valid(public_key()) for cp in from_file)
