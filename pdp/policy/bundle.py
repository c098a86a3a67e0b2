"""A loaded, compiled, immutable policy bundle: what the engine decides with."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import timedelta

from pdp.policy.catalog import Tool
from pdp.policy.cel import CelProgram, Environment
from pdp.policy.decision import Outcome, Tier
from pdp.policy.documents import TestCaseSpec
from pdp.policy.source import Location


@dataclass(frozen=True, slots=True)
class Approval:
    groups: tuple[str, ...]
    min_approvals: int
    expires_in: timedelta


@dataclass(frozen=True, slots=True)
class Boundary:
    name: str
    description: str
    match: CelProgram
    tier: Tier
    applies_to_all: bool
    approval: Approval | None
    location: Location


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: str
    effect: Outcome
    when: CelProgram
    message: CelProgram | None
    tools: tuple[str, ...] | None
    approval: Approval | None
    location: Location

    def applies_to(self, tool: str) -> bool:
        return self.tools is None or any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools)


@dataclass(frozen=True, slots=True)
class PolicyTestCase:
    spec: TestCaseSpec
    location: Location


@dataclass(frozen=True, slots=True)
class Limit:
    """A governance limit (kind: Limits), applied after rules and boundaries; see pdp/governance/limits.py."""

    id: str
    kind: str  # rate | budget | retry_storm
    scope: str  # agent | agent+tool | tool | key
    key: CelProgram | None  # the CEL scope key when scope == "key"
    tools: tuple[str, ...] | None
    count: int = 0  # rate: proposals per window
    window: timedelta = timedelta(0)  # rate window; retry storm window
    budget_usd: float = 0.0
    on_exceed: Outcome = Outcome.DENY
    approval: Approval | None = None
    repeats: int = 0  # retry storm: identical denied proposals that quarantine the agent
    quarantine: timedelta = timedelta(0)
    location: Location | None = None

    def applies_to(self, tool: str) -> bool:
        return self.tools is None or any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.tools)


@dataclass(frozen=True)
class PolicyBundle:
    name: str
    default_tier: Tier
    default_effect: Outcome
    default_approval: Approval | None
    tools: dict[str, Tool]
    boundaries: tuple[Boundary, ...]
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTestCase, ...]
    limits: tuple[Limit, ...]
    digest: str
    git_commit: str | None
    # Content digest, plus the git commit when the bundle is a checkout: "sha256:<16 hex>+git.<12 hex>".
    policy_version: str
    environment: Environment = field(repr=False)
    # Whether any expression reads `usage`: only then does the server compute it for each proposal.
    uses_usage: bool = False
    # tool name -> the rules that apply to it; filled once per tool so decisions do not scan
    # rules written for other tools. Tool names come from the catalog, so this stays bounded.
    _rule_index: dict[str, tuple[Rule, ...]] = field(default_factory=dict, repr=False)

    def rules_for(self, tool: str) -> tuple[Rule, ...]:
        rules = self._rule_index.get(tool)
        if rules is None:
            rules = tuple(r for r in self.rules if r.applies_to(tool))
            self._rule_index[tool] = rules
        return rules


class ActiveBundle:
    """The bundle new requests are decided with. Swapping it is one reference assignment, so a request
    that read ``current`` once finishes on the bundle it started with."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self._bundle = bundle

    @property
    def current(self) -> PolicyBundle:
        return self._bundle

    def swap(self, bundle: PolicyBundle) -> PolicyBundle:
        """Activate ``bundle``; returns the one it replaced."""
        previous, self._bundle = self._bundle, bundle
        return previous
