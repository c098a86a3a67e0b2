"""The executor's runtime: a claim loop, a pool of workers calling connectors, and a lease heartbeat.

The loop polls for approved work every ``poll_interval`` (a read-only query, so an idle executor
never takes SQLite's write lock) and runs recovery about once a second. Each claimed job runs on a
worker thread: the connector is called only after the claim committed, the outcome is scrubbed of
credentials, bounded, and recorded. If recording fails the job is left to its lease: recovery then
marks it UNKNOWN (or retries an idempotent tool), never runs it twice behind anyone's back.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, exists, select
from sqlalchemy.exc import SQLAlchemyError

from executor import breakers, claims
from executor.claims import Job, Lease, Outcome
from executor.config import Settings
from executor.connectors.base import Call, Connector, ConnectorError, ConnectorRejected, ConnectorTimeout
from executor.isolation import SetAside
from executor.redaction import Redactor
from pdp.audit.chain import chain_writer
from pdp.canonical import canonical_json
from pdp.observability import logs, metrics, tracing
from pdp.observability.collectors import ExecutorState
from pdp.observability.exposition import MetricsServer
from pdp.policy.catalog import Tool
from pdp.proposals.states import ProposalState
from pdp.store.models import executions, proposals

log = logging.getLogger("executor")

T = TypeVar("T")
# Results are stored with the proposal and in the audit log; past this they are cut to a preview.
MAX_RESULT_BYTES = 64 * 1024
# An error message is stored the same way; a connector's (a plugin's) may be any length.
MAX_ERROR_CHARS = 4096
RECOVERY_SECONDS = 1.0
FINISH_RETRIES = 5


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def bounded(result: dict[str, Any], redactor: Redactor) -> dict[str, Any]:
    """``result`` (already scrubbed), or past ``MAX_RESULT_BYTES`` a preview of its JSON, scrubbed again as
    text (serialising may join or escape what was scrubbed apart) and cut with no piece of a credential."""
    text = canonical_json(result)
    if len(text) <= MAX_RESULT_BYTES:
        return result
    preview = redactor.cut(text.decode("utf-8"), MAX_RESULT_BYTES // 2, unit="bytes").text
    return {"truncated": True, "preview": preview}


def bounded_error(message: str, redactor: Redactor) -> str:
    """What is stored of an error: scrubbed whole, then cut to ``MAX_ERROR_CHARS`` with no piece of a credential."""
    return redactor.cut(message, MAX_ERROR_CHARS).text


class Executor:
    def __init__(
        self,
        settings: Settings,
        *,
        reader: Engine,
        writer: Engine,
        catalog: Mapping[str, Tool],
        connectors: Mapping[str, Connector],
        public_key: Ed25519PublicKey,
        redactor: Redactor,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._writes = chain_writer(writer, max_batch=64)
        self._catalog = dict(catalog)
        self._connectors = dict(connectors)
        self._served = {name: catalog[name] for name in connectors}
        self._public_key = public_key
        self.redactor = redactor
        self._clock = clock
        self.worker_id = settings.worker_id or default_worker_id()
        self._lease = Lease(self.worker_id, settings.lease)
        self._aside = SetAside()  # rows that could not even be refused: skipped for a while, never holding the rest
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="executor-call")
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()  # claim nothing more
        self._stopped = threading.Event()  # every call in flight has been recorded
        self._threads: list[threading.Thread] = []
        # What /metrics serves: the process's executor series and this executor's scrape-time gauges.
        self.metrics = metrics.registry(metrics.EXECUTOR, [ExecutorState(reader, self.busy, clock)])
        self._metrics_server: MetricsServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (useful with port 0), None when it is off or not started."""
        return self._metrics_server.port if self._metrics_server is not None else None

    def start(self) -> None:
        """Serve /metrics (OSError or ValueError if its address cannot be had), then start claiming work."""
        if self._settings.metrics_addr:
            self._metrics_server = MetricsServer.start(self._settings.metrics_addr, self.metrics)
        for target, name in ((self._loop, "executor-claims"), (self._heartbeat, "executor-leases")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Claim nothing more; let calls in flight finish and record their outcome."""
        self._stopping.set()
        self._wake.set()
        if self._threads:
            self._threads[0].join(timeout)
        self._pool.shutdown(wait=True)  # leases are still renewed while these finish
        self._stopped.set()
        for thread in self._threads[1:]:
            thread.join(timeout)
        self._writes.close()
        for connector in self._connectors.values():
            connector.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()

    def busy(self) -> int:
        with self._lock:
            return len(self._inflight)

    # --- the claim loop ----------------------------------------------------------------------------

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a committed transaction; concurrent callers share one commit (group commit)."""
        return self._writes.submit(work).result()

    def _work_waiting(self, now: datetime) -> bool:
        """Approved work no breaker holds back and not set aside: the claim takes the write lock only for that."""
        waiting = exists().where(
            proposals.c.state == ProposalState.APPROVED.value,
            proposals.c.tool.in_(list(self._served)),
            ~breakers.held(now),
        )
        aside = self._aside.ids(now)
        if aside:  # set aside: not work until their pause ends
            waiting = waiting.where(proposals.c.id.not_in(aside))
        with self._reader.connect() as conn:
            return bool(conn.execute(select(waiting)).scalar())

    def _abandoned_waiting(self, now: datetime) -> bool:
        waiting = exists().where(claims.abandoned(now, self._served, self._catalog))
        aside = self._aside.ids(now)
        if aside:
            waiting = waiting.where(executions.c.proposal_id.not_in(aside))
        with self._reader.connect() as conn:
            return bool(conn.execute(select(waiting)).scalar())

    def _loop(self) -> None:
        next_recovery = 0.0
        while not self._stopping.is_set():
            jobs: list[Job] = []
            try:
                now = self._clock()
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + RECOVERY_SECONDS
                    if self._abandoned_waiting(now):
                        jobs += self._transaction(self._recover)
                free = self._settings.concurrency - self.busy() - len(jobs)
                if free > 0 and self._served and self._work_waiting(now):
                    jobs += self._transaction(functools.partial(self._claim, limit=free))
            except Exception:  # the loop must outlive any one bad poll (database down, a bug)
                log.exception("error in the claim loop; retrying in 1 s")
                self._stopping.wait(1.0)
            for job in jobs:
                with self._lock:
                    self._inflight.add(job.proposal_id)
                log.info(
                    "execution started",
                    extra={"proposal_id": job.proposal_id, "agent_id": job.agent_id, "tool": job.tool.name},
                )
                self._pool.submit(self._run, job)
            if not jobs:
                self._wake.wait(self._settings.poll_interval.total_seconds())
                self._wake.clear()

    def _claim(self, conn: Connection, limit: int) -> list[Job]:
        return claims.claim(
            conn,
            now=self._clock(),
            lease=self._lease,
            served=self._served,
            catalog=self._catalog,
            public_key=self._public_key,
            limit=limit,
            aside=self._aside,
        )

    def _recover(self, conn: Connection) -> list[Job]:
        return claims.recover(
            conn,
            now=self._clock(),
            lease=self._lease,
            served=self._served,
            catalog=self._catalog,
            public_key=self._public_key,
            max_attempts=self._settings.max_attempts,
            backoff=self._settings.retry_backoff,
            aside=self._aside,
        )

    def _heartbeat(self) -> None:
        interval = self._settings.lease.total_seconds() / 3
        while not self._stopped.wait(interval):
            with self._lock:
                held = list(self._inflight)
            if not held:
                continue
            try:
                self._transaction(
                    functools.partial(claims.renew, proposal_ids=held, lease=self._lease, now=self._clock())
                )
            except SQLAlchemyError:
                log.exception("cannot renew leases; recovery will take over the jobs if this persists")

    # --- one job -----------------------------------------------------------------------------------

    def _call(self, job: Job) -> Outcome:
        action = job.action
        call = Call(
            proposal_id=job.proposal_id,
            tool=job.tool,
            operation=str(action["operation"]),
            resource=str(action["resource"]),
            params=action.get("params") or {},
        )
        try:
            result = self._connectors[job.tool.name].execute(call)
        except ConnectorTimeout as exc:
            return Outcome(error=self._error(f"timeout: {exc.message}"))
        except ConnectorRejected as exc:  # the action, not the target, is at fault: the breaker ignores it
            return Outcome(error=self._error(exc.message), counts_for_breaker=False)
        except ConnectorError as exc:
            return Outcome(error=self._error(exc.message))
        except Exception as exc:  # a connector bug fails the execution, never the executor
            log.exception("connector %s raised", job.tool.type)
            return Outcome(error=self._error(f"connector error: {type(exc).__name__}: {exc}"))
        try:
            return Outcome(result=bounded(self.redactor.value(result), self.redactor))
        except (TypeError, ValueError) as exc:  # e.g. a plugin returned something JSON cannot hold
            return Outcome(error=self._error(f"connector returned a result that is not JSON: {exc}"))

    def _error(self, message: str) -> str:
        return bounded_error(message, self.redactor)

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        tool = job.tool.name
        try:
            with (
                logs.context(proposal_id=job.proposal_id, agent_id=job.agent_id, tool=tool),
                tracing.execute_span(job.proposal_id, tool, job.agent_id) as span,
            ):
                outcome = self._call(job)
                recorded = self._record(job, outcome)
                status = {True: "succeeded" if outcome.ok else "failed", False: "late", None: "unrecorded"}[recorded]
                span.set_attribute("pdp.status", status)
                seconds = time.perf_counter() - started
                metrics.executed(tool, status, seconds)
                log.info("execution %s in %.1f ms", status, seconds * 1000)
        finally:
            with self._lock:
                self._inflight.discard(job.proposal_id)
            self._wake.set()

    def _record(self, job: Job, outcome: Outcome) -> bool | None:
        """Record the outcome, retrying a failing database. True: recorded; False: too late, recovery had taken
        the job over (kept as ``execution.late_result``); None: gave up (the lease lapses, recovery takes over)."""
        breaker = self._settings.breaker_for(job.tool.name)
        for attempt in range(FINISH_RETRIES):
            try:
                return self._transaction(
                    lambda conn: claims.finish(
                        conn, job, outcome, now=self._clock(), lease=self._lease, breaker=breaker
                    )
                )
            except SQLAlchemyError:
                log.exception("cannot record the outcome of %s (try %d)", job.proposal_id, attempt + 1)
                time.sleep(min(2.0**attempt * 0.2, 5.0))
        # The lease will lapse and recovery will mark the job UNKNOWN (or retry an idempotent tool).
        log.error("giving up recording the outcome of %s; recovery will take it over", job.proposal_id)
        return None
