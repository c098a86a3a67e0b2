"""The hash chain: every audit event links to the one before it.

    hash = SHA-256( b"agent-pdp/audit/v1\\n" || seq as 8-byte big-endian || prev_hash (32 bytes) || body )

``body`` is the event's canonical JSON (RFC 8785); the first event's ``prev_hash`` is 32 zero bytes;
hashes are stored as lowercase hex. ``docs/audit-format.md`` freezes these rules for third-party
verifiers.

Appends happen inside the transaction of the state change they record (a unit of the group-commit
writer), so the event and the change commit or roll back together. On PostgreSQL a transaction-scoped
advisory lock serialises appends to a chain across replicas (a sequence would leave gaps); SQLite has
one writer at a time anyway (``BEGIN IMMEDIATE``, which no savepoint rollback gives back). The database
also refuses any insert that does not extend the head.

The lock is taken outside every savepoint: ``ROLLBACK TO SAVEPOINT`` releases the locks taken after the
savepoint, advisory ones included, so a lock taken inside a writer unit would vanish with that unit's
failure while the rest of the batch went on as if it held it. The writers take it in their prelude,
before the first unit (``chain_writer``); ``lock_chain`` refuses to take it inside a savepoint.
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
from pdp.store.writer import GroupCommitWriter, in_savepoint

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


class ChainLockError(RuntimeError):
    """The chain's lock was asked for inside a savepoint, where a rollback could release it unseen."""


def lock_chain(conn: Connection, chain: str = MAIN_CHAIN) -> None:
    """PostgreSQL: hold the chain's advisory lock until this transaction ends (once per transaction).

    Taken only outside any savepoint, so nothing short of the transaction's end releases it; then
    remembering it saves a round trip for every later unit of a group-committed batch. Inside a
    savepoint it must already be held (a writer's prelude took it), else ChainLockError: a lock taken
    there would be released by that savepoint's rollback while the memo still said held.
    """
    if conn.dialect.name != "postgresql":
        return
    held: set[str] | None = conn.info.get(_LOCKS_HELD)
    if held is not None and chain in held:
        return
    if in_savepoint(conn):
        raise ChainLockError(
            f"the audit chain {chain!r} must be locked before the first savepoint of the transaction "
            "(a savepoint's rollback releases it): build the writer with chain_writer()"
        )
    conn.execute(_LOCK, {"key": advisory_key(chain)})
    conn.info.setdefault(_LOCKS_HELD, set()).add(chain)


def chain_writer(engine: Engine, *, max_batch: int = 128) -> GroupCommitWriter:
    """A group-commit writer whose every batch holds the main chain's lock from BEGIN to COMMIT."""
    return GroupCommitWriter(engine, max_batch=max_batch, prelude=lock_chain)


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
