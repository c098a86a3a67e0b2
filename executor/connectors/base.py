"""What every connector is: built once per tool from its config section, then called once per action.

A connector derives its target only from ``Call.resource`` (the resource the policy saw), never
from free-form params. It returns a JSON-serialisable result or raises :class:`ConnectorError`.
The executor scrubs credentials from both before anything is stored, but it cannot scrub a credential
that a connector already cut in two: a connector that shortens anything it got from a target (a read
limit, an error snippet) does it with ``context.redactor.cut``, which scrubs first and leaves no piece
of a credential at the cut. A connector registers each credential it resolves with
``context.redactor.add`` (the executor also adds whatever ``secrets()`` returns), and must never put a
credential in a result on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from executor.redaction import Redactor
from executor.secrets import Secret
from pdp.policy.catalog import Tool


class ConnectorError(Exception):
    """The action failed; ``message`` is what the agent and the audit log see (after redaction)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectorTimeout(ConnectorError):
    """The target did not answer within the tool's time limit."""


class ConnectorRejected(ConnectorError):
    """The action itself was refused (bad parameters, an HTTP 4xx): the target is fine, so the tool's
    circuit breaker does not count it. One agent's bad input must not shut a tool for everyone."""


class ConnectorConfigError(Exception):
    """A tool's connector section is invalid; raised at executor startup, never per call."""


def config_error(tool: str, exc: ValidationError) -> ConnectorConfigError:
    """Every problem in a section, by key, without the offending input (it may be a credential)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(section)"
        problems.append(f"{where}: {error['msg']}")
    return ConnectorConfigError(f"tool {tool}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class Call:
    proposal_id: str  # stable across retries: connectors send it as an idempotency key where they can
    tool: Tool
    operation: str
    resource: str
    params: Mapping[str, Any]


class Connector(Protocol):
    def execute(self, call: Call) -> dict[str, Any]:
        """Carry out ``call`` within the tool's time limit; a JSON-serialisable result."""
        ...

    def secrets(self) -> list[Secret]:
        """Every credential this connector holds, so the executor can scrub them from anything stored."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What a connector factory gets besides its own section: resolves credential references, scrubs and cuts."""

    tool: Tool
    base_dir: Path  # relative credential files are read from here (the working directory)
    environ: Mapping[str, str]
    # The executor passes the one redactor it scrubs everything with, so it knows every tool's credentials.
    redactor: Redactor = field(default_factory=Redactor)


# An entry point in the ``pdp.connectors`` group names a callable with this signature (usually the class).
ConnectorFactory = Callable[[Mapping[str, Any], ConnectorContext], Connector]
