"""The audit log: hash-chained events and signed checkpoints, refused change by the database, views.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_GENESIS = "0" * 64
_TABLES = ("audit_events", "audit_checkpoints")


def _json(dialect: str, *path: str) -> str:
    """SQL extracting a text value at ``path`` from the JSON ``body`` column."""
    if dialect == "postgresql":
        return "(body::jsonb #>> '{" + ",".join(path) + "}')"
    return "json_extract(body, '$." + ".".join(path) + "')"


def _json_raw(dialect: str, *path: str) -> str:
    """The JSON value at ``path`` as JSON text (for lists and objects)."""
    if dialect == "postgresql":
        return "(body::jsonb #> '{" + ",".join(path) + "}')::text"
    return "json_extract(body, '$." + ".".join(path) + "')"


def _views(dialect: str) -> dict[str, str]:

    def j(*path: str) -> str:
        return _json(dialect, *path)

    def raw(*path: str) -> str:
        return _json_raw(dialect, *path)

    return {
        "audit_decisions": f"""
            SELECT seq, recorded_at, {j("occurred_at")} AS occurred_at, proposal_id, agent_id,
                   {j("data", "decision_input", "agent", "owner")} AS agent_owner,
                   {j("data", "action", "tool")} AS tool, {j("data", "action", "operation")} AS operation,
                   {j("data", "action", "resource")} AS resource,
                   {j("data", "decision", "outcome")} AS outcome, {j("data", "state")} AS state,
                   {j("data", "decision", "boundary")} AS boundary, {j("data", "decision", "tier")} AS tier,
                   policy_version, {j("data", "justification")} AS justification,
                   {raw("data", "decision", "reasons")} AS reasons,
                   {raw("data", "decision", "approval_requirements")} AS approval_requirements,
                   {raw("data", "action", "params")} AS params
            FROM audit_events WHERE type = 'proposal.decided'""",
        "audit_approvals": f"""
            SELECT seq, recorded_at, {j("occurred_at")} AS occurred_at, proposal_id, agent_id,
                   actor AS approver, {j("data", "verdict")} AS verdict, {j("data", "comment")} AS comment,
                   {j("data", "action_digest")} AS action_digest, policy_version
            FROM audit_events WHERE type IN ('approval.granted', 'approval.rejected')""",
        "audit_executions": f"""
            SELECT seq, recorded_at, {j("occurred_at")} AS occurred_at, proposal_id, agent_id,
                   substr(type, 11) AS status, {j("data", "tool")} AS tool, {j("data", "resource")} AS resource,
                   {j("data", "error")} AS error, policy_version
            FROM audit_events WHERE type LIKE 'execution.%'""",
        "audit_timeline": f"""
            SELECT proposal_id, seq, recorded_at, {j("occurred_at")} AS occurred_at, type, actor, agent_id,
                   policy_version
            FROM audit_events""",
    }


def _sqlite_refusals() -> list[str]:
    statements = []
    for table in _TABLES:
        for verb in ("UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
            )
    # Only appends that extend the head: this also defeats INSERT OR REPLACE (it would reuse a seq).
    statements.append(
        "CREATE TRIGGER audit_events_extend_head BEFORE INSERT ON audit_events "
        "WHEN NEW.seq != COALESCE((SELECT MAX(seq) FROM audit_events WHERE chain = NEW.chain), 0) + 1 "
        f"OR NEW.prev_hash != COALESCE((SELECT hash FROM audit_events WHERE chain = NEW.chain "
        f"ORDER BY seq DESC LIMIT 1), '{_GENESIS}') "
        "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: an insert must extend the chain head'); END"
    )
    statements.append(
        "CREATE TRIGGER audit_checkpoints_no_replace BEFORE INSERT ON audit_checkpoints "
        "WHEN EXISTS (SELECT 1 FROM audit_checkpoints WHERE chain = NEW.chain AND seq = NEW.seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only: REPLACE refused'); END"
    )
    return statements


def _postgresql_refusals() -> list[str]:
    statements = [
        """CREATE FUNCTION pdp_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                 USING ERRCODE = 'insufficient_privilege'; END $$""",
        f"""CREATE FUNCTION pdp_audit_extend_head() RETURNS trigger LANGUAGE plpgsql AS $$
           DECLARE last_seq bigint; last_hash text;
           BEGIN
             SELECT seq, hash INTO last_seq, last_hash FROM audit_events
              WHERE chain = NEW.chain ORDER BY seq DESC LIMIT 1;
             IF NEW.seq <> COALESCE(last_seq, 0) + 1 OR NEW.prev_hash <> COALESCE(last_hash, '{_GENESIS}') THEN
               RAISE EXCEPTION 'audit_events is append-only: an insert must extend the chain head'
                     USING ERRCODE = 'insufficient_privilege';
             END IF;
             RETURN NEW;
           END $$""",
    ]
    for table in _TABLES:
        statements += [
            f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION pdp_audit_refuse()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION pdp_audit_refuse()",
            # ALWAYS: also fires under session_replication_role = replica.
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_change",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_truncate",
        ]
    statements += [
        "CREATE TRIGGER audit_events_extend_head BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION pdp_audit_extend_head()",
        "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_extend_head",
    ]
    return statements


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # SQLite: the very text form SQLAlchemy stores datetimes in (microseconds), so comparisons with bound
    # datetimes are exact; strftime's %f gives milliseconds, padded to six digits.
    now = sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')") if dialect == "sqlite" else sa.text("now()")
    op.create_table(
        "audit_events",
        sa.Column("chain", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("recorded_at", _TS, server_default=now, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("proposal_id", sa.String(36), nullable=True),
        sa.Column("agent_id", sa.String(200), nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("policy_version", sa.String(100), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("chain", "seq", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_proposal_id", "audit_events", ["proposal_id"])
    op.create_index("ix_audit_events_agent_id", "audit_events", ["agent_id"])
    op.create_index("ix_audit_events_type", "audit_events", ["type"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("chain", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("signed_at", _TS, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("chain", "seq", name=op.f("pk_audit_checkpoints")),
    )
    for statement in _postgresql_refusals() if dialect == "postgresql" else _sqlite_refusals():
        op.execute(statement)
    for name, query in _views(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {query}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in _views(dialect):
        op.execute(f"DROP VIEW {name}")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_events")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION pdp_audit_extend_head()")
        op.execute("DROP FUNCTION pdp_audit_refuse()")
