"""`pdp policy check|test|eval|replay`: what a security team runs before merging a policy change."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pdp.cli.render import print_decision
from pdp.config import add_arguments, from_args
from pdp.identity.approvers import list_approvers
from pdp.policy.bundle import Approval, PolicyBundle
from pdp.policy.decision import Decision, Outcome
from pdp.policy.documents import TestInput
from pdp.policy.duration import parse_duration
from pdp.policy.engine import decide
from pdp.policy.loader import BundleError, load_bundle
from pdp.policy.replay import OUTCOMES, ReplayReport, decided_events, replay
from pdp.policy.testing import decision_input, run_tests
from pdp.server.convert import decision_message
from pdp.store.database import create_db_engine, is_sqlite


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("policy", help="check, test and try policy bundles")
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="parse, type-check and lint a bundle; lists every problem with file:line")
    check.add_argument("dir", type=Path)
    check.add_argument(
        "--database-url",
        default=None,
        help="also warn about approver groups with no active approver in this database "
        "(env PDP_DATABASE_URL; without either, no database is read)",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
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

    rp = sub.add_parser(
        "replay",
        help="re-decide recorded proposals with a candidate bundle and show what would change",
    )
    rp.add_argument("--candidate", required=True, type=Path, metavar="DIR", help="the candidate bundle directory")
    rp.add_argument(
        "--since", default=None, metavar="DURATION", help="only proposals recorded in the last DURATION (e.g. 7d, 12h)"
    )
    rp.add_argument("--limit", type=int, default=50, metavar="N", help="list at most N changes (0: all; default 50)")
    rp.add_argument("--format", choices=["text", "json"], default="text", help="json: one JSON document")
    rp.add_argument("--fail-on-flip", action="store_true", help="exit 1 when any allow becomes deny or deny allow")
    rp.add_argument("--fail-on-any-change", action="store_true", help="exit 1 when any outcome changes")
    add_arguments(rp, ("database_url",))
    rp.set_defaults(handler=run_replay)


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
    # Only a database someone named explicitly: the settings' default (./pdp.db) would make a plain
    # `pdp policy check` in a policy repository create a database file, or warn about an unrelated one.
    database_url = args.database_url or os.environ.get("PDP_DATABASE_URL")
    if not database_url:
        return 0
    warnings = approver_warnings(bundle, database_url)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if warnings and args.strict else 0


def _approval_specs(bundle: PolicyBundle) -> list[tuple[str, Approval]]:
    """Every approval spec in the bundle with where it is written, in bundle order."""
    specs = [(f"rule {r.id}", r.approval) for r in bundle.rules if r.approval is not None]
    specs += [(f"boundary {b.name}", b.approval) for b in bundle.boundaries if b.approval is not None]
    if bundle.default_approval is not None:
        specs.append(("default_approval", bundle.default_approval))
    return specs


def approver_warnings(bundle: PolicyBundle, database_url: str) -> list[str]:
    """Approval specs that nobody in the database can satisfy; a database that cannot be read is a warning too."""
    specs = _approval_specs(bundle)
    if not specs:
        return []
    try:
        # SQLite would create a missing file on connect: a typo in the path must not leave a stray database.
        if is_sqlite(database_url) and not Path(make_url(database_url).database or "").is_file():
            return [f"database {database_url} does not exist, so approver groups were not checked"]
        records = list_approvers(create_db_engine(database_url))
    except (SQLAlchemyError, ValueError) as exc:
        # SQLAlchemy's messages run to several lines (SQL, a link); the first names the problem.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"could not read approvers from the database, so approver groups were not checked: {reason}"]
    active = [r.approver for r in records if r.revoked_at is None]
    where: dict[str, list[str]] = {}
    for place, approval in specs:
        for group in approval.groups:
            where.setdefault(group, [])
            if place not in where[group]:
                where[group].append(place)
    warnings = [
        f"group {group!r} ({', '.join(places)}) has no active approvers: proposals needing it cannot be approved"
        for group, places in sorted(where.items())
        if not any(group in a.groups for a in active)
    ]
    # Some approvers but fewer than the quorum is as stuck as none (zero is reported per group above).
    for place, approval in specs:
        eligible = sum(1 for a in active if a.groups & set(approval.groups))
        if 0 < eligible < approval.min_approvals:
            warnings.append(
                f"{place} needs {approval.min_approvals} approvals from {', '.join(approval.groups)} but only "
                f"{eligible} active approver(s) can give them: proposals needing it cannot be approved"
            )
    return warnings


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


def run_replay(args: argparse.Namespace) -> int:
    """Exit 0, or 1 for what --fail-on-flip / --fail-on-any-change forbid; 2 when the replay cannot run."""
    if args.limit < 0:
        print("pdp policy replay: --limit must be 0 or more", file=sys.stderr)
        return 2
    since = None
    if args.since:
        try:
            since = datetime.now(UTC) - parse_duration(args.since)
        except ValueError as exc:
            print(f"pdp policy replay: --since: {exc}", file=sys.stderr)
            return 2
    bundle = _load(args.candidate, "replay")
    if bundle is None:
        return 2
    database_url = from_args(args).database_url
    # SQLite would create a missing file on connect: a typo must not replay an empty, new database.
    if is_sqlite(database_url) and not Path(make_url(database_url).database or "").is_file():
        print(f"pdp policy replay: database {database_url} does not exist", file=sys.stderr)
        return 2
    engine = create_db_engine(database_url)
    try:
        report = replay(bundle, decided_events(engine, since))
    except SQLAlchemyError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"pdp policy replay: could not read the audit log: {reason}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    limit = args.limit or None
    if args.format == "json":
        document = {"candidate": str(args.candidate), "since": args.since, **report.to_dict(limit)}
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        _print_replay(report, args.candidate, args.since, limit)
    if report.failed(on_flip=args.fail_on_flip, on_any_change=args.fail_on_any_change):
        what = f"{len(report.flips)} allow<->deny flip(s)" if report.flips else f"{len(report.changes)} change(s)"
        print(f"pdp policy replay: {what} in recorded traffic", file=sys.stderr)
        return 1
    return 0


def _print_replay(report: ReplayReport, candidate: Path, since: str | None, limit: int | None) -> None:
    def ts(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"

    window = f"in the last {since}" if since else "all recorded"
    print(f"candidate:  {candidate} ({report.candidate_version})")
    print(f"replayed:   {report.replayed} proposals ({window}, {ts(report.first_at)} .. {ts(report.last_at)})")
    print(f"compared:   {report.compared}")
    if report.runtime_decided:
        print(f"skipped:    {report.runtime_decided} decided by runtime state (breaker/limit): not compared")
    if report.without_usage:
        print(f"skipped:    {report.without_usage} recorded without usage counters, which the candidate reads")
    if report.unreadable:
        print(f"skipped:    {report.unreadable} unreadable proposal.decided events")
    for version, count in sorted(report.recorded_versions.items()):
        print(f"recorded:   {count} decided by {version}")
    if report.identical:
        print("note:       the candidate has the same content as the bundle that decided every compared proposal")
    elif report.same_content:
        print(f"note:       {report.same_content} compared proposals were decided by a bundle with the same content")
    print()
    print(f"{'RECORDED':<16}{'CANDIDATE':<16}{'PROPOSALS':>9}")
    for old in OUTCOMES:
        for new in OUTCOMES:
            count = report.counts[old, new]
            if count:
                mark = "" if old is new else ("  flip" if {old, new} == {Outcome.ALLOW, Outcome.DENY} else "  changed")
                print(f"{old.value:<16}{new.value:<16}{count:>9}{mark}")
    print()
    if not report.changes:
        print("no proposal would be decided differently")
        return
    print(f"{len(report.changes)} would change ({len(report.flips)} allow<->deny flips), oldest first:")
    shown = report.changes if limit is None else report.changes[:limit]
    for change in shown:
        print(
            f"  {ts(change.occurred_at)}  {change.proposal_id}  {change.agent_id}  "
            f"{change.tool} {change.operation} {change.resource}  {change.old.value} -> {change.new.value}"
        )
        for reason in change.reasons:
            print(f"      - {reason.rule_id} ({reason.effect.value}): {reason.message}")
    if len(shown) < len(report.changes):
        print(f"  ... and {len(report.changes) - len(shown)} more (--limit 0 lists all)")
