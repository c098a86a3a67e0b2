"""`pdp propose` and `pdp proposals get|watch|cancel`: the agent's side, for humans trying it out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pdp.cli.agents import DEV_TOKEN_FILE
from pdp.cli.render import print_decision, print_proposal
from pdp.client import PdpClient, PdpClientError
from pdp.config import add_arguments, from_args
from pdp.v1 import pdp_pb2


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "propose", help="propose an action as an agent and print the decision"
    )
    parser.add_argument("--tool", required=True)
    parser.add_argument("--operation", required=True)
    parser.add_argument("--resource", required=True)
    parser.add_argument("--params", default="{}", help="JSON object")
    parser.add_argument("--justification", required=True, help="why (recorded, shown to approvers as unverified)")
    parser.add_argument("--cost", type=float, default=0.0, help="estimated cost in USD")
    parser.add_argument("--idempotency-key", default="")
    parser.add_argument("--session-id", default="")
    parser.add_argument("--dry-run", action="store_true", help="Evaluate only: nothing is recorded")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for the final state and print the execution result; exit 0 only if the action succeeded",
    )
    parser.add_argument("--wait-timeout", type=float, default=None, help="seconds to wait at most (default: no limit)")
    _connection_flags(parser)
    parser.set_defaults(handler=run_propose)

    proposals: argparse.ArgumentParser = commands.add_parser("proposals", help="read or cancel your proposals")
    sub = proposals.add_subparsers(dest="proposals_command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("get", "show a proposal"),
        ("watch", "print each state change until a terminal state"),
        ("cancel", "withdraw a proposal pending approval"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("proposal_id")
        _connection_flags(cmd)
        cmd.set_defaults(handler=run_proposals, action=name)


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=None, help=f"agent token (env PDP_AGENT_TOKEN, else {DEV_TOKEN_FILE})")
    add_arguments(parser, ("grpc_addr",))


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("PDP_AGENT_TOKEN", "")
    if not token and DEV_TOKEN_FILE.exists():
        token = DEV_TOKEN_FILE.read_text().strip()
    if not token:
        raise SystemExit(
            f"no agent token: pass --token, set PDP_AGENT_TOKEN, or run `make run` to create {DEV_TOKEN_FILE}"
        )
    return token


def _client(args: argparse.Namespace) -> PdpClient:
    return PdpClient(from_args(args).grpc_addr, _token(args))


def run_propose(args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print(f"pdp propose: --params is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print("pdp propose: --params must be a JSON object", file=sys.stderr)
        return 2
    kw: dict[str, Any] = {"params": params, "estimated_cost_usd": args.cost}
    with _client(args) as client:
        try:
            if args.dry_run:
                print_decision(client.evaluate(args.tool, args.operation, args.resource, args.justification, **kw))
                return 0
            kw.update(idempotency_key=args.idempotency_key, session_id=args.session_id)
            response = client.propose(args.tool, args.operation, args.resource, args.justification, **kw)
            if args.wait:
                print(f"proposal:       {response.proposal_id} ({pdp_pb2.ProposalState.Name(response.state)})")
                print("waiting for the final state…", flush=True)
                final = client.wait(response.proposal_id, timeout=args.wait_timeout)
                print_proposal(final)
                return 0 if final.state == pdp_pb2.SUCCEEDED else 3
        except PdpClientError as exc:
            print(f"pdp propose: {exc}", file=sys.stderr)
            return 1
    print(f"proposal:       {response.proposal_id}")
    print(f"state:          {pdp_pb2.ProposalState.Name(response.state)}")
    print_decision(response.decision)
    return 0


def run_proposals(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            if args.action == "get":
                print_proposal(client.get(args.proposal_id))
            elif args.action == "cancel":
                print_proposal(client.cancel(args.proposal_id))
            else:
                for proposal in client.watch(args.proposal_id):
                    print_proposal(proposal)
                    print()
        except PdpClientError as exc:
            print(f"pdp proposals {args.action}: {exc}", file=sys.stderr)
            return 1
    return 0
