"""Approver identities in the database: add, list, revoke, change groups, authenticate.

Approvers are people. Their id is what separation of duties compares with an agent's ``owner``, so
use the same naming for both (e.g. the person's login).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from pdp.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from pdp.identity.tokens import new_token, token_hash
from pdp.store.models import approvers

_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Approver:
    id: str
    name: str
    groups: frozenset[str]


@dataclass(frozen=True, slots=True)
class ApproverRecord:
    approver: Approver
    created_at: datetime
    revoked_at: datetime | None


def check_groups(groups: Iterable[str]) -> list[str]:
    result = sorted({g.strip() for g in groups if g.strip()})
    for group in result:
        if not _GROUP.match(group):
            raise InvalidArgument("groups", f"{group!r} is not a group name (letters, digits, _ . -)")
    return result


def add_approver(engine: Engine, approver_id: str, groups: Iterable[str], name: str = "") -> str:
    """Create an approver and return the token: the only time it exists in clear."""
    if not approver_id.strip() or len(approver_id) > 200:
        raise InvalidArgument("id", "must be 1 to 200 characters")
    checked = check_groups(groups)
    token = new_token()
    with engine.begin() as conn:
        if conn.execute(select(approvers.c.id).where(approvers.c.id == approver_id)).first() is not None:
            raise AlreadyExists(f"approver {approver_id!r} already exists")
        conn.execute(
            insert(approvers).values(
                id=approver_id,
                name=name or approver_id,
                groups=checked,
                token_hash=token_hash(token),
                created_at=datetime.now(UTC),
                revoked_at=None,
            )
        )
    return token


def list_approvers(engine: Engine) -> list[ApproverRecord]:
    with engine.connect() as conn:
        rows = conn.execute(select(approvers).order_by(approvers.c.id)).mappings().all()
    return [
        ApproverRecord(Approver(r["id"], r["name"], frozenset(r["groups"])), r["created_at"], r["revoked_at"])
        for r in rows
    ]


def revoke_approver(engine: Engine, approver_id: str) -> None:
    with engine.begin() as conn:
        done = conn.execute(
            update(approvers)
            .where(approvers.c.id == approver_id, approvers.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        if (
            done.rowcount == 0
            and conn.execute(select(approvers.c.id).where(approvers.c.id == approver_id)).first() is None
        ):
            raise NotFound(f"approver {approver_id!r} does not exist")


def set_groups(engine: Engine, approver_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
    """Change an approver's group membership; returns the new groups."""
    adding, removing = set(check_groups(add)), set(check_groups(remove))
    with engine.begin() as conn:
        row = conn.execute(select(approvers.c.groups).where(approvers.c.id == approver_id)).first()
        if row is None:
            raise NotFound(f"approver {approver_id!r} does not exist")
        groups = sorted((set(row.groups) | adding) - removing)
        conn.execute(update(approvers).where(approvers.c.id == approver_id).values(groups=groups))
    return groups


def group_members(conn: Connection) -> dict[str, int]:
    """Active approvers per group."""
    counts: dict[str, int] = {}
    for row in conn.execute(select(approvers.c.groups).where(approvers.c.revoked_at.is_(None))):
        for group in row.groups:
            counts[group] = counts.get(group, 0) + 1
    return counts


_BY_TOKEN = select(approvers.c.id, approvers.c.name, approvers.c.groups).where(
    approvers.c.token_hash == bindparam("token_hash"), approvers.c.revoked_at.is_(None)
)
_BY_ID = select(approvers.c.id, approvers.c.name, approvers.c.groups).where(
    approvers.c.id == bindparam("approver_id"), approvers.c.revoked_at.is_(None)
)


def authenticate_approver(conn: Connection, token: str) -> Approver:
    """The approver a token belongs to; Unauthenticated if unknown or revoked."""
    row = conn.execute(_BY_TOKEN, {"token_hash": token_hash(token)}).first()
    if row is None:
        raise Unauthenticated("unknown or revoked approver token")
    return Approver(row.id, row.name, frozenset(row.groups))


def active_approver(conn: Connection, approver_id: str) -> Approver:
    """The approver as the database has it now (groups may have changed); Unauthenticated if revoked."""
    row = conn.execute(_BY_ID, {"approver_id": approver_id}).first()
    if row is None:
        raise Unauthenticated("unknown or revoked approver")
    return Approver(row.id, row.name, frozenset(row.groups))
