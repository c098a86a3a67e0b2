"""Signed checkpoints: an Ed25519 signature over a chain head, kept in the database and in a file outside it.

The signed bytes are ``b"agent-pdp/checkpoint/v1\\n"`` followed by the canonical JSON of
``{"chain", "seq", "head_hash", "signed_at"}``. A rewrite of the database (even with every hash
recomputed), a rollback to a backup, or a truncated tail no longer matches a checkpoint in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, select

from pdp.audit.chain import MAIN_CHAIN, head, lock_chain
from pdp.audit.keys import key_id
from pdp.canonical import canonical_json, timestamp
from pdp.store.models import audit_checkpoints

DOMAIN_TAG = b"agent-pdp/checkpoint/v1\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain: str
    seq: int
    head_hash: str
    signed_at: datetime
    key_id: str
    signature: str

    def signed_bytes(self) -> bytes:
        payload = {
            "chain": self.chain,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "signed_at": timestamp(self.signed_at),
        }
        return DOMAIN_TAG + canonical_json(payload)

    def valid(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(bytes.fromhex(self.signature), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_line(self) -> str:
        data = asdict(self)
        data["signed_at"] = timestamp(self.signed_at)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_line(cls, line: str) -> Checkpoint:
        data = json.loads(line)
        return cls(
            chain=str(data["chain"]),
            seq=int(data["seq"]),
            head_hash=str(data["head_hash"]),
            signed_at=datetime.fromisoformat(str(data["signed_at"]).replace("Z", "+00:00")),
            key_id=str(data["key_id"]),
            signature=str(data["signature"]),
        )


def sign_head(conn: Connection, key: Ed25519PrivateKey, now: datetime, chain: str = MAIN_CHAIN) -> Checkpoint | None:
    """Sign the current head and store the checkpoint in this transaction; None if there is nothing new."""
    lock_chain(conn, chain)
    seq, head_hash = head(conn, chain)
    if seq == 0:
        return None
    existing = conn.execute(
        select(audit_checkpoints.c.seq).where(audit_checkpoints.c.chain == chain, audit_checkpoints.c.seq == seq)
    ).first()
    if existing is not None:
        return None
    unsigned = Checkpoint(chain, seq, head_hash, now, key_id(key.public_key()), "")
    checkpoint = Checkpoint(chain, seq, head_hash, now, unsigned.key_id, key.sign(unsigned.signed_bytes()).hex())
    conn.execute(audit_checkpoints.insert().values(asdict(checkpoint)))
    return checkpoint


def append_to_file(path: Path, checkpoint: Checkpoint) -> None:
    """Append one JSON line and fsync, after the database transaction holding the checkpoint committed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (checkpoint.to_line() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> Iterator[tuple[int, Checkpoint]]:
    """(line number, checkpoint) for every line of a checkpoint file."""
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, Checkpoint.from_line(line)


def stored(conn: Connection, chain: str = MAIN_CHAIN) -> list[Checkpoint]:
    rows = conn.execute(
        select(audit_checkpoints).where(audit_checkpoints.c.chain == chain).order_by(audit_checkpoints.c.seq)
    ).mappings()
    return [Checkpoint(**dict(row)) for row in rows]
