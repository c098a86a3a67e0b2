"""Input limits for a proposal. Malformed input is refused naming the field, and recorded nowhere."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from pdp.canonical import canonical_json
from pdp.errors import InvalidArgument
from pdp.policy.engine import ActionInput
from pdp.v1 import pdp_pb2

MAX_TOOL = 200
MAX_OPERATION = 200
MAX_RESOURCE = 2048
MAX_JUSTIFICATION = 4096
MAX_KEY = 200
MAX_PROPOSAL_ID = 64
MAX_PARAMS_BYTES = 64 * 1024
MAX_PARAMS_DEPTH = 16
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
# JSON numbers are doubles: an integral value beyond 2**53 would silently change.
_MAX_EXACT = 2**53
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ProposalInput:
    """A proposal that passed every input check."""

    action: ActionInput
    justification: str
    idempotency_key: str
    session_id: str

    def action_document(self) -> dict[str, Any]:
        """The action exactly as recorded and digested."""
        a = self.action
        return {
            "tool": a.tool,
            "operation": a.operation,
            "resource": a.resource,
            "params": dict(a.params),
            "estimated_cost_usd": a.estimated_cost_usd,
            "labels": dict(a.labels),
        }


def _text(field: str, value: str, *, maximum: int, required: bool = True) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "is required")
    if len(value) > maximum:
        raise InvalidArgument(field, f"is longer than {maximum} characters")
    # PostgreSQL cannot store NUL in text or JSON; no legitimate value contains one.
    if "\x00" in value:
        raise InvalidArgument(field, "contains a NUL character")
    return value


def _value(field: str, value: struct_pb2.Value, depth: int) -> Any:
    if depth > MAX_PARAMS_DEPTH:
        raise InvalidArgument(field, f"nests deeper than {MAX_PARAMS_DEPTH} levels")
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return _text(field, value.string_value, maximum=MAX_PARAMS_BYTES, required=False)
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(field, "is not a finite number")
        return int(number) if number.is_integer() and abs(number) <= _MAX_EXACT else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(field, value.struct_value, depth + 1)
    if kind == "list_value":
        return [_value(f"{field}[{i}]", v, depth + 1) for i, v in enumerate(value.list_value.values)]
    return None  # null_value, or unset which protobuf reads as null


def _struct(field: str, struct: struct_pb2.Struct, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in struct.fields.items():
        _text(f"{field} key", key, maximum=MAX_KEY)
        out[key] = _value(f"{field}.{key}", value, depth)
    return out


def _labels(field: str, labels: Any) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"has more than {MAX_LABELS} entries")
    return {
        _text(f"{field} key", k, maximum=MAX_LABEL_KEY): _text(
            f"{field}.{k}", v, maximum=MAX_LABEL_VALUE, required=False
        )
        for k, v in labels.items()
    }


def validate_proposal_id(proposal_id: str) -> str:
    _text("proposal_id", proposal_id, maximum=MAX_PROPOSAL_ID)
    if _CONTROL.search(proposal_id):
        raise InvalidArgument("proposal_id", "contains control characters")
    return proposal_id


def validate(request: pdp_pb2.ProposeRequest) -> ProposalInput:
    """Check every limit; raise :class:`InvalidArgument` naming the first bad field."""
    if not request.HasField("action"):
        raise InvalidArgument("action", "is required")
    action = request.action
    tool = _text("action.tool", action.tool, maximum=MAX_TOOL)
    operation = _text("action.operation", action.operation, maximum=MAX_OPERATION)
    resource = _text("action.resource", action.resource, maximum=MAX_RESOURCE)
    params = _struct("action.params", action.params, 1)
    if len(canonical_json(params)) > MAX_PARAMS_BYTES:
        raise InvalidArgument("action.params", f"is larger than {MAX_PARAMS_BYTES} bytes serialised")
    cost = action.estimated_cost_usd
    if not math.isfinite(cost) or cost < 0:
        raise InvalidArgument("action.estimated_cost_usd", "must be a finite, non-negative number")
    labels = _labels("action.labels", action.labels)
    justification = _text("justification", request.justification, maximum=MAX_JUSTIFICATION)
    key = _text("idempotency_key", request.idempotency_key, maximum=MAX_KEY, required=False)
    session = _text("session_id", request.session_id, maximum=MAX_KEY, required=False)
    return ProposalInput(
        action=ActionInput(tool, operation, resource, params, float(cost), labels),
        justification=justification,
        idempotency_key=key,
        session_id=session,
    )
