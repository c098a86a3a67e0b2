"""`pdp serve`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pdp.config import add_arguments, from_args
from pdp.server.app import StartupError, serve
from pdp.server.workers import run_workers


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser("serve", help="serve the agent gRPC API")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pdp").setLevel(logging.INFO)
    config = from_args(args)
    try:
        workers = int(config.workers)
        if workers < 1:
            raise ValueError(workers)
    except ValueError:
        print(f"pdp serve: --workers must be a positive integer, not {config.workers!r}", file=sys.stderr)
        return 2
    try:
        if workers > 1:
            return run_workers(config, workers)
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"pdp serve: {exc}", file=sys.stderr)
        return 2
    return 0
