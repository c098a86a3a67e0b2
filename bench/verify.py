"""How fast `pdp audit verify` checks a chain: ``python -m bench.verify [--events N] [--database-url URL]``.

Builds a chain of realistic ``proposal.decided`` events (about 1.5 KB of canonical JSON each, the
shape the server writes) with the real append path, then times ``verify`` over it. Prints events/s
and peak memory growth; asserts nothing. Target: >= 50,000 events/s.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from bench.sysinfo import describe
from pdp.audit.chain import Event, append
from pdp.audit.checkpoints import append_to_file, sign_head
from pdp.audit.keys import init_key, load_private
from pdp.audit.verify import verify
from pdp.store.database import create_db_engine, normalize_url
from pdp.store.migrate import upgrade

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def sample_event(i: int) -> Event:
    pid = f"00000000-0000-4000-8000-{i:012d}"
    return Event(
        type="proposal.decided",
        actor="agent:bench-support",
        occurred_at=T0 + timedelta(milliseconds=i),
        proposal_id=pid,
        agent_id="bench-support",
        policy_version="sha256:381a9e7022a2934c+git.6bd90ef00d3f",
        data={
            "action": {
                "tool": "tickets",
                "operation": "POST",
                "resource": f"http://127.0.0.1:8282/api/tickets/{i}",
                "params": {"title": "Printer on fire", "priority": "high", "count": i % 50},
                "estimated_cost_usd": 0.0,
                "labels": {"team": "support"},
            },
            "action_digest": f"{i:064x}",
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
        started = time.perf_counter()
        batch = 5_000
        for first in range(0, args.events, batch):
            with engine.begin() as conn:
                for i in range(first, min(first + batch, args.events)):
                    append(conn, sample_event(i))
        with engine.begin() as conn:
            checkpoint = sign_head(conn, key, datetime.now(UTC))
        assert checkpoint is not None
        append_to_file(workdir / "checkpoints.jsonl", checkpoint)
        built = time.perf_counter() - started
        print(f"database: {'PostgreSQL' if postgres else 'SQLite'}; built {args.events:,} events in {built:.1f} s")

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        report = verify(engine, public_key=key.public_key(), checkpoint_file=workdir / "checkpoints.jsonl")
        elapsed = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rate = report.events / elapsed
        print(f"verify: {report.events:,} events in {elapsed:.2f} s = {rate:,.0f} events/s "
              f"(target >= 50,000/s: {'met' if rate >= 50_000 else 'NOT met'}); intact={report.intact}")  # fmt: skip
        print(f"memory: peak RSS grew by {(rss_after - rss_before) / 1024:.1f} MiB while verifying")
    finally:
        if postgres:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{normalize_url(url).database}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
