"""The approvers' JSON API under /api/v1: a thin adapter over :class:`ApprovalService`.

Authentication is ``Authorization: Bearer <approver token>``. Errors are the typed errors of
:mod:`pdp.errors`, turned into ``{"error", "field"}`` bodies by the one handler in :mod:`pdp.admin.app`; the
route decorators declare them so /openapi.json documents every status an endpoint can answer.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from pdp.admin.auth import STATE_KEY
from pdp.approvals.listing import DEFAULT_PAGE, MAX_CURSOR, MAX_PAGE
from pdp.approvals.service import (
    MAX_TEXT,
    ApprovalService,
    PendingItem,
    ProposalDetail,
    RequirementView,
    TimelineEntry,
    VoteResult,
)
from pdp.errors import NotFound, Unauthenticated
from pdp.identity.approvers import Approver
from pdp.store.proposals import ApprovalRecord

JUSTIFICATION_NOTE = "written by the agent; not verified and never seen by policy"
# What the service accepts, documented for clients and fuzzers. Only documented: the service checks the text
# itself (after str.strip(), whose whitespace includes \x1c-\x1f) and words its errors better than a regex.
NO_NUL = r"^[^\x00]*$"
NOT_BLANK = r"^[^\x00]*[^\x00\s\x1c-\x1f][^\x00]*$"
DIGEST = r"^[0-9a-f]{64}$"


# --- wire models ---------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


class Requirement(BaseModel):
    source: str
    groups: list[str]
    min_approvals: int
    approvals: int

    @classmethod
    def of(cls, r: RequirementView) -> Requirement:
        return cls(source=r.source, groups=list(r.groups), min_approvals=r.min_approvals, approvals=r.approvals)


AgentStatus = Literal["active", "revoked"]


def _status(revoked_at: datetime | None) -> AgentStatus:
    return "revoked" if revoked_at is not None else "active"


class PendingProposal(BaseModel):
    id: str
    agent_id: str
    # "revoked": the agent's token was revoked; its proposals cannot be decided (votes get 409).
    agent_status: AgentStatus
    agent_revoked_at: datetime | None
    owner: str
    tool: str
    operation: str
    resource: str
    created_at: datetime
    expires_at: datetime | None
    seconds_left: int
    requirements: list[Requirement]

    @classmethod
    def of(cls, item: PendingItem) -> PendingProposal:
        return cls(
            id=item.proposal_id,
            agent_id=item.agent_id,
            agent_status=_status(item.agent_revoked_at),
            agent_revoked_at=item.agent_revoked_at,
            owner=item.owner,
            tool=item.tool,
            operation=item.operation,
            resource=item.resource,
            created_at=item.created_at,
            expires_at=item.expires_at,
            seconds_left=item.seconds_left,
            requirements=[Requirement.of(r) for r in item.requirements],
        )


class PendingList(BaseModel):
    proposals: list[PendingProposal]
    # Opaque; pass as ?cursor= for the next (newer) or previous (older) page. null: there is none.
    next_cursor: str | None = None
    prev_cursor: str | None = None


class Approval(BaseModel):
    approver_id: str
    verdict: str
    comment: str
    decided_at: datetime

    @classmethod
    def of(cls, a: ApprovalRecord) -> Approval:
        return cls(approver_id=a.approver_id, verdict=a.verdict, comment=a.comment, decided_at=a.decided_at)


class Justification(BaseModel):
    """The agent's own words, labelled as such: a prompt-injected agent writes whatever gets it approved."""

    text: str
    verified: Literal[False] = False
    note: str = JUSTIFICATION_NOTE


class TimelineEvent(BaseModel):
    seq: int
    type: str
    actor: str
    occurred_at: str

    @classmethod
    def of(cls, t: TimelineEntry) -> TimelineEvent:
        return cls(seq=t.seq, type=t.type, actor=t.actor, occurred_at=t.occurred_at)


class Detail(BaseModel):
    id: str
    state: str
    agent_id: str
    agent_status: AgentStatus
    agent_revoked_at: datetime | None
    owner: str
    action: dict[str, Any]
    action_digest: str = Field(description="SHA-256 of the action shown; send it back with your vote")
    justification: Justification
    outcome: str
    boundary: str
    tier: str
    reasons: list[dict[str, str]]
    policy_version: str
    requirements: list[Requirement]
    created_at: datetime
    expires_at: datetime | None
    seconds_left: int
    approvals: list[Approval]
    timeline: list[TimelineEvent]
    can_vote: bool
    why_not: str

    @classmethod
    def of(cls, d: ProposalDetail) -> Detail:
        return cls(
            id=d.proposal_id,
            state=d.state,
            agent_id=d.agent_id,
            agent_status=_status(d.agent_revoked_at),
            agent_revoked_at=d.agent_revoked_at,
            owner=d.owner,
            action=d.action,
            action_digest=d.action_digest,
            justification=Justification(text=d.justification),
            outcome=d.outcome,
            boundary=d.boundary,
            tier=d.tier,
            reasons=[dict(r) for r in d.reasons],
            policy_version=d.policy_version,
            requirements=[Requirement.of(r) for r in d.requirements],
            created_at=d.created_at,
            expires_at=d.expires_at,
            seconds_left=d.seconds_left,
            approvals=[Approval.of(a) for a in d.approvals],
            timeline=[TimelineEvent.of(t) for t in d.timeline],
            can_vote=d.can_vote,
            why_not=d.why_not,
        )


class Vote(BaseModel):
    id: str
    state: str
    requirements: list[Requirement]
    approvals: list[Approval]

    @classmethod
    def of(cls, v: VoteResult) -> Vote:
        return cls(
            id=v.proposal_id,
            state=v.state,
            requirements=[Requirement.of(r) for r in v.requirements],
            approvals=[Approval.of(a) for a in v.approvals],
        )


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action_digest: str = Field(
        pattern=DIGEST,
        description="required: the `action_digest` of the proposal as you were shown it (GET …/{id}); "
        "409 when the proposal's action is not that one any more",
    )
    comment: str = Field(
        default="",
        max_length=MAX_TEXT,
        description="optional; sent back to the agent",
        json_schema_extra={"pattern": NO_NUL},
    )


class RejectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(
        min_length=1,
        max_length=MAX_TEXT,
        description="required, not blank; sent back to the agent",
        json_schema_extra={"pattern": NOT_BLANK},
    )
    action_digest: str | None = Field(
        default=None,
        pattern=DIGEST,
        description="optional: the `action_digest` you were shown; when given, 409 unless it is the proposal's",
    )


# --- routes --------------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "missing, unknown or revoked approver token",
        403: "not eligible (to decide this proposal; to release an agent one owns)",
        404: "no such proposal",
        409: "no longer pending approval, the action is not the one you were shown, or the proposal's rows "
        "disagree with its audit log (for a release: the agent is not quarantined)",
        422: "malformed request; `field` names the culprit",
    }
    responses: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorBody, "description": descriptions[c]} for c in codes
    }
    if 401 in responses:
        responses[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return responses


# auto_error=False: the scheme is documented in /openapi.json, but the 401 (with its challenge) is ours.
_bearer = HTTPBearer(auto_error=False, description="an approver token (`pdp approvers add` prints it once)")


def service_of(request: Request) -> ApprovalService:
    """The approval use cases the app was built with (``create_app`` puts them on ``app.state``)."""
    service: ApprovalService = request.app.state.approvals
    return service


async def current_approver(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Approver:
    """Who :class:`pdp.admin.auth.BearerAuth` authenticated, before the body was read (``credentials`` only
    documents the scheme in /openapi.json)."""
    approver = getattr(request.state, STATE_KEY, None)
    if not isinstance(approver, Approver):
        raise Unauthenticated("an approver bearer token is required")
    return approver


ApproverDep = Annotated[Approver, Depends(current_approver)]
ServiceDep = Annotated[ApprovalService, Depends(service_of)]


def proposal_id(value: str) -> str:
    """The id as stored; anything that is not a canonical UUID cannot name a proposal, so it is unknown (404)."""
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"proposal {value!r} not found") from None
    if canonical != value.lower():
        raise NotFound(f"proposal {value!r} not found")
    return canonical


router = APIRouter(prefix="/api/v1", tags=["approvals"])


@router.get("/proposals", response_model=PendingList, responses=_errors(401, 422))
def list_proposals(
    approver: ApproverDep,
    service: ServiceDep,
    state: Annotated[
        Literal["pending_approval"], Query(description="the only supported filter: proposals awaiting a decision")
    ] = "pending_approval",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="proposals per page")] = DEFAULT_PAGE,
    cursor: Annotated[
        str | None, Query(max_length=MAX_CURSOR, description="`next_cursor` or `prev_cursor` of a page")
    ] = None,
) -> PendingList:
    """Pending proposals this approver may decide, oldest first, one page at a time."""
    page = service.pending_page(approver, limit, cursor)
    return PendingList(
        proposals=[PendingProposal.of(item) for item in page.items],
        next_cursor=page.next_cursor,
        prev_cursor=page.prev_cursor,
    )


@router.get("/proposals/{id}", response_model=Detail, responses=_errors(401, 404, 422))
def get_proposal(id: str, approver: ApproverDep, service: ServiceDep) -> Detail:
    """Everything needed to decide; any approver may read any proposal."""
    return Detail.of(service.detail(approver, proposal_id(id)))


@router.post("/proposals/{id}/approve", response_model=Vote, responses=_errors(401, 403, 404, 409, 422))
def approve(id: str, approver: ApproverDep, service: ServiceDep, body: Annotated[ApproveBody, Body()]) -> Vote:
    """Approve the action you were shown (its `action_digest`), with an optional comment."""
    return Vote.of(service.approve(approver, proposal_id(id), body.comment, action_digest=body.action_digest))


@router.post("/proposals/{id}/reject", response_model=Vote, responses=_errors(401, 403, 404, 409, 422))
def reject(id: str, approver: ApproverDep, service: ServiceDep, body: RejectBody) -> Vote:
    """Reject, with a reason that goes back to the agent. One eligible rejection rejects the proposal."""
    return Vote.of(service.reject(approver, proposal_id(id), body.reason, action_digest=body.action_digest or ""))


@router.post(
    "/agents/{agent_id}/release",
    status_code=204,
    responses=_errors(401, 403, 404, 409, 422),
    tags=["governance"],
)
def release(agent_id: str, approver: ApproverDep, service: ServiceDep) -> Response:
    """Lift an agent's retry-storm quarantine (409 when it is not quarantined). Audited as `agent.released`."""
    if not agent_id or len(agent_id) > 200:
        raise NotFound(f"agent {agent_id!r} does not exist")
    service.release_agent(approver, agent_id)
    return Response(status_code=204)
