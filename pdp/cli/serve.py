"""`pdp serve`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pdp.config import add_arguments, from_args
from pdp.server.app import StartupError, serve


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("serve", help="serve the agent gRPC API")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pdp").setLevel(logging.INFO)
    try:
        asyncio.run(serve(from_args(args)))
    except StartupError as exc:
        print(f"pdp serve: {exc}", file=sys.stderr)
        return 2
    return 0
