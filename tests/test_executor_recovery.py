"""At most once across crashes, and the per-tool circuit breaker.

`kill -9` of the executor mid-call: a tool that is not idempotent ends UNKNOWN and never runs twice;
an idempotent one is retried after its lease lapses, with the same idempotency key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import signing_key
from credential_pieces import leaked
from execution import ExecutorProcess, Stack, execution_stack, running_executor
from sqlalchemy import select

from executor import claims
from executor.config import BreakerSettings
from executor.redaction import Redactor
from executor.secrets import Secret
from executor.worker import MAX_ERROR_CHARS, MAX_RESULT_BYTES, bounded, bounded_error
from pdp.audit.keys import load_public, public_path
from pdp.policy.loader import load_bundle
from pdp.store.models import audit_events, circuit_breakers, executions
from pdp.v1 import pdp_pb2


class Setup(Stack):
    def config(self, *, key: Path | None = None, **settings: Any) -> Path:
        return super().config(key=key, **{"timeout": "20s", **settings})


@pytest.fixture(params=["sqlite", "postgres"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    with execution_stack(request.param, tmp_path, crm=True) as stack:
        yield Setup(**vars(stack))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _killed_mid_call(setup: Setup, tool: str, path: str, operation: str) -> tuple[str, ExecutorProcess]:
    """Propose, let an executor process start the call, kill -9 it, and start a fresh one."""
    setup.target.slow_seconds = 2.0
    config = setup.config(lease="1s", retry_backoff="200ms")
    first = ExecutorProcess(config, setup.tmp / "executor-1.log")
    first.wait_started()
    pid = setup.client.propose(tool, operation, setup.target.url + path, "t").proposal_id
    wait_for(lambda: setup.target.count("/api/" + path) == 1, "the call to reach the target")
    first.kill()
    assert setup.client.get(pid).state == pdp_pb2.EXECUTING
    second = ExecutorProcess(config, setup.tmp / "executor-2.log")
    second.wait_started()
    return pid, second


def test_kill_9_mid_call_on_a_non_idempotent_tool_ends_unknown_and_never_reruns(setup: Setup) -> None:
    pid, second = _killed_mid_call(setup, "web", "slow", "POST")
    try:
        final = setup.client.wait(pid, timeout=60)
        assert final.state == pdp_pb2.UNKNOWN, final
        assert "human must reconcile" in final.execution.error
        time.sleep(1.5)  # a wrong retry would have reached the target by now
    finally:
        second.stop()
    assert setup.target.count("/api/slow") == 1
    assert setup.audit_types(pid) == ["proposal.decided", "execution.started", "execution.unknown"]


def test_kill_9_mid_call_on_an_idempotent_tool_retries_with_the_same_key(setup: Setup) -> None:
    pid, second = _killed_mid_call(setup, "kv", "kv/note-1", "PUT")
    try:
        final = setup.client.wait(pid, timeout=60)
    finally:
        second.stop()
    assert final.state == pdp_pb2.SUCCEEDED, final
    assert setup.target.count("/api/kv/") == 2
    assert {s.headers["Idempotency-Key"] for s in setup.target.seen} == {pid}
    assert setup.audit_types(pid) == [
        "proposal.decided",
        "execution.started",
        "execution.retrying",
        "execution.started",
        "execution.succeeded",
    ]
    with setup.engine.connect() as conn:
        assert conn.execute(select(executions.c.attempt).where(executions.c.proposal_id == pid)).scalar_one() == 2


def test_an_idempotent_tool_gives_up_after_max_attempts(setup: Setup) -> None:
    setup.target.slow_seconds = 30.0  # never answers in time: every attempt's worker gets killed
    config = setup.config(lease="1s", retry_backoff="100ms", max_attempts=2)
    process = ExecutorProcess(config, setup.tmp / "executor-a.log")
    process.wait_started()
    pid = setup.client.propose("kv", "PUT", setup.target.url + "kv/x", "t").proposal_id
    for attempt in (1, 2):
        wait_for(lambda a=attempt: setup.target.count("/api/kv/") == a, f"attempt {attempt}")  # type: ignore[misc]
        process.kill()
        process = ExecutorProcess(config, setup.tmp / f"executor-{attempt}.log")
        process.wait_started()
    try:
        final = setup.client.wait(pid, timeout=60)
    finally:
        process.stop()
    assert final.state == pdp_pb2.FAILED
    assert "gave up" in final.execution.error
    assert setup.target.count("/api/kv/") == 2


# --- circuit breaker -------------------------------------------------------------------------------


def _breaker(setup: Setup, tool: str = "web") -> dict[str, object] | None:
    with setup.engine.connect() as conn:
        row = conn.execute(select(circuit_breakers).where(circuit_breakers.c.tool == tool)).mappings().first()
        return dict(row) if row is not None else None


def test_the_breaker_opens_denies_with_retry_after_and_recovers(setup: Setup) -> None:
    config = setup.config(breaker={"failures": 2, "cooldown": "2s"})
    with running_executor(config):
        for _ in range(2):
            pid = setup.client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
            assert setup.client.wait(pid, timeout=30).state == pdp_pb2.FAILED
        breaker = _breaker(setup)
        assert breaker is not None and breaker["opened_until"] is not None

        def denied() -> bool:
            decision = setup.client.evaluate("web", "POST", setup.target.url + "items", "t")
            return decision.outcome == pdp_pb2.DENY

        wait_for(denied, "the PDP to see the open breaker", timeout=10)
        response = setup.client.propose("web", "POST", setup.target.url + "items", "t")
        assert response.state == pdp_pb2.DENIED
        assert 1 <= response.decision.retry_after_seconds <= 2
        assert response.decision.reasons[0].rule_id == "circuit.open"
        assert "retry after" in response.decision.reasons[0].message
        # Other tools are unaffected.
        assert setup.client.evaluate("kv", "PUT", setup.target.url + "kv/a", "t").outcome == pdp_pb2.ALLOW

        # After the cool-down: one trial; its success closes the breaker.
        wait_for(lambda: not denied(), "the cool-down to end", timeout=10)
        trial = setup.client.propose("web", "POST", setup.target.url + "items", "t").proposal_id
        assert setup.client.wait(trial, timeout=30).state == pdp_pb2.SUCCEEDED
    breaker = _breaker(setup)
    assert breaker is not None and breaker["opened_until"] is None and breaker["consecutive_failures"] == 0
    with setup.engine.connect() as conn:
        bodies = conn.execute(
            select(audit_events.c.type, audit_events.c.body)
            .where(audit_events.c.type.like("circuit.%"))
            .order_by(audit_events.c.seq)
        ).all()
    assert [b.type for b in bodies] == ["circuit.opened", "circuit.closed"]
    assert json.loads(bodies[1].body)["data"]["trial_proposal_id"] == trial


def test_a_failed_trial_reopens_the_breaker(setup: Setup) -> None:
    config = setup.config(breaker={"failures": 1, "cooldown": "1s"})
    with running_executor(config):
        pid = setup.client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
        assert setup.client.wait(pid, timeout=30).state == pdp_pb2.FAILED
        first = _breaker(setup)
        assert first is not None and first["opened_until"] is not None
        time.sleep(1.2)  # the cool-down passes: half-open
        trial = setup.client.propose("web", "POST", setup.target.url + "fail", "t")
        assert trial.state == pdp_pb2.APPROVED
        assert setup.client.wait(trial.proposal_id, timeout=30).state == pdp_pb2.FAILED
    second = _breaker(setup)
    assert second is not None
    assert second["opened_until"] is not None and second["opened_until"] > first["opened_until"]  # type: ignore[operator]


def test_an_agents_bad_input_fails_the_execution_but_not_the_tool(setup: Setup) -> None:
    """A refused action (bad params, HTTP 4xx) is not the target failing: one agent cannot open the breaker."""
    with running_executor(setup.config(breaker={"failures": 1, "cooldown": "1h"})):
        bad = setup.client.propose(
            "crm", "select", "sql://crm/contacts", "t", params={"where": {"nope": 1}}
        ).proposal_id
        final = setup.client.wait(bad, timeout=30)
        assert final.state == pdp_pb2.FAILED and "has no column 'nope'" in final.execution.error
        assert _breaker(setup, "crm") is None
        # A failure of the target itself does count (and with failures: 1, opens it).
        broken = setup.client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
        assert setup.client.wait(broken, timeout=30).state == pdp_pb2.FAILED
    opened = _breaker(setup)
    assert opened is not None and opened["opened_until"] is not None


def _job(setup: Setup, pid: str) -> claims.Job:
    tool = load_bundle(setup.bundle).tools["web"]
    return claims.Job(pid, "agent", tool, {}, 1, "v")


def test_stragglers_neither_close_the_breaker_nor_keep_it_open(setup: Setup) -> None:
    """Executions already running when the breaker opened: only the half-open trial decides."""
    settings = BreakerSettings(failures=1, cooldown="1h")
    now = datetime.now(UTC)
    with setup.engine.begin() as conn:
        assert claims._record_for_breaker(conn, _job(setup, "p1"), False, now, settings, "t") is not None  # opens
    first = _breaker(setup)
    assert first is not None
    with setup.engine.begin() as conn:
        later = now + timedelta(seconds=5)
        assert claims._record_for_breaker(conn, _job(setup, "p2"), False, later, settings, "t") is None
        assert claims._record_for_breaker(conn, _job(setup, "p3"), True, later, settings, "t") is None
    still = _breaker(setup)
    assert still is not None and still["opened_until"] == first["opened_until"]  # not pushed out, not closed
    with setup.engine.begin() as conn:
        assert claims._take_trial(conn, "web", "p4", now)
        closed = claims._record_for_breaker(conn, _job(setup, "p4"), True, now, settings, "t")
    assert closed is not None and closed.type == "circuit.closed"
    assert _breaker(setup) is not None and _breaker(setup)["opened_until"] is None  # type: ignore[index]


def test_a_worker_finishing_after_recovery_took_over_is_kept_as_late_result(setup: Setup) -> None:
    pid = setup.client.propose("web", "POST", setup.target.url + "items", "t").proposal_id
    catalog = load_bundle(setup.bundle).tools
    key = load_public(public_path(signing_key()))
    now = datetime.now(UTC)
    first, second = claims.Lease("first", timedelta(seconds=1)), claims.Lease("second", timedelta(seconds=30))
    with setup.engine.begin() as conn:
        [job] = claims.claim(conn, now=now, lease=first, served=catalog, catalog=catalog, public_key=key, limit=1)
    with setup.engine.begin() as conn:  # the first worker's lease lapsed: recovery decides
        later = now + timedelta(seconds=5)
        recovered = claims.recover(
            conn,
            now=later,
            lease=second,
            served=catalog,
            catalog=catalog,
            public_key=key,
            max_attempts=3,
            backoff=first.duration,
        )
        assert recovered == []  # web is not idempotent: UNKNOWN, nothing to run again
    with setup.engine.begin() as conn:  # ...and then the first worker's call returns
        outcome = claims.Outcome(result={"status": 201})
        assert not claims.finish(conn, job, outcome, now=later, lease=first, breaker=BreakerSettings())
    assert setup.client.get(pid).state == pdp_pb2.UNKNOWN  # recovery's verdict stands
    kinds = setup.audit_types(pid)
    assert kinds[-2:] == ["execution.unknown", "execution.late_result"]
    assert dict(setup.audit(pid))["execution.late_result"]["result"] == {"status": 201}


def test_results_past_the_limit_are_cut_to_a_preview() -> None:
    redactor = Redactor()
    small = {"body": "x" * 100}
    assert bounded(small, redactor) is small
    cut = bounded({"body": "y" * (MAX_RESULT_BYTES * 2)}, redactor)
    assert cut["truncated"] is True and cut["preview"].startswith('{"body":"yyy')
    assert len(json.dumps(cut)) <= MAX_RESULT_BYTES


@pytest.mark.parametrize("credential", ["tok-0123456789abcdef", 'tok-"quoted"-0123456789'], ids=["plain", "escaped"])
def test_the_preview_cut_leaves_no_piece_of_a_credential(credential: str) -> None:
    """The preview is scrubbed as text before it is cut, wherever the cut falls across a credential (as JSON
    writes it), even in a result whose strings nobody scrubbed."""
    redactor = Redactor([Secret(credential)])
    written = json.dumps(credential)[1:-1]
    for kept in range(len(written) + 1):
        before = "y" * (MAX_RESULT_BYTES // 2 - len('{"body":"') - kept)
        preview = bounded({"body": before + credential + "y" * MAX_RESULT_BYTES}, redactor)["preview"]
        assert preview.startswith('{"body":"yyy')
        assert leaked(preview, credential) == [], kept


def test_an_error_of_any_length_is_scrubbed_then_cut() -> None:
    credential = "tok-0123456789abcdef"
    redactor = Redactor([Secret(credential)])
    assert bounded_error(f"short {credential}", redactor) == "short [REDACTED]"
    for kept in range(len(credential) + 1):
        error = bounded_error("e" * (MAX_ERROR_CHARS - kept) + credential + "e" * 100, redactor)
        assert len(error) <= MAX_ERROR_CHARS
        assert leaked(error, credential) == [], kept
