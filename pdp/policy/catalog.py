"""The tool catalog: which tools exist, their verbs, and whether each verb reads or writes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pdp.policy import resource_form


class Kind(Enum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    type: str
    resource_prefix: str
    operations: dict[str, Kind]
    idempotent: bool = False
    query: bool = False  # whether a resource may carry a query string (?…), verbatim


@dataclass(frozen=True, slots=True)
class CatalogViolation:
    """Why a well-formed action cannot be matched to the catalog; it is recorded and denied."""

    check: str  # unknown_tool | unknown_operation | resource_outside_prefix | resource_not_canonical
    message: str


def resolve(tools: dict[str, Tool], tool: str, operation: str, resource: str) -> Kind | CatalogViolation:
    """The action's kind, or the catalog check it fails."""
    spec = tools.get(tool)
    if spec is None:
        return CatalogViolation("unknown_tool", f"tool {tool!r} is not in the catalog")
    kind = spec.operations.get(operation)
    if kind is None:
        known = ", ".join(sorted(spec.operations))
        return CatalogViolation("unknown_operation", f"tool {tool!r} has no operation {operation!r} (it has: {known})")
    if not resource.startswith(spec.resource_prefix):
        return CatalogViolation(
            "resource_outside_prefix",
            f"resource {resource!r} is outside tool {tool!r}'s prefix {spec.resource_prefix!r}",
        )
    # The bare prefix names the tool's whole scope, not one thing under it (a query does not change that).
    if spec.resource_prefix in (resource, resource.partition("?")[0]):
        return CatalogViolation(
            "resource_outside_prefix",
            f"resource {resource!r} is tool {tool!r}'s bare prefix, its whole scope; name one thing under it",
        )
    # One spelling per resource: what the policy reads is what the connector sends (resource_form.py).
    problem = resource_form.problem(resource, query=spec.query)
    if problem:
        return CatalogViolation("resource_not_canonical", f"resource {resource!r} {problem}")
    return kind
