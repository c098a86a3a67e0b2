"""Helpers for policy tests: write small bundles into a directory, load them, build decision inputs."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pdp.policy.bundle import PolicyBundle
from pdp.policy.engine import ActionInput, AgentIdentity, DecisionInput
from pdp.policy.loader import load_bundle

# A Monday, 10:00 UTC: the instant every decision in these tests happens at unless told otherwise.
NOW = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)

TICKETS = "http://127.0.0.1:8282/api/"

TOOLS: list[dict[str, Any]] = [
    {
        "name": "tickets",
        "type": "http",
        "resource_prefix": TICKETS,
        "operations": {"GET": "read", "POST": "write", "PATCH": "write"},
    },
    {
        "name": "iam",
        "type": "http",
        "resource_prefix": "iam://",
        "operations": {"get": "read", "set": "write"},
    },
]

DEFAULT_APPROVAL: dict[str, Any] = {"groups": ["ops"], "min_approvals": 1, "expires_in": "1h"}

# The same Bundle and Tools documents as YAML text, for tests that write the other documents by hand.
BUNDLE_TOOLS_YAML = f"""
apiVersion: pdp/v1
kind: Bundle
name: test-bundle
default_tier: ai_writable
default_effect: deny
default_approval: {{groups: [ops], min_approvals: 1, expires_in: 1h}}
---
apiVersion: pdp/v1
kind: Tools
tools:
  - name: tickets
    type: http
    resource_prefix: "{TICKETS}"
    operations: {{GET: read, POST: write, PATCH: write}}
  - name: iam
    type: http
    resource_prefix: "iam://"
    operations: {{get: read, set: write}}
"""


def write_yaml(directory: Path, name: str, *documents: Mapping[str, Any]) -> Path:
    """Write documents (separated by ``---``) to ``directory/name``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False), encoding="utf-8")
    return path


def write_text(directory: Path, name: str, text: str) -> Path:
    """Write dedented YAML text to ``directory/name`` (leading newline dropped) so line numbers are exact."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def write_bundle(
    directory: Path,
    *,
    rules: Sequence[Mapping[str, Any]] = (),
    boundaries: Sequence[Mapping[str, Any]] = (),
    tools: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, str] | None = None,
    tests: Sequence[Mapping[str, Any]] = (),
    default_tier: str = "ai_writable",
    default_effect: str = "deny",
    default_approval: Mapping[str, Any] | None = DEFAULT_APPROVAL,
    name: str = "test-bundle",
) -> Path:
    """Write a minimal bundle: one file per document kind. Returns ``directory``."""
    head: dict[str, Any] = {
        "apiVersion": "pdp/v1",
        "kind": "Bundle",
        "name": name,
        "default_tier": default_tier,
        "default_effect": default_effect,
    }
    if default_approval is not None:
        head["default_approval"] = dict(default_approval)
    write_yaml(directory, "bundle.yaml", head)
    write_yaml(
        directory,
        "tools.yaml",
        {"apiVersion": "pdp/v1", "kind": "Tools", "tools": [dict(t) for t in (TOOLS if tools is None else tools)]},
    )
    if boundaries:
        write_yaml(
            directory,
            "boundaries.yaml",
            {"apiVersion": "pdp/v1", "kind": "Boundaries", "boundaries": [dict(b) for b in boundaries]},
        )
    if rules or variables:
        doc: dict[str, Any] = {"apiVersion": "pdp/v1", "kind": "Rules"}
        if variables:
            doc["variables"] = dict(variables)
        doc["rules"] = [dict(r) for r in rules]
        write_yaml(directory, "rules.yaml", doc)
    if tests:
        write_yaml(directory, "tests.yaml", {"apiVersion": "pdp/v1", "kind": "PolicyTest", "tests": list(tests)})
    return directory


def make_bundle(directory: Path, **kwargs: Any) -> PolicyBundle:
    """Write a minimal bundle (see :func:`write_bundle`) and load it."""
    return load_bundle(write_bundle(directory, **kwargs))


def request(
    tool: str = "tickets",
    operation: str = "POST",
    resource: str = TICKETS + "t/1",
    *,
    params: Mapping[str, Any] | None = None,
    estimated_cost_usd: float = 0.0,
    labels: Mapping[str, str] | None = None,
    agent_id: str = "a1",
    owner: str = "alice",
    roles: Sequence[str] = ("support",),
    now: datetime = NOW,
    environment: str = "dev",
    usage: Mapping[str, Any] | None = None,
) -> DecisionInput:
    """A decision input with sensible defaults: a write to one ticket, at :data:`NOW`."""
    return DecisionInput(
        agent=AgentIdentity(id=agent_id, owner=owner, roles=tuple(roles), labels={}),
        action=ActionInput(
            tool=tool,
            operation=operation,
            resource=resource,
            params=dict(params or {}),
            estimated_cost_usd=estimated_cost_usd,
            labels=dict(labels or {}),
        ),
        now=now,
        environment=environment,
        usage=dict(usage or {}),
    )
