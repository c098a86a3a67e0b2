"""The realistic proposal mix both benchmarks send, against the example bundle in ``policies/``.

Weights are percentages (they sum to 100). Reads are common, most writes land where AI may write,
and a steady trickle hits approvals, human-only boundaries and the catalog checks. ``expect`` is the
outcome on a weekday in the ``dev`` environment; the engine benchmark prints any mismatch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# role -> (agent id, owner, roles). The load benchmark creates these agents; the engine one uses them directly.
AGENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "support": ("bench-support", "bench-owner", ("support",)),
    "ops": ("bench-ops", "bench-owner", ("ops",)),
}

T = "http://127.0.0.1:8282/api/tickets"


@dataclass(frozen=True, slots=True)
class MixItem:
    name: str
    role: str
    tool: str
    operation: str
    resource: str  # "{n}" is replaced by a running number so proposals differ
    weight: int
    expect: str  # allow | deny | needs_approval
    params: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 0.0

    @property
    def read(self) -> bool:
        return self.operation in ("GET", "select")


MIX: tuple[MixItem, ...] = (
    # --- support agent: tickets ----------------------------------------------------------------------
    MixItem("ticket read", "support", "tickets", "GET", T + "/{n}", 18, "allow"),
    MixItem("ticket create", "support", "tickets", "POST", T, 14, "allow", {"title": "Printer on fire #{n}"}),
    MixItem("ticket update", "support", "tickets", "PATCH", T + "/{n}", 10, "allow", {"status": "waiting"}),
    MixItem("ticket bulk close", "support", "tickets", "POST", T + "/bulk-close", 5, "needs_approval", {"count": 40}),
    MixItem("ticket critical", "support", "tickets", "POST", T, 2, "needs_approval", {"priority": "critical"}),
    MixItem("ticket PATCH collection", "support", "tickets", "PATCH", T, 2, "deny", {"status": "closed"}),
    # --- support agent: scratch, CRM -----------------------------------------------------------------
    MixItem("scratch write", "support", "scratch", "PUT", "https://scratch.internal/support/draft-{n}.md", 8, "allow"),
    MixItem("scratch read", "support", "scratch", "GET", "https://scratch.internal/support/draft-{n}.md", 5, "allow"),
    MixItem("crm lookup", "support", "crm", "select", "sql://crm/contacts", 8, "allow", {"email": "c{n}@example.com"}),
    MixItem("crm insert", "support", "crm", "insert", "sql://crm/contacts", 3, "needs_approval", {"email": "n{n}@x"}),
    # --- support agent: forbidden territory ----------------------------------------------------------
    MixItem("iam self-promotion", "support", "iam", "POST", "iam://roles/admin/members", 5, "deny", {"user": "u{n}"}),
    MixItem("secpolicy read", "support", "secpolicy", "GET", "secpolicy://firewall/rules", 2, "deny"),
    MixItem("catalog: unknown tool", "support", "shell", "exec", "shell://prod-web-1", 2, "deny", {"cmd": "rm -rf /"}),
    MixItem("catalog: unknown operation", "support", "tickets", "PUT", T + "/{n}", 1, "deny"),
    MixItem("catalog: outside prefix", "support", "tickets", "POST", "https://evil.example/api/tickets", 1, "deny"),
    MixItem("catalog: dot segments", "support", "scratch", "PUT", "https://scratch.internal/../admin/{n}", 1, "deny"),
    # --- ops agent -----------------------------------------------------------------------------------
    MixItem("proddb query", "ops", "proddb", "select", "sql://prod-orders/orders", 5, "allow", {"id": "{n}"}),
    MixItem("proddb update", "ops", "proddb", "update", "sql://prod-orders/orders", 2, "needs_approval", {"id": "{n}"}),
    MixItem("proddb delete", "ops", "proddb", "delete", "sql://prod-orders/orders", 1, "deny", {"id": "{n}"}),
    MixItem("infra read", "ops", "infra", "GET", "infra://dns/zones/{n}", 3, "allow"),
    MixItem("infra write", "ops", "infra", "PUT", "infra://instance-groups/web", 1, "deny", {"size": 40}),
    MixItem("expensive scratch write", "support", "scratch", "PUT", "https://scratch.internal/x/{n}.csv", 1,
            "needs_approval", cost=250.0),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Proposal:
    item: MixItem
    resource: str
    params: dict[str, Any]


def _fill(value: Any, n: int) -> Any:
    return value.replace("{n}", str(n)) if isinstance(value, str) else value


def render(item: MixItem, n: int) -> Proposal:
    return Proposal(item, _fill(item.resource, n), {k: _fill(v, n) for k, v in item.params.items()})


def sample(count: int, seed: int = 1) -> list[Proposal]:
    """About ``count`` proposals (a multiple of 100) in exactly the mix's proportions, shuffled with ``seed``,
    each with its own running number."""
    reps = max(1, count // 100)
    items = [m for m in MIX for _ in range(m.weight * reps)]
    random.Random(seed).shuffle(items)
    return [render(item, 1000 + seed * 1_000_000 + i) for i, item in enumerate(items)]
