"""OpenTelemetry tracing: one SDK TracerProvider per process, and the spans of a proposal's life.

Spans: ``pdp.Propose`` (the agent's call; continues the W3C ``traceparent`` the agent sent in gRPC metadata),
``pdp.approval.vote`` (an approver's vote) and ``pdp.execute`` (in the executor). They belong to different
traces (an approval comes minutes later, from a person), so they are linked by the attribute
``pdp.proposal_id``, which all three carry: search it in the tracing backend to see one proposal end to end.

Once :func:`configure` ran, every span has real ids, so log lines carry the trace id (continued from the
agent's). Spans are *recorded* (attributes, timing, export) only when something receives them: an OTLP/HTTP
endpoint (``PDP_OTLP_ENDPOINT``) or a test's exporter; then the sampler is ``ParentBased(ALWAYS_ON)``. Until
then they are non-recording, ~8 µs instead of ~50 µs per Propose. The standard ``OTEL_EXPORTER_OTLP_*``
variables (headers, timeout, compression) apply as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from pdp.policy.decision import Decision

TRACER_NAME = "agent-pdp"
_PROPAGATED = ("traceparent", "tracestate")


class _Capture(SpanProcessor):
    """Hands every finished span to one exporter, synchronously: the test hook of :func:`configure`."""

    def __init__(self) -> None:
        self.exporter: SpanExporter | None = None

    def on_end(self, span: ReadableSpan) -> None:
        exporter = self.exporter
        if exporter is not None:
            exporter.export((span,))


class _RecordWhenExported(Sampler):
    """Drops (ids only) until spans go somewhere, then samples every trace, honouring the agent's sampled flag."""

    def __init__(self) -> None:
        self.recording = False
        self._on = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        sampler = self._on if self.recording else ALWAYS_OFF
        return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "RecordWhenExported{ParentBased{AlwaysOn}}" if self.recording else "RecordWhenExported{off}"


class _Setup:
    """This process's tracing, filled by :func:`configure`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.provider: TracerProvider | None = None
        self.endpoints: set[str] = set()
        self.capture = _Capture()
        self.sampler = _RecordWhenExported()
        # A proxy until configure() ran (spans are then non-recording, without ids); then the provider's own.
        self.tracer: trace.Tracer = trace.get_tracer(TRACER_NAME)


_setup = _Setup()


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (``http://collector:4318``) gets the traces path; a full URL is kept."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def configure(
    *, service_name: str = "agent-pdp", endpoint: str = "", exporter: SpanExporter | None = None
) -> TracerProvider:
    """Set up tracing for this process; safe to call again (each endpoint is added once).

    The first call installs an SDK TracerProvider named ``service_name`` as the global one (or adopts one
    already installed, e.g. by ``opentelemetry-instrument``). ``endpoint``: export spans there over OTLP/HTTP,
    batched. ``exporter`` (tests, e.g. ``InMemorySpanExporter``): also hand every span to it, synchronously;
    it replaces the previous one.
    """
    with _setup.lock:
        provider = _setup.provider
        if provider is None:
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                provider = current
            else:
                resource = Resource.create({SERVICE_NAME: service_name})
                provider = TracerProvider(resource=resource, sampler=_setup.sampler)
                trace.set_tracer_provider(provider)
            provider.add_span_processor(_setup.capture)
            _setup.provider = provider
            _setup.tracer = provider.get_tracer(TRACER_NAME)
        if endpoint and endpoint not in _setup.endpoints:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
            _setup.endpoints.add(endpoint)
            _setup.sampler.recording = True
        if exporter is not None:
            _setup.capture.exporter = exporter
            _setup.sampler.recording = True
        return provider


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The caller's trace context from gRPC metadata (W3C ``traceparent``/``tracestate``); None without one."""
    carrier = {key: value for key, value in metadata or () if key in _PROPAGATED and isinstance(value, str)}
    return propagate.extract(carrier) if carrier else None


def propose_span(metadata: Iterable[tuple[str, str | bytes]] | None) -> AbstractContextManager[Span]:
    """``pdp.Propose``, a child of the agent's span when it sent one, current for its duration."""
    return _setup.tracer.start_as_current_span("pdp.Propose", context=extract(metadata), kind=SpanKind.SERVER)


def record_decision(
    span: Span, decision: Decision, *, tool: str, proposal_id: str, agent_id: str, replayed: bool
) -> None:
    if not span.is_recording():
        return
    rule_ids: Sequence[str] = [reason.rule_id for reason in decision.reasons]
    span.set_attributes(
        {
            "pdp.proposal_id": proposal_id,
            "pdp.agent_id": agent_id,
            "pdp.tool": tool,
            "pdp.outcome": decision.outcome.value,
            "pdp.rule_ids": rule_ids,
            "pdp.boundary": decision.boundary,
            "pdp.policy_version": decision.policy_version,
            "pdp.replayed": replayed,
        }
    )


def vote_span(proposal_id: str, verdict: str, approver_id: str) -> AbstractContextManager[Span]:
    """``pdp.approval.vote``; the caller adds ``pdp.state``, the proposal's state after the vote."""
    attributes = {"pdp.proposal_id": proposal_id, "pdp.verdict": verdict, "pdp.approver_id": approver_id}
    return _setup.tracer.start_as_current_span("pdp.approval.vote", attributes=attributes)


def execute_span(proposal_id: str, tool: str, agent_id: str) -> AbstractContextManager[Span]:
    """``pdp.execute``; the caller adds ``pdp.status`` (succeeded, failed or unrecorded)."""
    attributes = {"pdp.proposal_id": proposal_id, "pdp.tool": tool, "pdp.agent_id": agent_id}
    return _setup.tracer.start_as_current_span("pdp.execute", attributes=attributes, kind=SpanKind.CONSUMER)
