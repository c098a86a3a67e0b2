"""Prepare the demo target systems: ``python -m demo.setup [--dir .pdp/demo]``. Safe to run again.

Creates, each only when missing (and says so, one line each):

- the directory (0700);
- ``tickets.token`` (0600): the bearer token of the demo ticketing API, which the executor sends;
- ``crm.db`` (0600): a SQLite CRM with ``contacts`` and ``accounts`` tables and a few rows each;
- ``crm.url`` (0600): that database's SQLAlchemy URL, an absolute path, for the executor's ``sql`` connector.

Existing files are kept as they are (token and data survive); only permissions looser than the above are tightened.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_DIR = ".pdp/demo"
TOKEN_FILE = "tickets.token"  # noqa: S105 - a file name
CRM_DB = "crm.db"
CRM_URL = "crm.url"

CRM_SCHEMA = """
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT UNIQUE,
    company TEXT,
    tier TEXT,
    updated_at TEXT
);
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    plan TEXT,
    owner TEXT
);
"""

# jo@example.com is the contact the example policy tests look up (policies/tests/support.yaml).
CONTACTS = (
    ("Jo Martin", "jo@example.com", "Northwind Traders", "gold"),
    ("Amara Okafor", "amara.okafor@example.com", "Contoso Ltd", "platinum"),
    ("Lucas Schmidt", "lucas.schmidt@example.com", "Fabrikam GmbH", "silver"),
    ("Priya Raman", "priya.raman@example.com", "Tailspin Toys", "standard"),
    ("Kenji Watanabe", "kenji.watanabe@example.com", "Wide World Importers", "gold"),
)
ACCOUNTS = (
    ("Northwind Traders", "enterprise", "sam.lee@example.org"),
    ("Contoso Ltd", "enterprise", "dana.cruz@example.org"),
    ("Fabrikam GmbH", "team", "sam.lee@example.org"),
    ("Tailspin Toys", "starter", "ali.hassan@example.org"),
    ("Wide World Importers", "team", "dana.cruz@example.org"),
)


def _tighten(path: Path, mode: int, say: Callable[[str], None]) -> None:
    current = path.stat().st_mode & 0o777
    if current & ~mode:
        path.chmod(mode)
        say(f"tightened {path} from {current:04o} to {mode:04o}")


def _write_new(path: Path, text: str) -> None:
    # O_EXCL: never overwrite a file that appeared meanwhile; the mode is set at creation, not after.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _create_crm(path: Path, now: str) -> None:
    # Built under a temporary name and renamed, so an interrupted run never leaves a half-seeded database
    # that a later run would keep.
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(partial)
    try:
        with db:
            db.executescript(CRM_SCHEMA)
            db.executemany(
                "INSERT INTO contacts (name, email, company, tier, updated_at) VALUES (?, ?, ?, ?, ?)",
                [(*contact, now) for contact in CONTACTS],
            )
            db.executemany("INSERT INTO accounts (name, plan, owner) VALUES (?, ?, ?)", ACCOUNTS)
    finally:
        db.close()
    partial.replace(path)


def crm_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file: ``sqlite:///`` followed by the absolute path (hence four slashes)."""
    return f"sqlite:///{path.resolve()}"


def setup(directory: Path, say: Callable[[str], None] = print, now: datetime | None = None) -> None:
    """Create whatever is missing under ``directory``; report each creation through ``say``."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        say(f"created {directory}/ (0700)")
    else:
        _tighten(directory, 0o700, say)

    token = directory / TOKEN_FILE
    if not token.exists():
        _write_new(token, secrets.token_urlsafe(32) + "\n")
        say(f"created {token} (0600): the demo ticketing API's bearer token")
    else:
        _tighten(token, 0o600, say)

    database = directory / CRM_DB
    if not database.exists():
        _create_crm(database, (now or datetime.now(UTC)).isoformat(timespec="seconds"))
        say(f"created {database} (0600): CRM with {len(CONTACTS)} contacts and {len(ACCOUNTS)} accounts")
    else:
        _tighten(database, 0o600, say)

    url_file = directory / CRM_URL
    url = crm_url(database)
    if not url_file.exists():
        _write_new(url_file, url + "\n")
        say(f"created {url_file} (0600): {url}")
    elif url_file.read_text(encoding="utf-8").strip() != url:
        # The directory moved (or was copied): the old absolute path would point at another database.
        url_file.write_text(url + "\n", encoding="utf-8")
        say(f"updated {url_file}: {url}")
    _tighten(url_file, 0o600, say)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.setup", description="Prepare the demo target systems.")
    parser.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help=f"where (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        print(f"demo.setup: {line}")

    try:
        setup(args.dir, say)
    except OSError as exc:
        print(f"demo.setup: {exc}", file=sys.stderr)
        return 1
    if not said:
        print(f"demo.setup: {args.dir} is ready (nothing to create)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
