"""Tell approvers that a proposal is waiting for them: a JSON POST to each configured webhook.

Guarantees, and their limits:

- **Never blocks a decision.** ``pending_approval`` only puts the event on a bounded in-memory queue per
  URL and returns; a daemon thread per URL does the HTTP. A full queue drops the event and logs a warning
  rather than slow the caller or grow without bound.
- **At least once per URL while the process lives.** Each URL is retried on connection errors, timeouts,
  5xx and 429, up to ``attempts`` tries with exponential backoff; a receiver may therefore see an event
  twice and should de-duplicate on ``(event, proposal_id)``. Other 4xx (and redirects, which are not
  followed) mean the receiver refused it: logged, not retried. A dead URL delays only its own queue.
- **Best effort across restarts.** The queue is not persisted: events still queued when the process dies
  are lost, and ``close`` waits only a bounded time. The proposal itself is durable and stays listed at
  ``GET /api/v1/proposals?state=pending_approval``, which is the source of truth.
- **Says little.** The body carries the proposal id, tool, resource and a link to the admin endpoint;
  never the parameters or the agent's justification, which may hold data the webhook's owner should
  only see after authenticating there.

Failures are logged on ``pdp.approvals.notify`` and never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

log = logging.getLogger("pdp.approvals.notify")

EVENT_PENDING_APPROVAL = "proposal.pending_approval"
QUEUE_SIZE = 1000
# Seconds between retries never exceed this, however many attempts are configured.
MAX_BACKOFF = 30.0


class Notifier(Protocol):
    """What the approvals flow needs: fire and forget."""

    def pending_approval(self, proposal_id: str, tool: str, resource: str) -> None: ...


def _safe_url(url: str) -> str:
    """The URL without path, query or credentials: webhook URLs often embed a secret (Slack, Teams)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


class _Sender:
    """One URL: its queue, its thread, its HTTP client."""

    def __init__(self, url: str, *, attempts: int, timeout: float, backoff: float, abandon: threading.Event) -> None:
        self.url = url
        self.label = _safe_url(url)
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._attempts = attempts
        self._timeout = timeout
        self._backoff = backoff
        self._abandon = abandon
        self.dropped = 0  # events given up when close() ran out of time
        self.thread = threading.Thread(target=self._run, name=f"pdp-notify {self.label}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout, trust_env=False, follow_redirects=False) as client:
            while True:
                try:
                    # Once close() has run out of time nothing more is sent: take what is left without waiting.
                    event = self.queue.get_nowait() if self._abandon.is_set() else self.queue.get()
                except queue.Empty:
                    return
                if event is None:  # close()'s marker: everything queued before it has been handled
                    return
                if self._abandon.is_set():
                    self.dropped += 1
                    continue
                try:
                    self._deliver(client, event)
                except Exception:  # a bug here must not kill the thread and silently end all notifications
                    log.exception("notification for proposal %s to %s failed", event["proposal_id"], self.label)

    def _deliver(self, client: httpx.Client, event: dict[str, Any]) -> None:
        problem = ""
        for attempt in range(1, self._attempts + 1):
            try:
                response = client.post(self.url, json=event)
            except httpx.TransportError as exc:  # connection refused, DNS, timeouts, broken responses
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return
                problem = f"HTTP {response.status_code}"
                if not _retryable(response.status_code):
                    log.warning(
                        "notification for proposal %s to %s refused (%s); not retrying",
                        event["proposal_id"],
                        self.label,
                        problem,
                    )
                    return
            if attempt < self._attempts:
                delay = min(MAX_BACKOFF, self._backoff * 2 ** (attempt - 1))
                # wait() rather than sleep(): close() running out of time cuts the backoff short.
                if self._abandon.wait(delay):
                    break
        log.warning(
            "notification for proposal %s to %s failed after %d attempt(s): %s",
            event["proposal_id"],
            self.label,
            attempt,
            problem,
        )


class WebhookNotifier:
    """POSTs ``proposal.pending_approval`` events to webhooks from background threads (see the module doc)."""

    def __init__(
        self, urls: Sequence[str], admin_url: str, *, attempts: int = 4, timeout: float = 5.0, backoff: float = 0.5
    ) -> None:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # Configuration is checked at startup, where a mistake can still be fixed by the operator.
                raise ValueError(f"approval webhook {_safe_url(url)!r} is not an http(s) URL")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._admin_url = admin_url.rstrip("/")
        # After close()'s timeout, how long senders get to notice and stop (a request in flight ends by timeout).
        self._grace = timeout + 1.0
        self._abandon = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._senders = [
            _Sender(url, attempts=attempts, timeout=timeout, backoff=backoff, abandon=self._abandon)
            for url in dict.fromkeys(urls)  # the same URL twice would notify twice
        ]

    def pending_approval(self, proposal_id: str, tool: str, resource: str) -> None:
        """Queue a notification to every URL and return at once."""
        event = {
            "event": EVENT_PENDING_APPROVAL,
            "proposal_id": proposal_id,
            "tool": tool,
            "resource": resource,
            "link": f"{self._admin_url}/proposals/{quote(proposal_id, safe='')}",
        }
        with self._lock:  # so no event lands behind a sender's stop marker
            if self._closed:
                log.warning("notification for proposal %s dropped: the notifier is closed", proposal_id)
                return
            for sender in self._senders:
                try:
                    sender.queue.put_nowait(event)
                except queue.Full:
                    log.warning(
                        "notification for proposal %s to %s dropped: %d notifications already queued",
                        proposal_id,
                        sender.label,
                        QUEUE_SIZE,
                    )

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop; idempotent.

        Waits up to ``timeout`` seconds for the queues to drain; if that is not enough, drops what is left
        and waits up to one request timeout more for requests in flight to end.
        """
        deadline = time.monotonic() + timeout
        with self._lock:  # after this, pending_approval queues nothing more, so the markers come last
            first, self._closed = not self._closed, True
        if first:
            for sender in self._senders:
                try:
                    # Waits while a full queue drains, so the marker goes in behind everything queued.
                    sender.queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                except queue.Full:
                    self._abandon.set()  # the sender then stops by itself once its queue is empty
        for sender in self._senders:
            sender.thread.join(max(0.0, deadline - time.monotonic()))
        if any(s.thread.is_alive() for s in self._senders):
            # Out of time: cut retries short and drop the rest rather than hold up shutdown.
            self._abandon.set()
            stop_by = time.monotonic() + self._grace
            for sender in self._senders:
                sender.thread.join(max(0.0, stop_by - time.monotonic()))
        dropped = sum(s.dropped for s in self._senders)
        if dropped or any(s.thread.is_alive() for s in self._senders):
            log.warning("approval notifier closed before delivering everything: %d notification(s) dropped", dropped)
