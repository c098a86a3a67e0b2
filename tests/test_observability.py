"""Metrics, log lines and traces of a scripted run against a real server and executor (SQLite and PostgreSQL).

Counters are process-wide and other tests run servers in this process too, so counters are compared as deltas
between two scrapes; gauges come from this test's own database, so they are compared exactly.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import ADMIN_MEMBERS, TICKETS, Server, fresh_database, running_server, signing_key
from execution import executor_config, running_executor, target_server, write_bundle
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from executor.config import ConfigError, load
from executor.logs import configure_logging
from executor.main import build
from executor.redaction import Redactor
from executor.secrets import Secret
from pdp.client import PdpClient
from pdp.identity.approvers import add_approver
from pdp.observability import exposition, logs, metrics, tracing
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2, pdp_pb2_grpc

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[httpx.Response, Samples]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes during the test (the exporter drops everything once shut down)."""
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter)
    yield exporter
    exporter.shutdown()


@contextmanager
def json_log(name: str, level: int) -> Iterator[io.StringIO]:
    """The JSON lines ``name`` logs meanwhile, formatted as `pdp serve` formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- the decision service ---------------------------------------------------------------------------------


def create_ticket(server: Server, **kw: Any) -> pdp_pb2.ProposeResponse:
    # A fresh agent per proposal, so no rate limit or retry-storm rule of the example bundle interferes.
    _agent, client = server.agent_client()
    return client.propose("tickets", "POST", TICKETS, "metrics", params={"title": "Printer on fire"}, **kw)


def critical_ticket(server: Server) -> pdp_pb2.ProposeResponse:
    _agent, client = server.agent_client()
    return client.propose("tickets", "POST", TICKETS, "metrics", params={"priority": "critical"})


def make_admin(server: Server) -> pdp_pb2.ProposeResponse:
    _agent, client = server.agent_client()
    return client.propose("iam", "POST", ADMIN_MEMBERS, "metrics", params={"user": "me"})


def test_metrics_after_a_scripted_run(database_url: str) -> None:
    allows, denies, pending = 3, 2, 2
    with running_server(database_url) as server:
        url = server.admin_url + "/metrics"
        _, before = scrape(url)

        responses = [create_ticket(server) for _ in range(allows)]
        responses += [make_admin(server) for _ in range(denies)]
        responses += [critical_ticket(server) for _ in range(pending)]
        outcomes = Counter(pdp_pb2.Outcome.Name(r.decision.outcome) for r in responses)
        assert outcomes == {"ALLOW": allows, "DENY": denies, "NEEDS_APPROVAL": pending}
        _agent, client = server.agent_client()
        first = client.propose("tickets", "POST", TICKETS, "metrics", idempotency_key="k-1")
        replay = client.propose("tickets", "POST", TICKETS, "metrics", idempotency_key="k-1")
        assert replay.proposal_id == first.proposal_id
        responses.append(first)
        client.evaluate("tickets", "POST", TICKETS, "metrics")
        version = responses[0].decision.policy_version

        response, after = scrape(url)
        assert response.headers["content-type"] == exposition.CONTENT_TYPE
        assert response.headers["x-content-type-options"] == "nosniff"  # the admin app's headers still apply

        # Decisions: the replay is not a second decision; the dry run is counted apart.
        assert delta(before, after, "pdp_decisions_total", outcome="allow") == allows + 1
        assert delta(before, after, "pdp_decisions_total", outcome="deny") == denies
        assert delta(before, after, "pdp_decisions_total", outcome="needs_approval") == pending
        assert delta(before, after, "pdp_evaluations_total", outcome="allow") == 1
        # Every reason and every boundary of every decision, and two known ones by name.
        reasons = Counter((r.rule_id, r.effect) for response in responses for r in response.decision.reasons)
        for (rule, effect), count in reasons.items():
            assert delta(before, after, "pdp_decision_rules_total", rule=rule, effect=effect) == count, rule
        assert reasons[("rule:tickets-critical-priority", "needs_approval")] == pending
        # tickets-create also matches the critical ones (needs_approval wins over allow).
        created = allows + 1 + pending
        assert delta(before, after, "pdp_decision_rules_total", rule="rule:tickets-create", effect="allow") == created
        boundaries = Counter(response.decision.boundary or "none" for response in responses)
        for boundary, count in boundaries.items():
            assert delta(before, after, "pdp_decision_boundary_total", boundary=boundary) == count, boundary
        assert boundaries["access-control"] == denies
        # Latency: one observation per decision, one per Propose call (the replay included).
        decided = allows + denies + pending + 1
        assert delta(before, after, "pdp_decision_seconds_count", rpc="Propose") == decided
        assert delta(before, after, "pdp_decision_seconds_count", rpc="Evaluate") == 1
        assert delta(before, after, "pdp_propose_seconds_count") == decided + 1
        assert delta(before, after, "pdp_propose_seconds_bucket", le="+Inf") == decided + 1
        assert delta(before, after, "pdp_decision_seconds_sum", rpc="Propose") > 0
        # State gauges of this server's database and bundle: exact.
        assert value(after, "pdp_pending_approvals") == pending
        assert value(after, "pdp_policy_info", policy_version=version) == 1
        assert value(after, "pdp_quarantined_agents") == 0
        assert any(name == "python_info" for name, _ in after)  # the runtime collectors are served too

        # One approval ends one wait.
        approvals = server.running.approvals if server.running else pytest.fail("in-process server")
        add_approver(server.engine, "oncall-metrics", ["ops-oncall"])
        waiting = [r.proposal_id for r in responses if r.decision.outcome == pdp_pb2.NEEDS_APPROVAL]
        oncall = approvals.approver("oncall-metrics")
        shown = approvals.detail(oncall, waiting[0]).action_digest
        assert approvals.approve(oncall, waiting[0], "ok", action_digest=shown).state == "APPROVED"
        _, approved = scrape(url)
        assert delta(after, approved, "pdp_approval_seconds_count", result="approved") == 1
        assert value(approved, "pdp_pending_approvals") == pending - 1


def test_policy_reload_and_limit_counters_are_exposed(server: Server) -> None:
    """The calls hot reload and the limits make (their own tests cover when they make them)."""
    url = server.admin_url + "/metrics"
    _, before = scrape(url)
    metrics.limit_hit("rate-per-agent", "deny")
    metrics.reload_activated()
    metrics.reload_failed()
    metrics.reload_failed()
    _, after = scrape(url)
    assert delta(before, after, "pdp_limit_hits_total", limit="rate-per-agent", effect="deny") == 1
    assert delta(before, after, "pdp_policy_reloads_total") == 1
    assert delta(before, after, "pdp_policy_reload_failures_total") == 2


# --- logs and traces of a proposal -------------------------------------------------------------------------


def propose_with_traceparent(server: Server, traceparent: str) -> tuple[str, pdp_pb2.ProposeResponse]:
    agent = server.add_agent()
    request = pdp_pb2.ProposeRequest(
        action=pdp_pb2.Action(tool="tickets", operation="POST", resource=TICKETS),
        justification="tracing",
    )
    request.action.params.update({"priority": "critical"})
    with grpc.insecure_channel(server.target) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionPointStub(channel)
        metadata: tuple[tuple[str, str | bytes], ...] = (
            ("authorization", f"Bearer {agent.token}"),
            ("traceparent", traceparent),
        )
        return agent.id, stub.Propose(request, metadata=metadata, timeout=10)


def finished(exporter: InMemorySpanExporter, name: str, proposal_id: str) -> ReadableSpan:
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.name == name and span.attributes and span.attributes.get("pdp.proposal_id") == proposal_id
    ]
    assert len(found) == 1, [span.name for span in exporter.get_finished_spans()]
    return found[0]


def test_propose_continues_the_agents_trace_and_its_log_lines_name_it(
    server: Server, spans: InMemorySpanExporter
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with json_log("pdp", logging.DEBUG) as log:
        agent_id, response = propose_with_traceparent(server, f"00-{trace_id}-{parent_id}-01")
    proposal_id = response.proposal_id

    span = finished(spans, "pdp.Propose", proposal_id)
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent_id and span.parent.is_remote
    assert span.kind is SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["pdp.outcome"] == "needs_approval"
    assert list(attributes["pdp.rule_ids"]) == [r.rule_id for r in response.decision.reasons]  # type: ignore[arg-type]
    assert "rule:tickets-critical-priority" in attributes["pdp.rule_ids"]  # type: ignore[operator]
    assert attributes["pdp.boundary"] == "support-tickets"
    assert attributes["pdp.policy_version"] == response.decision.policy_version
    assert attributes["pdp.tool"] == "tickets"
    assert attributes["pdp.agent_id"] == agent_id

    about = [line for line in lines(log) if line.get("proposal_id") == proposal_id]
    assert about, log.getvalue()
    for line in about:
        assert {"ts", "level", "logger", "msg"} <= line.keys()
        assert (line["agent_id"], line["trace_id"], line["tool"]) == (agent_id, trace_id, "tickets")

    # The vote is its own trace (a person, later), linked by the proposal id.
    approvals = server.running.approvals if server.running else pytest.fail("in-process server")
    approver = f"oncall-{secrets.token_hex(4)}"
    add_approver(server.engine, approver, ["ops-oncall"])
    shown = approvals.detail(approvals.approver(approver), proposal_id).action_digest
    with json_log("pdp", logging.INFO) as log:
        assert approvals.approve(approvals.approver(approver), proposal_id, action_digest=shown).state == "APPROVED"
    vote = finished(spans, "pdp.approval.vote", proposal_id)
    assert vote.attributes is not None
    assert (vote.attributes["pdp.verdict"], vote.attributes["pdp.state"]) == ("approve", "APPROVED")
    assert any(line.get("proposal_id") == proposal_id for line in lines(log)), log.getvalue()


def test_without_a_traceparent_propose_starts_a_trace(server: Server, spans: InMemorySpanExporter) -> None:
    _agent, client = server.agent_client()
    response = client.propose("tickets", "POST", TICKETS, "tracing", params={"title": "x"})
    span = finished(spans, "pdp.Propose", response.proposal_id)
    assert span.parent is None and span.context is not None and span.context.trace_id != 0
    assert span.attributes is not None and span.attributes["pdp.outcome"] == "allow"


def test_a_malformed_traceparent_is_ignored(server: Server, spans: InMemorySpanExporter) -> None:
    _agent_id, response = propose_with_traceparent(server, "00-not-a-trace-01")
    span = finished(spans, "pdp.Propose", response.proposal_id)
    assert span.parent is None


# --- the executor -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_executor_metrics_logs_and_spans(backend: str, tmp_path: Path, spans: InMemorySpanExporter) -> None:
    with target_server() as target, fresh_database(backend, tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        token_file = tmp_path / "target.token"
        token_file.write_text(target.token)
        config = executor_config(
            tmp_path, database_url=url, policy_dir=bundle, signing_key=signing_key(), token_file=token_file
        )
        with running_server(url, policy_dir=bundle) as server, running_executor(config) as executor:
            assert executor.metrics_port
            metrics_url = f"http://127.0.0.1:{executor.metrics_port}/metrics"
            _, before = scrape(metrics_url)
            agent, client = server.agent_client()
            with json_log("executor", logging.INFO) as log:
                ok = client.propose("web", "POST", target.url + "items", "metrics").proposal_id
                bad = client.propose("web", "POST", target.url + "fail", "metrics").proposal_id
                assert client.wait(ok, timeout=30).state == pdp_pb2.SUCCEEDED
                assert client.wait(bad, timeout=30).state == pdp_pb2.FAILED
            _, after = scrape(metrics_url)

    assert delta(before, after, "pdp_executions_total", tool="web", status="succeeded") == 1
    assert delta(before, after, "pdp_executions_total", tool="web", status="failed") == 1
    assert delta(before, after, "pdp_execution_seconds_count", tool="web") == 2
    assert value(after, "pdp_executor_inflight") == 0
    assert value(after, "pdp_circuit_breaker_open", tool="web") == 0  # one failure does not open it
    assert ("pdp_decisions_total", frozenset({("outcome", "allow")})) not in after  # the PDP's are not here

    for proposal_id, status in ((ok, "succeeded"), (bad, "failed")):
        span = finished(spans, "pdp.execute", proposal_id)
        assert span.attributes is not None
        assert (span.attributes["pdp.tool"], span.attributes["pdp.status"]) == ("web", status)
        assert span.context is not None
        line = next(
            line
            for line in lines(log)
            if line.get("proposal_id") == proposal_id and line["msg"].startswith(f"execution {status} in")
        )
        assert line["tool"] == "web" and line["agent_id"] == agent.id
        assert line["trace_id"] == f"{span.context.trace_id:032x}"


def test_executor_metrics_address_taken_is_a_startup_error(database_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with target_server() as target:
            bundle = write_bundle(tmp_path / "bundle", target.url)
            token_file = tmp_path / "target.token"
            token_file.write_text(target.token)
            config = executor_config(
                tmp_path,
                database_url=database_url,
                policy_dir=bundle,
                signing_key=signing_key(),
                token_file=token_file,
                metrics_addr=f"127.0.0.1:{port}",
            )
            executor = build(load(config, env={}))
            try:
                with pytest.raises(OSError):
                    executor.start()
            finally:
                executor.stop()


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:http", ":"])
def test_executor_metrics_address_must_be_host_port(tmp_path: Path, address: str) -> None:
    path = tmp_path / "executor.yaml"
    path.write_text(json.dumps({"metrics_addr": address}))
    with pytest.raises(ConfigError, match="metrics_addr"):
        load(path, env={})


def test_executor_metrics_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "executor.yaml"
    path.write_text(json.dumps({"metrics_addr": "", "log_format": "text"}))
    settings = load(path, env={"PDP_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert (settings.metrics_addr, settings.log_format, settings.otlp_endpoint) == ("", "text", "http://127.0.0.1:4318")


# --- log lines ----------------------------------------------------------------------------------------------


@contextmanager
def root_logging() -> Iterator[None]:
    """Give back the root logger (pytest's capture handlers) after a test configured logging for a process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("pdp", "executor")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, previous in levels.items():
            logging.getLogger(name).setLevel(previous)


def test_executor_json_lines_are_scrubbed_and_one_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    with root_logging():
        configure_logging(Redactor([Secret("s3cret-value-123")]))
        with logs.context(proposal_id="p-1", agent_id="a-1", tool="web"):
            logging.getLogger("executor.test").error("upstream said %s", 'token s3cret-value-123\n"second" line')
            try:
                raise RuntimeError("boom with s3cret-value-123")
            except RuntimeError:
                logging.getLogger("executor.test").exception("connector raised")
        logging.getLogger("executor.test").info("no proposal here")
    written = capsys.readouterr().err.splitlines()
    assert len(written) == 3, written
    first, second, third = (json.loads(line) for line in written)
    assert not [line for line in written if "s3cret" in line]
    assert first["msg"] == 'upstream said token [REDACTED]\n"second" line'
    assert (first["level"], first["logger"], first["proposal_id"], first["agent_id"], first["tool"]) == (
        "ERROR",
        "executor.test",
        "p-1",
        "a-1",
        "web",
    )
    assert "RuntimeError: boom with [REDACTED]" in second["exc"]
    assert "proposal_id" not in third
    assert first["ts"].endswith("Z")


def test_text_format_keeps_the_ids(capsys: pytest.CaptureFixture[str]) -> None:
    with root_logging():
        logs.configure(json=False)
        with logs.context(proposal_id="p-2"):
            logging.getLogger("pdp.test").warning("hello")
    line = capsys.readouterr().err.strip()
    assert line.endswith("WARNING pdp.test: hello proposal_id=p-2"), line


def test_extra_wins_over_the_bound_context() -> None:
    with json_log("pdp.test", logging.INFO) as log, logs.context(proposal_id="outer", agent_id="a"):
        logging.getLogger("pdp.test").info("x", extra={"proposal_id": "inner"})
    (line,) = lines(log)
    assert (line["proposal_id"], line["agent_id"]) == ("inner", "a")


# --- small pieces -------------------------------------------------------------------------------------------


def test_otlp_endpoint_gets_the_traces_path() -> None:
    assert tracing.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("https://otel.example/custom/traces") == "https://otel.example/custom/traces"


def test_addresses() -> None:
    assert exposition.split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert exposition.split_address("[::1]:0") == ("::1", 0)
    assert exposition.split_address(":9464") == ("127.0.0.1", 9464)
    with pytest.raises(ValueError, match="host:port"):
        exposition.split_address("9464")


def test_pdp_client_still_works_without_tracing_metadata(server: Server) -> None:
    """A plain client (no traceparent) is unaffected: tracing is an addition, never a requirement."""
    agent = server.add_agent()
    with PdpClient(server.target, agent.token) as client:
        assert client.propose("tickets", "POST", TICKETS, "plain").decision.outcome == pdp_pb2.ALLOW
