"""At most once across crashes, and the circuit breakers (tool-wide and per agent).

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

from executor import breakers, claims
from executor.config import BreakerSettings
from executor.redaction import Redactor
from executor.secrets import Secret
from executor.worker import MAX_ERROR_CHARS, MAX_RESULT_BYTES, bounded, bounded_error
from pdp.audit.keys import load_public, public_path
from pdp.audit.verify import verify
from pdp.observability.collectors import ExecutorState
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


def rows_agree(setup: Setup) -> None:
    """`pdp audit verify` finds every row the executors moved where their events say (no false disagreement)."""
    report = verify(setup.engine, public_key=load_public(public_path(signing_key())), checkpoint_file=None)
    assert report.rows is not None and report.rows.agree, report.disagreements


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
    rows_agree(setup)


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


def _breaker(setup: Setup, tool: str = "web", agent_id: str = "") -> dict[str, object] | None:
    """The tool-wide breaker's row, or with ``agent_id`` that agent's own."""
    with setup.engine.connect() as conn:
        row = (
            conn.execute(
                select(circuit_breakers).where(circuit_breakers.c.tool == tool, circuit_breakers.c.agent_id == agent_id)
            )
            .mappings()
            .first()
        )
        return dict(row) if row is not None else None


def _circuit_events(setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    with setup.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.type, audit_events.c.body)
            .where(audit_events.c.type.like("circuit.%"))
            .order_by(audit_events.c.seq)
        ).all()
    return [(row.type, json.loads(row.body)["data"]) for row in rows]


def test_a_target_failing_for_several_agents_opens_the_tool_for_everyone_and_recovers(setup: Setup) -> None:
    config = setup.config(breaker={"failures": 2, "cooldown": "2s"})
    failing = [setup.server.agent_client() for _ in range(2)]
    with running_executor(config):
        for _, client in failing:
            pid = client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
            assert client.wait(pid, timeout=30).state == pdp_pb2.FAILED
        breaker = _breaker(setup)
        assert breaker is not None and breaker["opened_until"] is not None

        def denied() -> bool:  # setup.client's agent never failed: the tool is denied to everyone
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
    events = _circuit_events(setup)
    assert [kind for kind, _ in events] == ["circuit.opened", "circuit.closed"]
    assert events[0][1]["scope"] == "tool" and events[0][1]["agents"] == sorted(agent.id for agent, _ in failing)
    assert events[1][1] == {"tool": "web", "scope": "tool", "trial_proposal_id": trial}


def test_a_failed_trial_reopens_the_breaker(setup: Setup) -> None:
    """min_agents: 1 is the one breaker per tool of before: one agent's failures open it for everyone."""
    config = setup.config(breaker={"failures": 1, "cooldown": "1s", "min_agents": 1})
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
    """A refused action (bad params, HTTP 4xx) is not the target failing: it counts against no breaker at all."""
    with running_executor(setup.config(breaker={"failures": 1, "cooldown": "1h"})):
        bad = setup.client.propose(
            "crm", "select", "sql://crm/contacts", "t", params={"where": {"nope": 1}}
        ).proposal_id
        final = setup.client.wait(bad, timeout=30)
        assert final.state == pdp_pb2.FAILED and "has no column 'nope'" in final.execution.error
        with setup.engine.connect() as conn:
            assert conn.execute(select(circuit_breakers).where(circuit_breakers.c.tool == "crm")).first() is None
        # A failure of the target itself does count (and with failures: 1, opens the agent's own breaker).
        broken = setup.client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
        assert setup.client.wait(broken, timeout=30).state == pdp_pb2.FAILED
    agent_id = str(setup.client.get(broken).agent_id)
    opened = _breaker(setup, agent_id=agent_id)
    assert opened is not None and opened["opened_until"] is not None


def test_a_trial_whose_action_is_rejected_frees_the_trial_for_another(setup: Setup) -> None:
    """A rejected action proves nothing about the target: had it kept the trial slot, the tool stayed shut."""
    config = setup.config(breaker={"failures": 2, "cooldown": "1s"})
    failing = [setup.server.agent_client()[1] for _ in range(2)]
    with running_executor(config):
        for client in failing:
            pid = client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
            assert client.wait(pid, timeout=30).state == pdp_pb2.FAILED
        assert _breaker(setup) is not None and _breaker(setup)["opened_until"] is not None  # type: ignore[index]
        setup.target.fail_status = 404  # from now on /api/fail refuses the request instead of breaking

        def half_open() -> bool:
            return setup.client.evaluate("web", "POST", setup.target.url + "items", "t").outcome == pdp_pb2.ALLOW

        wait_for(half_open, "the cool-down to end", timeout=10)
        rejected = setup.client.propose("web", "POST", setup.target.url + "fail", "t").proposal_id
        assert setup.client.wait(rejected, timeout=30).state == pdp_pb2.FAILED
        trial = setup.client.propose("web", "POST", setup.target.url + "items", "t").proposal_id
        assert setup.client.wait(trial, timeout=30).state == pdp_pb2.SUCCEEDED
    assert _breaker(setup)["opened_until"] is None  # type: ignore[index]
    assert [kind for kind, _ in _circuit_events(setup)] == ["circuit.opened", "circuit.closed"]


def _record(setup: Setup, settings: BreakerSettings, when: datetime, pid: str, ok: bool, agent: str = "a") -> list[str]:
    """Count one outcome of ``agent``'s execution ``pid`` of web; the breaker events, as "type scope"."""
    with setup.engine.begin() as conn:
        events = breakers.record(
            conn, tool="web", agent_id=agent, proposal_id=pid, ok=ok, now=when, settings=settings, actor="t"
        )
    return [f"{event.type} {event.data['scope']}" for event in events]


def _take_trial(setup: Setup, pid: str, agent: str = "a") -> bool:
    """After every cool-down: make ``agent``'s proposal ``pid`` the trial of each half-open breaker it must pass."""
    with setup.engine.begin() as conn:
        now = datetime.now(UTC) + timedelta(hours=2)
        return breakers.Trials.load(conn, ["web"], now).take(conn, "web", agent, pid, now)


@pytest.mark.parametrize("scope", ["tool", "agent"])
def test_stragglers_neither_close_the_breaker_nor_keep_it_open(setup: Setup, scope: str) -> None:
    """Executions already running when a breaker opened: only the half-open trial decides (either scope)."""
    settings = BreakerSettings(failures=1, cooldown="1h", min_agents=1 if scope == "tool" else 2)
    agent_id = "" if scope == "tool" else "a"
    now = datetime.now(UTC)
    assert _record(setup, settings, now, "p1", False) == [f"circuit.opened {scope}"]
    first = _breaker(setup, agent_id=agent_id)
    assert first is not None
    later = now + timedelta(seconds=5)
    assert _record(setup, settings, later, "p2", False) == []
    assert _record(setup, settings, later, "p3", True) == []
    still = _breaker(setup, agent_id=agent_id)
    assert still is not None and still["opened_until"] == first["opened_until"]  # not pushed out, not closed
    assert _take_trial(setup, "p4")
    assert _record(setup, settings, later, "p4", True) == [f"circuit.closed {scope}"]
    assert _breaker(setup, agent_id=agent_id)["opened_until"] is None  # type: ignore[index]


def test_one_agents_failures_open_its_own_breaker_and_only_that(setup: Setup) -> None:
    settings = BreakerSettings(failures=3, cooldown="1h")
    now = datetime.now(UTC)
    assert [_record(setup, settings, now, f"p{i}", False) for i in range(3)] == [[], [], ["circuit.opened agent"]]
    assert _breaker(setup)["opened_until"] is None  # type: ignore[index]
    assert _breaker(setup, agent_id="a")["opened_until"] is not None  # type: ignore[index]
    gauges = {
        (sample.name, sample.labels["tool"]): sample.value
        for family in ExecutorState(setup.engine, busy=lambda: 0, clock=lambda: now).collect()
        for sample in family.samples
        if "tool" in sample.labels
    }
    assert gauges == {("pdp_circuit_breaker_open", "web"): 0, ("pdp_circuit_breaker_agents_open", "web"): 1}
    # Its trial, after the cool-down: another agent's proposal needs none and does not take it.
    assert _take_trial(setup, "q1", agent="b")
    assert _breaker(setup, agent_id="a")["trial_proposal_id"] is None  # type: ignore[index]
    assert _take_trial(setup, "q2", agent="a")
    assert _breaker(setup, agent_id="a")["trial_proposal_id"] == "q2"  # type: ignore[index]
    assert _record(setup, settings, now, "q2", False) == ["circuit.opened agent"]  # failed: open again


def test_the_tool_wide_breaker_needs_min_agents_each_with_a_share(setup: Setup) -> None:
    """failures 4, min_agents 2: no agent counts for more than 2, so one agent and another's blip do not open it."""
    settings = BreakerSettings(failures=4, cooldown="1h")
    now = datetime.now(UTC)
    for i in range(3):
        assert _record(setup, settings, now, f"a{i}", False, agent="a") == []
    assert _record(setup, settings, now, "b0", False, agent="b") == []  # a counts 2 of its 3, b 1: 3 of 4
    assert _record(setup, settings, now, "b1", False, agent="b") == ["circuit.opened tool"]


def test_one_agent_succeeding_does_not_end_the_streak_but_two_do(setup: Setup) -> None:
    settings = BreakerSettings(failures=2, cooldown="1h")
    now = datetime.now(UTC)
    assert _record(setup, settings, now, "a0", False, agent="a") == []
    for i in range(3):
        assert _record(setup, settings, now, f"l{i}", True, agent="lucky") == []
    assert _breaker(setup)["consecutive_failures"] == 1  # type: ignore[index]
    assert _record(setup, settings, now, "c0", True, agent="c") == []  # a second agent succeeded: the streak ends
    assert _breaker(setup)["consecutive_failures"] == 0  # type: ignore[index]
    assert _record(setup, settings, now, "b0", False, agent="b") == []  # a's failure is no longer in the streak
    # An agent's own success takes its own failures out of the streak.
    assert _record(setup, settings, now, "b1", True, agent="b") == []
    assert _record(setup, settings, now, "e0", False, agent="e") == []
    assert _record(setup, settings, now, "d0", False, agent="d") == ["circuit.opened tool"]


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
    rows_agree(setup)


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
