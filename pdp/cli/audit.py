"""`pdp keys init`, `pdp audit verify|checkpoint|export` and `pdp db roles`: for operators and auditors."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pdp.audit.checkpoints import append_to_file, sign_head
from pdp.audit.keys import KeyFileError, init_key, load_private, load_public, public_path
from pdp.audit.roles import create_roles
from pdp.audit.rows import RowsReport
from pdp.audit.verify import Report, describe, stale_tail, unsigned_age, verify
from pdp.canonical import timestamp
from pdp.config import add_arguments, from_args
from pdp.policy.duration import parse_duration
from pdp.store.database import create_db_engine
from pdp.store.models import audit_events

# Long enough for a PDP restart or deploy and for what the executor records after the PDP stopped; short
# enough that a day of events nobody signed fails. A running PDP signs the head about every second.
DEFAULT_MAX_UNSIGNED_AGE = "1h"


def register(commands: Any) -> None:
    keys: argparse.ArgumentParser = commands.add_parser("keys", help="the signing key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    init = keys_sub.add_parser("init", help="create the Ed25519 signing key (kept if it exists)")
    add_arguments(init, ("signing_key",))
    init.set_defaults(handler=run_keys_init)

    audit: argparse.ArgumentParser = commands.add_parser("audit", help="the audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    ver = sub.add_parser(
        "verify",
        help="recompute the chain, check checkpoints, compare the rows with it; exit 0 intact, 1 chain broken, "
        "3 rows disagree",
    )
    ver.add_argument("--checkpoints", type=Path, default=None, help="checkpoint file (default: PDP_CHECKPOINT_FILE)")
    ver.add_argument("--no-checkpoint-file", action="store_true", help="check database checkpoints only")
    ver.add_argument("--public-key", type=Path, default=None, help="default: the signing key's .pub file")
    ver.add_argument("--from", dest="from_seq", type=int, default=1, help="start at this seq (trusting seq-1)")
    ver.add_argument(
        "--max-unsigned-age",
        default=DEFAULT_MAX_UNSIGNED_AGE,
        metavar="DURATION",
        help="fail when events no checkpoint signs are older than this, e.g. 10m, 1h, 2d, or 'off' to only "
        f"report them (default {DEFAULT_MAX_UNSIGNED_AGE}; a running PDP signs the head every second or so)",
    )
    ver.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ver.add_argument("--no-rows", action="store_true", help="check the chain only, not the rows against it")
    add_arguments(ver, ("database_url", "signing_key", "checkpoint_file"))
    ver.set_defaults(handler=run_verify)

    cp = sub.add_parser("checkpoint", help="sign the current chain head now")
    add_arguments(cp, ("database_url", "signing_key", "checkpoint_file"))
    cp.set_defaults(handler=run_checkpoint)

    export = sub.add_parser("export", help="events as JSON lines, for a SIEM")
    export.add_argument("--since", default=None, help="ISO time (e.g. 2026-11-21T00:00:00Z) or a seq number")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    add_arguments(export, ("database_url",))
    export.set_defaults(handler=run_export)


def register_db(db_sub: Any) -> None:
    roles = db_sub.add_parser(
        "roles", help="PostgreSQL: create the service's writer, the executor's and the read-only auditor's roles"
    )
    roles.add_argument("--writer", default="pdp_writer")
    roles.add_argument("--auditor", default="pdp_auditor")
    roles.add_argument("--executor", default="pdp_executor")
    add_arguments(roles, ("database_url",))
    roles.set_defaults(handler=run_roles)


def run_keys_init(args: argparse.Namespace) -> int:
    path = Path(from_args(args).signing_key)
    if init_key(path):
        print(f"created signing key {path} (mode 0600) and public key {public_path(path)}")
    else:
        print(f"signing key {path} exists; kept")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    config = from_args(args)
    try:
        max_age = None if args.max_unsigned_age.strip().lower() == "off" else parse_duration(args.max_unsigned_age)
    except ValueError as exc:
        print(f"pdp audit verify: --max-unsigned-age: {exc} (or off)", file=sys.stderr)
        return 2
    try:
        key_path = args.public_key or _public_key_path(Path(config.signing_key))
        public_key = load_public(key_path)
    except KeyFileError as exc:
        print(f"pdp audit verify: {exc}", file=sys.stderr)
        return 2
    checkpoint_file = None if args.no_checkpoint_file else (args.checkpoints or Path(config.checkpoint_file))
    file_missing = checkpoint_file is not None and not checkpoint_file.exists()
    if file_missing and args.checkpoints is not None:
        print(f"pdp audit verify: no checkpoint file at {checkpoint_file}", file=sys.stderr)
        return 2
    if file_missing:
        checkpoint_file = None  # judged below: only suspicious if the database says checkpoints were written
    report = verify(
        create_db_engine(config.database_url),
        public_key=public_key,
        checkpoint_file=checkpoint_file,
        from_seq=args.from_seq,
        check_rows=not args.no_rows,
    )
    now = datetime.now(UTC)
    failures: list[str] = []
    notes: list[str] = []
    if report.first_bad_seq is not None:
        failures.append(f"FAIL at seq {report.first_bad_seq}: {report.problem}")
    if file_missing and report.checkpoints:
        failures.append(
            f"FAIL: the database holds {report.checkpoints} checkpoint(s) but the file {config.checkpoint_file} is gone"
        )
    elif file_missing:
        notes.append(
            f"no checkpoint yet ({config.checkpoint_file} does not exist): a truncated tail cannot be detected "
            "until the first checkpoint (pdp audit checkpoint, or the server's next one)"
        )
    if report.triggers_missing:
        failures.append("FAIL: the database no longer refuses changes to the audit log")
    stale = stale_tail(report, now, max_age) if max_age is not None else ""
    if stale:
        failures.append(
            f"FAIL: nothing signed vouches for {stale}: the PDP has not signed the head since (it signs about "
            "every second while it runs; the executor's events after it stopped wait for its next start), or "
            "someone appended behind its back. Review them; then start the PDP or run `pdp audit checkpoint`"
        )
    rows_failure, rows_status = "", 0
    if report.rows is not None and report.rows.error:
        # Not evidence of tampering: verify could not look (e.g. an auditor role granted before the columns it
        # reads existed: re-run `pdp db roles`). Exit 2, as for any other check that could not run.
        rows_failure = "FAIL: the rows could not be compared with the audit log (connect as a role that may read them)"
        rows_status = CANNOT_CHECK
    elif report.rows is not None and not report.rows.agree:
        rows_failure = "FAIL: the audit log is intact, but the rows above disagree with it (changed outside the PDP)"
        rows_status = ROWS_DISAGREE
    status = 1 if failures else rows_status
    if args.json:
        document = _verify_json(
            report, checkpoint_file, now, max_age, failures + [rows_failure] * bool(rows_failure), notes
        )
        document["ok"] = status == 0
        document["rows"] = _rows_json(report.rows)
        print(json.dumps(document, indent=2))
        return status
    print(f"events:      {report.events} verified, head seq {report.head_seq} hash {report.head_hash[:16]}…")
    print(f"checkpoints: {report.checkpoints} checked" + (f" (incl. {checkpoint_file})" if checkpoint_file else ""))
    print(f"unsigned:    {_tail_text(report, now)}")
    print(
        "triggers:    "
        + ("in place" if not report.triggers_missing else "MISSING " + ", ".join(report.triggers_missing))
    )
    _print_rows(report.rows)
    for note in notes:
        print(f"note:        {note}")
    for failure in failures:
        print(failure)
    if failures:
        return status
    if rows_failure:
        print(rows_failure)
        return status
    print("ok: the audit log is intact" + (" and the rows agree with it" if report.rows is not None else ""))
    return 0


def _tail_text(report: Report, now: datetime) -> str:
    if report.unsigned == 0:
        return f"none (the head, seq {report.head_seq}, is signed)" if report.head_seq else "none (no events)"
    after = f"after seq {report.signed_seq}" if report.signed_seq else "(no valid checkpoint yet)"
    text = f"{report.unsigned} event(s) {after}"
    age = unsigned_age(report, now)
    if age is not None and report.unsigned_since is not None:
        when = timestamp(report.unsigned_since)
        if age >= timedelta(0):
            text += f", the oldest from {when} ({describe(age)} ago)"
        else:
            text += f", the oldest dated {when} ({describe(-age)} in the future)"
    if report.undated:
        text += ", one or more without a readable occurred_at"
    return text


def _verify_json(
    report: Report,
    checkpoint_file: Path | None,
    now: datetime,
    max_age: timedelta | None,
    failures: list[str],
    notes: list[str],
) -> dict[str, Any]:
    age = unsigned_age(report, now)
    return {
        "ok": not failures,
        "events": report.events,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "checkpoints": report.checkpoints,
        "checkpoint_file": str(checkpoint_file) if checkpoint_file else None,
        "triggers_missing": report.triggers_missing,
        "first_bad_seq": report.first_bad_seq,
        "problem": report.problem or None,
        "unsigned": {
            "after_seq": report.signed_seq,
            "events": report.unsigned,
            "oldest_occurred_at": timestamp(report.unsigned_since) if report.unsigned_since else None,
            "age_seconds": round(age.total_seconds(), 3) if age is not None else None,
            "undated": report.undated,
            "max_age_seconds": max_age.total_seconds() if max_age is not None else None,
        },
        "verified_at": timestamp(now),
        "failures": failures,
        "notes": notes,
    }


ROWS_DISAGREE = 3  # the chain is intact; proposals or votes were changed outside the PDP
CANNOT_CHECK = 2  # a check could not run (no key, no file, rows this role may not read)
LISTED_ROWS = 50


def _print_rows(rows: RowsReport | None) -> None:
    if rows is None:
        print("rows:        not compared with the chain (--no-rows)")
        return
    if rows.error:
        print(f"rows:        NOT COMPARED: {rows.error}")
        return
    line = f"rows:        {rows.proposals} proposals compared with the chain, {rows.disagreeing} disagreement(s)"
    if rows.unsigned_requests:
        line += f"; {rows.unsigned_requests} approval request(s) unsigned (recorded before requests were signed)"
    print(line)
    for d in rows.disagreements[:LISTED_ROWS]:
        print(f"  DISAGREE proposal {_printable(d.proposal_id)}: {_printable(d.problem)}")
    if rows.disagreeing > LISTED_ROWS:
        print(f"  … and {rows.disagreeing - LISTED_ROWS} more")


def _printable(text: str) -> str:
    """Rows may hold anything a database writer put there: no control character reaches the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _rows_json(rows: RowsReport | None) -> dict[str, Any] | None:
    if rows is None:
        return None
    return {
        "proposals": rows.proposals,
        "disagreeing": rows.disagreeing,
        "unsigned_requests": rows.unsigned_requests,
        "error": rows.error or None,
        "disagreements": [{"proposal_id": d.proposal_id, "problem": d.problem} for d in rows.disagreements],
    }


def _public_key_path(signing_key: Path) -> Path:
    public = public_path(signing_key)
    return public if public.exists() else signing_key


def run_checkpoint(args: argparse.Namespace) -> int:
    config = from_args(args)
    try:
        key = load_private(Path(config.signing_key))
    except KeyFileError as exc:
        print(f"pdp audit checkpoint: {exc}", file=sys.stderr)
        return 2
    with create_db_engine(config.database_url, writer=True, pool_size=1).begin() as conn:
        checkpoint = sign_head(conn, key, datetime.now(UTC))
    if checkpoint is None:
        print("nothing to sign: the chain is empty or its head is already checkpointed")
        return 0
    append_to_file(Path(config.checkpoint_file), checkpoint)
    where = f"the database and {config.checkpoint_file}"
    print(f"checkpoint at seq {checkpoint.seq} head {checkpoint.head_hash[:16]}… written to {where}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    engine = create_db_engine(from_args(args).database_url)
    query = select(audit_events).order_by(audit_events.c.chain, audit_events.c.seq)
    if args.since:
        if args.since.isdigit():
            query = query.where(audit_events.c.seq >= int(args.since))
        else:
            since = datetime.fromisoformat(args.since.replace("Z", "+00:00"))
            query = query.where(audit_events.c.recorded_at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=2000).execute(query).mappings():
            event = dict(row)
            event["recorded_at"] = row["recorded_at"].isoformat()
            # Parsed for the SIEM, and the exact hashed text so anyone can recompute the chain.
            event["body"] = json.loads(row["body"])
            event["body_canonical"] = row["body"]
            sys.stdout.write(json.dumps(event, sort_keys=True, ensure_ascii=False) + "\n")
    return 0


def run_roles(args: argparse.Namespace) -> int:
    config = from_args(args)
    engine = create_db_engine(config.database_url)
    if engine.dialect.name != "postgresql":
        print(
            "pdp db roles: roles exist on PostgreSQL only; on SQLite, file permissions are the boundary",
            file=sys.stderr,
        )
        return 2
    create_roles(engine, args.writer, args.auditor, args.executor)
    print(
        f"roles {args.writer} (pdp serve), {args.executor} (pdp-executor; no votes, no tickets) and "
        f"{args.auditor} (read-only) are in place; the log is append-only to all of them"
    )
    return 0
