"""`pdp audit verify`: recompute the chain, cross-check it against signed checkpoints, report the first break.

It streams rows in seq order, so memory stays flat however long the chain is. What it proves:
every hash and link recomputes, seq is contiguous from 1, each row's indexed columns agree with its
hashed body, every checkpoint (database and file) carries a valid signature and names a head the chain
actually had. Only the file of checkpoints, kept outside the database, catches a full rewrite with
recomputed hashes or a truncated tail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, select, text

from pdp.audit.chain import GENESIS, MAIN_CHAIN, event_hash
from pdp.audit.checkpoints import Checkpoint, read_file, stored
from pdp.store.models import audit_events

# Indexed columns that repeat a field of the hashed body (recorded_at is the database's own clock).
_COLUMNS = ("event_id", "type", "proposal_id", "agent_id", "actor", "policy_version")
_SELECTED = ("seq", "prev_hash", "body", "hash", *_COLUMNS)
_HASH = 3
_BATCH = 5_000

# Each must exist (and on PostgreSQL fire ALWAYS) for the database to refuse change.
SQLITE_TRIGGERS = (
    "audit_events_no_update",
    "audit_events_no_delete",
    "audit_events_extend_head",
    "audit_checkpoints_no_update",
    "audit_checkpoints_no_delete",
    "audit_checkpoints_no_replace",
)
POSTGRES_TRIGGERS = (
    "audit_events_no_change",
    "audit_events_no_truncate",
    "audit_events_extend_head",
    "audit_checkpoints_no_change",
    "audit_checkpoints_no_truncate",
)


@dataclass
class Report:
    events: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpoints: int = 0
    # seq of the first problem (0 when the problem is not at a row, e.g. a missing trigger) and what it is
    first_bad_seq: int | None = None
    problem: str = ""
    triggers_missing: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.first_bad_seq is None and not self.triggers_missing

    def fail(self, seq: int, problem: str) -> None:
        if self.first_bad_seq is None:
            self.first_bad_seq, self.problem = seq, problem


def missing_triggers(conn: Connection) -> list[str]:
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'A' "
                "AND tgrelid IN ('audit_events'::regclass, 'audit_checkpoints'::regclass)"
            )
        )
        expected: Iterable[str] = POSTGRES_TRIGGERS
    else:
        rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
        expected = SQLITE_TRIGGERS
    present = {row[0] for row in rows}
    return [name for name in expected if name not in present]


def _checkpoints(
    conn: Connection, chain: str, checkpoint_file: Path | None, report: Report
) -> list[tuple[str, Checkpoint]]:
    found = [("database", cp) for cp in stored(conn, chain)]
    if checkpoint_file is not None:
        try:
            found += [(f"{checkpoint_file}:{n}", cp) for n, cp in read_file(checkpoint_file) if cp.chain == chain]
        except (OSError, ValueError, KeyError) as exc:
            report.fail(0, f"cannot read checkpoint file {checkpoint_file}: {exc}")
    return found


def verify(
    engine: Engine,
    *,
    public_key: Ed25519PublicKey | None,
    checkpoint_file: Path | None = None,
    from_seq: int = 1,
    chain: str = MAIN_CHAIN,
) -> Report:
    report = Report()
    with engine.connect() as conn:
        report.triggers_missing = missing_triggers(conn)
        checkpoints = _checkpoints(conn, chain, checkpoint_file, report)
        by_seq: dict[int, list[tuple[str, Checkpoint]]] = {}
        for source, cp in checkpoints:
            if public_key is not None and not cp.valid(public_key):
                report.fail(cp.seq, f"checkpoint at seq {cp.seq} ({source}) has an invalid signature")
            by_seq.setdefault(cp.seq, []).append((source, cp))
        report.checkpoints = len(checkpoints)

        expected_seq, prev = from_seq, GENESIS
        if from_seq > 1:  # start from a row the caller trusts
            start = conn.execute(
                select(audit_events.c.hash).where(audit_events.c.chain == chain, audit_events.c.seq == from_seq - 1)
            ).scalar()
            if start is None:
                report.fail(from_seq - 1, f"no event at seq {from_seq - 1} to start from")
                return report
            prev = str(start)
        query = (
            select(*(audit_events.c[name] for name in _SELECTED))
            .where(audit_events.c.chain == chain, audit_events.c.seq >= from_seq)
            .order_by(audit_events.c.seq)
        )
        rows = conn.execution_options(stream_results=True, yield_per=_BATCH).execute(query)
        for row in rows:
            seq = int(row[0])
            problem = _check_row(tuple(row), expected_seq, prev)
            if problem:
                report.fail(seq if seq == expected_seq else expected_seq, problem)
                break
            for source, cp in by_seq.get(seq, ()):
                if cp.head_hash != row[_HASH]:
                    report.fail(
                        seq,
                        f"checkpoint ({source}) signed head {cp.head_hash[:16]}… but the chain has "
                        f"{row[_HASH][:16]}… at seq {seq}: rewritten since it was signed",
                    )
            if report.first_bad_seq is not None:
                break
            report.events += 1
            expected_seq, prev = seq + 1, str(row[_HASH])
        rows.close()
        report.head_seq, report.head_hash = expected_seq - 1, prev
        if report.first_bad_seq is None:
            beyond = [(source, cp) for source, cp in checkpoints if cp.seq > report.head_seq]
            if beyond:
                source, cp = min(beyond, key=lambda item: item[1].seq)
                report.fail(
                    report.head_seq + 1,
                    f"the chain ends at seq {report.head_seq} but a checkpoint ({source}) was signed at seq "
                    f"{cp.seq}: events were removed (truncated or rolled back)",
                )
    return report


def _check_row(row: tuple[Any, ...], expected_seq: int, prev: str) -> str:
    seq, prev_hash, body, digest = int(row[0]), row[1], str(row[2]), row[_HASH]
    if seq != expected_seq:
        return f"seq jumps from {expected_seq - 1} to {seq}: events are missing"
    if prev_hash != prev:
        return f"prev_hash does not match the hash of seq {seq - 1}: the chain is broken here"
    if event_hash(seq, prev, body.encode("utf-8")) != digest:
        return "hash does not match the body: the event was altered"
    try:
        parsed = json.loads(body)
    except ValueError:
        return "body is not JSON"
    for offset, column in enumerate(_COLUMNS, start=4):
        if column not in parsed or parsed[column] != row[offset]:
            return f"column {column!r} does not match the hashed body: the row was altered"
    return ""
