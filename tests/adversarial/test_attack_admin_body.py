"""Anyone who can reach the admin port sends it a huge body, without a token, to grow ``pdp serve``'s memory.

``pdp serve`` holds the gRPC API and the admin endpoint in one process, so memory the admin endpoint spends is
taken from every agent. Before the fix FastAPI read (and joined) the whole body before the route's
authentication ran: an unauthenticated 400 MiB POST grew the process by more than a GiB and only then got its
401. Now a body over 64 KiB is refused with 413 before it is read (by its Content-Length), a chunked one once
past 64 KiB, and an /api/ request without a valid token is refused before any of its body is read.

Everything runs against a real ``pdp serve`` subprocess; memory is the kernel's view of it (/proc/<pid>/status).
"""

from __future__ import annotations

import re
import select
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ServeProcess, pdp_env, start_serve

from pdp.identity.approvers import add_approver
from pdp.store.database import create_db_engine

MiB = 1024 * 1024
CAP = 64 * 1024
HUGE = 200 * MiB  # what the attacker offers; it must never get near the server's memory
# Generous: the kernel's socket buffers and allocator noise, far below what reading the body would cost.
GROWTH_LIMIT = 48 * MiB
CHUNK = b"x" * MiB


@dataclass
class Admin:
    serve: ServeProcess
    host: str
    port: int
    token: str  # a real approver's

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the pdp serve process, in bytes."""
        status = Path(f"/proc/{self.serve.process.pid}/status").read_text()
        values = {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}
        return values["VmRSS"], values["VmHWM"]


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> Iterator[Admin]:
    token = add_approver(create_db_engine(database_url), "lead-1", ["support-leads"])
    serve = start_serve(database_url, tmp_path, pdp_env(tmp_path))
    try:
        found = re.search(r"admin endpoint on http://([\d.]+):(\d+)/", serve.stdout.read_text())
        assert found, serve.output()
        made = Admin(serve, found.group(1), int(found.group(2)), token)
        with httpx.Client(base_url=made.url, timeout=30) as client:  # warm up every route kind once
            assert client.get("/healthz").status_code == 200
            assert client.get("/api/v1/proposals", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert client.get("/login").status_code == 200
        yield made
    finally:
        serve.stop()


def offer(admin: Admin, head: bytes, body_chunks: Iterator[bytes]) -> tuple[int, int]:
    """Send ``head``, then body chunks for as long as the server takes them; (status it answered, bytes sent).

    The server may answer at any point: every chunk is sent only when the socket is writable, and the answer is
    read as soon as one is there. A server that stops reading simply makes the socket unwritable.
    """
    sent = 0
    with socket.create_connection((admin.host, admin.port), timeout=60) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        pending = b""
        stalled = 0
        while True:
            readable, writable, _ = select.select([sock], [sock] if (pending or body_chunks) else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                answer += data
                if not data or b"\r\n\r\n" in answer:
                    break
                continue
            if writable:
                if not pending:
                    pending = next(body_chunks, b"")
                    if not pending:
                        body_chunks = iter(())
                        continue
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += n
                pending = pending[n:]
                stalled = 0
                continue
            stalled += 1
            assert stalled < 60, f"no answer after {sent} bytes"
    status = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert status, answer[:200]
    return int(status.group(1)), sent


def plain(total: int) -> Iterator[bytes]:
    for _ in range(total // MiB):
        yield CHUNK


def chunked(total: int) -> Iterator[bytes]:
    frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n"
    for _ in range(total // MiB):
        yield frame
    yield b"0\r\n\r\n"


def request_head(admin: Admin, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {admin.host}:{admin.port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


VOTE = f"/api/v1/proposals/{uuid.uuid4()}/approve"


@pytest.mark.parametrize(
    ("path", "content_type", "auth"),
    [
        pytest.param(VOTE, "application/json", False, id="api-no-token"),
        pytest.param(VOTE, "application/json", True, id="api-with-token"),
        pytest.param("/login", "application/x-www-form-urlencoded", False, id="login-form"),
        pytest.param("/no/such/page", "application/octet-stream", False, id="unknown-path"),
    ],
)
def test_a_huge_body_with_a_length_is_refused_unread(admin: Admin, path: str, content_type: str, auth: bool) -> None:
    _, peak_before = admin.memory()
    headers = {"Content-Type": content_type, "Content-Length": str(HUGE)}
    if auth:
        headers["Authorization"] = f"Bearer {admin.token}"
    status, sent = offer(admin, request_head(admin, path, headers), plain(HUGE))
    _, peak_after = admin.memory()
    assert peak_after - peak_before < GROWTH_LIMIT, f"pdp serve grew by {(peak_after - peak_before) // MiB} MiB"
    assert status == 413
    assert sent < HUGE // 4  # the server stopped taking it long before the end


@pytest.mark.parametrize(
    ("path", "content_type", "auth", "expected"),
    [
        # No token: refused before a byte of the body is read, whatever its length.
        pytest.param(VOTE, "application/json", False, 401, id="api-no-token"),
        pytest.param(VOTE, "application/json", True, 413, id="api-with-token"),
        pytest.param("/login", "application/x-www-form-urlencoded", False, 413, id="login-form"),
    ],
)
def test_a_huge_chunked_body_is_refused_past_the_cap(
    admin: Admin, path: str, content_type: str, auth: bool, expected: int
) -> None:
    _, peak_before = admin.memory()
    headers = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
    if auth:
        headers["Authorization"] = f"Bearer {admin.token}"
    status, sent = offer(admin, request_head(admin, path, headers), chunked(HUGE))
    _, peak_after = admin.memory()
    assert peak_after - peak_before < GROWTH_LIMIT, f"pdp serve grew by {(peak_after - peak_before) // MiB} MiB"
    assert status == expected
    assert sent < HUGE // 4


def test_legitimate_requests_still_work_and_the_cap_is_exact(admin: Admin) -> None:
    auth = {"Authorization": f"Bearer {admin.token}"}
    with httpx.Client(base_url=admin.url, timeout=30) as client:
        assert client.get("/healthz").json()["status"] == "serving"
        assert client.get("/api/v1/proposals", headers=auth).json()["proposals"] == []
        # A body at the cap is read and judged on its merits (no such proposal); one byte more is refused.
        comment = "c" * 4000
        at_cap = b'{"action_digest": "' + b"0" * 64 + b'", "comment": "' + comment.encode() + b'"}'
        at_cap += b" " * (CAP - len(at_cap))
        response = client.post(VOTE, headers={**auth, "Content-Type": "application/json"}, content=at_cap)
        assert response.status_code == 404, response.text
        over = client.post(VOTE, headers={**auth, "Content-Type": "application/json"}, content=at_cap + b" ")
        assert over.status_code == 413
        assert over.json()["error"] == f"request body larger than {CAP} bytes"
        # A wrong token on the API is still a plain 401 with its challenge.
        wrong = client.post(VOTE, headers={"Authorization": "Bearer pdp_wrong"}, json={"comment": "hi"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        # The login page still signs in (its form is read, as it must be).
        page = client.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf, page.text
        signed_in = client.post("/login", data={"token": admin.token, "csrf_token": csrf.group(1)})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
    assert admin.serve.process.poll() is None
