"""The pdp.v1.PolicyDecisionPoint service: authentication, input checks, and error mapping in one place."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from sqlalchemy.exc import SQLAlchemyError

from pdp import errors
from pdp.errors import InvalidArgument, PdpError, ResourceExhausted, Unauthenticated, Unavailable
from pdp.identity.agents import Caller
from pdp.identity.throttle import AuthThrottle, peer_key
from pdp.identity.tokens import token_hash
from pdp.observability import logs, metrics, tracing
from pdp.proposals.service import ProposalService
from pdp.proposals.validation import validate, validate_proposal_id
from pdp.server import wire
from pdp.server.convert import STATES, decision_message, proposal_message
from pdp.v1 import pdp_pb2

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

SERVICE_NAME = "pdp.v1.PolicyDecisionPoint"
WATCH_POLL_SECONDS = 0.25
# Each open stream polls the database; one agent must not be able to starve the others.
MAX_WATCHES_PER_AGENT = 16

# Typed errors to status codes: the only place this mapping exists.
STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request protobuf refused to parse; ``field`` names what was wrong."""

    field: str


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, PdpError):
        return STATUS.get(type(exc), grpc.StatusCode.INTERNAL), exc.message
    if isinstance(exc, SQLAlchemyError):
        log.error("database error", exc_info=exc)
        return grpc.StatusCode.UNAVAILABLE, (
            "database unavailable; the request may not have been recorded: retry with the same idempotency_key"
        )
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


R = TypeVar("R")
Handler = Callable[[Any, Any, "Context"], Awaitable[R]]


def _unary(method: Handler[R]) -> Handler[R]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.field, "is not valid UTF-8 or cannot be parsed")
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = _status_for(exc)
            await context.abort(code, message)
            raise AssertionError("unreachable") from exc  # abort always raises

    return wrapper


class PolicyDecisionPointService:
    def __init__(
        self, service: ProposalService, pool: ThreadPoolExecutor, throttle: AuthThrottle | None = None
    ) -> None:
        self._service = service
        self._pool = pool
        # Tokens not cached as good go through this: bad ones cost their sender time, not the others' CPU.
        self._throttle = throttle or AuthThrottle("grpc", "unknown or revoked token")
        # Set at shutdown so open WatchProposal streams end at once instead of holding the grace period.
        self.stopping = asyncio.Event()
        self._watches: dict[str, int] = {}

    async def _blocking(self, fn: Callable[..., R], *args: Any) -> R:
        # In a copy of this context, so lines logged on the pool still name the request's proposal and trace.
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, run, fn, *args)

    async def _caller(self, context: Context) -> Caller:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    token = ""
                break
        token = token.strip()
        if not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        cached = self._service.identify(token)
        if cached is not None:
            return cached  # still checked active inside whatever the request does next
        return await self._throttle.authenticate(
            peer_key(context.peer() or ""),
            token_hash(token),
            lambda: self._blocking(self._service.authenticate, token),
        )

    @staticmethod
    def _proposal_id(request: pdp_pb2.GetProposalRequest) -> str:
        return validate_proposal_id(request.proposal_id)

    @_unary
    async def Propose(  # noqa: N802 — gRPC method names are fixed by the contract
        self, request: pdp_pb2.ProposeRequest, context: Context
    ) -> pdp_pb2.ProposeResponse:
        started = time.perf_counter()
        try:
            with tracing.propose_span(context.invocation_metadata()) as span, logs.context() as ids:
                caller = await self._caller(context)
                ids["agent_id"] = caller.agent.id
                proposal = validate(request)
                tool = proposal.action.tool
                ids["tool"] = tool
                deciding = time.perf_counter()
                recorded = await asyncio.wrap_future(self._service.propose(caller, proposal))
                record = recorded.record
                ids["proposal_id"] = record.id
                if not recorded.replayed:
                    metrics.decided(record.decision, time.perf_counter() - deciding)
                tracing.record_decision(
                    span,
                    record.decision,
                    tool=tool,
                    proposal_id=record.id,
                    agent_id=caller.agent.id,
                    replayed=recorded.replayed,
                )
                log.debug("proposal %s: %s", "replayed" if recorded.replayed else "decided", record.state.value)
                return pdp_pb2.ProposeResponse(
                    proposal_id=record.id, decision=decision_message(record.decision), state=STATES[record.state]
                )
        finally:
            metrics.propose_finished(time.perf_counter() - started)

    @_unary
    async def Evaluate(  # noqa: N802
        self, request: pdp_pb2.ProposeRequest, context: Context
    ) -> pdp_pb2.Decision:
        with logs.context() as ids:
            caller = await self._caller(context)
            ids["agent_id"] = caller.agent.id
            proposal = validate(request)
            ids["tool"] = proposal.action.tool
            deciding = time.perf_counter()
            decision = await self._blocking(self._service.evaluate, caller, proposal)
            metrics.evaluated(decision, time.perf_counter() - deciding)
            return decision_message(decision)

    @_unary
    async def GetProposal(  # noqa: N802
        self, request: pdp_pb2.GetProposalRequest, context: Context
    ) -> pdp_pb2.Proposal:
        caller = await self._caller(context)
        record = await self._blocking(self._service.get, caller, self._proposal_id(request))
        return proposal_message(record)

    @_unary
    async def CancelProposal(  # noqa: N802
        self, request: pdp_pb2.GetProposalRequest, context: Context
    ) -> pdp_pb2.Proposal:
        caller = await self._caller(context)
        proposal_id = self._proposal_id(request)
        record = await asyncio.wrap_future(self._service.cancel(caller, proposal_id))
        return proposal_message(record)

    async def WatchProposal(  # noqa: N802
        self, request: pdp_pb2.GetProposalRequest | Malformed, context: Context
    ) -> AsyncIterator[pdp_pb2.Proposal]:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.field, "is not valid UTF-8 or cannot be parsed")
            caller = await self._caller(context)
            proposal_id = self._proposal_id(request)
            agent_id = caller.agent.id
            if self._watches.get(agent_id, 0) >= MAX_WATCHES_PER_AGENT:
                raise ResourceExhausted(f"at most {MAX_WATCHES_PER_AGENT} open WatchProposal streams per agent")
            self._watches[agent_id] = self._watches.get(agent_id, 0) + 1
            try:
                async for proposal in self._watch(caller, proposal_id):
                    yield proposal
            finally:
                self._watches[agent_id] -= 1
                if not self._watches[agent_id]:
                    del self._watches[agent_id]
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = _status_for(exc)
            await context.abort(code, message)

    async def _watch(self, caller: Caller, proposal_id: str) -> AsyncIterator[pdp_pb2.Proposal]:
        """Yield the proposal whenever its state changes, until a terminal state or shutdown."""
        last = None
        while True:
            record = await self._blocking(self._service.get, caller, proposal_id)
            seen = (record.state, record.updated_at)
            if seen != last:
                last = seen
                yield proposal_message(record)
            if record.state.terminal:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), WATCH_POLL_SECONDS)
            if self.stopping.is_set():
                raise Unavailable("server is shutting down; watch again")


def _parser(message: type[Message], schema: wire.Schema) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except (DecodeError, RuntimeError):
            return Malformed(wire.bad_field(data, schema))

    return parse


def generic_handler(api: PolicyDecisionPointService) -> grpc.GenericRpcHandler:
    """Handlers with lenient parsing, so a malformed request gets INVALID_ARGUMENT naming the field."""
    propose = _parser(pdp_pb2.ProposeRequest, wire.PROPOSE_REQUEST)
    by_id = _parser(pdp_pb2.GetProposalRequest, wire.GET_PROPOSAL_REQUEST)

    def unary(fn: Any, parse: Callable[[bytes], Any]) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=parse, response_serializer=lambda m: m.SerializeToString()
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Propose": unary(api.Propose, propose),
            "Evaluate": unary(api.Evaluate, propose),
            "GetProposal": unary(api.GetProposal, by_id),
            "CancelProposal": unary(api.CancelProposal, by_id),
            "WatchProposal": grpc.unary_stream_rpc_method_handler(
                api.WatchProposal,
                request_deserializer=by_id,
                response_serializer=lambda m: m.SerializeToString(),
            ),
        },
    )
