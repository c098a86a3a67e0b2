"""`pdp approvers …` and the approver-group warnings of `pdp policy check`, run as the installed console script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PDP, POLICIES, free_port
from sqlalchemy import select

from pdp.errors import Unauthenticated
from pdp.identity.approvers import add_approver, authenticate_approver
from pdp.identity.tokens import token_hash
from pdp.store.database import create_db_engine, is_sqlite
from pdp.store.migrate import upgrade
from pdp.store.models import approvers

# Every approver group the example bundle asks for, and where.
EXAMPLE_GROUPS = {
    "dba": "boundary prod-database-writes",
    "finance-approvers": "rule spend-over-100",
    "ops-oncall": "default_approval",
    "support-leads": "rule tickets-bulk, rule tickets-delete",
}


def pdp(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False)


def ok(*args: str, env: dict[str, str], cwd: Path) -> str:
    result = pdp(*args, env=env, cwd=cwd)
    assert result.returncode == 0, f"pdp {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def add(url: str, env: dict[str, str], cwd: Path, approver_id: str, *extra: str) -> str:
    return ok("approvers", "add", approver_id, "--database-url", url, *extra, env=env, cwd=cwd).splitlines()[-1]


def authenticates(url: str, token: str) -> str | None:
    """The approver id the token authenticates as, or None."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return authenticate_approver(conn, token).id
    except Unauthenticated:
        return None
    finally:
        engine.dispose()


def stored_rows(url: str) -> list[dict[str, object]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(approvers)).mappings()]
    finally:
        engine.dispose()


def listing(url: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """`pdp approvers list` as {id: the whole line}."""
    out = ok("approvers", "list", "--database-url", url, env=env, cwd=cwd)
    return {line.split()[0]: line for line in out.splitlines()[1:]}


def check_warnings(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`pdp policy check`'s group warnings as {group: the line}."""
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: group ")]
    return {line.split("'")[1]: line for line in warnings}


# --- pdp approvers ----------------------------------------------------------------------------------


def test_add_prints_the_token_last_and_stores_only_its_hash(
    database_url: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    result = pdp(
        "approvers", "add", "alice", "--groups", "support-leads, dba", "--name", "Alice Example",
        "--database-url", database_url, env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    *before, token = result.stdout.splitlines()
    assert token == token.strip() and token.startswith("pdp_") and len(token) >= 40
    assert before and "alice" in before[-1]
    assert token not in "\n".join(before) and token not in result.stderr

    assert authenticates(database_url, token) == "alice"
    [row] = stored_rows(database_url)
    assert row["token_hash"] == token_hash(token)
    assert (row["name"], row["groups"], row["revoked_at"]) == ("Alice Example", ["dba", "support-leads"], None)
    assert not any(token.removeprefix("pdp_") in str(value) for value in row.values())
    if is_sqlite(database_url):
        files = b"".join(p.read_bytes() for p in tmp_path.glob("pdp.db*"))
        assert b"Alice Example" in files  # the check below looks at the right files
        assert token.removeprefix("pdp_").encode() not in files


def test_list_revoke_and_groups(database_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    alice = add(database_url, cli_env, tmp_path, "alice", "--groups", "support-leads", "--name", "Alice A")
    bob = add(database_url, cli_env, tmp_path, "bob", "--groups", "dba,ops-oncall")

    rows = listing(database_url, cli_env, tmp_path)
    assert set(rows) == {"alice", "bob"}
    assert "Alice A" in rows["alice"] and "support-leads" in rows["alice"] and rows["alice"].endswith("active")
    assert "dba,ops-oncall" in rows["bob"] and rows["bob"].endswith("active")
    everything = "\n".join(rows.values())
    for secret in (alice, bob, token_hash(alice), token_hash(bob)):
        assert secret not in everything

    changed = ok(
        "approvers", "groups", "bob", "--add", "finance-approvers,support-leads", "--remove", "dba",
        "--database-url", database_url, env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert changed.splitlines()[-1].endswith("finance-approvers,ops-oncall,support-leads")
    assert "finance-approvers,ops-oncall,support-leads" in listing(database_url, cli_env, tmp_path)["bob"]

    ok("approvers", "revoke", "alice", "--database-url", database_url, env=cli_env, cwd=tmp_path)
    assert authenticates(database_url, alice) is None
    assert authenticates(database_url, bob) == "bob"
    rows = listing(database_url, cli_env, tmp_path)
    assert "revoked" in rows["alice"] and rows["bob"].endswith("active")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("add", "alice", "--groups", "dba"), 1, "'alice' already exists"),
        (("add", "carol", "--groups", "dba,not a group"), 1, "'not a group' is not a group name"),
        (("add", "carol", "--groups", ","), 2, "--groups"),
        (("add", "carol"), 2, "--groups"),
        (("revoke", "nobody"), 1, "'nobody' does not exist"),
        (("groups", "nobody", "--add", "dba"), 1, "'nobody' does not exist"),
        (("groups", "alice", "--add", "bad/group"), 1, "'bad/group' is not a group name"),
        (("groups", "alice"), 2, "--add"),
    ],
)
def test_errors_name_the_problem_and_change_nothing(
    args: tuple[str, ...], code: int, message: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    url = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(url)  # setup in-process: only the command under test needs a subprocess
    engine = create_db_engine(url)
    try:
        token = add_approver(engine, "alice", ["support-leads"])
    finally:
        engine.dispose()
    before = stored_rows(url)

    result = pdp("approvers", *args, "--database-url", url, env=cli_env, cwd=tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr
    assert stored_rows(url) == before
    assert authenticates(url, token) == "alice"


def test_unmigrated_database_is_an_error_not_a_traceback(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = pdp("approvers", "list", "--database-url", f"sqlite:///{tmp_path / 'empty.db'}", env=cli_env, cwd=tmp_path)
    assert result.returncode == 1
    assert "approvers" in result.stderr and "Traceback" not in result.stderr


# --- pdp policy check --database-url ------------------------------------------------------------------


def test_policy_check_without_a_database_is_unchanged(tmp_path: Path, cli_env: dict[str, str]) -> None:
    for extra in ((), ("--strict",)):
        result = pdp("policy", "check", str(POLICIES), *extra, env=cli_env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: bundle 'acme-ops'")
        assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # and it did not create ./pdp.db


def test_policy_check_warns_about_groups_without_approvers(
    database_url: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    check = ("policy", "check", str(POLICIES), "--database-url", database_url)
    result = pdp(*check, env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # a warning, not a failure
    assert result.stdout.startswith("ok: bundle 'acme-ops'")
    warnings = check_warnings(result)
    assert set(warnings) == set(EXAMPLE_GROUPS)
    for group, where in EXAMPLE_GROUPS.items():
        assert warnings[group] == (
            f"warning: group '{group}' ({where}) has no active approvers: proposals needing it cannot be approved"
        )
    assert pdp(*check, "--strict", env=cli_env, cwd=tmp_path).returncode == 1

    # One support lead: that group's warning goes, but tickets-bulk wants two of them.
    add(database_url, cli_env, tmp_path, "alice", "--groups", "support-leads")
    result = pdp(*check, env=cli_env, cwd=tmp_path)
    assert result.returncode == 0
    assert set(check_warnings(result)) == set(EXAMPLE_GROUPS) - {"support-leads"}
    assert "rule tickets-bulk needs 2 approvals from support-leads but only 1" in result.stderr

    add(database_url, cli_env, tmp_path, "bob", "--groups", "support-leads,dba,ops-oncall,finance-approvers")
    result = pdp(*check, "--strict", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    # A revoked approver does not count; the environment variable works like the flag.
    ok("approvers", "revoke", "bob", "--database-url", database_url, env=cli_env, cwd=tmp_path)
    env = {**cli_env, "PDP_DATABASE_URL": database_url}
    result = pdp("policy", "check", str(POLICIES), env=env, cwd=tmp_path)
    assert result.returncode == 0
    assert set(check_warnings(result)) == {"dba", "finance-approvers", "ops-oncall"}


def test_policy_check_with_an_unreachable_database_warns(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    closed = f"postgresql://pdp@127.0.0.1:{free_port()}/pdp"
    for url in (missing, closed):
        result = pdp("policy", "check", str(POLICIES), "--database-url", url, env=cli_env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok: bundle 'acme-ops'")
        assert "warning:" in result.stderr and "not checked" in result.stderr
        assert "Traceback" not in result.stderr
        strict = pdp("policy", "check", str(POLICIES), "--database-url", url, "--strict", env=cli_env, cwd=tmp_path)
        assert strict.returncode == 1
    assert not (tmp_path / "typo.db").exists()


def test_policy_check_of_a_broken_bundle_still_fails_first(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(POLICIES, bundle)
    (bundle / "bundle.yaml").write_text("not: [a, bundle\n")
    url = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(url)
    result = pdp("policy", "check", str(bundle), "--database-url", url, env=cli_env, cwd=tmp_path)
    assert result.returncode == 1
    assert "warning:" not in result.stderr
