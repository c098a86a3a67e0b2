"""Prometheus series of the decision service and the executor, and the calls that record them.

Registries. Counters and histograms are process-wide, as Prometheus users expect: :data:`PDP` holds the
decision service's, :data:`EXECUTOR` the executor's, :data:`RUNTIME` the process collectors (CPU, memory,
GC). Gauges that describe shared state (pending approvals, quarantines, open breakers, the active policy)
are computed at scrape time from one server's database and bundle (:mod:`pdp.observability.collectors`),
so each server or executor serves its own registry, :func:`registry`, which includes the process-wide ones.
Several servers in one process (the tests) therefore share counters, whose labels never name a server:
tests compare deltas.

The hot path only increments: label children are looked up once and cached, no series is created per
request, and no label carries agent-supplied text (rule ids, boundary names and limit ids come from the
reviewed bundle, tool names from the catalog).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from pdp.policy.decision import Decision, Outcome

RUNTIME = CollectorRegistry(auto_describe=True)
PDP = CollectorRegistry(auto_describe=True)
EXECUTOR = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=RUNTIME)
PlatformCollector(registry=RUNTIME)
GCCollector(registry=RUNTIME)

# 50 µs (a cached, simple decision) to 1 s; above that something is wrong.
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Humans: seconds to a day.
APPROVAL_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
EXECUTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

NO_BOUNDARY = "none"  # the boundary label of a decision no boundary applied to

# --- the decision service ------------------------------------------------------------------------------

DECISIONS = Counter("pdp_decisions", "Recorded Propose decisions, by outcome", ["outcome"], registry=PDP)
EVALUATIONS = Counter("pdp_evaluations", "Evaluate (dry run) decisions, by outcome", ["outcome"], registry=PDP)
DECISION_RULES = Counter(
    "pdp_decision_rules", "Reasons of recorded decisions, by rule id and its effect", ["rule", "effect"], registry=PDP
)
DECISION_BOUNDARY = Counter(
    "pdp_decision_boundary",
    "Recorded decisions by the boundary that applied ('none': none)",
    ["boundary"],
    registry=PDP,
)
DECISION_SECONDS = Histogram(
    "pdp_decision_seconds",
    "Deciding: policy, limits and, for Propose, the durable record (rpc: Propose or Evaluate)",
    ["rpc"],
    buckets=DECISION_BUCKETS,
    registry=PDP,
)
PROPOSE_SECONDS = Histogram(
    "pdp_propose_seconds", "Whole Propose calls, errors included", buckets=RPC_BUCKETS, registry=PDP
)
APPROVAL_SECONDS = Histogram(
    "pdp_approval_seconds",
    "From a proposal's creation to its final approval decision (result: approved, rejected, denied, expired)",
    ["result"],
    buckets=APPROVAL_BUCKETS,
    registry=PDP,
)
LIMIT_HITS = Counter("pdp_limit_hits", "Governance limits that changed an outcome", ["limit", "effect"], registry=PDP)
POLICY_RELOADS = Counter("pdp_policy_reloads", "Policy bundles activated by hot reload", registry=PDP)
POLICY_RELOAD_FAILURES = Counter(
    "pdp_policy_reload_failures", "Hot reloads refused (the last good bundle stayed active)", registry=PDP
)
AUTH_FAILURES = Counter(
    "pdp_auth_failures",
    "Failed authentications, by door (grpc, admin) and answer (looked_up: a database lookup found nothing; "
    "remembered: a token that failed before, no lookup; throttled: the peer was over its budget, no lookup)",
    ["door", "answer"],
    registry=PDP,
)

# --- the executor --------------------------------------------------------------------------------------

EXECUTIONS = Counter(
    "pdp_executions",
    "Executions, by tool and status (succeeded, failed; late: recovery took over; unrecorded: not written)",
    ["tool", "status"],
    registry=EXECUTOR,
)
EXECUTION_SECONDS = Histogram(
    "pdp_execution_seconds",
    "One execution: the connector call and recording its outcome",
    ["tool"],
    buckets=EXECUTION_BUCKETS,
    registry=EXECUTOR,
)

# Label children, looked up once. A racing first lookup is harmless: `labels` returns the same child.
_DECIDED = {outcome: DECISIONS.labels(outcome.value) for outcome in Outcome}
_EVALUATED = {outcome: EVALUATIONS.labels(outcome.value) for outcome in Outcome}
_DECIDE_SECONDS = DECISION_SECONDS.labels("Propose")
_EVALUATE_SECONDS = DECISION_SECONDS.labels("Evaluate")
_RULES: dict[tuple[str, Outcome], Counter] = {}
_BOUNDARIES: dict[str, Counter] = {}
_LIMITS: dict[tuple[str, str], Counter] = {}
_APPROVALS: dict[str, Histogram] = {}
_EXECUTIONS: dict[tuple[str, str], Counter] = {}
_EXECUTION_SECONDS: dict[str, Histogram] = {}
_AUTH_FAILURES = {
    (door, answer): AUTH_FAILURES.labels(door, answer)
    for door in ("grpc", "admin")
    for answer in ("looked_up", "remembered", "throttled")
}


def decided(decision: Decision, seconds: float) -> None:
    """A Propose decision was recorded (not an idempotent replay of an earlier one)."""
    _DECIDE_SECONDS.observe(seconds)
    _DECIDED[decision.outcome].inc()
    for reason in decision.reasons:
        key = (reason.rule_id, reason.effect)
        child = _RULES.get(key)
        if child is None:
            child = _RULES[key] = DECISION_RULES.labels(reason.rule_id, reason.effect.value)
        child.inc()
    boundary = decision.boundary or NO_BOUNDARY
    counter = _BOUNDARIES.get(boundary)
    if counter is None:
        counter = _BOUNDARIES[boundary] = DECISION_BOUNDARY.labels(boundary)
    counter.inc()


def evaluated(decision: Decision, seconds: float) -> None:
    _EVALUATE_SECONDS.observe(seconds)
    _EVALUATED[decision.outcome].inc()


def propose_finished(seconds: float) -> None:
    PROPOSE_SECONDS.observe(seconds)


def approval_finished(result: str, seconds: float) -> None:
    """A pending proposal left PENDING_APPROVAL: ``result`` is approved, rejected, denied or expired."""
    child = _APPROVALS.get(result)
    if child is None:
        child = _APPROVALS[result] = APPROVAL_SECONDS.labels(result)
    child.observe(max(0.0, seconds))


def limit_hit(limit_id: str, effect: str) -> None:
    """A governance limit changed a decision (``effect``: deny or needs_approval)."""
    key = (limit_id, effect)
    child = _LIMITS.get(key)
    if child is None:
        child = _LIMITS[key] = LIMIT_HITS.labels(limit_id, effect)
    child.inc()


def reload_activated() -> None:
    POLICY_RELOADS.inc()


def reload_failed() -> None:
    POLICY_RELOAD_FAILURES.inc()


def auth_failed(door: str, answer: str) -> None:
    """A bearer token was refused at ``door`` (grpc, admin); ``answer``: looked_up, remembered or throttled."""
    _AUTH_FAILURES[(door, answer)].inc()


def executed(tool: str, status: str, seconds: float) -> None:
    """An execution finished; ``status`` is succeeded, failed, late or unrecorded."""
    key = (tool, status)
    child = _EXECUTIONS.get(key)
    if child is None:
        child = _EXECUTIONS[key] = EXECUTIONS.labels(tool, status)
    child.inc()
    histogram = _EXECUTION_SECONDS.get(tool)
    if histogram is None:
        histogram = _EXECUTION_SECONDS[tool] = EXECUTION_SECONDS.labels(tool)
    histogram.observe(seconds)


def registry(process: CollectorRegistry, state: Iterable[Collector] = ()) -> CollectorRegistry:
    """What one ``/metrics`` serves: the runtime collectors, ``process`` (PDP or EXECUTOR) and scrape-time ``state``.

    Registries are collectors, so they are included as they are; names are not checked across them
    (``auto_describe`` off), which is safe because each series is defined in exactly one of them.
    """
    served = CollectorRegistry(auto_describe=False)
    for collector in (RUNTIME, process, *state):
        served.register(collector)
    return served
