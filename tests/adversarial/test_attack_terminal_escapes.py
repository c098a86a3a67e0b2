"""Attack: recorded text carries terminal control sequences to whoever reads it with the CLI.

An agent with a valid token puts escape sequences in everything it controls: the justification, params, and
(through a policy message that quotes a param, a common pattern) the decision's reasons; an approver does the
same in a rejection's reason. A human then runs the real CLI as a subprocess: `pdp proposals get`,
`pdp proposals watch`, `pdp propose` and `pdp audit export` (JSON lines). Their output must hold no raw ESC,
no C1 control (U+0080..U+009F: U+009B is an 8-bit CSI), no bidi control and no other invisible format
character: each is shown as a visible ``\\uXXXX`` escape, and JSON output stays valid JSON that decodes to the
exact recorded text.
"""

from __future__ import annotations

import json
import subprocess
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import PDP, Server, fresh_database, pdp_env, running_server

from pdp.identity.approvers import add_approver
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

RESOURCE = "https://tickets.example/api/notes"
# Clear the screen, an OSC 8 hyperlink disguising its target, bidi overrides and isolates, an 8-bit CSI,
# zero-width and tag characters, a carriage return that would overwrite the line, and a fake next line.
EVIL = (
    "\x1b[2J\x1b[H\x1b]8;;https://evil.example/\x07click here\x1b]8;;\x07 "
    "\u202egnp.exe\u202c \u2066isolated\u2069 \u200f\u200e \x9b31mred\x9b0m \u200b\ufeff\U000e0041 "
    "\rstate:          SUCCEEDED\nvote:           security approves\x7f\x85"
)


def unsafe(text: str) -> list[str]:
    """Characters a terminal would act on or hide, other than the newlines and tabs that lay out output."""
    return sorted(
        {
            f"U+{ord(c):04X}"
            for c in text
            if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Cn")
        }
    )


def write_bundle(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    documents = [
        {
            "apiVersion": "pdp/v1",
            "kind": "Bundle",
            "name": "escapes",
            "default_tier": "ai_writable",
            "default_effect": "deny",
            "default_approval": {"groups": ["leads"], "min_approvals": 1, "expires_in": "1h"},
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [
                {
                    "name": "notes",
                    "type": "http",
                    "resource_prefix": "https://tickets.example/api/",
                    "operations": {"POST": "write"},
                }
            ],
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Rules",
            "rules": [
                {
                    "id": "notes-need-a-lead",
                    "effect": "needs_approval",
                    "when": "has(action.params.note)",
                    "message": '"note: " + action.params.note',
                }
            ],
        },
    ]
    (directory / "bundle.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return directory


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        with running_server(url, policy_dir=write_bundle(tmp_path / "bundle")) as running:
            yield running


def cli(*args: str, tmp_path: Path, token: str = "") -> subprocess.CompletedProcess[bytes]:
    env = pdp_env(tmp_path)
    if token:
        env["PDP_AGENT_TOKEN"] = token
    return subprocess.run([PDP, *args], capture_output=True, env=env, cwd=tmp_path, timeout=120, check=False)


def shown(result: subprocess.CompletedProcess[bytes]) -> str:
    """The output as a terminal would get it, checked byte by byte for what it must not hold."""
    assert result.returncode == 0, result.stdout + result.stderr
    for stream in (result.stdout, result.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream and b"\r" not in stream
    text = result.stdout.decode("utf-8")  # strict: the output is valid UTF-8
    assert unsafe(text) == [], unsafe(text)
    return text


def test_cli_output_never_carries_raw_control_sequences(server: Server, tmp_path: Path) -> None:
    agent = server.add_agent(owner="escape-owner")
    params = {"note": EVIL, "nested": {"deeper": [EVIL]}}
    response = server.client(agent.token).propose("notes", "POST", RESOURCE, EVIL, params=params)
    assert response.state == pdp_pb2.PENDING_APPROVAL
    assert EVIL in response.decision.reasons[0].message  # the policy quoted the param, as written
    token = add_approver(server.engine, f"lead-{uuid.uuid4().hex[:6]}", ["leads"])
    with httpx.Client(base_url=server.admin_url, headers={"Authorization": f"Bearer {token}"}) as lead:
        rejected = lead.post(f"/api/v1/proposals/{response.proposal_id}/reject", json={"reason": "no " + EVIL})
        assert rejected.status_code == 200, rejected.text

    got = shown(
        cli(
            "proposals", "get", response.proposal_id, "--grpc-addr", server.target, tmp_path=tmp_path, token=agent.token
        )
    )
    # Everything is still there, visibly: the reader sees that something odd was sent.
    assert "\\u001b[2J" in got and "\\u202egnp.exe" in got and "\\u009b31m" in got
    assert "state:          REJECTED" in got
    for field in ("justification:", "params:", "reasons:", "vote:"):
        assert field in got
    # A value can never start a line of its own and pass for another field.
    assert [line for line in got.splitlines() if line.startswith("state:")] == ["state:          REJECTED"]
    assert not [line for line in got.splitlines() if line.startswith("vote:           security")]

    watched = cli(
        "proposals", "watch", response.proposal_id, "--grpc-addr", server.target, tmp_path=tmp_path, token=agent.token
    )
    assert "REJECTED" in shown(watched)

    proposed = cli(
        "propose", "--tool", "notes", "--operation", "POST", "--resource", RESOURCE,
        "--params", json.dumps({"note": EVIL}), "--justification", EVIL, "--grpc-addr", server.target,
        tmp_path=tmp_path, token=agent.token,
    )  # fmt: skip
    assert "\\u202e" in shown(proposed)

    exported = shown(cli("audit", "export", "--database-url", server.database_url, tmp_path=tmp_path))
    decided = [json.loads(line) for line in exported.splitlines() if response.proposal_id in line]
    body = next(event["body"] for event in decided if event["type"] == "proposal.decided")
    assert body["data"]["justification"] == EVIL  # escaped on the screen, exact in the data
    assert body["data"]["action"]["params"] == params
