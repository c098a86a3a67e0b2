"""Every query in docs/auditing.md, run as an auditor runs it, on SQLite and PostgreSQL.

The SQL is read from the markdown itself (fenced ```sql blocks whose first line is
``-- sqlite: NAME``, ``-- postgresql: NAME`` or ``-- both: NAME``), so the doc and this test cannot drift.
The example values the doc prints (an agent, a time range, a policy version, a proposal id) are replaced by the
ones of the log populated here. SQLite is opened read-only by URI; PostgreSQL as a member of the auditor role
`pdp db roles` creates. docs/audit-format.md's worked example and standalone verifier, and the export's
``body_canonical`` that docs/auditing.md tells a SIEM to hash, are checked here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_MEMBERS, BULK_CLOSE, PDP, REPO, TICKETS, running_server
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql
from sqlalchemy.engine import make_url

from pdp.audit.chain import DOMAIN_TAG, GENESIS, Event, event_hash
from pdp.audit.checkpoints import Checkpoint
from pdp.audit.keys import key_id
from pdp.audit.roles import create_roles
from pdp.audit.verify import verify
from pdp.canonical import canonical_json, timestamp
from pdp.client import PdpClient, pdp_pb2
from pdp.identity.agents import add_agent
from pdp.identity.approvers import add_approver
from pdp.store.database import create_db_engine

AUDITING = REPO / "docs" / "auditing.md"
FORMAT = REPO / "docs" / "audit-format.md"
DIALECTS = ("sqlite", "postgresql")

# The example values docs/auditing.md prints in its queries; each is replaced by this test's own.
DOC_AGENT = "support-bot"
DOC_PREFIX = "http://127.0.0.1:8282/api/"
DOC_FROM, DOC_TO = "2026-11-01T00:00:00", "2026-12-01T00:00:00"
DOC_POLICY = "sha256:381a9e7022a2934c+git.60de1be6207b"
DOC_PROPOSAL = "2c523e52-91c0-4b75-a028-d881532765fe"

# The one timestamp form of hashed and signed data (docs/audit-format.md §3): UTC, 6 fractional digits, "Z".
FIXED_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")

Row = dict[str, Any]

# --- the queries, from the markdown ----------------------------------------------------------------------------

_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.DOTALL | re.MULTILINE)
_TAG = re.compile(r"^-- (sqlite|postgresql|both): ([a-z0-9-]+)\n")


def doc_queries() -> dict[str, dict[str, str]]:
    """{query name: {dialect: sql}} for every tagged sql block of docs/auditing.md."""
    queries: dict[str, dict[str, str]] = {}
    for block in _BLOCK.findall(AUDITING.read_text(encoding="utf-8")):
        tag = _TAG.match(block)
        if tag is None:
            continue  # untagged sql (e.g. CREATE ROLE) is setup an operator runs, not an auditor's query
        dialect, name = tag.groups()
        for target in DIALECTS if dialect == "both" else (dialect,):
            assert target not in queries.get(name, {}), f"{name} has two {target} versions"
            queries.setdefault(name, {})[target] = block
    return queries


QUERIES = doc_queries()


def test_every_query_in_the_doc_has_a_version_for_each_database() -> None:
    assert QUERIES, "no tagged ```sql blocks found in docs/auditing.md"
    for name, versions in QUERIES.items():
        assert set(versions) == set(DIALECTS), f"{name}: versions for {sorted(versions)} only"
    assert set(QUERIES) == set(EXPECTATIONS), "docs/auditing.md and this test's expectations list different queries"
    text = "\n".join(sql_text for versions in QUERIES.values() for sql_text in versions.values())
    for example in (DOC_AGENT, DOC_PREFIX, DOC_FROM, DOC_TO, DOC_POLICY, DOC_PROPOSAL):
        assert example in text, f"the doc's queries no longer use the example value {example!r}"


# --- a populated log -------------------------------------------------------------------------------------------


@dataclass
class Log:
    """What the population step did, to compare the queries' answers with."""

    policy_version: str
    allowed: str  # support-bot: open a ticket
    admin: str  # support-bot: add itself to admins (human_only boundary)
    bulk: str  # support-bot: bulk close, needs approval, then cancelled
    patches: tuple[str, str]  # support-bot: PATCH on non-ticket resources (denied twice by one rule)
    unknown_tool: str  # support-bot: a tool not in the catalog
    shouting: str  # support-bot: the ticket prefix in capitals (outside it: a prefix match is case-sensitive)
    scratch: str  # support-bot: allowed, outside the ticket prefix
    delete: str  # support-bot: delete a ticket, needs approval, left pending
    other: str  # other-bot: open a ticket (another agent, same prefix)
    approved: str  # other-bot: a critical ticket, approved by oncall-1
    rejected: str  # other-bot: delete a ticket, rejected by lead-1


def populate(url: str) -> Log:
    with running_server(url) as server:
        # The doc's example agent id, so its queries need no change for the agent.
        bot = server.client(add_agent(server.engine, DOC_AGENT, "alice", ("support",)))
        other = server.client(add_agent(server.engine, "other-bot", "bob", ("support",)))

        def propose(client: PdpClient, *args: Any, outcome: int, **kw: Any) -> tuple[str, str]:
            response = client.propose(*args, **kw)
            assert response.decision.outcome == outcome, response
            return response.proposal_id, response.decision.policy_version

        allowed, version = propose(
            bot,
            "tickets",
            "POST",
            TICKETS,
            "printer on fire",
            params={"title": "Printer on fire"},
            outcome=pdp_pb2.ALLOW,
        )
        admin, _ = propose(bot, "iam", "POST", ADMIN_MEMBERS, "I need admin", outcome=pdp_pb2.DENY)
        bulk, _ = propose(
            bot,
            "tickets",
            "POST",
            BULK_CLOSE,
            "close stale tickets",
            params={"count": 40},
            outcome=pdp_pb2.NEEDS_APPROVAL,
        )
        patch_a, _ = propose(bot, "tickets", "PATCH", DOC_PREFIX + "tickets/abc", "fix", outcome=pdp_pb2.DENY)
        patch_b, _ = propose(bot, "tickets", "PATCH", DOC_PREFIX + "tickets/", "fix all", outcome=pdp_pb2.DENY)
        unknown, _ = propose(bot, "nosuch", "GET", "x://y", "probe", outcome=pdp_pb2.DENY)
        shouting, _ = propose(bot, "tickets", "POST", DOC_PREFIX.upper() + "tickets", "loud", outcome=pdp_pb2.DENY)
        scratch, _ = propose(bot, "scratch", "PUT", "https://scratch.internal/notes/1", "notes", outcome=pdp_pb2.ALLOW)
        delete, _ = propose(
            bot, "tickets", "DELETE", DOC_PREFIX + "tickets/7", "duplicate", outcome=pdp_pb2.NEEDS_APPROVAL
        )
        assert bot.cancel(bulk).state == pdp_pb2.CANCELLED
        other_id, _ = propose(other, "tickets", "POST", TICKETS, "another ticket", outcome=pdp_pb2.ALLOW)
        critical, _ = propose(
            other, "tickets", "POST", TICKETS, "pager", params={"priority": "critical"}, outcome=pdp_pb2.NEEDS_APPROVAL
        )
        doomed, _ = propose(
            other, "tickets", "DELETE", DOC_PREFIX + "tickets/9", "cleanup", outcome=pdp_pb2.NEEDS_APPROVAL
        )
        assert server.running is not None
        approvals = server.running.approvals
        add_approver(server.engine, "oncall-1", ["ops-oncall"])
        add_approver(server.engine, "lead-1", ["support-leads"])
        oncall = approvals.approver("oncall-1")
        shown = approvals.detail(oncall, critical).action_digest
        assert approvals.approve(oncall, critical, "real outage", action_digest=shown).state == "APPROVED"
        assert approvals.reject(approvals.approver("lead-1"), doomed, "keep the history").state == "REJECTED"
    return Log(
        version,
        allowed,
        admin,
        bulk,
        (patch_a, patch_b),
        unknown,
        shouting,
        scratch,
        delete,
        other_id,
        critical,
        doomed,
    )


# --- running a query as an auditor -----------------------------------------------------------------------------


@contextmanager
def auditor_connection(url: str) -> Iterator[Any]:
    """A DB-API connection as an auditor has it: SQLite read-only by URI, PostgreSQL in the auditor role."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        lite = sqlite3.connect(f"file:{parsed.database}?mode=ro", uri=True)
        try:
            yield lite
        finally:
            lite.close()
        return
    suffix = uuid.uuid4().hex[:8]
    writer, auditor = f"pdp_writer_t{suffix}", f"pdp_auditor_t{suffix}"
    engine = create_db_engine(url)
    try:
        create_roles(engine, writer, auditor)
    finally:
        engine.dispose()
    libpq = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(auditor)))
            yield conn
    finally:
        with psycopg.connect(libpq, autocommit=True) as admin:
            for role in (writer, auditor):
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def assert_read_only(conn: Any, dialect: str) -> None:
    """The queries run with an auditor's rights, not the test's superuser ones."""
    error = sqlite3.OperationalError if dialect == "sqlite" else psycopg.errors.InsufficientPrivilege
    with pytest.raises(error, match=r"readonly|permission denied"):
        conn.execute("INSERT INTO audit_checkpoints VALUES ('x', 1, 'h', '2026-01-01 00:00:00', 'k', 's')")


def run(conn: Any, query: str, **replace: str) -> list[Row]:
    for example, value in replace.items():
        query = query.replace(_EXAMPLES[example], value)
    cursor = conn.cursor()
    cursor.execute(query)
    columns = [c[0] for c in cursor.description]
    rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    cursor.close()
    return rows


_EXAMPLES = {"agent": DOC_AGENT, "start": DOC_FROM, "end": DOC_TO, "policy": DOC_POLICY, "proposal": DOC_PROPOSAL}


# --- what each query must return -------------------------------------------------------------------------------


def check_agent_actions(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert [r["proposal_id"] for r in rows] == [log.allowed, log.bulk, *log.patches, log.delete]
    assert [r["outcome"] for r in rows] == ["allow", "needs_approval", "deny", "deny", "needs_approval"]
    assert {r["state"] for r in rows} == {"APPROVED", "PENDING_APPROVAL", "DENIED"}
    assert all(r["resource"].startswith(DOC_PREFIX) and r["policy_version"] == log.policy_version for r in rows)
    assert all(r["approver"] is None and r["verdict"] is None for r in rows)  # no approvals are recorded yet
    # The time range filters: a range in the past has none of them.
    past = dict(values, start="2000-01-01T00:00:00", end="2000-01-02T00:00:00")
    assert run(conn, query, **past) == []


def check_denials_by_reason(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert {r["rule_id"]: r["denials"] for r in rows} == {
        "rule:tickets-patch-single-ticket": 2,
        "boundary:access-control": 1,
        "bundle.default_effect": 1,
        "catalog.unknown_tool": 1,
        "catalog.resource_outside_prefix": 1,
    }
    assert rows[0]["rule_id"] == "rule:tickets-patch-single-ticket"  # most frequent first
    assert all(r["first_seen"] is not None and r["first_seen"] <= r["last_seen"] for r in rows)


def check_denials(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert [(r["proposal_id"], r["rule_id"]) for r in rows] == [
        (log.admin, "boundary:access-control"),
        (log.admin, "bundle.default_effect"),
        (log.patches[0], "rule:tickets-patch-single-ticket"),
        (log.patches[1], "rule:tickets-patch-single-ticket"),
        (log.unknown_tool, "catalog.unknown_tool"),
        (log.shouting, "catalog.resource_outside_prefix"),
    ]
    assert all(r["agent_id"] == DOC_AGENT and r["message"] for r in rows)
    assert "not in the catalog" in rows[-2]["message"]


def check_executions_under_policy(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    assert run(conn, query, **values) == []  # execution events arrive with the execution gateway


def check_proposal_timeline(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert [r["type"] for r in rows] == ["proposal.decided", "proposal.cancelled"]
    assert [r["actor"] for r in rows] == [f"agent:{DOC_AGENT}"] * 2
    assert rows[0]["seq"] < rows[1]["seq"] and rows[0]["occurred_at"] <= rows[1]["occurred_at"]
    assert all(FIXED_TIMESTAMP.fullmatch(r["occurred_at"]) for r in rows), rows
    assert all(r["recorded_at"] is not None and r["policy_version"] == log.policy_version for r in rows)


def check_proposal_evidence(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    bodies = [json.loads(r["body"]) for r in rows]
    assert [b["type"] for b in bodies] == [r["type"] for r in rows] == ["proposal.decided", "proposal.cancelled"]
    decided = bodies[0]["data"]
    assert decided["action"]["resource"] == BULK_CLOSE and decided["justification"] == "close stale tickets"
    assert decided["decision"]["outcome"] == "needs_approval"
    assert bodies[1]["data"] == {"from_state": "PENDING_APPROVAL", "to_state": "CANCELLED"}


def check_outcomes_per_day(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    totals: Counter[str] = Counter()
    for row in rows:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["day"]), row
        totals[row["outcome"]] += int(row["proposals"])
    assert totals == {"allow": 3, "deny": 5, "needs_approval": 4}


def check_approvals_by_approver(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert [(r["approver"], r["verdict"], int(r["decisions"])) for r in rows] == [
        ("approver:lead-1", "reject", 1),
        ("approver:oncall-1", "approve", 1),
    ]
    assert all(r["first_at"] is not None and r["first_at"] == r["last_at"] for r in rows)


def check_awaiting_approval(conn: Any, query: str, log: Log, values: dict[str, str]) -> None:
    rows = run(conn, query, **values)
    assert [r["proposal_id"] for r in rows] == [log.delete]  # the bulk close was cancelled
    requirements = json.loads(rows[0]["approval_requirements"])
    assert requirements[0]["groups"] == ["support-leads"]


EXPECTATIONS = {
    "agent-actions": check_agent_actions,
    "denials-by-reason": check_denials_by_reason,
    "denials": check_denials,
    "executions-under-policy": check_executions_under_policy,
    "proposal-timeline": check_proposal_timeline,
    "proposal-evidence": check_proposal_evidence,
    "outcomes-per-day": check_outcomes_per_day,
    "approvals-by-approver": check_approvals_by_approver,
    "awaiting-approval": check_awaiting_approval,
}


def test_every_documented_query_answers_from_a_real_log(database_url: str) -> None:
    started = datetime.now(UTC) - timedelta(minutes=5)
    log = populate(database_url)
    values = {
        "agent": DOC_AGENT,
        "start": started.strftime("%Y-%m-%dT%H:%M:%S"),
        "end": (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S"),
        "policy": log.policy_version,
        "proposal": log.bulk,
    }
    dialect = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    with auditor_connection(database_url) as conn:
        assert_read_only(conn, dialect)
        for name, check in EXPECTATIONS.items():
            query = QUERIES[name][dialect]
            try:
                check(conn, query, log, values)
            except Exception as exc:
                raise AssertionError(f"query {name!r} ({dialect}) from docs/auditing.md: {exc}\n{query}") from exc
    if dialect == "sqlite":
        check_standalone_verifier(Path(str(make_url(database_url).database)))
        check_export(database_url)


def check_standalone_verifier(db_file: Path) -> None:
    """docs/audit-format.md's verifier accepts the log, and names the row whose event_id column was edited."""
    verifier = re.search(r"```python\n(# verify_chain\.py.*?)```", FORMAT.read_text(encoding="utf-8"), re.DOTALL)
    assert verifier is not None, "docs/audit-format.md lost its standalone verifier"
    script = db_file.with_name("verify_chain.py")
    script.write_text(verifier.group(1), encoding="utf-8")

    def run_verifier(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=False)

    result = run_verifier(db_file)
    assert result.returncode == 0 and result.stdout.startswith("ok: 16 events"), result

    # event_id is inside the hashed body now: editing the column alone is caught, by the doc and by the code.
    tampered = db_file.with_name("tampered.db")
    source = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    copy = sqlite3.connect(tampered)
    try:
        source.backup(copy)
        copy.execute("DROP TRIGGER audit_events_no_update")
        copy.execute("UPDATE audit_events SET event_id = ? WHERE seq = 2", (str(uuid.uuid4()),))
        copy.commit()
    finally:
        copy.close()
        source.close()
    result = run_verifier(tampered)
    assert result.returncode == 1 and result.stdout.startswith("FAIL at seq 2: columns differ"), result
    engine = create_db_engine(f"sqlite:///{tampered}")
    try:
        report = verify(engine, public_key=None)
    finally:
        engine.dispose()
    assert report.first_bad_seq == 2 and "'event_id'" in report.problem, report


def check_export(database_url: str) -> None:
    """`pdp audit export`, as docs/auditing.md describes it: body_canonical recomputes the whole chain."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    result = subprocess.run(
        [PDP, "audit", "export", "--database-url", database_url], capture_output=True, text=True, check=True, env=env
    )
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 16
    prev = GENESIS
    for event in events:
        canonical = event["body_canonical"].encode("utf-8")
        assert event["prev_hash"] == prev and event_hash(event["seq"], prev, canonical) == event["hash"], event
        assert json.loads(canonical) == event["body"] and event["body"]["event_id"] == event["event_id"]
        assert FIXED_TIMESTAMP.fullmatch(event["body"]["occurred_at"]), event
        prev = event["hash"]


# --- docs/audit-format.md's test vectors -----------------------------------------------------------------------


def _text_block_after(text: str, marker: str) -> str:
    start = text.index("```text\n", text.index(marker)) + len("```text\n")
    return text[start : text.index("```", start)]


def test_the_format_docs_worked_example_matches_the_code() -> None:
    text = FORMAT.read_text(encoding="utf-8")
    body = _text_block_after(text, "**Body**").strip().encode("utf-8")
    digest = _text_block_after(text, "**Hash**").strip()
    assert event_hash(1, GENESIS, body) == digest
    assert hashlib.sha256(DOMAIN_TAG + (1).to_bytes(8, "big") + bytes(32) + body).hexdigest() == digest
    assert canonical_json(json.loads(body)) == body  # the body is itself canonical
    assert f"**Body**: {len(body)} bytes" in text and body.isascii()
    prefix = _text_block_after(text, "**The 59 bytes before the body**")
    assert bytes.fromhex("".join(prefix.split())) == b"agent-pdp/audit/v1\n" + (1).to_bytes(8, "big") + bytes(32)

    # The input table is what the code turns into that body: event_id first-level, occurred_at in the fixed form.
    fields = dict(line.split(None, 1) for line in _text_block_after(text, "An event at **seq 1**").splitlines())
    occurred_at = datetime.fromisoformat(fields["occurred_at"].replace("Z", "+00:00"))
    assert FIXED_TIMESTAMP.fullmatch(fields["occurred_at"]) and timestamp(occurred_at) == fields["occurred_at"]
    event = Event(
        type=fields["type"],
        actor=fields["actor"],
        occurred_at=occurred_at,
        proposal_id=fields["proposal_id"],
        agent_id=fields["agent_id"],
        policy_version=fields["policy_version"],
        data=json.loads(fields["data"]),
    )
    assert canonical_json(event.body(fields["event_id"])) == body
    assert json.loads(body)["event_id"] == fields["event_id"]

    vector_in = _text_block_after(text, "Test vector for these rules")
    vector_out = _text_block_after(text, "Its canonical form is")
    expected = bytes.fromhex("".join(vector_out.split("\n\n", 1)[1].split()))
    assert canonical_json(json.loads(vector_in)) == expected
    assert f"Its canonical form is {len(expected)} bytes" in text

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the doc's test key: seed 00 01 … 1f
    vectors = _text_block_after(text, "A checkpoint over this head")
    cp = dict(re.findall(r"^(public key \(raw\)|key_id|signed bytes|signature|file line) +(.+)$", vectors, re.M))
    checkpoint = Checkpoint.from_line(cp["file line"])
    assert signed_at_in_fixed_form(cp["file line"])
    assert cp["public key (raw)"] == key.public_key().public_bytes_raw().hex()
    assert checkpoint.head_hash == digest and checkpoint.key_id == cp["key_id"] == key_id(key.public_key())
    assert cp["signed bytes"].replace("\\n", "\n").encode() == checkpoint.signed_bytes()
    assert f"({len(checkpoint.signed_bytes())} bytes;" in vectors
    assert checkpoint.signature == cp["signature"] == key.sign(checkpoint.signed_bytes()).hex()
    assert checkpoint.to_line() == cp["file line"]  # the line is exactly what the code appends
    assert checkpoint.valid(key.public_key())


def signed_at_in_fixed_form(line: str) -> bool:
    """A checkpoint file line's signed_at is in the fixed form, verbatim (the doc says: use it as is)."""
    return FIXED_TIMESTAMP.fullmatch(str(json.loads(line)["signed_at"])) is not None
