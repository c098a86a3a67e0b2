"""How fast `pdp audit verify` checks a chain: ``python -m bench.verify [--events N] [--database-url URL]``.

Builds a chain of realistic ``proposal.decided`` events (about 1.5 KB of canonical JSON each, the
shape the server writes) with the real append path, each with its ``proposals`` row; every tenth
proposal needed approval and was approved by two leads (a signed request, two signed votes, their
rows and the ``proposal.approved`` event). Then it times ``verify`` over the chain alone and with the
rows compared (``pdp.audit.rows``). Prints events/s, proposals/s and peak memory growth; asserts
nothing. Target: >= 50,000 events/s for the chain.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, text

from bench.sysinfo import describe
from pdp.approvals import signed
from pdp.audit.chain import Event, append
from pdp.audit.checkpoints import append_to_file, sign_head
from pdp.audit.keys import init_key, load_private
from pdp.audit.verify import verify
from pdp.canonical import digest
from pdp.identity.agents import add_agent
from pdp.identity.approvers import add_approver
from pdp.policy.decision import Decision
from pdp.store.database import create_db_engine, normalize_url
from pdp.store.migrate import upgrade
from pdp.store.models import approvals, proposals

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
AGENT = "bench-support"
LEADS = ("bench-lead-1", "bench-lead-2")
APPROVAL_EVERY = 10  # one proposal in ten needed approval


def sample_event(i: int) -> Event:
    pid = f"00000000-0000-4000-8000-{i:012d}"
    action = {
        "tool": "tickets",
        "operation": "POST",
        "resource": f"http://127.0.0.1:8282/api/tickets/{i}",
        "params": {"title": "Printer on fire", "priority": "high", "count": i % 50},
        "estimated_cost_usd": 0.0,
        "labels": {"team": "support"},
    }
    return Event(
        type="proposal.decided",
        actor="agent:bench-support",
        occurred_at=T0 + timedelta(milliseconds=i),
        proposal_id=pid,
        agent_id="bench-support",
        policy_version="sha256:381a9e7022a2934c+git.6bd90ef00d3f",
        data={
            "action": action,
            "action_digest": digest(action),
            "justification": "Customer reported a broken printer; opening a ticket to track the fix.",
            "decision": {
                "outcome": "allow",
                "reasons": [
                    {"rule_id": "rule:tickets-create", "effect": "allow", "message": "Support may open tickets"}
                ],
                "boundary": "support-tickets",
                "tier": "ai_writable",
                "policy_version": "sha256:381a9e7022a2934c+git.6bd90ef00d3f",
                "retry_after_seconds": 0,
                "approval_requirements": [],
                "approval_expires_at": None,
                "matched_rules": ["tickets-create"],
            },
            "decision_input": {
                "agent": {"id": "bench-support", "owner": "bench", "roles": ["support"], "labels": {}},
                "context": {"now": (T0 + timedelta(milliseconds=i)).isoformat(), "environment": "dev"},
                "usage": {},
            },
            "state": "APPROVED",
            "session_id": "",
            "idempotency_key": "",
        },
    )


def _needing_approval(event: Event, key: Ed25519PrivateKey) -> Event:
    """The same proposal, decided needs-approval (two leads), with the request the PDP signs."""
    data = dict(event.data)
    decision = dict(data["decision"])
    decision.update(
        outcome="needs_approval",
        approval_requirements=[{"source": "rule:tickets-bulk", "groups": ["support-leads"], "min_approvals": 2}],
        approval_expires_at="2026-11-21T14:00:00.000000Z",
    )
    data.update(decision=decision, state="PENDING_APPROVAL")
    request = signed.sign_request(
        key,
        proposal_id=str(event.proposal_id),
        agent_id=AGENT,
        owner="bench",
        action_digest=data["action_digest"],
        decision=Decision.from_dict(decision),
    )
    data["approval_request"] = request.audit()
    return Event(
        event.type, event.actor, event.occurred_at, event.proposal_id, event.agent_id, event.policy_version, data
    )


def record(conn: Connection, i: int, key: Ed25519PrivateKey) -> int:
    """Append proposal ``i``'s events with its rows, as the server would have; returns how many events."""
    event = sample_event(i)
    approved = i % APPROVAL_EVERY == 0
    if approved:
        event = _needing_approval(event, key)
    data, pid, at = event.data, str(event.proposal_id), event.occurred_at
    append(conn, event)
    conn.execute(
        proposals.insert(),
        {
            "id": pid,
            "agent_id": AGENT,
            "session_id": "",
            "idempotency_key": None,
            "tool": data["action"]["tool"],
            "operation": data["action"]["operation"],
            "resource": data["action"]["resource"],
            "action": data["action"],
            "action_digest": data["action_digest"],
            "justification": data["justification"],
            "state": "APPROVED",
            "outcome": data["decision"]["outcome"],
            "decision": data["decision"],
            "decision_input": data["decision_input"],
            "policy_version": event.policy_version,
            "approval_expires_at": datetime.fromisoformat("2026-11-21T14:00:00+00:00") if approved else None,
            "created_at": at,
            "updated_at": at,
        },
    )
    if not approved:
        return 1
    for lead in LEADS:
        vote = signed.sign_vote(
            key,
            proposal_id=pid,
            approver_id=lead,
            verdict="approve",
            action_digest=data["action_digest"],
            groups=["support-leads"],
            decided_at=at,
        )
        vote_data = {
            "verdict": "approve",
            "comment": "",
            "action_digest": data["action_digest"],
            "groups": ["support-leads"],
            "vote": vote.audit(),
        }
        append(conn, Event("approval.granted", f"approver:{lead}", at, pid, AGENT, event.policy_version, vote_data))
        conn.execute(
            approvals.insert(),
            {
                "proposal_id": pid,
                "approver_id": lead,
                "verdict": "approve",
                "comment": "",
                "groups": ["support-leads"],
                "action_digest": data["action_digest"],
                "decided_at": at,
            },
        )
    approved_data = {"from_state": "PENDING_APPROVAL", "to_state": "APPROVED", "approvals": list(LEADS)}
    append(conn, Event("proposal.approved", "pdp", at, pid, AGENT, event.policy_version, approved_data))
    return 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (the database is created and dropped)")
    args = parser.parse_args()
    for line in describe(("SQLAlchemy", "psycopg")):
        print(line)
    workdir = Path(tempfile.mkdtemp(prefix="pdp-bench-verify-"))
    url = args.database_url or f"sqlite:///{workdir / 'verify.db'}"
    postgres = normalize_url(url).get_backend_name() == "postgresql"
    admin = create_db_engine(normalize_url(url).set(database="postgres").render_as_string(hide_password=False))
    try:
        if postgres:
            name = normalize_url(url).database
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        upgrade(url)
        engine = create_db_engine(url, writer=True, pool_size=1)
        init_key(workdir / "signing.key")
        key = load_private(workdir / "signing.key")
        add_agent(engine, AGENT, "bench", ("support",))
        for lead in LEADS:
            add_approver(engine, lead, ["support-leads"])
        started = time.perf_counter()
        batch, events, count = 5_000, 0, 0
        while events < args.events:
            with engine.begin() as conn:
                for _ in range(batch):
                    if events >= args.events:
                        break
                    events += record(conn, count, key)
                    count += 1
        with engine.begin() as conn:
            checkpoint = sign_head(conn, key, datetime.now(UTC))
        assert checkpoint is not None
        append_to_file(workdir / "checkpoints.jsonl", checkpoint)
        built = time.perf_counter() - started
        print(f"database: {'PostgreSQL' if postgres else 'SQLite'}; built {events:,} events of {count:,} "
              f"proposals (one in {APPROVAL_EVERY} approved by two signed votes) in {built:.1f} s")  # fmt: skip

        checkpoints = workdir / "checkpoints.jsonl"
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        report = verify(engine, public_key=key.public_key(), checkpoint_file=checkpoints, check_rows=False)
        chain_only = time.perf_counter() - started
        rate = report.events / chain_only
        print(f"verify, chain: {report.events:,} events in {chain_only:.2f} s = {rate:,.0f} events/s "
              f"(target >= 50,000/s: {'met' if rate >= 50_000 else 'NOT met'}); intact={report.intact}")  # fmt: skip
        started = time.perf_counter()
        report = verify(engine, public_key=key.public_key(), checkpoint_file=checkpoints)
        both = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert report.rows is not None
        rows = both - chain_only
        print(f"verify, rows:  {report.rows.proposals:,} proposals compared in about {rows:.2f} s more "
              f"= {report.rows.proposals / max(rows, 1e-9):,.0f} proposals/s; {report.rows.disagreeing} "
              f"disagreement(s); whole verify {both:.2f} s = {report.events / both:,.0f} events/s")  # fmt: skip
        print(f"memory: peak RSS grew by {(rss_after - rss_before) / 1024:.1f} MiB while verifying")
    finally:
        if postgres:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{normalize_url(url).database}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
