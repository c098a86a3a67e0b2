"""The sql connector on real databases: a SQLite file and a fresh PostgreSQL database (``empty_database_url``)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from credential_pieces import leaked
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    text,
)
from sqlalchemy import exc as sa_exc

from executor.connectors.base import Call, ConnectorConfigError, ConnectorContext, ConnectorError, ConnectorTimeout
from executor.connectors.sql import SqlConnector
from executor.redaction import Redactor
from pdp.policy.catalog import Kind, Tool
from pdp.store.database import normalize_url

OPERATIONS = {"select": Kind.READ, "insert": Kind.WRITE, "update": Kind.WRITE, "delete": Kind.WRITE}
CRM = Tool(name="crm", type="sql", resource_prefix="sql://crm/", operations=OPERATIONS)
CONTACTS = "sql://crm/contacts"
MAX_ROWS = 3
SEED = [
    {"id": 1, "name": "Ada", "email": "ada@example.com", "score": 12.5},
    {"id": 2, "name": "Grace", "email": None, "score": None},
    {"id": 3, "name": "Edsger", "email": "ew@example.com", "score": 3},
    {"id": 4, "name": "Barbara", "email": "bl@example.com", "score": None},
    {"id": 5, "name": "Ken", "email": None, "score": 7.25},
]


def contacts_table(metadata: MetaData) -> Table:
    return Table(
        "contacts",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(100), nullable=False),
        Column("email", String(200)),
        Column("score", Numeric(10, 2)),
        Column("created", DateTime),
        Column("photo", LargeBinary),
    )


@dataclass
class Db:
    url: str
    engine: Engine
    directory: Path

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def rows(self) -> list[dict[str, Any]]:
        """Every contact, by id: what a refused call must leave exactly as it was."""
        with self.engine.connect() as conn:
            result = conn.execute(text("SELECT id, name, email, score FROM contacts ORDER BY id"))
            return [dict(row) for row in result.mappings()]

    def ddl(self, *statements: str) -> None:
        with self.engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))


@pytest.fixture
def db(empty_database_url: str, tmp_path: Path) -> Iterator[Db]:
    engine = create_engine(normalize_url(empty_database_url))
    metadata = MetaData()
    table = contacts_table(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), SEED)
    (tmp_path / "crm.url").write_text(empty_database_url + "\n")
    try:
        yield Db(empty_database_url, engine, tmp_path)
    finally:
        engine.dispose()


def section(**overrides: Any) -> dict[str, Any]:
    return {"databases": {"crm": {"file": "crm.url"}}, "statement_timeout": "5s", "max_rows": MAX_ROWS, **overrides}


@pytest.fixture
def connector(db: Db) -> Iterator[SqlConnector]:
    made = SqlConnector(section(), ConnectorContext(tool=CRM, base_dir=db.directory, environ={}))
    try:
        yield made
    finally:
        made.close()


def call(operation: str, params: Mapping[str, Any], resource: str = CONTACTS, tool: Tool = CRM) -> Call:
    return Call(proposal_id="prop-1", tool=tool, operation=operation, resource=resource, params=params)


# --- select -----------------------------------------------------------------------------------------------


def test_select_returns_at_most_max_rows_and_says_so(connector: SqlConnector) -> None:
    result = connector.execute(call("select", {"order_by": "id", "columns": ["id", "name"]}))
    assert result == {
        "operation": "select",
        "table": "contacts",
        "rowcount": 3,
        "rows": [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Grace"}, {"id": 3, "name": "Edsger"}],
        "truncated": True,
    }


def test_select_with_where_columns_and_limit(connector: SqlConnector) -> None:
    result = connector.execute(
        call("select", {"where": {"email": None}, "columns": ["name"], "order_by": "name", "limit": 1})
    )
    assert result["rows"] == [{"name": "Grace"}]
    assert result["truncated"] is True
    result = connector.execute(call("select", {"where": {"name": "Ken", "email": None}, "columns": ["id"]}))
    assert result["rows"] == [{"id": 5}]
    assert result["truncated"] is False


def test_select_where_a_list_means_in_and_a_null_in_it_means_is_null(connector: SqlConnector) -> None:
    found = connector.execute(call("select", {"where": {"id": [1, 3, 99]}, "columns": ["id"], "order_by": "id"}))
    assert found["rows"] == [{"id": 1}, {"id": 3}]
    found = connector.execute(
        call("select", {"where": {"email": ["ada@example.com", None]}, "columns": ["id"], "order_by": "id"})
    )
    assert found["rows"] == [{"id": 1}, {"id": 2}, {"id": 5}]


def test_selected_values_are_json_safe(connector: SqlConnector) -> None:
    connector.execute(
        call(
            "insert",
            {
                "values": {
                    "id": 10,
                    "name": "Typed",
                    "score": 9.75,
                    "created": "2026-01-02T03:04:05",
                    "photo": base64.b64encode(b"\x00\xffpng").decode(),
                }
            },
        )
    )
    [row] = connector.execute(call("select", {"where": {"id": 10}}))["rows"]
    assert row == {
        "id": 10,
        "name": "Typed",
        "email": None,
        "score": "9.75",
        "created": "2026-01-02T03:04:05",
        "photo": base64.b64encode(b"\x00\xffpng").decode(),
    }


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        pytest.param({"limit": MAX_ROWS + 1}, "limit", id="limit-over-max"),
        pytest.param({"limit": 0}, "limit", id="limit-zero"),
        pytest.param({"limit": True}, "limit", id="limit-bool"),
        pytest.param({"columns": []}, "columns", id="no-columns"),
        pytest.param({"columns": ["id", "password"]}, "password", id="unknown-column"),
        pytest.param({"order_by": "id desc"}, "id desc", id="order-by-expression"),
        pytest.param({"where": {"id": {"$gt": 1}}}, "where.id", id="operator-object"),
        pytest.param({"where": "id = 1"}, "where", id="where-text"),
        pytest.param({"sql": "SELECT 1"}, "sql", id="raw-sql-param"),
    ],
)
def test_bad_select_params_are_refused_naming_the_param(
    connector: SqlConnector, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConnectorError) as raised:
        connector.execute(call("select", params))
    assert problem in raised.value.message


# --- writes -----------------------------------------------------------------------------------------------


def test_insert_one_row(connector: SqlConnector, db: Db) -> None:
    result = connector.execute(call("insert", {"values": {"id": 6, "name": "Linus"}}))
    assert result == {"operation": "insert", "table": "contacts", "rowcount": 1}
    assert db.rows() == [*SEED, {"id": 6, "name": "Linus", "email": None, "score": None}]
    assert len(db.rows()) == 6


def test_insert_many_rows(connector: SqlConnector, db: Db) -> None:
    rows = [{"id": i, "name": f"n{i}", "email": f"{i}@x"} for i in range(20, 25)]
    assert connector.execute(call("insert", {"rows": rows}))["rowcount"] == 5
    assert [(r["id"], r["name"], r["email"]) for r in db.rows()[5:]] == [(i, f"n{i}", f"{i}@x") for i in range(20, 25)]


def test_a_failing_row_rolls_back_the_whole_insert(connector: SqlConnector, db: Db) -> None:
    before = db.rows()
    rows = [{"id": 30, "name": "ok"}, {"id": 1, "name": "duplicate key"}]
    with pytest.raises(ConnectorError) as raised:
        connector.execute(call("insert", {"rows": rows}))
    assert db.rows() == before
    message = raised.value.message
    assert "\n" not in message and db.url not in message and "INSERT" not in message


def test_rows_must_name_the_same_columns(connector: SqlConnector, db: Db) -> None:
    before = db.rows()
    with pytest.raises(ConnectorError, match=r"rows\[1\]"):
        connector.execute(call("insert", {"rows": [{"id": 40, "name": "a"}, {"id": 41, "name": "b", "email": "e"}]}))
    assert db.rows() == before


def test_update_with_where_touches_only_matching_rows(connector: SqlConnector, db: Db) -> None:
    before = db.rows()
    result = connector.execute(call("update", {"values": {"email": "none@example.com"}, "where": {"email": None}}))
    assert result == {"operation": "update", "table": "contacts", "rowcount": 2}
    after = db.rows()
    changed = {row["id"] for row in after if row not in before}
    assert changed == {2, 5}
    assert all(row["email"] == "none@example.com" for row in after if row["id"] in changed)


def test_delete_with_where_removes_only_matching_rows(connector: SqlConnector, db: Db) -> None:
    result = connector.execute(call("delete", {"where": {"id": [2, 4]}}))
    assert result == {"operation": "delete", "table": "contacts", "rowcount": 2}
    assert [row["id"] for row in db.rows()] == [1, 3, 5]


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        pytest.param("update", {"values": {"name": "everyone"}}, id="update-without-where"),
        pytest.param("update", {"values": {"name": "everyone"}, "where": {}}, id="update-empty-where"),
        pytest.param("delete", {}, id="delete-without-where"),
        pytest.param("delete", {"where": {}}, id="delete-empty-where"),
        pytest.param("update", {"where": {"id": 1}}, id="update-without-values"),
        pytest.param("insert", {}, id="insert-nothing"),
        pytest.param("insert", {"values": {"id": 7, "name": "x"}, "rows": []}, id="insert-both"),
        pytest.param("insert", {"rows": [{"id": i, "name": "x"} for i in range(1001)]}, id="insert-too-many"),
        pytest.param("update", {"values": {"nope": 1}, "where": {"id": 1}}, id="update-unknown-column"),
        pytest.param("delete", {"where": {"nope": 1}}, id="delete-unknown-column"),
        pytest.param("delete", {"where": {"id": 1}, "limit": 1}, id="delete-unknown-param"),
        pytest.param("insert", {"values": {"id": 8, "name": "x", "created": "yesterday"}}, id="bad-datetime"),
    ],
)
def test_refused_writes_change_nothing(connector: SqlConnector, db: Db, operation: str, params: dict[str, Any]) -> None:
    before = db.rows()
    with pytest.raises(ConnectorError, match="crm: "):
        connector.execute(call(operation, params))
    assert db.rows() == before


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        pytest.param("sql://crm/missing_table", "no table 'missing_table'", id="unknown-table"),
        pytest.param("sql://crm/contacts-x", "not a table name", id="bad-table-name"),
        pytest.param("sql://crm/1contacts", "not a table name", id="leading-digit"),
        pytest.param("sql://crm/contacts;drop", "path parameters", id="semicolon"),
        pytest.param("sql://crm/contacts/extra", "sql://<database>/<table>", id="extra-path"),
        pytest.param("sql://crm/public.contacts", "not a table name", id="schema-qualified"),
        pytest.param("sql://other/contacts", "outside", id="outside-prefix"),
    ],
)
def test_bad_resources_are_refused(connector: SqlConnector, db: Db, resource: str, problem: str) -> None:
    before = db.rows()
    with pytest.raises(ConnectorError) as raised:
        connector.execute(call("delete", {"where": {"id": 1}}, resource=resource))
    assert problem in raised.value.message
    assert db.rows() == before


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        pytest.param("CONTACTS", "no table 'CONTACTS'", id="upper-case"),
        pytest.param("Contacts", "no table 'Contacts'", id="mixed-case"),
        pytest.param("sqlite_master", "system table", id="sqlite-master"),
        pytest.param("SQLite_Schema", "system table", id="sqlite-schema-any-case"),
        pytest.param("pg_class", "system table", id="pg-class"),
        pytest.param("tables", "no table 'tables'", id="information-schema-unqualified"),
    ],
)
def test_a_table_matches_its_reflected_name_exactly(connector: SqlConnector, db: Db, table: str, problem: str) -> None:
    before = db.rows()
    for operation, params in (("select", {}), ("delete", {"where": {"id": 1}})):
        with pytest.raises(ConnectorError) as raised:
            connector.execute(call(operation, params, resource=f"sql://crm/{table}"))
        assert problem in raised.value.message
    assert db.rows() == before


def test_a_column_matches_its_reflected_name_exactly(connector: SqlConnector, db: Db) -> None:
    before = db.rows()
    for params in ({"where": {"NAME": "Ada"}}, {"columns": ["Name"]}, {"order_by": "ID"}, {"where": {"rowid": 1}}):
        with pytest.raises(ConnectorError, match="has no column"):
            connector.execute(call("select", params))
    with pytest.raises(ConnectorError, match="has no column 'EMAIL'"):
        connector.execute(call("update", {"values": {"EMAIL": "x@example.com"}, "where": {"id": 1}}))
    assert db.rows() == before


def test_the_tables_allow_list_limits_the_tables_a_database_serves(db: Db) -> None:
    db.ddl("CREATE TABLE accounts (id INTEGER PRIMARY KEY, secret VARCHAR(50))")
    made = SqlConnector(section(tables={"crm": ["contacts"]}), ConnectorContext(CRM, db.directory, {}))
    try:
        assert made.execute(call("select", {"where": {"id": 1}, "columns": ["id"]}))["rows"] == [{"id": 1}]
        with pytest.raises(ConnectorError, match=r"'accounts' is not in tables\.crm"):
            made.execute(call("select", {}, resource="sql://crm/accounts"))
    finally:
        made.close()


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        pytest.param({"other": ["contacts"]}, "no such database", id="unknown-database"),
        pytest.param({"crm": []}, "at least one table", id="empty"),
        pytest.param({"crm": ["sqlite_master"]}, "system table", id="system-table"),
        pytest.param({"crm": ["public.contacts"]}, "not a table name", id="qualified"),
        pytest.param({"crm": "contacts"}, "tables.crm", id="not-a-list"),
    ],
)
def test_a_bad_tables_allow_list_is_a_config_error(tmp_path: Path, tables: dict[str, Any], problem: str) -> None:
    (tmp_path / "crm.url").write_text(f"sqlite:///{tmp_path / 'crm.db'}")
    with pytest.raises(ConnectorConfigError, match="tool crm: ") as raised:
        SqlConnector(section(tables=tables), ConnectorContext(CRM, tmp_path, {}))
    assert problem in str(raised.value)


def test_a_database_the_tool_does_not_configure_is_refused(db: Db) -> None:
    wide = Tool(name="crm", type="sql", resource_prefix="sql://", operations=OPERATIONS)
    made = SqlConnector(section(), ConnectorContext(tool=wide, base_dir=db.directory, environ={}))
    try:
        with pytest.raises(ConnectorError, match="database 'other' is not configured"):
            made.execute(call("delete", {"where": {"id": 1}}, resource="sql://other/contacts", tool=wide))
    finally:
        made.close()
    assert len(db.rows()) == len(SEED)


def test_an_operation_outside_the_four_is_refused(db: Db) -> None:
    odd = Tool(name="crm", type="sql", resource_prefix="sql://crm/", operations={"truncate": Kind.WRITE})
    made = SqlConnector(section(), ConnectorContext(tool=odd, base_dir=db.directory, environ={}))
    try:
        with pytest.raises(ConnectorError, match="truncate"):
            made.execute(call("truncate", {}, tool=odd))
    finally:
        made.close()
    assert len(db.rows()) == len(SEED)


def test_an_injection_attempt_is_stored_literally(connector: SqlConnector, db: Db) -> None:
    attack = "x'; DROP TABLE contacts; --"
    connector.execute(call("insert", {"values": {"id": 50, "name": attack}}))
    connector.execute(call("update", {"values": {"email": attack}, "where": {"name": attack}}))
    found = connector.execute(call("select", {"where": {"name": attack}, "columns": ["id", "name", "email"]}))
    assert found["rows"] == [{"id": 50, "name": attack, "email": attack}]
    assert len(db.rows()) == len(SEED) + 1


def test_a_column_added_after_first_use_is_found(connector: SqlConnector, db: Db) -> None:
    connector.execute(call("select", {"where": {"id": 1}}))
    db.ddl("ALTER TABLE contacts ADD COLUMN phone VARCHAR(20)")
    connector.execute(call("update", {"values": {"phone": "+1 555"}, "where": {"id": 1}}))
    assert connector.execute(call("select", {"where": {"id": 1}, "columns": ["phone"]}))["rows"] == [
        {"phone": "+1 555"}
    ]


def test_concurrent_writes_from_many_threads(connector: SqlConnector, db: Db) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            connector.execute(call("insert", {"values": {"id": 100 + i, "name": f"t{i}"}}))
            connector.execute(call("update", {"values": {"email": f"t{i}@x"}, "where": {"id": 100 + i}}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    added = [row for row in db.rows() if row["id"] >= 100]
    assert [(row["id"], row["email"]) for row in added] == [(100 + i, f"t{i}@x") for i in range(8)]


# --- statement timeout ------------------------------------------------------------------------------------


def test_a_slow_select_is_cut_off_and_the_connector_keeps_working(db: Db) -> None:
    if db.backend == "postgresql":
        db.ddl("CREATE VIEW slow AS SELECT 1 AS n FROM pg_sleep(30)")
    else:
        db.ddl(
            "CREATE VIEW slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000)"
            " SELECT count(*) AS n FROM c"
        )
    made = SqlConnector(section(statement_timeout="300ms"), ConnectorContext(CRM, db.directory, {}))
    try:
        with pytest.raises(ConnectorTimeout, match="crm: statement did not finish within 300ms"):
            made.execute(call("select", {}, resource="sql://crm/slow"))
        assert made.execute(call("select", {"where": {"id": 1}, "columns": ["id"]}))["rows"] == [{"id": 1}]
    finally:
        made.close()


@pytest.mark.backend("postgres")
def test_a_slow_write_on_postgres_is_cut_off_and_rolled_back(db: Db) -> None:
    db.ddl(
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$",
        "CREATE TRIGGER contacts_slow BEFORE INSERT ON contacts FOR EACH ROW EXECUTE FUNCTION slow_insert()",
    )
    made = SqlConnector(section(statement_timeout="300ms"), ConnectorContext(CRM, db.directory, {}))
    try:
        with pytest.raises(ConnectorTimeout):
            made.execute(call("insert", {"values": {"id": 60, "name": "slow"}}))
    finally:
        made.close()
    assert len(db.rows()) == len(SEED)


@pytest.mark.backend("sqlite")
def test_a_write_blocked_by_another_writer_on_sqlite_times_out(db: Db) -> None:
    made = SqlConnector(section(statement_timeout="300ms"), ConnectorContext(CRM, db.directory, {}))
    try:
        with db.engine.connect() as other:
            other.exec_driver_sql("BEGIN IMMEDIATE")  # holds the write lock
            with pytest.raises(ConnectorTimeout):
                made.execute(call("insert", {"values": {"id": 61, "name": "blocked"}}))
            other.rollback()
    finally:
        made.close()
    assert len(db.rows()) == len(SEED)


# --- errors and configuration -----------------------------------------------------------------------------


@pytest.mark.backend("postgres")
def test_an_unreachable_database_is_an_error_without_the_url(db: Db) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(db.url).set(database="pdp_no_such_database").render_as_string(hide_password=False)
    (db.directory / "missing.url").write_text(url)
    made = SqlConnector(
        section(databases={"crm": {"file": "missing.url"}}), ConnectorContext(CRM, db.directory, environ={})
    )
    try:
        with pytest.raises(ConnectorError) as raised:
            made.execute(call("select", {}))
    finally:
        made.close()
    assert "pdp_no_such_database" in raised.value.message
    assert url not in raised.value.message


def test_secrets_are_the_url_and_its_password(tmp_path: Path) -> None:
    url = "postgresql://crm_user:a-long-db-password@db.internal:5432/crm"
    made = SqlConnector(
        section(databases={"crm": {"env": "CRM_URL"}}), ConnectorContext(CRM, tmp_path, {"CRM_URL": url})
    )
    try:
        assert {secret.reveal() for secret in made.secrets()} == {url, "a-long-db-password"}
        shown = f"{made!r} {made!s} {made.secrets()!r}"
        assert "a-long-db-password" not in shown and "db.internal" not in shown
        assert Redactor(made.secrets()).text(f"failed: {url}") == "failed: [REDACTED]"
    finally:
        made.close()


def test_a_database_error_is_scrubbed_before_its_first_line_is_taken(tmp_path: Path) -> None:
    """A driver message that quotes the URL across a line break, split anywhere: the first line keeps no piece
    of the password (the URL's own scheme, user and host around a scrubbed password may remain)."""
    password = "a-long-db-password"
    url = f"postgresql://crm_user:{password}@db.internal:5432/crm"
    made = SqlConnector(
        section(databases={"crm": {"env": "CRM_URL"}}), ConnectorContext(CRM, tmp_path, {"CRM_URL": url})
    )
    try:
        for split in range(len(url) + 1):
            driver = Exception(f"could not use {url[:split]}\n{url[split:]} any more")
            message = made._database_error(sa_exc.OperationalError("SELECT 1", {}, driver)).message
            assert message.startswith("crm: could not use")
            assert leaked(message, password) == [], message
    finally:
        made.close()


@pytest.mark.parametrize(
    ("databases", "environ", "problem"),
    [
        pytest.param({"crm": "sqlite:///inline-value.db"}, {}, "never inline", id="inline-url"),
        pytest.param({"crm": {"env": "CRM_URL"}}, {}, "CRM_URL", id="missing-variable"),
        pytest.param({"crm": {"env": "CRM_URL"}}, {"CRM_URL": "not a url at all"}, "not a SQLAlchemy URL", id="junk"),
        pytest.param({"crm": {"env": "CRM_URL"}}, {"CRM_URL": "mysql://u@h/crm-db"}, "not supported", id="mysql"),
        pytest.param({"crm": {"env": "CRM_URL"}}, {"CRM_URL": "sqlite:///:memory:"}, "must be a file", id="memory"),
        pytest.param({"crm": {"env": "CRM_URL"}}, {"CRM_URL": "postgresql://u:short@h/db"}, "shorter", id="short-pw"),
        pytest.param({}, {}, "databases", id="no-databases"),
        pytest.param({"crm/x": {"env": "CRM_URL"}}, {"CRM_URL": "sqlite:///x.db"}, "database name", id="bad-name"),
    ],
)
def test_bad_database_config_is_a_config_error_without_values(
    tmp_path: Path, databases: dict[str, Any], environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConnectorConfigError) as raised:
        SqlConnector(section(databases=databases), ConnectorContext(CRM, tmp_path, environ))
    message = str(raised.value)
    assert message.startswith("tool crm: ")
    assert problem in message
    for value in [*environ.values(), "inline-value"]:
        assert value not in message


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"statement_timeout": "forever"}, id="bad-timeout"),
        pytest.param({"max_rows": 0}, id="zero-rows"),
        pytest.param({"max_rows": "100"}, id="string-rows"),
        pytest.param({"pool_size": 3}, id="unknown-key"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(tmp_path: Path, overrides: dict[str, Any]) -> None:
    (tmp_path / "crm.url").write_text(f"sqlite:///{tmp_path / 'crm.db'}")
    with pytest.raises(ConnectorConfigError, match=f"tool crm: {next(iter(overrides))}"):
        SqlConnector(section(**overrides), ConnectorContext(CRM, tmp_path, {}))


def test_row_count_helper_sees_the_seed(db: Db) -> None:
    # Guards the other tests' "nothing changed" checks: they compare against a real, populated table.
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(text("contacts"))).scalar_one() == len(SEED)
