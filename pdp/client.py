"""Python client for agents: ``PdpClient(target, token).propose(...)``.

Anything other than ``ALLOW`` means "do not act". Errors from the server raise :class:`PdpClientError`
with the gRPC status code and the server's message (which names the bad field).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
from google.protobuf.message import Message

from pdp.v1 import pdp_pb2, pdp_pb2_grpc

__all__ = ["PdpClient", "PdpClientError", "pdp_pb2"]

R = TypeVar("R")


class PdpClientError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _wrap(exc: grpc.RpcError) -> PdpClientError:
    # Every error a stub raises is also a grpc.Call carrying the status.
    call = cast(grpc.Call, exc)
    return PdpClientError(call.code(), call.details() or "")


class PdpClient:
    def __init__(self, target: str = "127.0.0.1:50051", token: str = "", *, timeout: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pdp_pb2_grpc.PolicyDecisionPointStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        self.close()

    @staticmethod
    def request(
        tool: str,
        operation: str,
        resource: str,
        justification: str,
        *,
        params: Mapping[str, Any] | None = None,
        estimated_cost_usd: float = 0.0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        session_id: str = "",
    ) -> pdp_pb2.ProposeRequest:
        action = pdp_pb2.Action(
            tool=tool,
            operation=operation,
            resource=resource,
            estimated_cost_usd=estimated_cost_usd,
            labels=dict(labels or {}),
        )
        if params:
            action.params.update(dict(params))
        return pdp_pb2.ProposeRequest(
            action=action, justification=justification, idempotency_key=idempotency_key, session_id=session_id
        )

    def propose(
        self, tool: str, operation: str, resource: str, justification: str, **kw: Any
    ) -> pdp_pb2.ProposeResponse:
        """Record and decide a proposal. Same ``idempotency_key`` → the same proposal back."""
        return self.send(self.request(tool, operation, resource, justification, **kw))

    def _call(self, method: Callable[..., R], request: Message) -> R:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def send(self, request: pdp_pb2.ProposeRequest) -> pdp_pb2.ProposeResponse:
        return self._call(self._stub.Propose, request)

    def evaluate(self, tool: str, operation: str, resource: str, justification: str, **kw: Any) -> pdp_pb2.Decision:
        """Dry run: the decision a proposal would get; nothing is recorded."""
        return self._call(self._stub.Evaluate, self.request(tool, operation, resource, justification, **kw))

    def get(self, proposal_id: str) -> pdp_pb2.Proposal:
        return self._call(self._stub.GetProposal, pdp_pb2.GetProposalRequest(proposal_id=proposal_id))

    def cancel(self, proposal_id: str) -> pdp_pb2.Proposal:
        """Withdraw a proposal that is still pending approval."""
        return self._call(self._stub.CancelProposal, pdp_pb2.GetProposalRequest(proposal_id=proposal_id))

    def watch(self, proposal_id: str, timeout: float | None = None) -> Iterator[pdp_pb2.Proposal]:
        """One message per state change; ends at a terminal state."""
        try:
            yield from self._stub.WatchProposal(
                pdp_pb2.GetProposalRequest(proposal_id=proposal_id), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def wait(self, proposal_id: str, timeout: float | None = None) -> pdp_pb2.Proposal:
        """The proposal once it reached a terminal state (SUCCEEDED, FAILED, DENIED, …)."""
        last = None
        for message in self.watch(proposal_id, timeout=timeout):
            last = message
        if last is None:  # a watch always sends the current state first
            raise PdpClientError(grpc.StatusCode.INTERNAL, "the watch ended without a message")
        return last
