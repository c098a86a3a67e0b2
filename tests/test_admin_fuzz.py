"""Fuzzing the approvers' JSON API: schemathesis, from the OpenAPI document a running admin endpoint serves.

Every operation in ``/openapi.json`` gets generated requests over real HTTP, both fitting the schema and not, with an
approver's bearer token and without one: whatever comes in, the answer is never a 5xx. Path ids are mostly random
(404); one more run votes on real pending proposals, a fresh one per request, so generated comments and reasons
reach the database. Bounded and reproducible: ``MAX_EXAMPLES`` cases per operation and mode, derandomized, no
example database.

The operations are driven with ``operation.as_strategy()`` and Hypothesis' ``@given`` rather than schemathesis'
pytest plugin (``schemathesis.pytest.from_fixture``): the plugin reads ``Function._nodeid``, which pytest 9.2 no
longer has. Each run fuzzes every operation and then reports every failing one, with its minimal example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from conftest import BACKENDS, TICKETS, Server, fresh_database, running_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err

from pdp.approvals.service import MAX_TEXT
from pdp.client import PdpClient
from pdp.identity.approvers import add_approver
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

MAX_EXAMPLES = 50
UNKNOWN = "00000000-0000-4000-8000-000000000000"  # a well-formed id no proposal has
REQUEST_TIMEOUT = 30.0  # seconds; a hung request fails the run instead of hanging it

API = {
    "GET /api/v1/proposals",
    "GET /api/v1/proposals/{id}",
    "POST /api/v1/proposals/{id}/approve",
    "POST /api/v1/proposals/{id}/reject",
}
VOTES = {"POST /api/v1/proposals/{id}/approve", "POST /api/v1/proposals/{id}/reject"}

fuzz_settings = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

Operation = APIOperation[Any, Any, Any, Any]


@dataclass
class Admin:
    server: Server
    token: str
    agent: PdpClient

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    proposed: int = 0

    def pending_proposal(self) -> str:
        """A new proposal lead-1 may decide alone: critical priority needs one approval from ops-oncall."""
        self.proposed += 1
        if self.proposed % 100 == 0:  # a fresh agent now and then: the example bundle rate-limits ticket writes
            self.agent = self.server.agent_client(("support",))[1]
        response = self.agent.propose(
            "tickets", "POST", TICKETS, "the customer reports an outage", params={"priority": "critical"}
        )
        assert response.state == pdp_pb2.PENDING_APPROVAL, response
        return response.proposal_id


@pytest.fixture(scope="module", params=BACKENDS)
def admin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    """A running PDP with an approver (in every group the example bundle asks for) and pending proposals."""
    with fresh_database(request.param, tmp_path_factory.mktemp(f"admin-fuzz-{request.param}")) as url:
        upgrade(url)
        with running_server(url) as server:
            token = add_approver(server.engine, "lead-1", ["support-leads", "ops-oncall"])
            admin = Admin(server, token, server.agent_client(("support",))[1])
            for _ in range(3):
                admin.pending_proposal()
            yield admin


@pytest.fixture(scope="module")
def operations(admin: Admin) -> dict[str, Operation]:
    """The operations of the OpenAPI document as the running admin endpoint serves it, by label."""
    schema: BaseSchema = schemathesis.openapi.from_url(f"{admin.server.admin_url}/openapi.json", timeout=30)
    schema.config.update(base_url=admin.server.admin_url)
    found: dict[str, Operation] = {}
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation schemathesis cannot read: the document is broken
            pytest.fail(f"/openapi.json: {result.err()}")
        found[result.ok().label] = result.ok()
    return found


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def fuzz(
    operations: dict[str, Operation],
    session: requests.Session,
    headers: dict[str, str] | None,
    prepare: Callable[[Case[Operation]], None] = lambda case: None,
    bodies: Callable[[Operation], list[Any]] = lambda operation: [],
) -> None:
    """Every operation, in both generation modes (plus the given request bodies, always tried first); fails
    listing each operation that answered a 5xx."""
    failures: list[str] = []
    for label, operation in sorted(operations.items()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            def call(case: Case[Operation]) -> None:
                prepare(case)
                case.call_and_validate(
                    session=session, headers=headers, checks=[not_a_server_error], timeout=REQUEST_TIMEOUT
                )

            run = given(case=operation.as_strategy(generation_mode=mode))(call)
            if mode is GenerationMode.POSITIVE:
                for body in bodies(operation):
                    case = operation.Case(body=body, media_type="application/json", path_parameters={"id": UNKNOWN})
                    run = example(case=case)(run)
            run = fuzz_settings(run)
            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise
                # Nothing in the operation can be made invalid (GET /healthz takes no input at all).
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis reports check failures as a group
                failures.append(f"{label} ({mode.value} cases): {exc}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


def test_the_served_document_has_the_approvals_api(operations: dict[str, Operation]) -> None:
    """The runs below cover what the document lists: make sure it lists the JSON API (§7)."""
    assert set(operations) >= API


def test_no_server_errors_as_an_approver(
    operations: dict[str, Operation], session: requests.Session, admin: Admin
) -> None:
    fuzz(operations, session, admin.auth)


def test_no_server_errors_without_a_token(operations: dict[str, Operation], session: requests.Session) -> None:
    fuzz(operations, session, None)


def test_no_server_errors_voting_on_pending_proposals(
    operations: dict[str, Operation], session: requests.Session, admin: Admin
) -> None:
    """Generated comments and reasons on proposals the approver may decide: they get as far as the database."""

    def fresh_proposal(case: Case[Operation]) -> None:
        case.path_parameters = {**(case.path_parameters or {}), "id": admin.pending_proposal()}

    def hostile(operation: Operation) -> list[Any]:
        """Text the database may choke on (PostgreSQL refuses NUL), and bodies of the wrong shape."""
        field = "reason" if operation.path.endswith("/reject") else "comment"
        texts = [
            "\x00",
            "a\x00b",
            "\ud800",
            " \t\n ",
            "x" * MAX_TEXT,
            "x" * (MAX_TEXT + 1),
            "\u202egnp.exe",
            "😀" * 100,
        ]
        return [{field: text} for text in texts] + [{field: 1}, {field: None}, {"other": "x"}, [], "text", None]

    fuzz({label: operations[label] for label in VOTES}, session, admin.auth, fresh_proposal, hostile)
