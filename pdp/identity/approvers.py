"""Approver identities in the database: add, list, revoke, change groups, authenticate.

Approvers are people. Their id is what separation of duties compares with an agent's ``owner``, so
use the same naming for both (e.g. the person's login). Ids and group names follow
:mod:`pdp.identity.names`: canonical when created, compared by :func:`~pdp.identity.names.identity_key`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from pdp.errors import AlreadyExists, NotFound, Unauthenticated
from pdp.identity.names import check_display_name, check_group, check_id, colliding, identity_key
from pdp.identity.tokens import new_token, token_hash
from pdp.store.database import write_transaction
from pdp.store.models import approvers


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
    """Canonical group names, sorted and de-duplicated (blanks around a comma-separated name are dropped)."""
    return sorted({check_group(g.strip()) for g in groups if g.strip()})


def add_approver(engine: Engine, approver_id: str, groups: Iterable[str], name: str = "") -> str:
    """Create an approver and return the token: the only time it exists in clear.

    The id must be canonical, and not the same identity as an existing approver (``Alice`` when ``alice``
    exists, say: separation of duties and one-vote-each compare identities, not spellings).
    """
    check_id("id", approver_id)
    check_display_name(name)
    checked = check_groups(groups)
    token = new_token()
    with write_transaction(engine) as conn:
        same = colliding(approver_id, conn.execute(select(approvers.c.id)).scalars())
        if same is not None:
            taken = "already exists" if same == approver_id else f"would be confused with existing approver {same!r}"
            raise AlreadyExists(f"approver {approver_id!r} {taken}")
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
    with write_transaction(engine) as conn:
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
    """Change an approver's group membership; returns the new groups.

    Groups to join must be canonical; a group to leave matches by identity key, so a group stored before
    the naming rule (``Ops``) can still be left.
    """
    adding = set(check_groups(add))
    removing = {identity_key(g) for g in remove if g.strip()}
    with write_transaction(engine) as conn:
        row = conn.execute(select(approvers.c.groups).where(approvers.c.id == approver_id)).first()
        if row is None:
            raise NotFound(f"approver {approver_id!r} does not exist")
        kept = {g for g in row.groups if identity_key(g) not in removing}
        held = {identity_key(g) for g in kept}
        groups = sorted(kept | {g for g in adding if identity_key(g) not in removing | held})
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
