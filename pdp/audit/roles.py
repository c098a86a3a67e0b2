"""PostgreSQL roles: the service's writer, the executor's role, and an auditor that only reads.

All three are NOLOGIN group roles; each process connects as a login role that is a member of one
(`CREATE ROLE pdp_service LOGIN PASSWORD '…' IN ROLE pdp_writer`); migrations and identity
management run as the schema owner. The triggers refuse UPDATE/DELETE/TRUNCATE on the audit log even
to the owner; these grants mean the others could not even try.

- writer (``pdp serve``): decides, records proposals and votes, issues tickets, appends to the log.
- executor (``pdp-executor``): reads approved proposals and their tickets, moves a proposal's state,
  records executions and breakers, appends to the log. It cannot insert a vote or a ticket, nor change
  an action or a decision: an executor's credentials never make anything approved.
- auditor: the log and its views, and the columns of proposals and votes that ``pdp audit verify``
  compares with the log (each a copy of what the log itself holds); it writes nothing.

Votes and approval requests are signed by the PDP's key (pdp.approvals.signed), so even the writer's
grants cannot forge a vote or a requirement that counts: they can only make rows that ``verify`` reports.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, text

AUDIT_TABLES = ("audit_events", "audit_checkpoints")
AUDIT_VIEWS = ("audit_decisions", "audit_approvals", "audit_executions", "audit_timeline")
# What `pdp audit verify` reads besides the log (pdp/audit/rows.py).
AUDITED_PROPOSAL_COLUMNS = (
    "id",
    "agent_id",
    "state",
    "action",
    "action_json",
    "action_digest",
    "decision",
    "decision_input",
    "outcome",
    "policy_version",
    "approval_expires_at",
)
AUDITED_VOTE_COLUMNS = ("proposal_id", "approver_id", "verdict", "groups", "action_digest")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def create_roles(engine: Engine, writer: str, auditor: str, executor: str | None = None) -> None:
    """Create (or reset) the roles' grants; ``executor`` None leaves the executor's role alone."""
    roles = [writer, auditor] + ([executor] if executor is not None else [])
    for name in roles:
        if not _NAME.match(name):
            raise ValueError(f"role name {name!r}: use lowercase letters, digits and _")
    if len(set(roles)) != len(roles):
        raise ValueError("the roles need distinct names")
    audit = ", ".join(AUDIT_TABLES)
    statements = []
    for role in roles:
        statements += [
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",  # also revokes column grants
        ]
    statements += [
        # The service: reads identities, writes proposals and votes, appends (only) to the audit log.
        f"GRANT SELECT ON agents, approvers, alembic_version TO {writer}",
        f"GRANT SELECT, INSERT ON approvals TO {writer}",
        f"GRANT SELECT, INSERT, UPDATE ON proposals TO {writer}",
        f"GRANT SELECT, INSERT ON {audit} TO {writer}",
        # It issues tickets (never changed) and reads execution state and breakers the executor writes.
        f"GRANT SELECT, INSERT ON execution_tickets TO {writer}",
        f"GRANT SELECT ON executions, circuit_breakers TO {writer}",
        # Governance: counters and quarantines (old counter windows are pruned).
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON limit_counters TO {writer}",
        f"GRANT SELECT, INSERT, UPDATE ON quarantines TO {writer}",
        # Auditors: the audit log and its views, and what verify compares with it, read-only.
        f"GRANT SELECT ON {audit}, {', '.join(AUDIT_VIEWS)} TO {auditor}",
        f"GRANT SELECT ({', '.join(AUDITED_PROPOSAL_COLUMNS)}) ON proposals TO {auditor}",
        f"GRANT SELECT ({', '.join(AUDITED_VOTE_COLUMNS)}) ON approvals TO {auditor}",
    ]
    if executor is not None:
        statements += [
            # Approved work and its signed tickets; agents, to refuse a revoked agent's work; the schema version.
            f"GRANT SELECT ON proposals, execution_tickets, alembic_version TO {executor}",
            f"GRANT SELECT (id, revoked_at) ON agents TO {executor}",  # not token_hash: it needs no identity
            # A proposal's state moves (EXECUTING, SUCCEEDED, …); its action and decision never.
            f"GRANT UPDATE (state, updated_at) ON proposals TO {executor}",
            f"GRANT SELECT, INSERT, UPDATE ON executions, circuit_breakers TO {executor}",
            f"GRANT SELECT, INSERT ON audit_events TO {executor}",
        ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
