"""`pdp`: the command line for operators, security teams and humans trying things out."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pdp.cli import agents, approvers, audit, db, policy, propose, serve
from pdp.cli.terminal import guard_streams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdp", description="agent-pdp: the model suggests, the platform decides.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (serve, db, agents, approvers, policy, propose, audit):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    guard_streams()  # recorded text is printed as text, never as terminal control sequences
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
