"""Connector types by name, from the ``pdp.connectors`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from executor.connectors.base import ConnectorConfigError, ConnectorFactory

GROUP = "pdp.connectors"


def factory(kind: str) -> ConnectorFactory:
    """The factory registered for connector type ``kind``; ConnectorConfigError names the known ones."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if kind not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConnectorConfigError(f"no connector of type {kind!r} is installed (known: {known})")
    loaded = found[kind].load()
    if not callable(loaded):
        raise ConnectorConfigError(f"entry point {kind!r} in {GROUP} is not callable")
    return loaded  # type: ignore[no-any-return]
