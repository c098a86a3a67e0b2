"""A small ticketing HTTP API, the demo target of the ``tickets`` tool (standard library only).

Run it with ``python -m demo.tickets [--addr 127.0.0.1:8282] [--token-file F] [--data F]``; every request needs
``Authorization: Bearer <token>``, the token being the token file's content. Endpoints (JSON in and out):

    GET    /api/tickets[?status=open&limit=100]  list, newest first                    -> 200 {"tickets": [...]}
    POST   /api/tickets                          {title, body?, priority?, customer?}  -> 201 + Location, the ticket
    GET    /api/tickets/<id>                     one ticket                            -> 200
    PATCH  /api/tickets/<id>                     {status?, priority?, title?, body?, customer?} -> 200
    DELETE /api/tickets/<id>                                                            -> 204
    POST   /api/tickets/bulk-close               {ids: [...]} or {count: n} (the n oldest open) -> 200
    GET    /api/_stats                           {requests, creates, replays}           -> 200

Writes honour ``Idempotency-Key`` (the executor sends the proposal id): a key seen before replays the stored
response (a create answers 200 instead of 201, with the same ticket) and changes nothing; a key reused for a
different request is 422. Errors are ``{"error": message, "field": name}`` (``field`` only when one is to blame).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast
from urllib.parse import parse_qs, urlsplit

DEFAULT_ADDR = "127.0.0.1:8282"
DEFAULT_TOKEN_FILE = ".pdp/demo/tickets.token"  # noqa: S105 - a path, not the token
DEFAULT_DATA = ".pdp/demo/tickets.db"

PRIORITIES = ("low", "normal", "high", "critical")
STATUSES = ("open", "pending", "closed")
MAX_TITLE = 200
MAX_CUSTOMER = 200
MAX_BODY = 20_000
MAX_REQUEST_BYTES = 64 * 1024
MAX_DRAIN_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 200
MAX_LIST = 1000
MAX_BULK = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    customer TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- One row per Idempotency-Key: what the request was, and the response to replay.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL
);
-- Kept in the database, not in memory, so a test that restarts the server still counts every call.
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class ApiError(Exception):
    """An answer other than success; ``field`` names the offending input when there is one."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        out = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any = None  # JSON-serialisable; None sends no body
    headers: dict[str, str] = field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- validation -------------------------------------------------------------------------------------------------


def _text(data: dict[str, Any], name: str, limit: int, *, blank_ok: bool = True) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", name)
    if len(value) > limit:
        raise ApiError(400, f"{name} must be at most {limit} characters", name)
    if not blank_ok and not value.strip():
        raise ApiError(400, f"{name} must not be blank", name)
    return value


def _choice(data: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = data[name]
    if value not in choices or not isinstance(value, str):
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}", name)
    return value


def _reject_unknown(data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    # Typos ("priorty") must not be silently dropped: the agent would think it set them.
    for name in sorted(data):
        if name not in allowed:
            raise ApiError(400, f"unknown field {name!r}; allowed: {', '.join(allowed)}", name)


def validate_new(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a new ticket, with defaults filled in."""
    _reject_unknown(data, ("title", "body", "priority", "customer"))
    if "title" not in data:
        raise ApiError(400, "title is required", "title")
    fields: dict[str, Any] = {"title": _text(data, "title", MAX_TITLE, blank_ok=False), "body": "", "customer": None}
    fields["priority"] = _choice(data, "priority", PRIORITIES) if "priority" in data else "normal"
    if "body" in data:
        fields["body"] = _text(data, "body", MAX_BODY)
    if data.get("customer") is not None:
        fields["customer"] = _text(data, "customer", MAX_CUSTOMER)
    return fields


def validate_patch(data: dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH changes; at least one."""
    _reject_unknown(data, ("title", "body", "priority", "status", "customer"))
    if not data:
        raise ApiError(400, "nothing to change: give at least one of title, body, priority, status, customer")
    fields: dict[str, Any] = {}
    if "title" in data:
        fields["title"] = _text(data, "title", MAX_TITLE, blank_ok=False)
    if "body" in data:
        fields["body"] = _text(data, "body", MAX_BODY)
    if "priority" in data:
        fields["priority"] = _choice(data, "priority", PRIORITIES)
    if "status" in data:
        fields["status"] = _choice(data, "status", STATUSES)
    if "customer" in data:
        fields["customer"] = None if data["customer"] is None else _text(data, "customer", MAX_CUSTOMER)
    return fields


def _positive_int(value: Any, name: str, limit: int) -> int:
    # bool is an int in Python, and true must not mean ticket 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ApiError(400, f"{name} must be an integer from 1 to {limit}", name)
    return value


def validate_bulk(data: dict[str, Any]) -> dict[str, Any]:
    """``{"ids": [...]}`` or ``{"count": n}``, exactly one."""
    _reject_unknown(data, ("ids", "count"))
    if ("ids" in data) == ("count" in data):
        raise ApiError(400, "give exactly one of ids (a list of ticket ids) or count (close the oldest open)", "ids")
    if "count" in data:
        return {"count": _positive_int(data["count"], "count", MAX_BULK)}
    ids = data["ids"]
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BULK:
        raise ApiError(400, f"ids must be a list of 1 to {MAX_BULK} ticket ids", "ids")
    return {"ids": sorted({_positive_int(i, "ids", 2**63 - 1) for i in ids})}


# --- storage ----------------------------------------------------------------------------------------------------


def _row_to_ticket(row: sqlite3.Row) -> dict[str, Any]:
    return {name: row[name] for name in row.keys()}  # noqa: SIM118 - sqlite3.Row iterates values, not keys


class TicketStore:
    """The SQLite file behind the API. One connection behind a lock: the demo needs correctness, not throughput."""

    def __init__(self, path: Path | str, clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _bump(self, db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1",
            (name,),
        )

    def count_request(self) -> None:
        with self._transaction() as db:
            self._bump(db, "requests")

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {name: int(counts.get(name, 0)) for name in ("requests", "creates", "replays")}

    def _get(self, db: sqlite3.Connection, ticket_id: int) -> dict[str, Any]:
        row = db.execute("SELECT * FROM tickets WHERE id = ?", (ticket_id,)).fetchone()
        if row is None:
            raise ApiError(404, f"no ticket {ticket_id}")
        return _row_to_ticket(row)

    def get(self, ticket_id: int) -> dict[str, Any]:
        with self._lock:
            return self._get(self._db, ticket_id)

    def list_tickets(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ("WHERE status = ?", (status,)) if status is not None else ("", ())
        with self._lock:
            query = f"SELECT * FROM tickets {where} ORDER BY id DESC LIMIT ?"  # noqa: S608 - fixed fragments only
            rows = self._db.execute(query, (*args, limit))
            return [_row_to_ticket(row) for row in rows]

    def write(self, key: str | None, request: str, action: Callable[[sqlite3.Connection], Reply]) -> tuple[Reply, bool]:
        """Run ``action`` in one transaction, or replay the response stored under ``key``; True means replayed.

        The key check and the write share the transaction, so two concurrent requests with one key create one
        ticket. Only successes are stored: a failed request may be retried with the same key.
        """
        with self._transaction() as db:
            if key is not None:
                seen = db.execute("SELECT request, status, response FROM idempotency_keys WHERE key = ?", (key,))
                row = seen.fetchone()
                if row is not None:
                    if row["request"] != request:
                        raise ApiError(
                            422, "Idempotency-Key was already used for a different request", "Idempotency-Key"
                        )
                    self._bump(db, "replays")
                    stored = json.loads(row["response"])
                    return Reply(row["status"], stored["body"], stored["headers"]), True
            reply = action(db)
            if key is not None and 200 <= reply.status < 300:
                db.execute(
                    "INSERT INTO idempotency_keys (key, request, status, response, created_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        key,
                        request,
                        reply.status,
                        json.dumps({"body": reply.body, "headers": reply.headers}),
                        self._now(),
                    ),
                )
            return reply, False

    def _now(self) -> str:
        return _timestamp(self._clock())

    # Actions for write(): each runs inside its transaction.

    def create(self, fields: dict[str, Any]) -> Callable[[sqlite3.Connection], Reply]:
        def action(db: sqlite3.Connection) -> Reply:
            now = self._now()
            cursor = db.execute(
                "INSERT INTO tickets (title, body, priority, status, customer, created_at, updated_at)"
                " VALUES (?, ?, ?, 'open', ?, ?, ?)",
                (fields["title"], fields["body"], fields["priority"], fields["customer"], now, now),
            )
            self._bump(db, "creates")
            ticket = self._get(db, cast(int, cursor.lastrowid))
            return Reply(201, ticket, {"Location": f"/api/tickets/{ticket['id']}"})

        return action

    def update(self, ticket_id: int, fields: dict[str, Any]) -> Callable[[sqlite3.Connection], Reply]:
        def action(db: sqlite3.Connection) -> Reply:
            self._get(db, ticket_id)
            assignments = ", ".join(f"{name} = ?" for name in fields)  # names come from validate_patch only
            db.execute(
                f"UPDATE tickets SET {assignments}, updated_at = ? WHERE id = ?",  # noqa: S608
                (*fields.values(), self._now(), ticket_id),
            )
            return Reply(200, self._get(db, ticket_id))

        return action

    def delete(self, ticket_id: int) -> Callable[[sqlite3.Connection], Reply]:
        def action(db: sqlite3.Connection) -> Reply:
            self._get(db, ticket_id)
            db.execute("DELETE FROM tickets WHERE id = ?", (ticket_id,))
            return Reply(204)

        return action

    def bulk_close(self, spec: dict[str, Any]) -> Callable[[sqlite3.Connection], Reply]:
        def action(db: sqlite3.Connection) -> Reply:
            if "count" in spec:
                rows = db.execute(
                    "SELECT id FROM tickets WHERE status != 'closed' ORDER BY id LIMIT ?", (spec["count"],)
                )
                ids = [row["id"] for row in rows]
            else:
                ids = spec["ids"]
                placeholders = ", ".join("?" * len(ids))
                query = f"SELECT id FROM tickets WHERE id IN ({placeholders})"  # noqa: S608 - placeholders only
                found = {row["id"] for row in db.execute(query, ids)}
                missing = [i for i in ids if i not in found]
                if missing:
                    raise ApiError(404, f"no ticket {missing[0]}", "ids")
            now = self._now()
            db.executemany("UPDATE tickets SET status = 'closed', updated_at = ? WHERE id = ?", [(now, i) for i in ids])
            return Reply(200, {"closed": ids, "count": len(ids)})

        return action


# --- HTTP -------------------------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    # A request path is attacker-controlled: escape anything that could forge or split a log line.
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def _fingerprint(method: str, path: str, fields: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{method} {path} {digest}"


class TicketServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], token: str, store: TicketStore, log: TextIO) -> None:
        if not token:
            raise ValueError("the tickets token is empty")
        self.token = token.encode("utf-8")
        self.store = store
        self.log = log
        self.log_lock = threading.Lock()
        super().__init__(addr, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server_version = "demo-tickets/1"

    def version_string(self) -> str:
        return self.server_version  # no Python version: nothing for a scanner to match

    @property
    def app(self) -> TicketServer:
        return cast(TicketServer, self.server)

    def __getattr__(self, name: str) -> Callable[[], None]:
        # Every verb lands in _dispatch, so PUT, HEAD or a made-up one get 405 rather than the stdlib's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Method, path and status only: headers (Authorization above all) never reach the log.
        path = urlsplit(self.path or "").path if self.command else "-"
        self._log(f"{self.command or '-'} {_printable(path)} {code}")

    def log_message(self, format: str, *args: Any) -> None:
        self._log(_printable(format % args))

    def _log(self, line: str) -> None:
        with self.app.log_lock:
            self.app.log.write(f"tickets: {line}\n")
            self.app.log.flush()

    def _dispatch(self) -> None:
        try:
            reply = self._handle()
        except ApiError as exc:
            reply = Reply(exc.status, exc.body(), exc.headers)
        except Exception as exc:  # a bug must not kill the thread silently, nor leak details to the client
            self._log(f"internal error: {exc.__class__.__name__}: {_printable(str(exc))}")
            reply = Reply(500, {"error": "internal error"})
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(411, "send a Content-Length; chunked bodies are not supported")
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length < 0:
            raise ApiError(400, "bad Content-Length")
        if length > MAX_REQUEST_BYTES:
            # Closing on unread bytes makes the kernel reset the connection, and the client would see that
            # instead of the 413; a modest excess is read and dropped so the answer arrives.
            if length <= MAX_DRAIN_BYTES:
                while length > 0:
                    length -= len(self.rfile.read(min(length, 64 * 1024))) or length
            self.close_connection = True
            raise ApiError(413, f"request body over {MAX_REQUEST_BYTES} bytes")
        return self.rfile.read(length)

    def _authorised(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.app.token)

    def _json(self, raw: bytes) -> dict[str, Any]:
        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def _idempotency_key(self) -> str | None:
        key = self.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key")
        return key

    def _handle(self) -> Reply:
        url = urlsplit(self.path)
        path, method = url.path, self.command
        store = self.app.store
        # _stats reads do not count themselves, so a test sees exactly the calls made by what it tests.
        if path != "/api/_stats":
            store.count_request()
        raw = self._read_body()  # read before answering, or an unread body could reset the connection
        if not self._authorised():
            raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        if path == "/api/_stats":
            self._allow(("GET",))
            return Reply(200, store.stats())
        if path == "/api/tickets":
            self._allow(("GET", "POST"))
            if method == "GET":
                return Reply(200, {"tickets": self._list(url.query)})
            fields = validate_new(self._json(raw))
            return self._write(path, fields, store.create(fields))
        if path == "/api/tickets/bulk-close":
            self._allow(("POST",))
            spec = validate_bulk(self._json(raw))
            return self._write(path, spec, store.bulk_close(spec))
        prefix, _, tail = path.rpartition("/")
        if prefix != "/api/tickets" or not tail.isascii() or not tail.isdigit() or len(tail) > 18:
            raise ApiError(404, f"no such resource: {_printable(path)}")
        ticket_id = int(tail)
        self._allow(("GET", "PATCH", "DELETE"))
        if method == "GET":
            return Reply(200, store.get(ticket_id))
        if method == "PATCH":
            changes = validate_patch(self._json(raw))
            return self._write(path, changes, store.update(ticket_id, changes))
        return self._write(path, {}, store.delete(ticket_id))

    def _allow(self, methods: tuple[str, ...]) -> None:
        if self.command not in methods:
            allowed = ", ".join(methods)
            raise ApiError(405, f"{_printable(self.command)} is not allowed here", headers={"Allow": allowed})

    def _list(self, query: str) -> list[dict[str, Any]]:
        params = parse_qs(query, keep_blank_values=True)
        status = params.get("status", [None])[-1]
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(STATUSES)}", "status")
        limit_text = params.get("limit", [str(MAX_LIST)])[-1]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST}", "limit")
        return self.app.store.list_tickets(status, int(limit_text))

    def _write(self, path: str, fields: dict[str, Any], action: Callable[[sqlite3.Connection], Reply]) -> Reply:
        request = _fingerprint(self.command, path, fields)
        reply, replayed = self.app.store.write(self._idempotency_key(), request, action)
        if replayed and reply.status == 201:
            # 200 tells the client "done earlier, here it is"; 201 would claim a second creation.
            return Reply(200, reply.body, reply.headers)
        return reply


# --- running ----------------------------------------------------------------------------------------------------


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def start_server(
    addr: tuple[str, int] | str, token: str, data_path: Path | str, log: TextIO | None = None
) -> tuple[TicketServer, threading.Thread]:
    """Serve in a background thread (port 0 picks a free one: ``server.port``); stop with :func:`stop_server`."""
    store = TicketStore(data_path)
    try:
        server = TicketServer(parse_addr(addr) if isinstance(addr, str) else addr, token, store, log or sys.stderr)
    except BaseException:
        store.close()
        raise
    # A short poll interval makes shutdown() quick (the default 0.5 s adds up over a test suite).
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="demo-tickets", daemon=True)
    thread.start()
    return server, thread


def stop_server(server: TicketServer, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join()
    server.server_close()
    server.store.close()


def read_token(path: Path) -> str:
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.tickets", description="Demo ticketing API.")
    parser.add_argument("--addr", default=DEFAULT_ADDR, help=f"HOST:PORT to listen on (default {DEFAULT_ADDR})")
    parser.add_argument("--token-file", type=Path, default=Path(DEFAULT_TOKEN_FILE), help="bearer token file")
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="SQLite file (created if missing)")
    args = parser.parse_args(argv)
    try:
        addr = parse_addr(args.addr)
        token = read_token(args.token_file)
    except FileNotFoundError:
        print(f"tickets: {args.token_file} is missing; run: python -m demo.setup", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"tickets: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Set explicitly: a background job of a non-interactive shell (make run) starts with SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    args.data.parent.mkdir(parents=True, exist_ok=True)
    try:
        server, thread = start_server(addr, token, args.data)
    except OSError as exc:
        print(f"tickets: cannot listen on {args.addr}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"tickets: serving http://{args.addr.rpartition(':')[0]}:{server.port}/api/ (data {args.data})", file=sys.stderr
    )
    stop.wait()
    stop_server(server, thread)
    print("tickets: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
