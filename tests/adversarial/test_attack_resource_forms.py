"""An agent cannot reach a resource a rule denies by writing it another way (issue 10, finding 2).

The attacker holds a valid agent token and talks to the real gRPC API. The bundle lets support agents do
anything on the ``web`` tool, except three resources, each guarded the way policy authors write such rules:
by exact comparison, by ``endsWith`` and by an anchored ``matches``. Every other spelling of those
resources (a fragment the client drops, a query the target routes past, a percent-encoded unreserved
character, lowercase hex, encoded separators, invisible Unicode raw or encoded) must be recorded and DENIED
by the catalog, and nothing of it may reach the real target through the real executor. Before the fix each
of these forms was allowed and executed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import fresh_database, running_server
from execution import Stack, running_executor, target_server, write_bundle

from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

NAMES = ("exact", "ends", "anchored")

# Each form turns a resource name into another spelling of it, one a client, proxy or server reads as the name.
FORMS: dict[str, str] = {
    "fragment": "{n}#x",
    "empty fragment": "{n}#",
    "query": "{n}?x",
    "empty query": "{n}?",
    "query that looks like a path": "{n}?/../other",
    "encoded unreserved letter": "{head}%{last:02X}",
    "encoded unreserved letter, lowercase hex": "{head}%{last:02x}",
    "encoded tilde": "{n}%7E",
    "encoded slashes": "%2F%2F{n}",
    "encoded slashes, lowercase hex": "%2f%2f{n}",
    "encoded semicolon": "{n}%3Bx",
    "encoded semicolon, lowercase hex": "{n}%3bx",
    "encoded space": "{n}%20",
    "encoded sub-delimiter": "{n}%21",
    "raw C1 control U+0085": "{n}\u0085",
    "encoded C1 control U+0085": "{n}%C2%85",
    "raw no-break space U+00A0": "{n}\u00a0",
    "encoded no-break space U+00A0": "{n}%C2%A0",
    "raw zero-width space U+200B": "{n}\u200b",
    "encoded zero-width space U+200B": "{n}%E2%80%8B",
    "raw right-to-left override U+202E": "\u202e{n}",
    "encoded right-to-left override U+202E": "%E2%80%AE{n}",
    "raw byte-order mark U+FEFF": "{n}\ufeff",
    "encoded overlong dot": "{n}%C0%AE",
    "encoded invalid UTF-8": "{n}%FF",
    "decomposed (not NFC) letter": "{n}e%CC%81",
    "raw non-ASCII letter": "{n}\u00e9",
}


def _rules(url: str) -> dict[str, object]:
    return {
        "apiVersion": "pdp/v1",
        "kind": "Rules",
        "rules": [
            {"id": "deny-exact", "effect": "deny", "tools": ["web"], "when": f'action.resource == "{url}exact"'},
            {"id": "deny-ends", "effect": "deny", "tools": ["web"], "when": 'action.resource.endsWith("/ends")'},
            {
                "id": "deny-anchored",
                "effect": "deny",
                "tools": ["web"],
                "when": f'action.resource.matches(r"^{re.escape(url)}anchored$")',
            },
        ],
    }


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The execution stack of ``tests/execution.py``, its bundle extended with the three guarding rules."""
    with target_server() as target, fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        (bundle / "guards.yaml").write_text(yaml.safe_dump(_rules(target.url), sort_keys=False))
        token_file = tmp_path / "target.token"
        token_file.write_text(target.token)
        with running_server(url, policy_dir=bundle) as server:
            _agent, client = server.agent_client()
            yield Stack(server, target, client, tmp_path, bundle, token_file)


def _spellings(url: str) -> list[tuple[str, str]]:
    out = []
    for name in NAMES:
        for form, template in FORMS.items():
            spelled = template.format(n=name, head=name[:-1], last=ord(name[-1]))
            out.append((f"{name}: {form}", url + spelled))
    return out


def test_the_plain_resources_are_denied_by_their_rules(stack: Stack) -> None:
    for name in NAMES:
        response = stack.client.propose("web", "GET", stack.target.url + name, "reading it")
        assert response.decision.outcome == pdp_pb2.DENY
        assert f"rule:deny-{name}" in [r.rule_id for r in response.decision.reasons]


def test_every_other_spelling_is_recorded_and_denied_by_the_catalog_and_never_sent(stack: Stack) -> None:
    admitted = []
    for label, resource in _spellings(stack.target.url):
        for operation in ("GET", "POST"):
            response = stack.client.propose("web", operation, resource, "reading it another way")
            reasons = [r.rule_id for r in response.decision.reasons]
            if response.decision.outcome != pdp_pb2.DENY or reasons != ["catalog.resource_not_canonical"]:
                admitted.append((label, operation, pdp_pb2.Outcome.Name(response.decision.outcome), reasons))
                continue
            # recorded as the agent wrote it, for auditors, and denied
            row = stack.server.row(response.proposal_id)
            assert row is not None and row["state"] == "DENIED"
            assert response.decision.reasons[0].message.startswith("resource ")
    assert admitted == []

    # A real executor runs and carries out a plain action: the only request the target ever sees.
    with running_executor(stack.config(timeout="5s")):
        allowed = stack.client.propose("web", "POST", stack.target.url + "items", "the one real request")
        assert allowed.decision.outcome == pdp_pb2.ALLOW
        assert stack.client.wait(allowed.proposal_id, timeout=30).state == pdp_pb2.SUCCEEDED
    assert [(seen.method, seen.path) for seen in stack.target.seen] == [("POST", "/api/items")]


def test_the_reason_tells_the_agent_how_to_write_it(stack: Stack) -> None:
    url = stack.target.url
    cases = {
        url + "exac%74": "'t'",  # write the letter itself
        url + "exact%7b": "%7B",  # uppercase hex
        url + "exact#x": "fragment",
        url + "exact?x": "query: true",
        url + "exact\u00a0": "%C2%A0",  # raw non-ASCII: how it would be encoded (and that it is refused anyway)
    }
    for resource, hint in cases.items():
        decision = stack.client.propose("web", "GET", resource, "how do I write it").decision
        assert [r.rule_id for r in decision.reasons] == ["catalog.resource_not_canonical"]
        assert hint in decision.reasons[0].message, decision.reasons[0].message
