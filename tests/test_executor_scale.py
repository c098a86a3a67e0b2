"""Two `pdp-executor` processes on one PostgreSQL database share 500 allowed proposals: each runs exactly once.

Claiming uses ``FOR UPDATE SKIP LOCKED``, so the executors split the work without coordinating. The target
counts what reached it; the audit log says which executor started what, and its chain must still verify.
Timing is printed for information only: nothing here asserts on speed.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import fresh_database, running_server, signing_key
from execution import ExecutorProcess, executor_config, target_server, write_bundle
from sqlalchemy import Engine, func, select

from pdp.audit.keys import load_public, public_path
from pdp.audit.verify import verify
from pdp.client import PdpClient
from pdp.proposals.states import ProposalState
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events, proposals
from pdp.v1 import pdp_pb2

PROPOSALS = 500
SENDERS = 4
WORKERS = ("w1", "w2")
TIMEOUT = 180.0
TERMINAL = [state.value for state in ProposalState if state.terminal]


def states(engine: Engine, ids: set[str]) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(proposals.c.state, func.count()).where(proposals.c.id.in_(ids)).group_by(proposals.c.state)
        ).all()
    return Counter({str(state): int(count) for state, count in rows})


def send(client: PdpClient, url: str, numbers: range) -> list[str]:
    ids = []
    for n in numbers:
        response = client.propose("web", "POST", f"{url}items/{n}", "scale test", params={"n": n})
        assert response.decision.outcome == pdp_pb2.ALLOW, response
        ids.append(response.proposal_id)
    return ids


@pytest.mark.postgres
@pytest.mark.backend("postgres")
def test_two_executors_share_the_work_and_run_each_proposal_exactly_once(tmp_path: Path) -> None:
    with target_server() as target, fresh_database("postgres", tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        token_file = tmp_path / "target.token"
        token_file.write_text(target.token)
        configs = {}
        for worker in WORKERS:
            (tmp_path / worker).mkdir()
            configs[worker] = executor_config(
                tmp_path / worker,
                database_url=url,
                policy_dir=bundle,
                signing_key=signing_key(),
                token_file=token_file,
                worker_id=worker,
                concurrency=8,
            )
        with running_server(url, policy_dir=bundle) as server:
            executors = {w: ExecutorProcess(configs[w], tmp_path / f"{w}.log") for w in WORKERS}
            try:
                for executor in executors.values():
                    executor.wait_started()
                clients = [server.agent_client()[1] for _ in range(SENDERS)]
                started = time.monotonic()
                with ThreadPoolExecutor(SENDERS) as pool:
                    batches = pool.map(
                        lambda i: send(clients[i], target.url, range(i, PROPOSALS, SENDERS)), range(SENDERS)
                    )
                    ids = {pid for batch in batches for pid in batch}
                assert len(ids) == PROPOSALS
                sent = time.monotonic() - started

                deadline = started + TIMEOUT
                while True:
                    counts = states(server.engine, ids)
                    if sum(counts[state] for state in TERMINAL) == PROPOSALS:
                        break
                    if time.monotonic() > deadline:
                        outputs = "\n".join(f"--- {w}:\n{e.output()[-3000:]}" for w, e in executors.items())
                        pytest.fail(
                            f"not all {PROPOSALS} proposals finished in {TIMEOUT:.0f}s: {dict(counts)}\n{outputs}"
                        )
                    for worker, executor in executors.items():
                        if executor.process.poll() is not None:
                            pytest.fail(f"executor {worker} exited {executor.process.returncode}:\n{executor.output()}")
                    time.sleep(0.2)
                elapsed = time.monotonic() - started
            finally:
                codes = {w: e.stop() for w, e in executors.items()}
            print(
                f"\n{PROPOSALS} proposals sent in {sent:.1f}s; all executed after {elapsed:.1f}s "
                f"({PROPOSALS / elapsed:.0f} executions/s, {len(WORKERS)} executors)"
            )
            assert codes == dict.fromkeys(WORKERS, 0), {w: e.output()[-3000:] for w, e in executors.items()}

            assert counts == Counter({"SUCCEEDED": PROPOSALS}), dict(counts)

            # Each proposal reached the target exactly once.
            seen = [s for s in target.seen if s.path.startswith("/api/items/")]
            assert len(seen) == PROPOSALS == len(target.seen)
            keys = Counter(s.headers.get("Idempotency-Key") for s in seen)
            assert set(keys) == ids, "every request carries its proposal's id as Idempotency-Key"
            assert set(keys.values()) == {1}, [key for key, n in keys.items() if n > 1]
            assert len({s.path for s in seen}) == PROPOSALS

            # Both executors did some of the work, and together all of it, once.
            with server.engine.connect() as conn:
                actors = Counter(
                    conn.execute(
                        select(audit_events.c.actor).where(
                            audit_events.c.type == "execution.started", audit_events.c.proposal_id.in_(ids)
                        )
                    ).scalars()
                )
            print(f"execution.started by actor: {dict(actors)}")
            assert set(actors) == {f"executor:{w}" for w in WORKERS}, dict(actors)
            assert sum(actors.values()) == PROPOSALS

            report = verify(server.engine, public_key=load_public(public_path(signing_key())), checkpoint_file=None)
            assert report.first_bad_seq is None, report.problem
            assert not report.triggers_missing, report.triggers_missing
            assert report.events >= 3 * PROPOSALS  # decided, started, succeeded for each
            # Every row two executors moved agrees with the transitions they recorded.
            assert report.rows is not None and report.rows.agree, report.disagreements[:5]
