"""The tool catalog: which tools exist, their verbs, and whether each verb reads or writes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote


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


@dataclass(frozen=True, slots=True)
class CatalogViolation:
    """Why a well-formed action cannot be matched to the catalog; it is recorded and denied."""

    check: str  # unknown_tool | unknown_operation | resource_outside_prefix | resource_not_canonical
    message: str


# Dot segments (also percent-encoded) would let a resource that passes a prefix check point elsewhere
# once a connector normalises it; the resource the policy saw must be the one the connector touches.
# Checked on the resource as written and once percent-decoded, so "..%2f" or "%2e%2e/" cannot slip by.
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$|\?|#)")
_UNSAFE_RAW = re.compile(r"[\x00-\x20\x7f\\]")
# An encoded space (%20) is fine; encoded control characters and backslashes are not.
_UNSAFE_DECODED = re.compile(r"[\x00-\x1f\x7f\\]")


def resolve(tools: dict[str, Tool], tool: str, operation: str, resource: str) -> Kind | CatalogViolation:
    """The action's kind, or the catalog check it fails."""
    spec = tools.get(tool)
    if spec is None:
        return CatalogViolation("unknown_tool", f"tool {tool!r} is not in the catalog")
    kind = spec.operations.get(operation)
    if kind is None:
        known = ", ".join(sorted(spec.operations))
        return CatalogViolation("unknown_operation", f"tool {tool!r} has no operation {operation!r} (it has: {known})")
    # The bare prefix names the tool's whole scope, not one thing under it.
    if not resource.startswith(spec.resource_prefix) or len(resource) == len(spec.resource_prefix):
        return CatalogViolation(
            "resource_outside_prefix",
            f"resource {resource!r} is outside tool {tool!r}'s prefix {spec.resource_prefix!r}",
        )
    problem = _ambiguity(resource)
    if problem:
        return CatalogViolation("resource_not_canonical", f"resource {resource!r} {problem}")
    return kind


def _ambiguity(resource: str) -> str | None:
    """Why ``resource`` could name something else than it appears to once a connector parses it, if it could.

    A prefix check is a string comparison; connectors parse URLs. Anything a URL parser, an HTTP
    server or a path normaliser could read differently from the plain string is refused.
    """
    decoded = unquote(resource)
    if _DOT_SEGMENT.search(resource) or _DOT_SEGMENT.search(decoded):
        return "contains dot segments"
    if _UNSAFE_RAW.search(resource) or _UNSAFE_DECODED.search(decoded):
        return "contains whitespace, control characters or backslashes"
    if "%25" in resource.lower():
        return "is percent-encoded twice"
    _, separator, rest = resource.partition("://")
    if separator:
        authority, _, path = rest.partition("/")
        authority = re.split(r"[?#]", authority, maxsplit=1)[0]
        if "@" in authority:
            return "names a user in its authority (user@host)"
        path = re.split(r"[?#]", path, maxsplit=1)[0]
        if path.startswith("/") or "//" in path:
            return "contains an empty path segment (//)"
        if ";" in path:
            return "contains path parameters (;)"
    return None
