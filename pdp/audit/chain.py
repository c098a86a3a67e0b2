"""The hash chain: every audit event links to the one before it.

    hash = SHA-256( b"agent-pdp/audit/v1\\n" || seq as 8-byte big-endian || prev_hash (32 bytes) || body )

``body`` is the event's canonical JSON (RFC 8785); the first event's ``prev_hash`` is 32 zero bytes;
hashes are stored as lowercase hex. ``docs/audit-format.md`` freezes these rules for third-party
verifiers.

Appends happen inside the transaction of the state change they record (a unit of the group-commit
writer), so the event and the change commit or roll back together. On PostgreSQL a transaction-scoped
advisory lock serialises appends to a chain across replicas (a sequence would leave gaps); SQLite has
one writer at a time anyway. The database also refuses any insert that does not extend the head.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, event, select, text

from pdp.canonical import canonical_json, timestamp
from pdp.store.models import audit_events

DOMAIN_TAG = b"agent-pdp/audit/v1\n"
GENESIS = "0" * 64
MAIN_CHAIN = "main"


def event_hash(seq: int, prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(DOMAIN_TAG + seq.to_bytes(8, "big") + bytes.fromhex(prev_hash) + body).hexdigest()


def advisory_key(chain: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory lock on one chain."""
    return int.from_bytes(hashlib.sha256(b"agent-pdp/audit-lock/" + chain.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Event:
    """One step worth recording. ``data`` holds everything needed to reconstruct it."""

    type: str
    actor: str
    occurred_at: datetime
    proposal_id: str | None = None
    agent_id: str | None = None
    policy_version: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def body(self, event_id: str) -> dict[str, Any]:
        """The canonical body; the indexed columns repeat these fields so verify can cross-check them."""
        return {
            "event_id": event_id,
            "type": self.type,
            "actor": self.actor,
            "occurred_at": timestamp(self.occurred_at),
            "proposal_id": self.proposal_id,
            "agent_id": self.agent_id,
            "policy_version": self.policy_version,
            "data": self.data,
        }


@dataclass(frozen=True, slots=True)
class Appended:
    chain: str
    seq: int
    event_id: str
    hash: str


_HEAD = (
    select(audit_events.c.seq, audit_events.c.hash)
    .where(audit_events.c.chain == bindparam("chain"))
    .order_by(audit_events.c.seq.desc())
    .limit(1)
)
_INSERT = audit_events.insert()
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def head(conn: Connection, chain: str = MAIN_CHAIN) -> tuple[int, str]:
    """(seq, hash) of the newest event, or (0, GENESIS) for an empty chain."""
    row = conn.execute(_HEAD, {"chain": chain}).first()
    return (int(row.seq), str(row.hash)) if row is not None else (0, GENESIS)


def lock_chain(conn: Connection, chain: str = MAIN_CHAIN) -> None:
    """PostgreSQL: hold the chain's advisory lock until this transaction ends (once per transaction).

    A transaction-level advisory lock survives the rollback of a savepoint, so remembering that this
    transaction took it saves a round trip for every later unit in a group-committed batch.
    """
    if conn.dialect.name != "postgresql":
        return
    held = conn.info.setdefault(_LOCKS_HELD, set())
    if chain not in held:
        conn.execute(_LOCK, {"key": advisory_key(chain)})
        held.add(chain)


_LOCKS_HELD = "pdp_audit_locks_held"


@event.listens_for(Engine, "commit")
@event.listens_for(Engine, "rollback")
def _locks_released(conn: Connection) -> None:
    """The transaction ended, and with it every advisory xact lock it held."""
    conn.info.pop(_LOCKS_HELD, None)


def append(conn: Connection, event: Event, chain: str = MAIN_CHAIN) -> Appended:
    """Append ``event`` in the caller's transaction; raises (and so rolls the caller back) on any failure."""
    lock_chain(conn, chain)
    seq, prev = head(conn, chain)
    seq += 1
    event_id = str(uuid.uuid4())
    body = canonical_json(event.body(event_id))
    digest = event_hash(seq, prev, body)
    conn.execute(
        _INSERT,
        {
            "chain": chain,
            "seq": seq,
            "event_id": event_id,
            "type": event.type,
            "proposal_id": event.proposal_id,
            "agent_id": event.agent_id,
            "actor": event.actor,
            "policy_version": event.policy_version,
            "body": body.decode("utf-8"),
            "prev_hash": prev,
            "hash": digest,
        },
    )
    return Appended(chain, seq, event_id, digest)
