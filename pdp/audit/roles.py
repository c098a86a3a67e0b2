"""PostgreSQL roles: a writer that can append to the audit log but never change it, an auditor that only reads.

Both are NOLOGIN group roles. The service connects as a login role that is a member of the writer
(`CREATE ROLE pdp_service LOGIN PASSWORD '…' IN ROLE pdp_writer`); migrations and identity management
run as the schema owner. The triggers refuse UPDATE/DELETE/TRUNCATE even to the owner; these grants
mean the writer could not even try.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, text

AUDIT_TABLES = ("audit_events", "audit_checkpoints")
AUDIT_VIEWS = ("audit_decisions", "audit_approvals", "audit_executions", "audit_timeline")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def create_roles(engine: Engine, writer: str, auditor: str) -> None:
    for name in (writer, auditor):
        if not _NAME.match(name):
            raise ValueError(f"role name {name!r}: use lowercase letters, digits and _")
    audit = ", ".join(AUDIT_TABLES)
    statements = []
    for role in (writer, auditor):
        statements += [
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
        ]
    statements += [
        # The service: reads identities, writes proposals, appends (only) to the audit log.
        f"GRANT SELECT ON agents, approvers, alembic_version TO {writer}",
        f"GRANT SELECT, INSERT ON approvals TO {writer}",
        f"GRANT SELECT, INSERT, UPDATE ON proposals TO {writer}",
        f"GRANT SELECT, INSERT ON {audit} TO {writer}",
        # Execution state, shared by the PDP (issues tickets, reads results and breakers) and the
        # executor, which connects as a member of the same role. Tickets are never changed.
        f"GRANT SELECT, INSERT ON execution_tickets TO {writer}",
        f"GRANT SELECT, INSERT, UPDATE ON executions, circuit_breakers TO {writer}",
        # Governance: counters and quarantines (old counter windows are pruned).
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON limit_counters TO {writer}",
        f"GRANT SELECT, INSERT, UPDATE ON quarantines TO {writer}",
        # Auditors: the audit log and its views, nothing else, read-only.
        f"GRANT SELECT ON {audit}, {', '.join(AUDIT_VIEWS)} TO {auditor}",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
