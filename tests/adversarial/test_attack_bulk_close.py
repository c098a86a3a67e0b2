"""An agent closes many tickets without approval by naming them in a parameter the example rule did not read.

The example bundle's own needs-approval case, ``tickets-bulk``, once looked only at ``params.count``; the demo
tickets API's bulk-close also takes ``{"ids": [...]}``, so ``{"ids": [1..15]}`` was allowed and closed 15
tickets with no approval. The rule must guard the operation: every bulk write needs two support leads except
the narrow case of closing at most 10 tickets, named one way.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import BULK_CLOSE, PDP, POLICIES, Server, pdp_env
from google.protobuf.json_format import MessageToDict

from pdp.v1 import pdp_pb2

AGENT = {"id": "support-bot", "owner": "alice", "roles": ["support"]}
FIFTEEN = list(range(1, 16))

# Every way of saying "many tickets" that the target accepts or that a future target might: each needs approval.
ATTACKS = {
    "ids and no count": {"ids": FIFTEEN},
    "two hundred ids": {"ids": list(range(1, 201))},
    "a small count beside many ids": {"count": 1, "ids": FIFTEEN},
    "no params at all": {},
    "ids as a range string": {"ids": "1-500"},
    "ids as an object": {"ids": {"from": 1, "to": 500}},
    "a parameter the rule does not know": {"ids": [1, 2], "all": True},
    "count as a string": {"count": "15"},
}


def attack_cases() -> dict[str, object]:
    tests = [
        {
            "name": f"attack: bulk-close with {name}",
            "input": {
                "agent": AGENT,
                "action": {"tool": "tickets", "operation": "POST", "resource": BULK_CLOSE, "params": params},
            },
            # A count that is not a number errors in the rule, which denies: also no unapproved close.
            "expect": {
                "outcome": "deny" if name == "count as a string" else "needs_approval",
                "rules": ["tickets-bulk"],
            },
        }
        for name, params in ATTACKS.items()
    ]
    return {"apiVersion": "pdp/v1", "kind": "PolicyTest", "name": "bulk-close attacks", "tests": tests}


def test_pdp_policy_test_shows_every_bulk_close_needs_approval(tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle, ignore=shutil.ignore_patterns(".git"))
    (bundle / "tests" / "attack_bulk_close.yaml").write_text(yaml.safe_dump(attack_cases(), sort_keys=False))
    done = subprocess.run(
        [PDP, "policy", "test", str(bundle)],
        check=False,
        capture_output=True,
        text=True,
        env=pdp_env(tmp_path),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ATTACKS:
        assert f"attack: bulk-close with {name}"[:60] in done.stdout
    assert ", 0 failed" in done.stdout


def test_a_real_bulk_close_by_ids_waits_for_two_support_leads(server: Server) -> None:
    agent, client = server.agent_client()
    response = client.propose(
        "tickets", "POST", BULK_CLOSE, "closing the duplicates after the outage", params={"ids": FIFTEEN}
    )
    assert response.decision.outcome == pdp_pb2.NEEDS_APPROVAL, response
    assert response.state == pdp_pb2.PENDING_APPROVAL
    reasons = {r.rule_id: r.message for r in response.decision.reasons}
    assert reasons["rule:tickets-bulk"] == "bulk change of 15 tickets needs two support leads"
    [requirement] = [MessageToDict(r) for r in response.decision.approval_requirements]
    assert requirement == {"source": "rule:tickets-bulk", "groups": ["support-leads"], "minApprovals": 2}
    row = server.row(response.proposal_id)
    assert row is not None and row["state"] == "PENDING_APPROVAL" and row["agent_id"] == agent.id

    # The README's quick start says exactly this for a count.
    by_count = client.propose("tickets", "POST", BULK_CLOSE, "closing duplicates", params={"count": 40})
    assert by_count.decision.outcome == pdp_pb2.NEEDS_APPROVAL
    counted = {r.rule_id: r.message for r in by_count.decision.reasons}
    assert counted["rule:tickets-bulk"] == "bulk change of 40 tickets needs two support leads"
