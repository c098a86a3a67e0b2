"""`pdp policy check|test|eval`: what a security team runs before merging a policy change."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pdp.cli.render import print_decision
from pdp.policy.bundle import PolicyBundle
from pdp.policy.decision import Decision
from pdp.policy.documents import TestInput
from pdp.policy.engine import decide
from pdp.policy.loader import BundleError, load_bundle
from pdp.policy.testing import decision_input, run_tests
from pdp.server.convert import decision_message


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("policy", help="check, test and try policy bundles")
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="parse, type-check and lint a bundle; lists every problem with file:line")
    check.add_argument("dir", type=Path)
    check.set_defaults(handler=run_check)

    test = sub.add_parser("test", help="run the bundle's PolicyTest cases; exit 1 on any failure")
    test.add_argument("dir", type=Path)
    test.add_argument("--verbose", "-v", action="store_true", help="show reasons for passing cases too")
    test.set_defaults(handler=run_test)

    ev = sub.add_parser("eval", help="decide one input file against a bundle and print the decision")
    ev.add_argument("dir", type=Path)
    ev.add_argument("--input", required=True, type=Path, help="JSON {agent, action, context?, usage?}")
    ev.add_argument("--json", action="store_true", help="print the decision as JSON")
    ev.set_defaults(handler=run_eval)


def _load(directory: Path, command: str) -> PolicyBundle | None:
    try:
        return load_bundle(directory)
    except BundleError as exc:
        print(f"pdp policy {command}: {directory} has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print("  " + str(problem).replace("\n", "\n      "), file=sys.stderr)
        return None


def run_check(args: argparse.Namespace) -> int:
    bundle = _load(args.dir, "check")
    if bundle is None:
        return 1
    print(
        f"ok: bundle {bundle.name!r} {bundle.policy_version}: {len(bundle.tools)} tools, "
        f"{len(bundle.boundaries)} boundaries, {len(bundle.rules)} rules, {len(bundle.tests)} tests"
    )
    return 0


def _outcome(decision: Decision) -> str:
    return decision.outcome.value


def run_test(args: argparse.Namespace) -> int:
    bundle = _load(args.dir, "test")
    if bundle is None:
        return 1
    results = run_tests(bundle)
    if not results:
        print(f"pdp policy test: {args.dir} has no PolicyTest cases", file=sys.stderr)
        return 1
    name_width = min(60, max(len(r.case.spec.name) for r in results))
    where_width = max(len(str(r.case.location)) for r in results)
    print(f"{'RESULT':<6}  {'TEST':<{name_width}}  {'WHERE':<{where_width}}  OUTCOME")
    for result in results:
        status = "ok" if result.passed else "FAIL"
        name = result.case.spec.name[:name_width]
        print(
            f"{status:<6}  {name:<{name_width}}  {result.case.location!s:<{where_width}}  {_outcome(result.decision)}"
        )
        for failure in result.failures:
            print(f"{'':<8}{failure}")
        if result.failures or args.verbose:
            for reason in result.decision.reasons:
                print(f"{'':<8}- {reason.rule_id} ({reason.effect.value}): {reason.message}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def run_eval(args: argparse.Namespace) -> int:
    bundle = _load(args.dir, "eval")
    if bundle is None:
        return 1
    try:
        spec = TestInput.model_validate(json.loads(args.input.read_text()), strict=False)
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        print(f"pdp policy eval: {args.input}: {exc}", file=sys.stderr)
        return 2
    decision = decide(bundle, decision_input(spec))
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2))
    else:
        print_decision(decision_message(decision))
    return 0
