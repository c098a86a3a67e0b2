"""The schema of every bundle document kind, as written in YAML. Unknown keys are errors."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from pdp.policy.duration import parse_duration

API_VERSION = "pdp/v1"

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Expression = Annotated[str, StringConstraints(min_length=1, max_length=20_000)]
EffectName = Literal["allow", "deny", "needs_approval"]
TierName = Literal["ai_writable", "approval_required", "human_only"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Doc(_Strict):
    apiVersion: Literal["pdp/v1"]  # noqa: N815 — the YAML key is fixed


class ApprovalSpec(_Strict):
    groups: list[Name] = Field(min_length=1)
    min_approvals: int = Field(default=1, ge=1, le=100)
    expires_in: str = "1h"

    @field_validator("expires_in")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class BundleDoc(_Doc):
    kind: Literal["Bundle"]
    name: Name
    description: str = ""
    default_tier: TierName
    default_effect: EffectName = "deny"
    default_approval: ApprovalSpec | None = None


class BoundarySpec(_Strict):
    name: Name
    description: str = ""
    match: Expression
    tier: TierName
    applies_to: Literal["writes", "all"] = "writes"
    approval: ApprovalSpec | None = None


class BoundariesDoc(_Doc):
    kind: Literal["Boundaries"]
    boundaries: list[BoundarySpec]


class RuleSpec(_Strict):
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
    description: str = ""
    effect: EffectName
    when: Expression
    message: Expression | None = None
    tools: list[Name] | None = Field(default=None, min_length=1)
    approval: ApprovalSpec | None = None


class RulesDoc(_Doc):
    kind: Literal["Rules"]
    variables: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Expression] = {}
    rules: list[RuleSpec]


class ToolSpec(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
    description: str = ""
    type: Name
    resource_prefix: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    operations: dict[Name, Literal["read", "write"]] = Field(min_length=1)
    idempotent: bool = False


class ToolsDoc(_Doc):
    kind: Literal["Tools"]
    tools: list[ToolSpec]


class LimitsDoc(_Doc):
    """Parsed so bundles that carry limits load; enforced by the governance layer."""

    kind: Literal["Limits"]
    limits: list[dict[str, Any]]


class TestAgent(_Strict):
    id: Name
    owner: str = ""
    roles: list[str] = []
    labels: dict[str, str] = {}


class TestAction(_Strict):
    tool: Name
    operation: Name
    resource: Name
    params: dict[str, Any] = {}
    estimated_cost_usd: float | int = 0.0
    labels: dict[str, str] = {}


class TestContext(_Strict):
    # YAML reads an unquoted timestamp as a datetime, a quoted one as a string; both are fine.
    now: datetime | str | None = None
    environment: str | None = None


class TestInput(_Strict):
    agent: TestAgent
    action: TestAction
    context: TestContext = TestContext()
    usage: dict[str, Any] = {}


class TestExpect(_Strict):
    outcome: EffectName
    rules: list[str] | None = None
    boundary: str | None = None
    tier: TierName | None = None


class TestCaseSpec(_Strict):
    name: Name
    input: TestInput
    expect: TestExpect


class PolicyTestDoc(_Doc):
    kind: Literal["PolicyTest"]
    name: str = ""
    tests: list[TestCaseSpec] = Field(min_length=1)


DOCUMENT_KINDS: dict[str, type[_Doc]] = {
    "Bundle": BundleDoc,
    "Boundaries": BoundariesDoc,
    "Rules": RulesDoc,
    "Tools": ToolsDoc,
    "Limits": LimitsDoc,
    "PolicyTest": PolicyTestDoc,
}
