"""`pdp agents add|list|revoke|release|ensure-dev`."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pdp.cli.terminal import visible
from pdp.config import add_arguments, from_args
from pdp.errors import PdpError
from pdp.governance.release import release_agent
from pdp.identity.agents import add_agent, list_agents, revoke_agent
from pdp.store.database import create_db_engine, write_transaction

# Where `make run` keeps the development agent's token, and where `pdp propose` looks for one.
DEV_TOKEN_FILE = Path(".pdp/agent-token")
DEV_AGENT = ("dev-agent", "dev", ("support",))


def csv(value: str) -> tuple[str, ...]:
    """A comma-separated flag value (roles, groups), blanks dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _labels(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("agents", help="agent identities")
    sub = parser.add_subparsers(dest="agents_command", required=True, metavar="COMMAND")

    add = sub.add_parser("add", help="create an agent; prints its token once, alone on the last line")
    add.add_argument("id")
    add.add_argument("--owner", required=True, help="the human accountable for this agent")
    add.add_argument("--roles", default="", type=csv, help="comma-separated roles policies can see")
    add.add_argument("--label", action="append", default=[], help="KEY=VALUE, repeatable")
    add_arguments(add, ("database_url",))
    add.set_defaults(handler=run_add)

    ls = sub.add_parser("list", help="list agents (never their tokens)")
    add_arguments(ls, ("database_url",))
    ls.set_defaults(handler=run_list)

    revoke = sub.add_parser(
        "revoke",
        help="revoke an agent: its token stops working, and its proposals pending approval or approved but not "
        "yet executing are cancelled (audited)",
    )
    revoke.add_argument("id")
    revoke.add_argument("--by", default="", help="who revokes it, for the audit log (default: the OS user)")
    add_arguments(revoke, ("database_url",))
    revoke.set_defaults(handler=run_revoke)

    release = sub.add_parser("release", help="lift an agent's retry-storm quarantine (audited)")
    release.add_argument("id")
    release.add_argument("--by", default="", help="who releases it, for the audit log (default: the OS user)")
    add_arguments(release, ("database_url",))
    release.set_defaults(handler=run_release)

    dev = sub.add_parser(
        "ensure-dev", help=f"create {DEV_AGENT[0]!r} if missing and store its token in {DEV_TOKEN_FILE}"
    )
    add_arguments(dev, ("database_url",))
    dev.set_defaults(handler=run_ensure_dev)


def run_add(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    try:
        token = add_agent(engine, args.id, args.owner, args.roles, _labels(args.label))
    except PdpError as exc:
        print(f"pdp agents add: {exc.message}", file=sys.stderr)
        return 1
    roles = visible(",".join(args.roles)) or "-"
    print(f"agent {args.id} created (owner {args.owner}, roles {roles}); its token, shown once:")
    print(token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    print(f"{'ID':<24} {'OWNER':<16} {'ROLES':<24} {'CREATED':<20} STATUS")
    for record in list_agents(engine):
        agent = record.identity
        status = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
        roles = visible(",".join(agent.roles))
        agent_id, owner = visible(agent.id), visible(agent.owner)
        print(f"{agent_id:<24} {owner:<16} {roles:<24} {record.created_at:%Y-%m-%d %H:%M:%S}  {status}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    by = args.by or os.environ.get("USER") or "unknown"
    engine = create_db_engine(from_args(args).database_url, writer=True, pool_size=1)
    try:
        done = revoke_agent(engine, args.id, f"cli:{by}")
    except PdpError as exc:
        print(f"pdp agents revoke: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    when = "" if done.newly_revoked else f" (already since {done.revoked_at:%Y-%m-%d %H:%M:%S})"
    print(f"agent {visible(args.id)} revoked{when}; {len(done.cancelled)} proposal(s) cancelled")
    for proposal_id in done.cancelled:
        print(f"  cancelled {proposal_id}")
    return 0


def run_release(args: argparse.Namespace) -> int:
    by = args.by or os.environ.get("USER") or "unknown"
    engine = create_db_engine(from_args(args).database_url, writer=True, pool_size=1)
    try:
        with write_transaction(engine) as conn:
            release_agent(conn, args.id, f"cli:{by}", datetime.now(UTC))
    except PdpError as exc:
        print(f"pdp agents release: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"agent {visible(args.id)} released from quarantine")
    return 0


def run_ensure_dev(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    agent_id, owner, roles = DEV_AGENT
    existing = [r for r in list_agents(engine) if r.identity.id == agent_id]
    if existing and existing[0].revoked_at is None and DEV_TOKEN_FILE.exists():
        print(f"development agent {agent_id!r} exists; token in {DEV_TOKEN_FILE}")
        return 0
    if existing:
        print(
            f"agent {agent_id!r} exists but its token file is missing or it was revoked; not touching it",
            file=sys.stderr,
        )
        return 0
    token = add_agent(engine, agent_id, owner, roles)
    DEV_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(DEV_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    print(f"created development agent {agent_id!r} (roles {','.join(roles)}); token stored in {DEV_TOKEN_FILE}")
    return 0
