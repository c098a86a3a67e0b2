"""The executor's log lines: one per event, with the proposal, agent and trace when there is one, scrubbed.

Formatting is :mod:`pdp.observability.logs` (JSON by default, ``PDP_LOG_FORMAT=text`` for people); the
redacting filter runs before it on the handler, so no formatter ever sees a credential.
"""

from __future__ import annotations

import logging

from executor.redaction import RedactingFilter, Redactor
from pdp.observability import logs


def configure_logging(redactor: Redactor, level: int = logging.INFO, *, json: bool = True) -> None:
    """Every record passes the redactor before any handler writes it."""
    logs.configure(json=json, level=level, loggers=("executor", "pdp"), filters=[RedactingFilter(redactor)])
