"""The demo target systems of ``make run``: the ticketing API (a real server on a free port) and ``demo.setup``."""

from __future__ import annotations

import io
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
import yaml

REPO = Path(__file__).resolve().parents[1]
# demo/ is not an installed package (make run starts it from the repository root), so pytest run as a script
# would not find it.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demo import setup as demo_setup  # noqa: E402
from demo import tickets  # noqa: E402


class Api:
    """A client of one running server: ``call`` sends the right token unless told otherwise."""

    def __init__(self, server: tickets.TicketServer, token: str, log: io.StringIO) -> None:
        self.server = server
        self.token = token
        self.log = log
        self.base = f"http://127.0.0.1:{server.port}"
        self.http = httpx.Client(base_url=self.base, trust_env=False)

    def call(
        self, method: str, path: str, *, token: str | None = "", headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token or self.token}"
        return self.http.request(method, path, headers=sent, **kw)

    def create(self, **fields: Any) -> dict[str, Any]:
        response = self.call("POST", "/api/tickets", json=fields)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.call("GET", "/api/_stats").json()
        return stats


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    token = secrets.token_urlsafe(32)
    log = io.StringIO()
    server, thread = tickets.start_server(("127.0.0.1", 0), token, tmp_path / "tickets.db", log=log)
    client = Api(server, token, log)
    try:
        yield client
    finally:
        client.http.close()
        tickets.stop_server(server, thread)


# --- authentication ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-of-some-length", "Bearer", "Basic {token}", "{token}", "Bearer {token}x"],
    ids=["missing", "wrong", "empty", "basic-scheme", "no-scheme", "token-plus-suffix"],
)
def test_requests_without_the_right_bearer_token_are_401_and_change_nothing(
    api: Api, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.format(token=api.token)}
    for method, path, body in [
        ("GET", "/api/tickets", None),
        ("POST", "/api/tickets", {"title": "sneaky"}),
        ("GET", "/api/_stats", None),
        ("GET", "/api/no-such-thing", None),  # 401, not 404: unauthenticated callers learn nothing about paths
    ]:
        response = api.call(method, path, token=None, headers=headers, json=body)
        assert response.status_code == 401, (method, path)
        assert response.json() == {"error": "missing or wrong bearer token"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.call("GET", "/api/tickets").json() == {"tickets": []}
    assert api.stats()["creates"] == 0


# --- the ticket lifecycle ---------------------------------------------------------------------------------------


def test_create_get_list_patch_delete(api: Api) -> None:
    response = api.call(
        "POST",
        "/api/tickets",
        json={"title": "Printer on fire", "body": "3rd floor", "priority": "high", "customer": "jo@example.com"},
    )
    assert response.status_code == 201
    ticket = response.json()
    assert response.headers["Location"] == f"/api/tickets/{ticket['id']}"
    assert response.headers["Content-Type"] == "application/json"
    assert ticket["title"] == "Printer on fire"
    assert ticket["body"] == "3rd floor"
    assert (ticket["priority"], ticket["status"], ticket["customer"]) == ("high", "open", "jo@example.com")
    assert ticket["created_at"] == ticket["updated_at"]
    assert ticket["created_at"].endswith("Z")
    assert set(ticket) == {"id", "title", "body", "priority", "status", "customer", "created_at", "updated_at"}

    assert api.call("GET", response.headers["Location"]).json() == ticket

    second = api.create(title="Coffee machine leaks")
    assert (second["priority"], second["body"], second["customer"]) == ("normal", "", None)
    listed = api.call("GET", "/api/tickets").json()["tickets"]
    assert [t["id"] for t in listed] == [second["id"], ticket["id"]]  # newest first

    patched = api.call("PATCH", f"/api/tickets/{ticket['id']}", json={"status": "pending", "priority": "low"})
    assert patched.status_code == 200
    assert patched.json() | {"updated_at": None} == ticket | {
        "status": "pending",
        "priority": "low",
        "updated_at": None,
    }
    assert api.call("GET", f"/api/tickets/{ticket['id']}").json() == patched.json()

    by_status = api.call("GET", "/api/tickets", params={"status": "pending"}).json()["tickets"]
    assert [t["id"] for t in by_status] == [ticket["id"]]
    assert [t["id"] for t in api.call("GET", "/api/tickets?status=open").json()["tickets"]] == [second["id"]]

    deleted = api.call("DELETE", f"/api/tickets/{ticket['id']}")
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert api.call("GET", f"/api/tickets/{ticket['id']}").status_code == 404
    assert api.call("DELETE", f"/api/tickets/{ticket['id']}").status_code == 404
    assert [t["id"] for t in api.call("GET", "/api/tickets").json()["tickets"]] == [second["id"]]


def test_bulk_close_by_ids_and_by_count(api: Api) -> None:
    ids = [api.create(title=f"duplicate {n}")["id"] for n in range(4)]
    response = api.call("POST", "/api/tickets/bulk-close", json={"ids": [ids[3], ids[1]]})
    assert response.status_code == 200
    assert response.json() == {"closed": [ids[1], ids[3]], "count": 2}
    response = api.call("POST", "/api/tickets/bulk-close", json={"count": 40})  # the README's example
    assert response.json() == {"closed": [ids[0], ids[2]], "count": 2}
    statuses = {t["id"]: t["status"] for t in api.call("GET", "/api/tickets").json()["tickets"]}
    assert statuses == dict.fromkeys(ids, "closed")
    missing = api.call("POST", "/api/tickets/bulk-close", json={"ids": [ids[0], 999]})
    assert (missing.status_code, missing.json()["field"]) == (404, "ids")


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": 42}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "ok", "priority": "urgent"}, "priority"),
        ({"title": "ok", "priority": None}, "priority"),
        ({"title": "ok", "body": ["not", "text"]}, "body"),
        ({"title": "ok", "customer": 7}, "customer"),
        ({"title": "ok", "status": "closed"}, "status"),  # a new ticket is always open
        ({"title": "ok", "priorty": "high"}, "priorty"),  # a typo is refused, not ignored
    ],
)
def test_a_bad_field_in_a_create_is_400_naming_it(api: Api, body: dict[str, Any], field: str) -> None:
    response = api.call("POST", "/api/tickets", json=body)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert field in response.json()["error"]
    assert api.stats()["creates"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "done"}, "status"),
        ({"priority": "meh"}, "priority"),
        ({"title": ""}, "title"),
        ({"id": 5}, "id"),
    ],
)
def test_a_bad_field_in_a_patch_is_400_and_changes_nothing(api: Api, body: dict[str, Any], field: str) -> None:
    ticket = api.create(title="stays as it is")
    response = api.call("PATCH", f"/api/tickets/{ticket['id']}", json=body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert api.call("GET", f"/api/tickets/{ticket['id']}").json() == ticket


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'["a", "list"]', b'{"title": NaN}', b"\xff\xfe", b""],
    ids=["syntax", "not-an-object", "nan", "not-utf8", "empty"],
)
def test_a_body_that_is_not_a_json_object_is_400(api: Api, content: bytes) -> None:
    response = api.call("POST", "/api/tickets", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_bad_query_parameters_are_400_naming_them(api: Api) -> None:
    assert api.call("GET", "/api/tickets?status=solved").json()["field"] == "status"
    assert api.call("GET", "/api/tickets?limit=0").json()["field"] == "limit"


def test_an_oversized_body_is_refused(api: Api) -> None:
    response = api.call("POST", "/api/tickets", json={"title": "big", "body": "x" * (tickets.MAX_REQUEST_BYTES + 1)})
    assert response.status_code == 413
    assert api.stats()["creates"] == 0


def test_unknown_paths_are_404_and_other_methods_405(api: Api) -> None:
    for path in ["/", "/api", "/api/ticket", "/api/tickets/abc", "/api/tickets/1/comments", "/api/tickets/-1"]:
        assert api.call("GET", path).status_code == 404, path
    assert api.call("GET", "/api/tickets/12345").json() == {"error": "no ticket 12345"}
    for method, path, allowed in [
        ("PUT", "/api/tickets", "GET, POST"),
        ("DELETE", "/api/tickets", "GET, POST"),
        ("POST", "/api/tickets/1", "GET, PATCH, DELETE"),
        ("OPTIONS", "/api/tickets/1", "GET, PATCH, DELETE"),
        ("BREW", "/api/tickets", "GET, POST"),  # made-up verbs too, not the standard library's 501
        ("PATCH", "/api/_stats", "GET"),
    ]:
        response = api.call(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["Allow"] == allowed


# --- idempotency and counting -----------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_first_ticket_and_creates_nothing(api: Api) -> None:
    key = {"Idempotency-Key": "proposal-4711"}
    first = api.call("POST", "/api/tickets", json={"title": "Printer on fire"}, headers=key)
    again = api.call("POST", "/api/tickets", json={"title": "Printer on fire"}, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"]
    assert len(api.call("GET", "/api/tickets").json()["tickets"]) == 1
    assert api.stats()["creates"] == 1

    reused = api.call("POST", "/api/tickets", json={"title": "Something else"}, headers=key)
    assert (reused.status_code, reused.json()["field"]) == (422, "Idempotency-Key")
    other = api.call("POST", "/api/tickets", json={"title": "Printer on fire"}, headers={"Idempotency-Key": "p-2"})
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    assert api.stats()["creates"] == 2


def test_concurrent_posts_with_one_idempotency_key_create_one_ticket(api: Api) -> None:
    results: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def post() -> None:
        with httpx.Client(base_url=api.base, trust_env=False) as client:
            start.wait()
            response = client.post(
                "/api/tickets",
                json={"title": "once"},
                headers={"Authorization": f"Bearer {api.token}", "Idempotency-Key": "same"},
            )
        with lock:
            results.append(response)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in results}) == 1
    assert api.stats()["creates"] == 1


def test_a_retried_delete_or_patch_with_its_key_is_replayed_not_redone(api: Api) -> None:
    ticket = api.create(title="to go")
    path = f"/api/tickets/{ticket['id']}"
    patch = {"Idempotency-Key": "patch-1"}
    first = api.call("PATCH", path, json={"status": "closed"}, headers=patch)
    api.call("PATCH", path, json={"status": "open"})  # someone reopens it meanwhile
    again = api.call("PATCH", path, json={"status": "closed"}, headers=patch)
    assert again.json() == first.json()
    assert api.call("GET", path).json()["status"] == "open"  # the retry did not close it a second time

    delete = {"Idempotency-Key": "delete-1"}
    assert api.call("DELETE", path, headers=delete).status_code == 204
    assert api.call("DELETE", path, headers=delete).status_code == 204  # an executor retry is not an error
    assert api.call("DELETE", path).status_code == 404


def test_stats_count_every_request_but_their_own(api: Api) -> None:
    api.create(title="one")
    api.call("GET", "/api/tickets")
    api.call("GET", "/api/tickets", token=None)  # refused requests count too: they reached the target
    api.call("POST", "/api/tickets", json={})
    assert api.stats() == {"requests": 4, "creates": 1, "replays": 0}
    assert api.stats()["requests"] == 4


def test_the_log_has_one_line_per_request_without_headers(api: Api) -> None:
    api.create(title="logged")
    api.call("GET", "/api/tickets?status=open", headers={"X-Trace": "trace-me"})
    api.call("GET", "/api/tickets/999")
    assert api.log.getvalue().splitlines() == [
        "tickets: POST /api/tickets 201",
        "tickets: GET /api/tickets 200",  # the query string is not logged either
        "tickets: GET /api/tickets/999 404",
    ]


# --- the process ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_process_never_logs_the_token_and_stops_cleanly(tmp_path: Path, stop_signal: signal.Signals) -> None:
    token = secrets.token_urlsafe(32)
    (tmp_path / "tickets.token").write_text(token + "\n")
    token_file, data = str(tmp_path / "tickets.token"), str(tmp_path / "data" / "tickets.db")
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.tickets", "--addr", "127.0.0.1:0", "--token-file", token_file, "--data", data],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        # As under `make run`: a background job of a non-interactive shell starts with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 - no threads here yet
    )
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()
        assert banner.startswith("tickets: serving http://127.0.0.1:"), banner
        base = banner.split()[2].removesuffix("/api/")
        wrong = secrets.token_urlsafe(32)
        with httpx.Client(base_url=base, trust_env=False) as client:
            good = {"Authorization": f"Bearer {token}"}
            assert client.post("/api/tickets", json={"title": "t"}, headers=good).status_code == 201
            assert client.get("/api/tickets/1", headers=good).status_code == 200
            assert client.get("/api/tickets", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
            assert client.post("/api/tickets", content=b"{", headers=good).status_code == 400
        process.send_signal(stop_signal)
        # The timeout only turns "ignored the signal" into a failure instead of a hung suite.
        rest = process.communicate(timeout=60)[1]
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = banner + rest
    assert token not in log
    assert wrong not in log
    assert rest.splitlines() == [
        "tickets: POST /api/tickets 201",
        "tickets: GET /api/tickets/1 200",
        "tickets: GET /api/tickets 401",
        "tickets: POST /api/tickets 400",
        "tickets: stopped",
    ]
    with sqlite3.connect(tmp_path / "data" / "tickets.db") as db:
        assert db.execute("SELECT title FROM tickets").fetchall() == [("t",)]


def test_the_process_refuses_to_start_without_a_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tickets.main(["--token-file", str(tmp_path / "missing"), "--data", str(tmp_path / "t.db")]) == 2
    assert "python -m demo.setup" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert tickets.main(["--token-file", str(tmp_path / "empty"), "--data", str(tmp_path / "t.db")]) == 2
    assert not (tmp_path / "t.db").exists()


# --- demo.setup -------------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_setup_creates_everything_once_and_keeps_it(tmp_path: Path) -> None:
    directory = tmp_path / ".pdp" / "demo"
    first = subprocess.run(
        [sys.executable, "-m", "demo.setup", "--dir", str(directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    created = first.stdout.splitlines()
    assert len(created) == 4
    assert all(line.startswith("demo.setup: created ") for line in created)
    token = (directory / "tickets.token").read_text()
    assert len(token.strip()) >= 40
    assert token.strip() not in first.stdout
    assert _mode(directory) == 0o700
    for name in ("tickets.token", "crm.db", "crm.url"):
        assert _mode(directory / name) == 0o600, name

    url = (directory / "crm.url").read_text().strip()
    assert url == f"sqlite:///{directory.resolve() / 'crm.db'}"
    assert url.startswith("sqlite:////")
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as db:
        contacts = db.execute(sqlalchemy.text("SELECT name, email, company, tier, updated_at FROM contacts")).all()
        accounts = db.execute(sqlalchemy.text("SELECT name, plan, owner FROM accounts")).all()
        assert len(contacts) == 5
        assert len(accounts) == 5
        assert ("jo@example.com",) in [(c.email,) for c in contacts]
        db.execute(sqlalchemy.text("INSERT INTO accounts (name, plan) VALUES ('Added Later', 'team')"))
    engine.dispose()

    (directory / "tickets.token").chmod(0o644)
    again = subprocess.run(
        [sys.executable, "-m", "demo.setup", "--dir", str(directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.splitlines() == [f"demo.setup: tightened {directory / 'tickets.token'} from 0644 to 0600"]
    assert (directory / "tickets.token").read_text() == token
    assert _mode(directory / "tickets.token") == 0o600
    with sqlite3.connect(directory / "crm.db") as db:
        assert db.execute("SELECT count(*) FROM accounts").fetchone() == (6,)

    third = subprocess.run(
        [sys.executable, "-m", "demo.setup", "--dir", str(directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert third.stdout == f"demo.setup: {directory} is ready (nothing to create)\n"


def test_setup_rewrites_a_stale_crm_url(tmp_path: Path) -> None:
    said: list[str] = []
    demo_setup.setup(tmp_path / "a", said.append)
    (tmp_path / "a").rename(tmp_path / "b")
    said.clear()
    demo_setup.setup(tmp_path / "b", said.append)
    assert said == [f"updated {tmp_path / 'b' / 'crm.url'}: sqlite:///{tmp_path.resolve() / 'b' / 'crm.db'}"]


# --- how make run wires them together ---------------------------------------------------------------------------


def test_the_executor_config_references_what_setup_creates_and_the_catalog_names(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "demo" / "executor.yaml").read_text())
    catalog = {tool["name"]: tool for tool in yaml.safe_load((REPO / "policies" / "tools.yaml").read_text())["tools"]}
    demo_dir = Path(demo_setup.DEFAULT_DIR)
    auth = config["tools"]["tickets"]["headers"]["Authorization"]
    assert auth == {"file": str(demo_dir / demo_setup.TOKEN_FILE), "template": "Bearer {}"}
    assert config["tools"]["crm"]["databases"]["crm"] == {"file": str(demo_dir / demo_setup.CRM_URL)}
    assert catalog["tickets"]["type"] == "http"
    assert catalog["crm"]["type"] == "sql"
    # The catalog's prefix is where the policy lets agents point; the server must listen exactly there.
    assert catalog["tickets"]["resource_prefix"] == f"http://{tickets.DEFAULT_ADDR}/api/"
    assert auth["file"] == tickets.DEFAULT_TOKEN_FILE


def test_the_executor_http_connector_with_the_demo_config_creates_one_ticket(api: Api, tmp_path: Path) -> None:
    """An allowed proposal, as the executor carries it out: the demo config's credential reference, then a retry."""
    from executor.connectors.base import Call, ConnectorContext
    from executor.connectors.http import HttpConnector
    from pdp.policy.catalog import Kind, Tool

    token_file = tmp_path / ".pdp" / "demo" / "tickets.token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(api.token + "\n")
    section = yaml.safe_load((REPO / "demo" / "executor.yaml").read_text())["tools"]["tickets"]
    prefix = f"{api.base}/api/"  # the catalog's port, replaced by the test server's
    tool = Tool("tickets", "http", prefix, {"GET": Kind.READ, "POST": Kind.WRITE, "PATCH": Kind.WRITE})
    connector = HttpConnector(section, ConnectorContext(tool=tool, base_dir=tmp_path, environ={}))
    call = Call("proposal-1", tool, "POST", f"{prefix}tickets", {"title": "Printer on fire", "priority": "high"})
    try:
        result = connector.execute(call)
        retried = connector.execute(call)
    finally:
        connector.close()
    assert result["status"] == 201
    assert result["body"]["title"] == "Printer on fire"
    assert result["headers"]["location"] == f"/api/tickets/{result['body']['id']}"
    assert (retried["status"], retried["body"]) == (200, result["body"])
    assert api.stats()["creates"] == 1
