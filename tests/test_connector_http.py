"""The http connector against a real local HTTP server that records every request it gets."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from credential_pieces import leaked

from executor.connectors.base import (
    Call,
    ConnectorConfigError,
    ConnectorContext,
    ConnectorError,
    ConnectorRejected,
    ConnectorTimeout,
)
from executor.connectors.http import ERROR_BODY_CHARS, HttpConnector, HttpSection
from executor.redaction import Redactor
from pdp.policy.catalog import Kind, Tool

TOKEN = "tok-3f9a1c77e2b54d0e"
API_KEY = "key-from-a-file-0123456789"
HUGE_BYTES = 200_000
TRICKLE_BYTES = 60
TRICKLE_PAUSE = 0.1
SLOW_SECONDS = 5.0
OPERATIONS = {
    m: Kind.READ if m in ("GET", "HEAD") else Kind.WRITE for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Target:
    """The server's address and every request it has seen."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_handler(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, content_type: str, extra: Mapping[str, str] = {}) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            target.seen.append(Seen(self.command, self.path, headers, body))
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            try:
                if name == "fail":
                    text = f"upstream broke; you sent Authorization: {headers.get('authorization')}"
                    self._reply(500, text.encode(), "text/plain")
                elif name == "missing":
                    self._reply(404, b"", "text/plain")
                elif name == "slow":
                    target.release.wait(SLOW_SECONDS)
                    self._reply(200, b"{}", "application/json")
                elif name.startswith("padded-"):  # padded-<status>-<n>: n dots, then the credential echoed
                    _, status, pad = name.split("-")
                    text = "." * int(pad) + f"Authorization: {headers.get('authorization')}" + "." * 20
                    self._reply(int(status), text.encode(), "text/plain")
                elif name == "huge":
                    self._reply(200, b"[" + b"1," * (HUGE_BYTES // 2) + b"1]", "application/json")
                elif name == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(TRICKLE_BYTES))
                    self.end_headers()
                    for _ in range(TRICKLE_BYTES):
                        if target.release.wait(TRICKLE_PAUSE):
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                elif name == "redirect":
                    self._reply(302, b"moved", "text/plain", {"Location": "http://elsewhere.invalid/steal"})
                elif name == "text":
                    self._reply(200, "plain text, not JSON ✓".encode(), "text/plain; charset=utf-8")
                elif name == "badjson":
                    self._reply(200, b"{not json", "application/json")
                else:
                    echo = {"method": self.command, "path": self.path, "headers": headers, "body": body.decode()}
                    extra = {"ETag": '"v1"', "X-Internal-Trace": "abc", "Retry-After": "7"}
                    self._reply(201, json.dumps(echo).encode(), "application/json; charset=utf-8", extra)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the connector gave up on us, as it should

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_TRACE = _handle  # noqa: N815 - http.server names

    return Handler


@pytest.fixture
def target() -> Iterator[Target]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = Target(port=server.server_address[1])
    server.RequestHandlerClass = make_handler(state)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-http-target", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def tool(prefix: str) -> Tool:
    return Tool(name="tickets", type="http", resource_prefix=prefix, operations=OPERATIONS)


def context(tmp_path: Path, prefix: str, environ: Mapping[str, str] | None = None) -> ConnectorContext:
    (tmp_path / "key").write_text(API_KEY + "\n")
    env = {"TICKETS_TOKEN": TOKEN} if environ is None else dict(environ)
    return ConnectorContext(tool=tool(prefix), base_dir=tmp_path, environ=env)


SECTION: dict[str, Any] = {
    "timeout": "2s",
    "headers": {
        "Authorization": {"env": "TICKETS_TOKEN", "template": "Bearer {}"},
        "X-Api-Key": {"file": "key"},
    },
}


@pytest.fixture
def connector(target: Target, tmp_path: Path) -> Iterator[HttpConnector]:
    made = HttpConnector(SECTION, context(tmp_path, f"{target.base}/api/"))
    try:
        yield made
    finally:
        made.close()


def call(prefix: str, operation: str, resource: str, params: Mapping[str, Any] | None = None) -> Call:
    return Call(proposal_id="prop-123", tool=tool(prefix), operation=operation, resource=resource, params=params or {})


def test_post_sends_credentials_idempotency_key_and_json_body(connector: HttpConnector, target: Target) -> None:
    params = {"title": "printer on fire", "priority": 2}
    result = connector.execute(call(f"{target.base}/api/", "POST", f"{target.base}/api/tickets", params))
    assert result["status"] == 201
    assert result["truncated"] is False
    echoed = result["body"]
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/api/tickets"
    # The target got the credentials; the echo of them comes back scrubbed by the connector itself.
    [seen] = target.seen
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["x-api-key"] == API_KEY
    assert echoed["headers"]["authorization"] == "[REDACTED]"
    assert echoed["headers"]["x-api-key"] == "[REDACTED]"
    assert echoed["headers"]["idempotency-key"] == "prop-123"
    assert echoed["headers"]["content-type"] == "application/json"
    assert json.loads(echoed["body"]) == params


def test_only_selected_response_headers_are_returned(connector: HttpConnector, target: Target) -> None:
    result = connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/tickets/1"))
    assert result["headers"] == {"content-type": "application/json; charset=utf-8", "etag": '"v1"', "retry-after": "7"}


def test_configured_response_headers_replace_the_default(target: Target, tmp_path: Path) -> None:
    section = {**SECTION, "response_headers": ["X-Internal-Trace"]}
    made = HttpConnector(section, context(tmp_path, f"{target.base}/api/"))
    try:
        result = made.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/tickets/1"))
    finally:
        made.close()
    assert result["headers"] == {"x-internal-trace": "abc"}


@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD"])
def test_params_never_reach_the_url_or_body_without_a_body_method(
    connector: HttpConnector, target: Target, method: str
) -> None:
    params = {"id": "2", "redirect": "http://elsewhere.invalid/"}
    result = connector.execute(call(f"{target.base}/api/", method, f"{target.base}/api/tickets/1", params))
    assert result["status"] == 201
    [seen] = target.seen
    assert (seen.method, seen.path, seen.body) == (method, "/api/tickets/1", b"")
    assert seen.headers["idempotency-key"] == "prop-123"


def test_the_resource_query_string_is_sent_as_written(connector: HttpConnector, target: Target) -> None:
    prefix = f"{target.base}/api/"
    queried = Tool(name="tickets", type="http", resource_prefix=prefix, operations=OPERATIONS, query=True)
    resource = f"{target.base}/api/tickets?state=open&q=a+b%2B%3D%26&tag=%7Bx%7D"
    connector.execute(Call(proposal_id="prop-123", tool=queried, operation="GET", resource=resource, params={}))
    assert [seen.path for seen in target.seen] == ["/api/tickets?state=open&q=a+b%2B%3D%26&tag=%7Bx%7D"]


def test_a_query_is_refused_unless_the_tool_takes_one(connector: HttpConnector, target: Target) -> None:
    with pytest.raises(ConnectorError, match="query: true"):
        connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/tickets?state=open"))
    assert target.seen == []


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param("{base}/admin/users", id="outside-prefix"),
        pytest.param("{base}/api/../admin/users", id="dot-segments"),
        pytest.param("{base}/api/", id="bare-prefix"),
    ],
)
def test_a_resource_outside_the_prefix_is_refused_before_any_request(
    connector: HttpConnector, target: Target, resource: str
) -> None:
    with pytest.raises(ConnectorError, match="tickets"):
        connector.execute(call(f"{target.base}/api/", "GET", resource.format(base=target.base)))
    assert target.seen == []


def test_a_prefix_without_trailing_slash_cannot_be_extended_to_another_origin(target: Target, tmp_path: Path) -> None:
    made = HttpConnector(SECTION, context(tmp_path, "http://127.0.0.1"))
    try:
        with pytest.raises(ConnectorError, match="host of the tool's prefix"):
            made.execute(call("http://127.0.0.1", "GET", "http://127.0.0.1.elsewhere.invalid/api"))
        with pytest.raises(ConnectorError, match="host of the tool's prefix"):  # another port is another origin
            made.execute(call("http://127.0.0.1", "GET", f"{target.base}/api/x"))
    finally:
        made.close()
    assert target.seen == []
    made = HttpConnector(SECTION, context(tmp_path, target.base))
    try:
        assert made.execute(call(target.base, "GET", f"{target.base}/api/x"))["status"] == 201
    finally:
        made.close()


def test_a_non_http_scheme_is_refused(tmp_path: Path) -> None:
    made = HttpConnector(SECTION, context(tmp_path, "ftp://files.internal/"))
    try:
        with pytest.raises(ConnectorError, match="not an http"):
            made.execute(call("ftp://files.internal/", "GET", "ftp://files.internal/passwd"))
    finally:
        made.close()


def test_an_operation_that_is_not_a_method_is_refused(target: Target, tmp_path: Path) -> None:
    weird = Tool(name="tickets", type="http", resource_prefix=f"{target.base}/api/", operations={"TRACE": Kind.READ})
    (tmp_path / "key").write_text(API_KEY)
    made = HttpConnector(SECTION, ConnectorContext(tool=weird, base_dir=tmp_path, environ={"TICKETS_TOKEN": TOKEN}))
    try:
        with pytest.raises(ConnectorError, match="TRACE"):
            made.execute(Call("p", weird, "TRACE", f"{target.base}/api/x", {}))
    finally:
        made.close()
    assert target.seen == []


def test_a_redirect_is_returned_not_followed(connector: HttpConnector, target: Target) -> None:
    result = connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/redirect"))
    assert result["status"] == 302
    assert result["headers"]["location"] == "http://elsewhere.invalid/steal"
    assert result["body"] == "moved"
    assert len(target.seen) == 1


def test_an_error_status_raises_with_the_start_of_the_body(connector: HttpConnector, target: Target) -> None:
    with pytest.raises(ConnectorError) as raised:
        connector.execute(call(f"{target.base}/api/", "POST", f"{target.base}/api/fail", {"a": 1}))
    message = raised.value.message
    assert message.startswith("HTTP 500: upstream broke")
    assert not isinstance(raised.value, ConnectorRejected)  # the target failed: the breaker counts it
    # The connector reports what the server said, scrubbed before it was cut to a snippet.
    assert TOKEN not in message
    assert message.endswith("Authorization: [REDACTED]")


def test_a_client_error_with_an_empty_body_raises_too(connector: HttpConnector, target: Target) -> None:
    # A 4xx is the request's fault: rejected, so it does not count against the tool's circuit breaker.
    with pytest.raises(ConnectorRejected, match=r"^HTTP 404$"):
        connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/missing"))


def test_no_response_in_time_is_a_timeout(target: Target, tmp_path: Path) -> None:
    made = HttpConnector({**SECTION, "timeout": "300ms"}, context(tmp_path, f"{target.base}/api/"))
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorTimeout, match="tickets: no response within 300ms"):
            made.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/slow"))
    finally:
        made.close()
    assert time.monotonic() - started < SLOW_SECONDS  # it gave up rather than waiting for the answer


def test_a_body_trickling_past_the_deadline_is_a_timeout(target: Target, tmp_path: Path) -> None:
    # Each byte arrives well within the per-read timeout; only the per-call deadline stops this.
    made = HttpConnector({**SECTION, "timeout": "500ms"}, context(tmp_path, f"{target.base}/api/"))
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorTimeout, match="no response within 500ms"):
            made.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/trickle"))
    finally:
        made.close()
    assert time.monotonic() - started < TRICKLE_BYTES * TRICKLE_PAUSE  # cut off, not read to the end


def test_a_huge_body_is_truncated_and_not_parsed(target: Target, tmp_path: Path) -> None:
    made = HttpConnector({**SECTION, "max_response_bytes": 1000}, context(tmp_path, f"{target.base}/api/"))
    try:
        result = made.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/huge"))
    finally:
        made.close()
    assert result["truncated"] is True
    assert isinstance(result["body"], str)
    assert len(result["body"]) == 1000
    assert result["body"].startswith("[1,1,")


@pytest.mark.parametrize(
    ("status", "max_bytes", "limit"),
    [
        pytest.param(200, 100, 100, id="body-limit"),
        pytest.param(400, 100, ERROR_BODY_CHARS, id="4xx-read-limit"),
        pytest.param(400, 10_000, ERROR_BODY_CHARS, id="4xx-snippet"),
        pytest.param(503, 10_000, ERROR_BODY_CHARS, id="5xx-snippet"),
    ],
)
def test_no_piece_of_a_credential_survives_any_cut(
    target: Target, tmp_path: Path, status: int, max_bytes: int, limit: int
) -> None:
    """The echoed credential slides, one character at a time, across the cut (the body limit, the error
    snippet) and across the read limit past ``max_response_bytes``: it comes back whole and scrubbed, or not at all."""
    redactor = Redactor()
    section = {**SECTION, "max_response_bytes": max_bytes}
    made = HttpConnector(section, replace(context(tmp_path, f"{target.base}/api/"), redactor=redactor))
    credential = len(f"Bearer {TOKEN}")
    edges = {min(limit, max_bytes), max_bytes + redactor.overlap}  # the cut, and the read limit
    starts = sorted({start for edge in edges for start in range(edge - credential - 2, edge + 3)})
    scrubbed = 0
    try:
        for start in starts:  # where the credential starts in the body
            resource = f"{target.base}/api/padded-{status}-{start - len('Authorization: ')}"
            if status < 400:
                result = made.execute(call(f"{target.base}/api/", "GET", resource))
                text = result["body"]
                assert len(text.encode()) <= max_bytes
            else:
                with pytest.raises(ConnectorError) as raised:
                    made.execute(call(f"{target.base}/api/", "GET", resource))
                text = raised.value.message.removeprefix(f"HTTP {status}: ")
                assert len(text) <= limit
            assert leaked(text, TOKEN) == [], (start, text)
            scrubbed += "[REDACTED]" in text
    finally:
        made.close()
    assert scrubbed > 0  # where the whole credential came before the cut, it was replaced, not dropped


def test_a_body_that_fits_once_scrubbed_comes_back_whole(
    connector: HttpConnector, target: Target, tmp_path: Path
) -> None:
    # The echo is longer than the limit only by the credentials in it, which scrubbing shortens.
    echo = connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/tickets/1"))["body"]
    scrubbed = len(json.dumps(echo))  # the target writes its JSON the same way
    raw = scrubbed + len(f"Bearer {TOKEN}") + len(API_KEY) - 2 * len("[REDACTED]")
    made = HttpConnector({**SECTION, "max_response_bytes": scrubbed}, context(tmp_path, f"{target.base}/api/"))
    try:
        result = made.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/tickets/1"))
    finally:
        made.close()
    assert raw > scrubbed
    assert result["truncated"] is False
    assert result["body"] == echo


def test_the_connector_registers_its_credentials_with_the_shared_redactor(target: Target, tmp_path: Path) -> None:
    shared = Redactor()
    made = HttpConnector(SECTION, replace(context(tmp_path, f"{target.base}/api/"), redactor=shared))
    made.close()
    assert shared.text(f"{TOKEN} {API_KEY} Bearer {TOKEN}") == "[REDACTED] [REDACTED] [REDACTED]"


def test_a_body_within_the_limit_is_whole_and_parsed(connector: HttpConnector, target: Target) -> None:
    result = connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/huge"))
    assert result["truncated"] is False
    assert isinstance(result["body"], list)
    assert len(result["body"]) == HUGE_BYTES // 2 + 1


@pytest.mark.parametrize(
    ("name", "body"), [("text", "plain text, not JSON ✓"), ("badjson", "{not json")], ids=["text", "bad-json"]
)
def test_a_body_that_is_not_json_comes_back_as_text(
    connector: HttpConnector, target: Target, name: str, body: str
) -> None:
    result = connector.execute(call(f"{target.base}/api/", "GET", f"{target.base}/api/{name}"))
    assert result["body"] == body
    assert result["truncated"] is False


def test_a_connection_failure_names_the_host_and_no_credential(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    made = HttpConnector(SECTION, context(tmp_path, f"{base}/api/"))
    try:
        with pytest.raises(ConnectorError) as raised:
            made.execute(call(f"{base}/api/", "GET", f"{base}/api/tickets"))
    finally:
        made.close()
    assert raised.value.message == "tickets: ConnectError talking to 127.0.0.1"


def test_concurrent_calls_share_one_connector(connector: HttpConnector, target: Target) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            result = connector.execute(call(f"{target.base}/api/", "PUT", f"{target.base}/api/tickets/{i}", {"i": i}))
            assert json.loads(result["body"]["body"]) == {"i": i}
            results.append(result["status"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert results == [201] * 16
    assert sorted(seen.path for seen in target.seen) == sorted(f"/api/tickets/{i}" for i in range(16))


# --- configuration ---------------------------------------------------------------------------------


def test_secrets_cover_raw_and_templated_values(connector: HttpConnector) -> None:
    values = {secret.reveal() for secret in connector.secrets()}
    assert values == {TOKEN, f"Bearer {TOKEN}", API_KEY}


def test_no_secret_in_any_repr(connector: HttpConnector, tmp_path: Path) -> None:
    config = HttpSection.model_validate(SECTION)
    shown = " ".join([repr(connector), str(connector), repr(config), str(config), repr(connector.secrets())])
    assert TOKEN not in shown
    assert API_KEY not in shown


def test_an_inline_credential_is_a_config_error(tmp_path: Path) -> None:
    section = {"headers": {"Authorization": "Bearer inline-credential-999"}}
    with pytest.raises(ConnectorConfigError, match="credentials are referenced, never inline") as raised:
        HttpConnector(section, context(tmp_path, "http://127.0.0.1/api/"))
    assert "inline-credential-999" not in str(raised.value)
    assert "tool tickets" in str(raised.value)


def test_a_missing_variable_is_a_config_error_naming_it(tmp_path: Path) -> None:
    environ = {"SOMETHING_ELSE": "value-that-is-not-for-you"}
    with pytest.raises(ConnectorConfigError) as raised:
        HttpConnector(SECTION, context(tmp_path, "http://127.0.0.1/api/", environ))
    message = str(raised.value)
    assert "tool tickets" in message and "headers.Authorization" in message and "TICKETS_TOKEN" in message
    assert "value-that-is-not-for-you" not in message and API_KEY not in message


def test_an_unreadable_credential_file_is_a_config_error(tmp_path: Path) -> None:
    section = {"headers": {"X-Api-Key": {"file": "no-such-file"}}}
    with pytest.raises(ConnectorConfigError, match=r"headers\.X-Api-Key.*no-such-file"):
        HttpConnector(section, context(tmp_path, "http://127.0.0.1/api/"))


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        pytest.param({"timeout": "soon"}, "timeout", id="bad-timeout"),
        pytest.param({"timeout": 10}, "timeout", id="timeout-without-unit"),
        pytest.param({"max_response_bytes": 0}, "max_response_bytes", id="zero-limit"),
        pytest.param({"verify_tls": "yes"}, "verify_tls", id="string-bool"),
        pytest.param({"follow_redirects": True}, "follow_redirects", id="unknown-key"),
        pytest.param({"headers": {"A": {"env": "TICKETS_TOKEN", "template": "x"}}}, "template", id="no-placeholder"),
        pytest.param({"headers": {"A": {"env": "X", "file": "y"}}}, "exactly one", id="two-sources"),
        pytest.param({"headers": {"Host": {"env": "TICKETS_TOKEN"}}}, "Host", id="reserved-header"),
        pytest.param({"headers": {"Bad Name": {"env": "TICKETS_TOKEN"}}}, "header name", id="bad-header-name"),
    ],
)
def test_invalid_sections_are_config_errors_naming_the_key(
    tmp_path: Path, section: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConnectorConfigError, match=f"tool tickets: .*{problem}"):
        HttpConnector(section, context(tmp_path, "http://127.0.0.1/api/"))
