"""The executor's log lines: one per event, with the proposal and agent when there is one, scrubbed."""

from __future__ import annotations

import logging
import sys

from executor.redaction import RedactingFilter, Redactor

_FIELDS = ("proposal_id", "agent_id", "tool")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{name}={getattr(record, name)}" for name in _FIELDS if hasattr(record, name))
        return f"{line} {extra}" if extra else line


def configure_logging(redactor: Redactor, level: int = logging.INFO) -> None:
    """Every record passes the redactor before any handler writes it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
