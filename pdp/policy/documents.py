"""The schema of every bundle document kind, as written in YAML. Unknown keys are errors."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from pdp.policy.duration import DurationText, parse_duration

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
    expires_in: DurationText = "1h"


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
    query: bool = False  # resources may carry a query string (?…); policy then sees it in action.resource


class ToolsDoc(_Doc):
    kind: Literal["Tools"]
    tools: list[ToolSpec]


class RetryStormSpec(_Strict):
    repeats: int = Field(ge=1, le=1000)
    window: DurationText = "10m"
    quarantine: DurationText = "15m"


class ScopeKeySpec(_Strict):
    key: Expression  # CEL string: limits are counted per distinct value


class LimitSpec(_Strict):
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
    description: str = ""
    scope: Literal["agent", "agent+tool", "tool"] | ScopeKeySpec = "agent"
    tools: list[Name] | None = Field(default=None, min_length=1)
    rate: str | None = None  # "N/window": N proposals per fixed window
    budget_usd: str | None = None  # "N/day": estimated spend of allowed and approved proposals per UTC day
    on_exceed: Literal["deny", "needs_approval"] = "deny"
    approval: ApprovalSpec | None = None
    retry_storm: RetryStormSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> LimitSpec:
        kinds = [k for k in ("rate", "budget_usd", "retry_storm") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a limit has exactly one of rate, budget_usd or retry_storm")
        if self.rate is not None:
            parse_rate(self.rate)
        if self.budget_usd is not None:
            parse_budget(self.budget_usd)
        if self.on_exceed != "deny" and self.budget_usd is None:
            raise ValueError("on_exceed applies to budget_usd limits only (rate limits and retry storms deny)")
        if self.approval is not None and self.on_exceed != "needs_approval":
            raise ValueError("approval is only meaningful with on_exceed: needs_approval")
        if self.retry_storm is not None and self.scope != "agent":
            raise ValueError("retry_storm is per agent: it quarantines the agent (scope: agent)")
        return self


_WINDOWS = {"second": "1s", "minute": "1m", "hour": "1h", "day": "1d"}


def parse_rate(text: str) -> tuple[int, timedelta]:
    """ "100/1m", "10/second", "5000/day" -> (count, window)."""
    count, sep, window = text.partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"rate {text!r}: write N/window, e.g. 60/1m or 1000/hour")
    return int(count), parse_duration(_WINDOWS.get(window.strip(), window.strip()))


def parse_budget(text: str) -> float:
    """ "25/day" or "25.50/day" -> 25.5 (USD per UTC day)."""
    amount, sep, window = text.partition("/")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if not sep or window.strip() != "day" or not 0 < value < float("inf"):  # also refuses NaN
        raise ValueError(f"budget_usd {text!r}: write N/day with N > 0, e.g. 50/day")
    return value


class LimitsDoc(_Doc):
    kind: Literal["Limits"]
    limits: list[LimitSpec]


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
