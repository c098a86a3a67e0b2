"""An agent aims the sql connector at a table the policy denies, or at the database's own catalogs.

The bundle denies ``sql://crm/accounts``; support agents may do anything else. The attacker, holding a valid
token, proposes through the real gRPC API and the real executor runs what is allowed against a real CRM
database (SQLite file or PostgreSQL). SQLite matches table names without regard to case, so before the fix
``sql://crm/ACCOUNTS`` (a resource the rule does not match) read the denied table, and ``sql://crm/sqlite_master``
returned the schema. Every such resource must be refused, and nothing of the accounts table may come back.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BACKENDS, fresh_database
from execution import Stack, execution_stack, running_executor
from google.protobuf.json_format import MessageToDict
from sqlalchemy import create_engine, text

from pdp.store.database import normalize_url
from pdp.v1 import pdp_pb2

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DENY_ACCOUNTS = {
    "id": "no-accounts",
    "description": "Nobody reads or writes the accounts table.",
    "effect": "deny",
    "when": 'action.resource == "sql://crm/accounts"',
}

OPERATIONS: list[tuple[str, dict[str, object]]] = [
    ("select", {}),
    ("update", {"values": {"name": "pwned"}, "where": {"id": 1}}),
    ("delete", {"where": {"id": 2}}),
]

# Wrong case, system catalogs of both databases (whatever the case), schema-qualified and quoted names.
ATTACKS = [
    "ACCOUNTS",
    "Accounts",
    "accountS",
    "sqlite_master",
    "SQLITE_MASTER",
    "sqlite_schema",
    "sqlite_temp_master",
    "sqlite_sequence",
    "sqlite_stat1",
    "pg_class",
    "PG_CLASS",
    "pg_user",
    "pg_authid",
    "pg_shadow",
    "pg_settings",
    "pg_tables",
    "pg_stat_activity",
    "tables",
    "columns",
    "information_schema.tables",
    "pg_catalog.pg_class",
    "public.accounts",
    "main.accounts",
    "main.sqlite_master",
    "temp.sqlite_master",
    '"accounts"',
    "%22ACCOUNTS%22",
    "[accounts]",
    "`accounts`",
]


@dataclass
class Crm:
    url: str
    marker: str  # in every accounts row: must never reach the agent

    def accounts(self) -> list[tuple[object, ...]]:
        engine = create_engine(normalize_url(self.url))
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text("SELECT id, name, secret FROM accounts ORDER BY id"))]
        finally:
            engine.dispose()


def make_crm(backend: str, url: str) -> Crm:
    marker = "acct-secret-" + secrets.token_hex(8)
    engine = create_engine(normalize_url(url))
    key = "INTEGER PRIMARY KEY AUTOINCREMENT" if backend == "sqlite" else "SERIAL PRIMARY KEY"
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE accounts (id {key}, name TEXT NOT NULL, secret TEXT NOT NULL)"))
            conn.execute(text("CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))
            conn.execute(text("INSERT INTO accounts (name, secret) VALUES ('acme', :m), ('globex', :m)"), {"m": marker})
            conn.execute(text("INSERT INTO contacts (id, name) VALUES (1, 'Ada')"))
            conn.execute(text("ANALYZE"))  # SQLite: creates sqlite_stat1 too
    finally:
        engine.dispose()
    return Crm(url, marker)


@pytest.fixture(params=BACKENDS)
def attack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, Crm]]:
    backend = request.param
    (tmp_path / "crm").mkdir()
    with (
        execution_stack(backend, tmp_path, rules=[DENY_ACCOUNTS]) as stack,
        fresh_database(backend, tmp_path / "crm") as crm_url,
    ):
        crm = make_crm(backend, crm_url)
        stack.crm_url_file = tmp_path / "crm.url"
        stack.crm_url_file.write_text(crm_url + "\n")
        yield stack, crm


def run(stack: Stack, operation: str, resource: str, params: dict[str, object]) -> pdp_pb2.Proposal:
    response = stack.client.propose("crm", operation, resource, "attacking the sql connector", params=params)
    if response.decision.outcome != pdp_pb2.ALLOW:
        return stack.client.get(response.proposal_id)
    return stack.client.wait(response.proposal_id, timeout=30)


def seen_by_agent(stack: Stack, proposal: pdp_pb2.Proposal) -> str:
    """Everything the agent and an auditor can read about the proposal."""
    shown = json.dumps(MessageToDict(proposal))
    return shown + json.dumps(stack.audit(proposal.proposal_id))


def test_wrong_case_system_and_qualified_tables_are_refused_and_nothing_is_read(attack: tuple[Stack, Crm]) -> None:
    stack, crm = attack
    before = crm.accounts()
    with running_executor(stack.config()):
        # The stack works: an ordinary table is read, and the rule denies the accounts table by its name.
        ok = run(stack, "select", "sql://crm/contacts", {})
        assert ok.state == pdp_pb2.SUCCEEDED, ok
        assert MessageToDict(ok.execution.result)["rows"] == [{"id": 1.0, "name": "Ada"}]
        denied = run(stack, "select", "sql://crm/accounts", {})
        assert denied.state == pdp_pb2.DENIED and denied.decision.reasons[0].rule_id == "rule:no-accounts"

        for name in ATTACKS:
            resource = f"sql://crm/{name}"
            for operation, params in OPERATIONS:
                final = run(stack, operation, resource, params)
                where = f"{operation} {resource}"
                assert final.state in (pdp_pb2.DENIED, pdp_pb2.FAILED), (where, final)
                assert crm.marker not in seen_by_agent(stack, final), where
                assert not final.execution.HasField("result") or not MessageToDict(final.execution.result), where
                if final.state == pdp_pb2.FAILED:
                    # Refused by the connector before any statement ran, saying why.
                    error = final.execution.error
                    assert "system table" in error or "has no table" in error or "not a table name" in error, (
                        where,
                        error,
                    )
                    if name.lower().startswith(("sqlite_", "pg_")) and "." not in name:
                        assert "system table" in error, (where, error)
    assert crm.accounts() == before
