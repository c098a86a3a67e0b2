"""The only module that talks to cel-expr-python (Google's cel-cpp runtime).

Duties: declare exactly the variables policies may see, enable the standard extensions, compile and
type-check once at load, evaluate against a fresh activation per request, and turn every failure —
an exception, an error *value* (cel-expr-python returns errors as values), or a result of the wrong
type — into a :class:`CelError`, so callers can fail closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cel_expr_python import cel
from google.protobuf import descriptor_pool

# Importing registers the message types in the default descriptor pool that the environment resolves.
from pdp.policy.v1 import cel_input_pb2

__all__ = ["CelError", "CelProgram", "Environment", "ResultType", "Variables"]

# The standard extensions policy authors coming from cel-go, Kubernetes and Cerbos expect.
_ENV_CONFIG = """
extensions:
  - name: bindings
  - name: encoders
  - name: lists
  - name: math
  - name: optional
  - name: sets
  - name: strings
"""

_MESSAGE_TYPES = {
    "agent": cel_input_pb2.Agent.DESCRIPTOR.full_name,
    "action": cel_input_pb2.Action.DESCRIPTOR.full_name,
    "context": cel_input_pb2.Context.DESCRIPTOR.full_name,
}

# cel-cpp prefixes messages with a status code ("INVALID_ARGUMENT: ERROR: <input>:1:7: ...").
_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_TRAILING_STATUS = re.compile(r"\s*\[[A-Z_]+\]\s*$")


class CelError(Exception):
    """A compile, type or evaluation error in one expression."""


class ResultType(Enum):
    BOOL = "bool"
    STRING = "string"


@dataclass(frozen=True, slots=True)
class Variables:
    """One request's CEL inputs, already in their wire types."""

    agent: cel_input_pb2.Agent
    action: cel_input_pb2.Action
    context: cel_input_pb2.Context
    usage: dict[str, Any]


def _clean(message: str) -> str:
    return _TRAILING_STATUS.sub("", _STATUS_PREFIX.sub("", message.strip()))


class CelProgram:
    """A compiled, type-checked expression with a known result type."""

    __slots__ = ("_expr", "result_type", "source")

    def __init__(self, expr: Any, source: str, result_type: ResultType) -> None:
        self._expr = expr
        self.source = source
        self.result_type = result_type

    def evaluate(self, activation: Any) -> bool | str:
        """Evaluate; raise :class:`CelError` for any error or mistyped result."""
        try:
            value = self._expr.eval(activation)
            result = value.value()
            # Fast path: a bool can only come from a BOOL value (errors come back as str).
            if self.result_type is ResultType.BOOL and type(result) is bool:
                return result
            kind = value.type()
        except Exception as exc:  # cel-cpp surfaces some failures as exceptions
            raise CelError(_clean(str(exc))) from exc
        if kind == cel.Type.ERROR:
            raise CelError(_clean(str(result)))
        expected = cel.Type.BOOL if self.result_type is ResultType.BOOL else cel.Type.STRING
        if kind != expected or not isinstance(result, bool | str):
            raise CelError(f"expected {self.result_type.value}, got {kind.name()}")
        return result


class Environment:
    """The declared CEL environment all policy expressions compile in."""

    def __init__(self, *, declare_variables: bool = False) -> None:
        variables = {name: cel.Type(full_name) for name, full_name in _MESSAGE_TYPES.items()}
        variables["usage"] = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
        if declare_variables:
            variables["variables"] = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
        self._env = cel.NewEnv(
            descriptor_pool.Default(),
            config=cel.NewEnvConfigFromYaml(_ENV_CONFIG),
            variables=variables,
        )

    def compile(self, source: str, result_type: ResultType) -> CelProgram:
        """Parse and type-check; raise :class:`CelError` with the checker's message."""
        try:
            expr = self._env.compile(source)
        except Exception as exc:
            raise CelError(_clean(str(exc))) from exc
        returned = expr.return_type()
        expected = cel.Type.BOOL if result_type is ResultType.BOOL else cel.Type.STRING
        # dyn (e.g. a map lookup in params) can only be checked at evaluation time.
        if returned not in (expected, cel.Type.DYN):
            raise CelError(f"expression must be {result_type.value}, but it is {returned.name()}")
        return CelProgram(expr, source, result_type)

    def check(self, source: str) -> None:
        """Parse and type-check an expression of any result type (used for named variables)."""
        try:
            self._env.compile(source)
        except Exception as exc:
            raise CelError(_clean(str(exc))) from exc

    def activation(self, variables: Variables) -> Any:
        """A fresh activation for one request (reusing one across requests leaks memory)."""
        return self._env.Activation(
            {
                "agent": variables.agent,
                "action": variables.action,
                "context": variables.context,
                "usage": variables.usage,
            }
        )
