"""Decision-engine benchmark: ``python -m bench.engine [--duration S] [--profile]``.

1. Decisions per second on one core (one thread) over the realistic mix (bench/mix.py) on the example
   bundle in ``policies/``, after a warm-up: mean, p50, p99 µs per decision, and µs per mix entry.
2. Scaling: synthetic bundles with 10, 100 and 1,000 rules over 100 tools, each tool matched by exactly 10
   rules (``tools: [...]``), plus four boundaries. The rule index should make 1,000 rules cost what 10 do.
3. ``--profile``: where a decision's time goes (catalog check, CEL input conversion, activation, expression
   evaluation, the rest), then cProfile's top functions by cumulative time.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import sysinfo
from bench.mix import AGENTS, MIX, sample
from pdp.policy.bundle import PolicyBundle
from pdp.policy.catalog import CatalogViolation, Kind, resolve
from pdp.policy.cel import CelError
from pdp.policy.engine import ActionInput, AgentIdentity, DecisionInput, _cel_variables, decide
from pdp.policy.loader import load_bundle

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_BUNDLE = REPO / "policies"
# A Monday morning: the example bundle freezes production writes at weekends.
NOW = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
TARGET_PER_SECOND = 10_000
TARGET_SCALING_RATIO = 2.0
SYNTHETIC_TOOLS = 100
RULES_PER_TOOL = 10


# --- measuring ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    wall: float  # seconds
    cpu: float  # seconds of this thread's CPU
    latencies_ns: list[int]
    others: float  # cores other processes kept busy meanwhile (they skew the numbers)
    steal: float  # share of CPU time the hypervisor gave elsewhere

    @property
    def per_second(self) -> float:
        return self.count / self.wall

    @property
    def mean_us(self) -> float:
        return self.wall / self.count * 1e6

    def percentile_us(self, p: float) -> float:
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[index] / 1000


def measure(bundle: PolicyBundle, inputs: Sequence[DecisionInput], duration: float, warmup: float) -> Stats:
    """Decide ``inputs`` round and round on this thread: ``warmup`` seconds untimed, then ``duration`` timed.

    Whole passes only, so the mix's proportions hold exactly.
    """
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        for request in inputs:
            decide(bundle, request)
    gc.collect()
    latencies: list[int] = []
    clock = time.perf_counter_ns
    machine0 = sysinfo.MachineCpu.read()
    cpu0, t0 = time.thread_time(), clock()
    deadline = t0 + int(duration * 1e9)
    finished = t0
    while finished < deadline:
        for request in inputs:
            start = clock()
            decide(bundle, request)
            finished = clock()
            latencies.append(finished - start)
    wall = (clock() - t0) / 1e9
    cpu = time.thread_time() - cpu0
    machine1 = sysinfo.MachineCpu.read()
    others = max(0.0, machine1.busy_cores_since(machine0) - cpu / wall)
    return Stats(len(latencies), wall, cpu, latencies, others, machine1.steal_since(machine0))


def _agent(role: str) -> AgentIdentity:
    agent_id, owner, roles = AGENTS[role]
    return AgentIdentity(id=agent_id, owner=owner, roles=roles)


def example_inputs(count: int = 1000) -> tuple[list[str], list[DecisionInput]]:
    names: list[str] = []
    inputs: list[DecisionInput] = []
    for proposal in sample(count):
        item = proposal.item
        action = ActionInput(item.tool, item.operation, proposal.resource, proposal.params, item.cost)
        names.append(item.name)
        inputs.append(DecisionInput(agent=_agent(item.role), action=action, now=NOW, environment="dev"))
    return names, inputs


# --- 1. the example bundle ----------------------------------------------------------------------------


def bench_example(duration: float, warmup: float) -> None:
    bundle = load_bundle(EXAMPLE_BUNDLE)
    names, inputs = example_inputs()
    print(f"\n== 1. example bundle ({EXAMPLE_BUNDLE.relative_to(REPO)}), one thread, realistic mix")
    print(f"   {len(bundle.rules)} rules, {len(bundle.boundaries)} boundaries, {len(bundle.tools)} tools; ", end="")
    print(f"{len(inputs)} distinct proposals from {len(MIX)} mix entries; warm-up {warmup:g} s, timed {duration:g} s")

    outcomes: dict[str, int] = defaultdict(int)
    mismatches: list[str] = []
    by_name = {m.name: m for m in MIX}
    checked: set[str] = set()
    for name, request in zip(names, inputs, strict=True):
        outcome = decide(bundle, request).outcome.value
        outcomes[outcome] += 1
        if name not in checked:
            checked.add(name)
            if outcome != by_name[name].expect:
                mismatches.append(f"{name}: expected {by_name[name].expect}, got {outcome}")
    reads = sum(1 for n in names if by_name[n].read)
    mix = ", ".join(f"{k} {v / len(inputs):.0%}" for k, v in sorted(outcomes.items()))
    print(f"   outcome mix: {mix}; reads {reads / len(inputs):.0%}")
    for line in mismatches:
        print(f"   NOTE mix entry decided differently than bench/mix.py expects: {line}")

    stats = measure(bundle, inputs, duration, warmup)
    met = "met" if stats.per_second >= TARGET_PER_SECOND else "NOT met"
    print(f"   decisions        {stats.count:,} in {stats.wall:.2f} s wall, {stats.cpu:.2f} s CPU (one thread)")
    print(f"   meanwhile        other processes kept {stats.others:.2f} cores busy; steal {stats.steal:.0%}")
    target = f"(target >= {TARGET_PER_SECOND:,}/s on one core: {met})"
    print(f"   throughput       {stats.per_second:,.0f} decisions/s   {target}")
    print(f"   latency µs       mean {stats.mean_us:.1f}   p50 {stats.percentile_us(50):.1f}   ", end="")
    print(f"p90 {stats.percentile_us(90):.1f}   p99 {stats.percentile_us(99):.1f}   max {stats.percentile_us(100):.0f}")

    per_name: dict[str, list[int]] = defaultdict(list)
    for i, ns in enumerate(stats.latencies_ns):
        per_name[names[i % len(names)]].append(ns)
    print("   per mix entry (mean µs, share of decisions):")
    for item in sorted(MIX, key=lambda m: -sum(per_name[m.name]) / len(per_name[m.name])):
        samples = per_name[item.name]
        print(f"     {item.name:<28} {sum(samples) / len(samples) / 1000:7.1f}   {item.weight:3d}%   {item.expect}")


# --- 2. scaling with the number of rules --------------------------------------------------------------

# Ten rule shapes; each tool gets one of each. "{i}" makes every rule's expression its own.
_RULE_SHAPES: tuple[tuple[str, str, str | None], ...] = (
    ("allow", 'agent.roles.exists(r, r in ["support", "ops"]) && action.kind == "read"', None),
    ("allow", '"support" in agent.roles && action.operation == "POST" && !action.resource.endsWith("/r{i}")', None),
    ("deny", 'context.environment == "prod" && action.operation == "DELETE"', '"no deletes in prod (rule {i})"'),
    (
        "needs_approval",
        'action.kind == "write" && has(action.params.count) && action.params.count > 10.0',
        '"bulk change of " + string(int(action.params.count)) + " items (rule {i})"',
    ),
    ("needs_approval", "action.estimated_cost_usd > 100.0", '"costly: " + string(action.estimated_cost_usd)'),
    ("deny", 'action.resource.contains("/r{i}/forbidden")', None),
    ("allow", 'action.operation == "DELETE" && sets.contains(agent.roles, ["support"])', '"delete " + action.resource'),
    ("deny", 'has(action.params.priority) && string(action.params.priority).lowerAscii() == "critical-{i}"', None),
    ("allow", 'action.kind == "write" && size(action.resource) < 200 && agent.id.startsWith("bench")', None),
    ("deny", 'context.now.getHours("UTC") < 5 && action.kind == "write" && action.resource.contains("/r{i}/")', None),
)


def _tool(t: int) -> str:
    return f"svc-{t:03d}"


def write_synthetic_bundle(directory: Path, rule_count: int) -> None:
    """``rule_count`` rules (a multiple of 10, at most 10 x tools) over 100 tools; every tool matches 10 rules."""
    groups = rule_count // RULES_PER_TOOL  # each group: 10 rules, one per shape, over 100/groups tools
    tools_per_group = SYNTHETIC_TOOLS // groups
    rules: list[dict[str, Any]] = []
    for i in range(rule_count):
        group, shape = divmod(i, RULES_PER_TOOL)
        effect, when, message = _RULE_SHAPES[shape]
        rule: dict[str, Any] = {
            "id": f"rule-{i:04d}",
            "description": f"synthetic rule {i}",
            "tools": [_tool(t) for t in range(group * tools_per_group, (group + 1) * tools_per_group)],
            "effect": effect,
            "when": when.replace("{i}", str(i)),
        }
        if message:
            rule["message"] = message.replace("{i}", str(i))
        rules.append(rule)
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "pdp/v1",
            "kind": "Bundle",
            "name": f"synthetic-{rule_count}",
            "default_tier": "approval_required",
            "default_effect": "deny",
            "default_approval": {"groups": ["ops-oncall"], "min_approvals": 1, "expires_in": "1h"},
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [
                {
                    "name": _tool(t),
                    "type": "http",
                    "resource_prefix": f"https://{_tool(t)}.internal/",
                    "operations": {"GET": "read", "POST": "write", "DELETE": "write"},
                    "idempotent": False,
                }
                for t in range(SYNTHETIC_TOOLS)
            ],
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Boundaries",
            "boundaries": [
                {"name": "admin", "match": 'action.resource.contains(".internal/admin/")', "tier": "human_only"},
                {
                    "name": "secrets",
                    "match": 'action.resource.endsWith("/secrets")',
                    "tier": "human_only",
                    "applies_to": "all",
                },
                {
                    "name": "prod",
                    "match": 'action.resource.contains("/prod/")',
                    "tier": "approval_required",
                    "approval": {"groups": ["dba"], "min_approvals": 1, "expires_in": "30m"},
                },
                {"name": "services", "match": 'action.resource.startsWith("https://svc-")', "tier": "ai_writable"},
            ],
        },
        {"apiVersion": "pdp/v1", "kind": "Rules", "rules": rules},
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))


def synthetic_inputs(count: int = 1000, seed: int = 7) -> list[DecisionInput]:
    """Uniform over the 100 tools; half reads; a few bulk, costly, prod and secret proposals."""
    rng = random.Random(seed)
    agent = _agent("support")
    inputs: list[DecisionInput] = []
    for n in range(count):
        tool = _tool(rng.randrange(SYNTHETIC_TOOLS))
        operation = rng.choices(("GET", "POST", "DELETE"), weights=(50, 35, 15))[0]
        area = rng.choices(("items", "prod", "secrets"), weights=(90, 7, 3))[0]
        resource = f"https://{tool}.internal/r{n % 50}/{area}/{n}"
        if area == "secrets":
            resource = f"https://{tool}.internal/r{n % 50}/secrets"
        params: dict[str, Any] = {}
        if operation == "POST":
            params = {"title": f"item {n}", "count": rng.choice((1, 3, 40))}
        cost = 250.0 if rng.random() < 0.05 else 1.0
        action = ActionInput(tool, operation, resource, params, cost)
        inputs.append(DecisionInput(agent=agent, action=action, now=NOW, environment="dev"))
    return inputs


def bench_scaling(duration: float, warmup: float, sizes: Sequence[int]) -> None:
    print(f"\n== 2. scaling: synthetic bundles over {SYNTHETIC_TOOLS} tools, each tool matched by exactly ", end="")
    print(f"{RULES_PER_TOOL} rules, 4 boundaries; warm-up {warmup:g} s, timed {duration:g} s each")
    inputs = synthetic_inputs()
    columns = ("rules", "rules/tool", "load s", "mean µs", "p50 µs", "p99 µs", "decisions/s", "others", "steal")
    widths = (6, 10, 7, 8, 7, 7, 12, 7, 6)
    print("   " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    means: dict[int, float] = {}
    outcomes: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="pdp-bench-bundles-") as tmp:
        for size in sizes:
            directory = Path(tmp) / f"rules-{size}"
            write_synthetic_bundle(directory, size)
            started = time.perf_counter()
            bundle = load_bundle(directory)
            load_seconds = time.perf_counter() - started
            per_tool = {len(bundle.rules_for(_tool(t))) for t in range(SYNTHETIC_TOOLS)}
            mix: dict[str, int] = defaultdict(int)
            for request in inputs:
                mix[decide(bundle, request).outcome.value] += 1
            outcomes[size] = mix
            stats = measure(bundle, inputs, duration, warmup)
            means[size] = stats.mean_us
            print(
                f"   {size:>6} {'/'.join(map(str, sorted(per_tool))):>10} {load_seconds:>7.2f} {stats.mean_us:>8.1f} "
                f"{stats.percentile_us(50):>7.1f} {stats.percentile_us(99):>7.1f} {stats.per_second:>12,.0f} "
                f"{stats.others:>7.2f} {stats.steal:>6.0%}"
            )
    mixes = {tuple(sorted(m.items())) for m in outcomes.values()}
    if len(mixes) == 1:
        print(
            "   outcome mix (same for every size): "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes[sizes[0]].items()))
        )
    if len(sizes) > 1:
        ratio = means[sizes[-1]] / means[sizes[0]]
        met = "met" if ratio <= TARGET_SCALING_RATIO else "NOT met"
        target = f"(target <= {TARGET_SCALING_RATIO:g}x: {met})"
        print(f"   ratio {sizes[-1]:,}-rule / {sizes[0]:,}-rule mean: {ratio:.2f}x   {target}")


# --- 3. profile ---------------------------------------------------------------------------------------


def bench_profile(passes: int) -> None:
    """Stage timings that mirror pdp/policy/engine.py::_decide, then cProfile."""
    bundle = load_bundle(EXAMPLE_BUNDLE)
    _, inputs = example_inputs()
    env = bundle.environment
    clock = time.perf_counter_ns
    totals: dict[str, int] = defaultdict(int)
    expressions = 0
    for request in inputs * 2:  # warm-up pass, then one counted below
        decide(bundle, request)
    totals.clear()
    for _ in range(passes):
        for request in inputs:
            action = request.action
            t0 = clock()
            kind = resolve(bundle.tools, action.tool, action.operation, action.resource)
            t1 = clock()
            totals["catalog check (resolve)"] += t1 - t0
            if not isinstance(kind, CatalogViolation):
                variables = _cel_variables(request, kind)
                t2 = clock()
                activation = env.activation(variables)
                t3 = clock()
                for boundary in bundle.boundaries:
                    if kind is Kind.WRITE or boundary.applies_to_all:
                        expressions += 1
                        with contextlib.suppress(CelError):
                            boundary.match.evaluate(activation)
                for rule in bundle.rules_for(action.tool):
                    expressions += 1
                    try:
                        if rule.when.evaluate(activation) and rule.message:
                            expressions += 1
                            rule.message.evaluate(activation)
                    except CelError:
                        pass
                t4 = clock()
                totals["CEL input conversion (_cel_variables)"] += t2 - t1
                totals["CEL activation (env.activation)"] += t3 - t2
                totals["CEL evaluation (boundaries + rules)"] += t4 - t3
            t5 = clock()
            decide(bundle, request)
            totals["whole decide()"] += clock() - t5
    n = passes * len(inputs)
    whole = totals.pop("whole decide()") / n / 1000
    print(f"\n== 3. profile: example bundle, {n:,} decisions")
    print(f"   stage breakdown (µs per decision, averaged over the mix; whole decide() {whole:.1f} µs):")
    staged = 0.0
    for stage, ns in totals.items():
        us = ns / n / 1000
        staged += us
        print(f"     {stage:<40} {us:7.1f}   {us / whole:5.1%}")
    rest = whole - staged
    print(f"     {'rest (combine, reasons, Decision)':<40} {rest:7.1f}   {rest / whole:5.1%}")
    evaluation = totals["CEL evaluation (boundaries + rules)"] / 1000
    print(f"   {expressions / n:.1f} expressions evaluated per decision, {evaluation / expressions:.1f} µs each")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(passes):
        for request in inputs:
            decide(bundle, request)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats(pstats.SortKey.CUMULATIVE).print_stats(15)
    print(f"   cProfile, top 15 by cumulative time ({n:,} decisions; profiling inflates Python-level costs):")
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    for line in lines[start:]:
        if line.strip():
            print(f"   {line}")


# --- main ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="timed seconds for the example bundle (8)")
    parser.add_argument("--scale-duration", type=float, default=4.0, help="timed seconds per synthetic bundle (4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each measurement (1)")
    parser.add_argument("--sizes", default="10,100,1000", help="synthetic rule counts, multiples of 10 (10,100,1000)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the example bundle")
    parser.add_argument("--profile", action="store_true", help="add a stage breakdown and a cProfile top 15")
    parser.add_argument("--profile-passes", type=int, default=10, help="passes over the 1,000-proposal mix (10)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if any(s % RULES_PER_TOOL or s < RULES_PER_TOOL or SYNTHETIC_TOOLS % (s // RULES_PER_TOOL) for s in sizes):
        parser.error(f"--sizes: each must be {RULES_PER_TOOL} x a divisor of {SYNTHETIC_TOOLS} (10, 20, 50, ... 1000)")

    print("agent-pdp decision-engine benchmark (pdp.policy.engine.decide)")
    for line in sysinfo.describe(("cel-expr-python", "protobuf")):
        print(line)
    print(sysinfo.background_load())
    bench_example(args.duration, args.warmup)
    if not args.skip_scaling:
        bench_scaling(args.scale_duration, args.warmup, sizes)
    if args.profile:
        bench_profile(args.profile_passes)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
