"""`pdp-executor`: carry out approved proposals with the credentials only this process holds."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from executor.config import OVERRIDES, ConfigError, Settings, load
from executor.connectors.base import Connector, ConnectorConfigError, ConnectorContext
from executor.connectors.registry import factory
from executor.logs import configure_logging
from executor.redaction import Redactor
from executor.worker import Executor, utc_now
from pdp.audit.keys import KeyFileError, load_public
from pdp.observability import tracing
from pdp.policy.catalog import Tool
from pdp.policy.loader import BundleError, load_bundle
from pdp.store.database import create_db_engine
from pdp.store.migrate import is_current


class StartupError(Exception):
    """The executor refuses to start; the message says why."""


def build_connectors(settings: Settings, catalog: dict[str, Tool], redactor: Redactor) -> dict[str, Connector]:
    """Every configured tool's connector, sharing ``redactor``, which learns every connector's credentials."""
    connectors: dict[str, Connector] = {}
    try:
        for name, section in settings.tools.items():
            tool = catalog.get(name)
            if tool is None:
                raise StartupError(f"tools.{name}: no such tool in the catalog of {settings.policy_dir}")
            context = ConnectorContext(tool=tool, base_dir=Path.cwd(), environ=dict(os.environ), redactor=redactor)
            try:
                connectors[name] = factory(tool.type)(section, context)
            except ConnectorConfigError as exc:
                raise StartupError(f"tools.{name}: {exc}") from exc
            # Whether or not the connector registered them itself: every tool's calls are scrubbed of all of them.
            redactor.add(connectors[name].secrets())
    except StartupError:
        for connector in connectors.values():
            connector.close()
        raise
    return connectors


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> Executor:
    """The executor ``settings`` describe; ``clock`` is its only source of time (tests move it)."""
    try:
        bundle = load_bundle(settings.policy_dir)
    except BundleError as exc:
        raise StartupError(f"the tool catalog in {settings.policy_dir} does not load:\n{exc}") from exc
    try:
        public_key = load_public(settings.public_key)
    except KeyFileError as exc:
        raise StartupError(f"{exc} (the PDP's public key; `pdp keys init` writes it next to the private key)") from exc
    catalog = dict(bundle.tools)
    redactor = Redactor()
    connectors = build_connectors(settings, catalog, redactor)
    reader = create_db_engine(settings.database_url, pool_size=2)
    writer = create_db_engine(settings.database_url, writer=True, pool_size=2)
    try:
        current = is_current(reader)
    except SQLAlchemyError as exc:
        raise StartupError(f"cannot reach the database {reader.url!r}: {exc.__class__.__name__}") from exc
    if not current:
        raise StartupError("the database schema is not current: run `pdp db upgrade` first")
    return Executor(
        settings,
        reader=reader,
        writer=writer,
        catalog=catalog,
        connectors=connectors,
        public_key=public_key,
        redactor=redactor,
        clock=clock,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdp-executor", description=__doc__)
    parser.add_argument("--config", type=Path, help="the executor's YAML config (env PDP_EXECUTOR_CONFIG)")
    for name, (flag, variable) in OVERRIDES.items():
        parser.add_argument(flag, dest=name, help=f"overrides the config file's {name} (env {variable})")
    args = parser.parse_args(argv)
    config_path = args.config or (
        Path(os.environ["PDP_EXECUTOR_CONFIG"]) if os.environ.get("PDP_EXECUTOR_CONFIG") else None
    )
    try:
        settings = load(config_path, {name: getattr(args, name) for name in OVERRIDES})
        executor = build(settings)
    except (ConfigError, StartupError) as exc:
        print(f"pdp-executor: {exc}", file=sys.stderr)
        return 2
    configure_logging(executor.redactor, json=settings.log_format == "json")
    tracing.configure(service_name="pdp-executor", endpoint=settings.otlp_endpoint)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        executor.start()
    except (OSError, ValueError) as exc:
        print(f"pdp-executor: cannot serve metrics on {settings.metrics_addr}: {exc}", file=sys.stderr)
        executor.stop()
        return 2
    served = ", ".join(sorted(settings.tools)) or "none"
    url = make_url(settings.database_url).render_as_string(hide_password=True)
    metrics = f", metrics on http://{settings.metrics_addr.rsplit(':', 1)[0]}:{executor.metrics_port}/metrics"
    print(
        f"pdp-executor: worker {executor.worker_id} executing tools [{served}], database {url}"
        + (metrics if executor.metrics_port is not None else ""),
        flush=True,
    )
    stop.wait()
    print("pdp-executor: stopping; letting calls in flight finish", flush=True)
    executor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
