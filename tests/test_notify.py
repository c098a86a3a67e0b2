"""Approval webhooks against a real local HTTP server that records every request."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import free_port

from pdp.approvals import notify
from pdp.approvals.notify import WebhookNotifier

WAIT = 30.0  # generous bound on waits for background threads; never a timing assertion
BACKOFF = 0.01  # seconds: retries quickly, still exercising the backoff path


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Recorder:
    """What the server saw, and what it answers: per path, a list of statuses used in turn, then 200."""

    base: str = ""
    requests: list[Received] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    # Set to hold every request until released (to show the caller never waits for the receiver).
    gate: threading.Event | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def to(self, path: str) -> list[Received]:
        with self.changed:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, count: int) -> list[Received]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.to(path)) >= count, WAIT), self.requests
        return self.to(path)


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with recorder.changed:
                recorder.requests.append(Received(self.path, dict(self.headers), body))
                script = recorder.script.get(self.path, [])
                status = script.pop(0) if script else 200
                recorder.changed.notify_all()
            if recorder.gate is not None:
                recorder.gate.wait(WAIT)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "/redirected")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    recorder.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield recorder
    finally:
        if recorder.gate is not None:
            recorder.gate.set()
        httpd.shutdown()
        httpd.server_close()


def test_payload_is_exactly_the_specified_fields(server: Recorder) -> None:
    notifier = WebhookNotifier([server.base + "/hook"], "https://pdp.example.com/admin/", backoff=BACKOFF)
    notifier.pending_approval("0b7e-42", "tickets.bulk_close", "http://127.0.0.1:8282/api/tickets/bulk-close")
    [request] = server.wait_for("/hook", 1)
    notifier.close(WAIT)

    assert request.body == {
        "event": "proposal.pending_approval",
        "proposal_id": "0b7e-42",
        "tool": "tickets.bulk_close",
        "resource": "http://127.0.0.1:8282/api/tickets/bulk-close",
        "link": "https://pdp.example.com/admin/proposals/0b7e-42",
    }
    assert request.headers["Content-Type"] == "application/json"
    assert "params" not in json.dumps(request.body) and "justification" not in json.dumps(request.body)


def test_server_errors_and_429_are_retried_until_success(server: Recorder) -> None:
    server.script = {"/flaky": [500, 503, 429]}
    notifier = WebhookNotifier([server.base + "/flaky"], "http://admin", attempts=4, backoff=BACKOFF)
    notifier.pending_approval("p1", "t", "r")
    notifier.close(WAIT)  # drains: every retry has happened by the time it returns
    assert [r.body["proposal_id"] for r in server.to("/flaky")] == ["p1"] * 4


def test_retries_stop_after_attempts_and_are_logged(server: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    server.script = {"/down": [500] * 10}
    notifier = WebhookNotifier([server.base + "/down"], "http://admin", attempts=3, backoff=BACKOFF)
    with caplog.at_level(logging.WARNING, logger="pdp.approvals.notify"):
        notifier.pending_approval("p2", "t", "r")
        notifier.close(WAIT)
    assert len(server.to("/down")) == 3
    assert "p2" in caplog.text and "HTTP 500" in caplog.text and "3 attempt" in caplog.text


@pytest.mark.parametrize("status", [400, 404, 302])
def test_client_errors_and_redirects_are_not_retried(
    status: int, server: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = {"/refuses": [status] * 10}
    notifier = WebhookNotifier([server.base + "/refuses"], "http://admin", attempts=4, backoff=BACKOFF)
    with caplog.at_level(logging.WARNING, logger="pdp.approvals.notify"):
        notifier.pending_approval("p3", "t", "r")
        notifier.close(WAIT)
    assert len(server.to("/refuses")) == 1
    assert server.to("/redirected") == []
    assert f"HTTP {status}" in caplog.text and "not retrying" in caplog.text


def test_a_dead_url_neither_blocks_the_caller_nor_the_other_urls(
    server: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # A closed port, a path holding a secret, and a backoff so long that waiting for it would hang the test.
    dead = f"http://127.0.0.1:{free_port()}/hooks/s3cret-path"
    notifier = WebhookNotifier([dead, server.base + "/live"], "http://admin", attempts=5, backoff=3600.0)
    server.gate = threading.Event()  # the live receiver holds every request until released
    with caplog.at_level(logging.WARNING, logger="pdp.approvals.notify"):
        notifier.pending_approval("p4", "t", "r")  # returns although neither URL has answered
        server.wait_for("/live", 1)
        server.gate.set()
        notifier.close(0.5)  # the dead URL is in its hour-long backoff: close gives up on it
    assert [r.body["proposal_id"] for r in server.to("/live")] == ["p4"]
    assert "ConnectError" in caplog.text and "p4" in caplog.text
    assert "s3cret" not in caplog.text  # webhook URLs often embed credentials


def test_close_drains_the_queue(server: Recorder) -> None:
    urls = [server.base + "/a", server.base + "/b"]
    notifier = WebhookNotifier(urls, "http://admin", backoff=BACKOFF)
    for i in range(20):
        notifier.pending_approval(f"p{i}", "t", "r")
    notifier.close(WAIT)
    expected = [f"p{i}" for i in range(20)]
    assert [r.body["proposal_id"] for r in server.to("/a")] == expected
    assert [r.body["proposal_id"] for r in server.to("/b")] == expected

    notifier.pending_approval("late", "t", "r")  # after close: dropped, not raised
    notifier.close(WAIT)  # idempotent
    assert all(r.body["proposal_id"] != "late" for r in server.requests)


def test_a_full_queue_drops_and_warns_instead_of_blocking(
    server: Recorder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "QUEUE_SIZE", 2)
    server.gate = threading.Event()
    notifier = WebhookNotifier([server.base + "/slow"], "http://admin", backoff=BACKOFF)
    with caplog.at_level(logging.WARNING, logger="pdp.approvals.notify"):
        notifier.pending_approval("in-flight", "t", "r")
        server.wait_for("/slow", 1)  # the sender is now stuck in this request; its queue is empty
        for name in ("q1", "q2", "overflow"):
            notifier.pending_approval(name, "t", "r")
        server.gate.set()
        notifier.close(WAIT)
    assert [r.body["proposal_id"] for r in server.to("/slow")] == ["in-flight", "q1", "q2"]
    assert "overflow" in caplog.text and "dropped" in caplog.text


def test_proxy_settings_in_the_environment_are_ignored(server: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    notifier = WebhookNotifier([server.base + "/direct"], "http://admin", attempts=1, backoff=BACKOFF)
    notifier.pending_approval("p5", "t", "r")
    notifier.close(WAIT)
    assert len(server.to("/direct")) == 1


def test_bad_configuration_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="not an http"):
        WebhookNotifier(["ftp://example.com/hook"], "http://admin")
    with pytest.raises(ValueError, match="attempts"):
        WebhookNotifier([], "http://admin", attempts=0)
