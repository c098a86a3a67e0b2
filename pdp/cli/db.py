"""`pdp db upgrade`."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy.engine import make_url

from pdp.cli.audit import register_db as register_roles
from pdp.config import add_arguments, from_args
from pdp.store.migrate import upgrade


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("db", help="database schema")
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    up = sub.add_parser("upgrade", help="apply every pending migration")
    add_arguments(up, ("database_url",))
    up.set_defaults(handler=run_upgrade)
    register_roles(sub)


def run_upgrade(args: argparse.Namespace) -> int:
    config = from_args(args)
    upgrade(config.database_url)
    shown = make_url(config.database_url).render_as_string(hide_password=True)
    print(f"database {shown} is at the newest schema")
    return 0
