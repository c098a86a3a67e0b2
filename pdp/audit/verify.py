"""`pdp audit verify`: recompute the chain, cross-check it against signed checkpoints, report the first break.

It streams rows in seq order, so memory stays flat however long the chain is. What it proves:
every hash and link recomputes, seq is contiguous from 1, each row's indexed columns agree with its
hashed body, every checkpoint (database and file) carries a valid signature and names a head the chain
actually had. Only the file of checkpoints, kept outside the database, catches a full rewrite with
recomputed hashes or a truncated tail.

It also reports the *unsigned tail*: the events after the newest validly signed checkpoint, and the
oldest ``occurred_at`` among them. A correct hash chain proves only that the rows agree with each other;
whoever holds the database's grants can append a well-formed event, and until a checkpoint covers it
nothing signed vouches for it. With the PDP running the tail is a second or two old; an old one means
the PDP is not running (the executor's events after it stopped wait for its next start) or that
someone appended behind its back.

Then (:mod:`pdp.audit.rows`) it compares the mutable rows with the chain: each proposal's state, action,
decision and votes with its events and the PDP's signatures. Those are not chain breaks, and are reported
apart (``Report.rows``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, select, text

from pdp.audit import rows as mutable_rows
from pdp.audit.chain import GENESIS, MAIN_CHAIN, event_hash
from pdp.audit.checkpoints import Checkpoint, read_file, stored
from pdp.audit.rows import Disagreement, RowsReport
from pdp.canonical import timestamp
from pdp.store.models import audit_events

# Indexed columns that repeat a field of the hashed body (recorded_at is the database's own clock).
_COLUMNS = ("event_id", "type", "proposal_id", "agent_id", "actor", "policy_version")
_SELECTED = ("seq", "prev_hash", "body", "hash", *_COLUMNS)
_HASH = 3
_BATCH = 5_000

# Each trigger must exist with exactly the definition migration 0002 created (on PostgreSQL: enabled
# ALWAYS, with its function's source unchanged): a trigger recreated with `WHEN 0`, or a function
# replaced by one that does nothing, keeps its name but refuses nothing. Values: SHA-256 of the
# definition text (tests/test_audit_triggers.py rebuilds them from a fresh migration).
SQLITE_TRIGGERS = {
    "audit_events_no_update": "9e5442eb67c8104360a5acf1e60725d5d5ea2e77977dda7c120bcd3d2d1c4735",
    "audit_events_no_delete": "97b8b975343b2d4e702dc58a44a550e6bedce400607806fbf30a76132df759a4",
    "audit_events_extend_head": "d4f74f4309d63cf3cfa7e16970bfa6845dc06037b720fe68172a25fae02a7ccb",
    "audit_checkpoints_no_update": "38af4ff3838aac3d4ec065e0839400716558dfc40dc6679f3221371e95ad7103",
    "audit_checkpoints_no_delete": "bdd107f4b7faa96d7a71b5b89c3454f5fd0f3aa6c160574c644e2c5927b21271",
    "audit_checkpoints_no_replace": "5392948bf910be33ac069255347f33f6e5600a7ba1740dc5f7e8c9235e9d852e",
}
POSTGRES_TRIGGERS = {
    "audit_events_no_change": "da77e1b5b4f73e0d6fe7670f6775f932b92be46fd994564cffb6517a3c02da68",
    "audit_events_no_truncate": "fbd5fa16e7ae02c4e47a03f475c3e407ba5b9801372197586c8a6348e6f9ee58",
    "audit_events_extend_head": "4fd93bc6f9d5dc75c8952dfa1191c8ad474392d9939b4d2d520b3c899f8490e2",
    "audit_checkpoints_no_change": "4ef36dbe6516d7d10390bd84ff20773eb4d744d4180fbcd3e063870aa2ab8e38",
    "audit_checkpoints_no_truncate": "c002d17290978511c8ba3e47c6aca665a1a24ac483efd55ca4e52f5788fa93ce",
}


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
    # The newest seq a validly signed checkpoint covers (0: none), and the verified events after it.
    signed_seq: int = 0
    unsigned: int = 0
    # The earliest hashed occurred_at among the unsigned events; None when there are none, or when one of
    # them has no readable occurred_at (then undated is set: its age is unknown).
    unsigned_since: datetime | None = None
    undated: bool = False
    # The rows against the chain; None when not checked (no public key, or not asked for).
    rows: RowsReport | None = None

    @property
    def intact(self) -> bool:
        """The chain, its checkpoints and the triggers (the rows are judged apart: ``rows.agree``)."""
        return self.first_bad_seq is None and not self.triggers_missing

    @property
    def disagreements(self) -> list[Disagreement]:
        return self.rows.disagreements if self.rows is not None else []

    def fail(self, seq: int, problem: str) -> None:
        if self.first_bad_seq is None:
            self.first_bad_seq, self.problem = seq, problem


def trigger_fingerprints(conn: Connection) -> dict[str, str]:
    """name -> SHA-256 of the definition of every trigger on the audit tables (PostgreSQL: enabled ALWAYS only)."""
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT t.tgname, pg_get_triggerdef(t.oid) || chr(10) || p.prosrc FROM pg_trigger t "
                "JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT t.tgisinternal AND t.tgenabled = 'A' "
                "AND t.tgrelid IN ('audit_events'::regclass, 'audit_checkpoints'::regclass)"
            )
        )
    else:
        rows = conn.execute(
            text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                "AND tbl_name IN ('audit_events', 'audit_checkpoints')"
            )
        )
    return {str(name): hashlib.sha256(str(definition).encode()).hexdigest() for name, definition in rows}


def missing_triggers(conn: Connection) -> list[str]:
    """Refusal triggers that are absent, disabled or altered."""
    expected = POSTGRES_TRIGGERS if conn.dialect.name == "postgresql" else SQLITE_TRIGGERS
    present = trigger_fingerprints(conn)
    return [
        name if name not in present else f"{name} (altered)"
        for name, fingerprint in expected.items()
        if present.get(name) != fingerprint
    ]


def _file_checkpoints(checkpoint_file: Path | None, chain: str, report: Report) -> list[tuple[str, Checkpoint]]:
    if checkpoint_file is None:
        return []
    try:
        return [(f"{checkpoint_file}:{n}", cp) for n, cp in read_file(checkpoint_file) if cp.chain == chain]
    except (OSError, ValueError, KeyError) as exc:
        report.fail(0, f"cannot read checkpoint file {checkpoint_file}: {exc}")
        return []


def verify(
    engine: Engine,
    *,
    public_key: Ed25519PublicKey | None,
    checkpoint_file: Path | None = None,
    from_seq: int = 1,
    chain: str = MAIN_CHAIN,
    check_rows: bool = True,
) -> Report:
    report = Report()
    # The file first: a checkpoint signed after the database snapshot below would otherwise name a seq
    # the snapshot cannot see, and look like a truncation of a live, intact log.
    from_file = _file_checkpoints(checkpoint_file, chain, report)
    with engine.connect() as conn:
        report.triggers_missing = missing_triggers(conn)
        checkpoints = [("database", cp) for cp in stored(conn, chain)] + from_file
        by_seq: dict[int, list[tuple[str, Checkpoint]]] = {}
        for source, cp in checkpoints:
            if public_key is not None and not cp.valid(public_key):
                report.fail(cp.seq, f"checkpoint at seq {cp.seq} ({source}) has an invalid signature")
            elif public_key is not None:  # without a key nothing is signed as far as this check knows
                report.signed_seq = max(report.signed_seq, cp.seq)
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
            problem, body = _check_row(tuple(row), expected_seq, prev)
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
            if seq > report.signed_seq:
                _unsigned(report, body)
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
    if check_rows and public_key is not None:
        report.rows = mutable_rows.check(engine, public_key, chain)
    return report


def _unsigned(report: Report, body: dict[str, Any]) -> None:
    """Count one event of the unsigned tail and date it by its hashed occurred_at."""
    report.unsigned += 1
    occurred = body.get("occurred_at")
    try:
        when = datetime.fromisoformat(occurred.replace("Z", "+00:00")) if isinstance(occurred, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        report.undated = True  # an event that cannot be dated must not make the tail look young
    elif report.unsigned_since is None or when < report.unsigned_since:
        report.unsigned_since = when


def _check_row(row: tuple[Any, ...], expected_seq: int, prev: str) -> tuple[str, dict[str, Any]]:
    """The row's problem ("" if none) and its parsed body (a JSON object whenever there is no problem)."""
    seq, prev_hash, body, digest = int(row[0]), row[1], str(row[2]), row[_HASH]
    if seq != expected_seq:
        return f"seq jumps from {expected_seq - 1} to {seq}: events are missing", {}
    if prev_hash != prev:
        return f"prev_hash does not match the hash of seq {seq - 1}: the chain is broken here", {}
    if event_hash(seq, prev, body.encode("utf-8")) != digest:
        return "hash does not match the body: the event was altered", {}
    try:
        parsed = json.loads(body)
    except ValueError:
        return "body is not JSON", {}
    if not isinstance(parsed, dict):
        return "body is not a JSON object", {}
    for offset, column in enumerate(_COLUMNS, start=4):
        if column not in parsed or parsed[column] != row[offset]:
            return f"column {column!r} does not match the hashed body: the row was altered", {}
    return "", parsed


def unsigned_age(report: Report, now: datetime) -> timedelta | None:
    """How long the oldest unsigned event has waited, by its hashed occurred_at (negative: dated ahead of
    ``now``); None when there is no dated unsigned event."""
    return None if report.unsigned_since is None else now - report.unsigned_since


def stale_tail(report: Report, now: datetime, max_age: timedelta) -> str:
    """Why the unsigned tail is beyond ``max_age`` (older, dated further ahead, or undated); "" if it is not.

    A date ahead of ``now`` counts like one behind it: an appender who controls occurred_at must not be
    able to keep its events young for ever.
    """
    if report.unsigned == 0:
        return ""
    tail = f"{report.unsigned} unsigned event(s) after seq {report.signed_seq}"
    if report.undated:
        return f"{tail}, one of them without a readable occurred_at: its age is unknown"
    age = unsigned_age(report, now)
    assert age is not None and report.unsigned_since is not None
    since = timestamp(report.unsigned_since)
    if age > max_age:
        return f"{tail}, the oldest from {since} ({describe(age)} ago), older than {describe(max_age)}"
    if -age > max_age:
        return f"{tail}, the oldest dated {since} ({describe(-age)} in the future), beyond {describe(max_age)}"
    return ""


def describe(span: timedelta) -> str:
    """A duration for people: 850ms, 12s, 5m 3s, 2h 10m, 3d 4h."""
    seconds = span.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next(i for i, (n, _) in enumerate(parts) if n)  # whole >= 1, so some part is non-zero
    return " ".join(f"{n}{unit}" for n, unit in parts[first : first + 2] if n)
