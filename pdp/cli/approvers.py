"""`pdp approvers add|list|revoke|groups`: the humans who may approve proposals, and their groups."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from pdp.cli.agents import csv
from pdp.cli.terminal import visible
from pdp.config import add_arguments, from_args
from pdp.errors import PdpError
from pdp.identity.approvers import add_approver, check_groups, list_approvers, revoke_approver, set_groups
from pdp.store.database import create_db_engine


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("approvers", help="approver identities and their groups")
    sub = parser.add_subparsers(dest="approvers_command", required=True, metavar="COMMAND")

    add = sub.add_parser("add", help="create an approver; prints their token once, alone on the last line")
    add.add_argument(
        "id",
        help="the person's login (lowercase ASCII letters, digits, . _ - @ +); separation of duties compares it "
        "with agents' owners",
    )
    add.add_argument("--groups", required=True, type=csv, help="comma-separated approver groups")
    add.add_argument("--name", default="", help="display name (default: the id)")
    add_arguments(add, ("database_url",))
    add.set_defaults(handler=run_add)

    ls = sub.add_parser("list", help="list approvers (never their tokens)")
    add_arguments(ls, ("database_url",))
    ls.set_defaults(handler=run_list)

    revoke = sub.add_parser("revoke", help="revoke an approver's token; effective on their next request")
    revoke.add_argument("id")
    add_arguments(revoke, ("database_url",))
    revoke.set_defaults(handler=run_revoke)

    groups = sub.add_parser("groups", help="add an approver to groups or remove them; prints the new groups")
    groups.add_argument("id")
    groups.add_argument("--add", default=(), type=csv, help="comma-separated groups to join")
    groups.add_argument("--remove", default=(), type=csv, help="comma-separated groups to leave")
    add_arguments(groups, ("database_url",))
    groups.set_defaults(handler=run_groups)


def _fail(command: str, exc: PdpError | SQLAlchemyError) -> int:
    # SQLAlchemy's messages run to several lines (SQL, parameters, a link); the first names the problem.
    message = exc.message if isinstance(exc, PdpError) else f"database error: {str(exc).splitlines()[0]}"
    print(f"pdp approvers {command}: {message}", file=sys.stderr)
    return 1


def run_add(args: argparse.Namespace) -> int:
    if not args.groups:
        # An approver in no group can approve nothing: almost certainly a typo on the command line.
        print("pdp approvers add: --groups needs at least one group", file=sys.stderr)
        return 2
    engine = create_db_engine(from_args(args).database_url)
    try:
        token = add_approver(engine, args.id, args.groups, args.name)
    except (PdpError, SQLAlchemyError) as exc:
        return _fail("add", exc)
    print(f"approver {args.id} created (groups {','.join(check_groups(args.groups))}); their token, shown once:")
    print(token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    try:
        records = list_approvers(engine)
    except SQLAlchemyError as exc:
        return _fail("list", exc)
    print(f"{'ID':<24} {'NAME':<24} {'GROUPS':<32} {'CREATED':<20} STATUS")
    for record in records:
        approver = record.approver
        status = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
        groups = visible(",".join(sorted(approver.groups))) or "-"
        approver_id, name = visible(approver.id), visible(approver.name)
        print(f"{approver_id:<24} {name:<24} {groups:<32} {record.created_at:%Y-%m-%d %H:%M:%S}  {status}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    try:
        revoke_approver(engine, args.id)
    except (PdpError, SQLAlchemyError) as exc:
        return _fail("revoke", exc)
    print(f"approver {visible(args.id)} revoked")
    return 0


def run_groups(args: argparse.Namespace) -> int:
    if not args.add and not args.remove:
        print("pdp approvers groups: give --add and/or --remove", file=sys.stderr)
        return 2
    engine = create_db_engine(from_args(args).database_url)
    try:
        groups = set_groups(engine, args.id, args.add, args.remove)
    except (PdpError, SQLAlchemyError) as exc:
        return _fail("groups", exc)
    print(f"approver {visible(args.id)} groups: {visible(','.join(groups)) or '-'}")
    return 0
