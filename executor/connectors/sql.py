"""The ``sql`` connector: structured select/insert/update/delete on the one table the resource names.

Config section::

    crm:
      databases:                  # database name in the resource -> SQLAlchemy URL, always a reference
        crm: {file: .pdp/demo/crm.url}
      statement_timeout: 5s       # default 5s
      max_rows: 100               # default 100: the most rows a select returns
      tables:                     # optional allow-list per database; unlisted databases reach every user table
        crm: [contacts, accounts]

The resource is ``sql://<database>/<table>``. The table is looked up, by exact name (case included), among
the user tables and views of the database's schema (SQLite ``main``; PostgreSQL the connection's
``current_schema()``), never by letting the database resolve the name: SQLite matches names without regard
to case, and the system catalogs (``sqlite_*``, ``pg_*``, ``pg_catalog``, ``information_schema``) are never
reachable, whatever the grants of the configured credential. Params by operation (nothing else is accepted):

- ``select``: ``{"where"?, "columns"?: [col, ...], "limit"?: n <= max_rows, "order_by"?: col}``
- ``insert``: ``{"values": {col: value}}`` or ``{"rows": [{col: value}, ...]}`` (at most 1000 rows)
- ``update``: ``{"values": {...}, "where": {...}}``, ``where`` required and non-empty
- ``delete``: ``{"where": {...}}``, required and non-empty

``where`` is equality only: ``{col: value}``; ``null`` means IS NULL and a list means IN. Every column is
checked against the reflected table and every value is a bound parameter: the agent's text never
becomes SQL. One call is one transaction, cut off at the statement timeout (PostgreSQL
``statement_timeout``; SQLite a progress handler), and rolled back on any error.
"""

from __future__ import annotations

import base64
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy import types as sa_types
from sqlalchemy.engine import URL
from sqlalchemy.sql.elements import ColumnElement

from executor.connectors.base import (
    Call,
    ConnectorConfigError,
    ConnectorContext,
    ConnectorError,
    ConnectorRejected,
    ConnectorTimeout,
    config_error,
)
from executor.secrets import MIN_SECRET_LENGTH, Secret, SecretError, SecretRef
from pdp.policy.catalog import CatalogViolation, resolve
from pdp.policy.duration import DurationText, parse_duration
from pdp.store.database import normalize_url

OPERATIONS = ("select", "insert", "update", "delete")
MAX_INSERT_ROWS = 1000
# Used with fullmatch: "$" would also accept a trailing newline.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Names the databases reserve for their own catalogs (SQLite refuses to create sqlite_*; PostgreSQL's catalogs are
# pg_*). Refused whatever the case and whatever the database holds, so no catalog is ever one typo away.
_SYSTEM_PREFIXES = ("sqlite_", "pg_")
_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_PARAMS = {
    "select": {"where", "columns", "limit", "order_by"},
    "insert": {"values", "rows"},
    "update": {"values", "where"},
    "delete": {"where"},
}
_SCALARS = (str, int, float, bool, type(None))
# SQLite calls the progress handler every this many virtual-machine instructions.
_PROGRESS_STEPS = 1000
# SQLSTATEs for query_canceled (statement_timeout) and lock_not_available (lock_timeout).
_PG_TIMEOUT_STATES = frozenset({"57014", "55P03"})


class SqlSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    databases: dict[str, SecretRef] = Field(min_length=1)
    statement_timeout: DurationText = "5s"
    max_rows: int = Field(default=100, gt=0, le=10_000)
    tables: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("databases", mode="before")
    @classmethod
    def _referenced(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if not isinstance(name, str) or not _DATABASE_NAME.fullmatch(name):
                    raise ValueError(f"{name!r} is not a database name (letters, digits, _ . -)")
                if not isinstance(item, Mapping):
                    raise ValueError(
                        f"database {name}: credentials are referenced, never inline: {{env: NAME}} or {{file: PATH}}"
                    )
        return value

    @model_validator(mode="after")
    def _tables_listed(self) -> SqlSection:
        for database, names in self.tables.items():
            if database not in self.databases:
                raise ValueError(f"tables.{database}: no such database in databases")
            if not names:
                raise ValueError(f"tables.{database}: list at least one table (or leave the database out)")
            for name in names:
                problem = _table_name_problem(name)
                if problem:
                    raise ValueError(f"tables.{database}: {problem}")
        return self


def _table_name_problem(name: str) -> str:
    """Why ``name`` can never name a reachable table; empty when it can."""
    if not _IDENTIFIER.fullmatch(name):
        return f"{name!r} is not a table name"
    if name.lower().startswith(_SYSTEM_PREFIXES):
        return f"{name!r} is a system table name: system tables are never reachable"
    return ""


class SqlConnector:
    """Thread-safe: engines and reflected tables are created once under a lock; each call uses its own connection."""

    def __init__(self, section: Mapping[str, Any], context: ConnectorContext) -> None:
        self._tool = context.tool.name
        self._redactor = context.redactor
        try:
            config = SqlSection.model_validate(dict(section))
        except ValidationError as exc:
            raise config_error(self._tool, exc) from None
        self._timeout_text = config.statement_timeout
        self._timeout = parse_duration(config.statement_timeout).total_seconds()
        self._max_rows = config.max_rows
        self._allowed = {database: frozenset(names) for database, names in config.tables.items()}
        self._urls: dict[str, URL] = {}
        self._secrets: list[Secret] = []
        for name, ref in config.databases.items():
            where = f"tool {self._tool}: databases.{name}"
            try:
                secret = ref.resolve(context.base_dir, context.environ)
            except SecretError as exc:
                raise ConnectorConfigError(f"{where}: {exc}") from None
            self._secrets.append(secret)
            self._urls[name] = self._parse_url(where, secret)
            password = self._urls[name].password
            if password:
                if len(str(password)) < MIN_SECRET_LENGTH:
                    # Redacting a short password would mangle ordinary text; leaving it would leak it.
                    raise ConnectorConfigError(f"{where}: the password is shorter than {MIN_SECRET_LENGTH} characters")
                self._secrets.append(Secret(str(password)))
        self._redactor.add(self._secrets)
        self._lock = threading.Lock()
        self._engines: dict[str, Engine] = {}
        self._tables: dict[tuple[str, str], Table] = {}

    @staticmethod
    def _parse_url(where: str, secret: Secret) -> URL:
        try:
            url = normalize_url(secret.reveal())
        except (sa_exc.ArgumentError, ValueError):
            # SQLAlchemy's message quotes the URL, password included.
            raise ConnectorConfigError(f"{where}: the credential is not a SQLAlchemy URL") from None
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConnectorConfigError(f"{where}: {backend} is not supported (sqlite or postgresql)")
        if backend == "sqlite" and url.database in (None, "", ":memory:"):
            raise ConnectorConfigError(f"{where}: a SQLite database must be a file")
        return url

    def __repr__(self) -> str:
        return f"SqlConnector(tool={self._tool!r}, databases={sorted(self._urls)!r})"

    def secrets(self) -> list[Secret]:
        return list(self._secrets)

    def close(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
            self._tables.clear()
        for engine in engines:
            engine.dispose()

    # --- a call ---------------------------------------------------------------------------------------

    def execute(self, call: Call) -> dict[str, Any]:
        operation = call.operation
        database, table_name = self._target(call)
        params = dict(call.params)
        unknown = sorted(set(params) - _PARAMS[operation])
        if unknown:
            accepted = ", ".join(sorted(_PARAMS[operation]))
            raise ConnectorRejected(
                f"{self._tool}: {operation} does not accept param {unknown[0]!r} (accepts: {accepted})"
            )
        try:
            engine = self._engine(database)
            table = self._table(database, table_name, _mentioned_columns(params))
            with engine.connect() as conn:
                if operation != "select":
                    conn.execution_options(pdp_write=True)
                deadline = time.monotonic() + self._timeout
                with _sqlite_deadline(conn, deadline), conn.begin():
                    if engine.dialect.name == "postgresql":
                        ms = str(max(1, int(self._timeout * 1000)))
                        conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": ms})
                        conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": ms})
                    result = self._run(conn, operation, table, params)
        except sa_exc.SQLAlchemyError as exc:
            raise self._database_error(exc) from None
        return {"operation": operation, "table": table_name, **result}

    def _target(self, call: Call) -> tuple[str, str]:
        """The database and table, refused unless the resource is exactly ``sql://<database>/<table>``."""
        checked = resolve({call.tool.name: call.tool}, call.tool.name, call.operation, call.resource)
        if isinstance(checked, CatalogViolation):
            raise ConnectorRejected(f"{self._tool}: {checked.message}")
        if call.operation not in OPERATIONS:
            raise ConnectorRejected(f"{self._tool}: operation {call.operation!r} is not one of {', '.join(OPERATIONS)}")
        scheme, _, rest = call.resource.partition("://")
        parts = rest.split("/")
        if scheme != "sql" or len(parts) != 2:
            raise ConnectorRejected(f"{self._tool}: resource {call.resource!r} is not sql://<database>/<table>")
        database, table = parts
        if database not in self._urls:
            raise ConnectorRejected(f"{self._tool}: database {database!r} is not configured for this tool")
        problem = _table_name_problem(table)
        if problem:
            raise ConnectorRejected(f"{self._tool}: {problem}")
        allowed = self._allowed.get(database)
        if allowed is not None and table not in allowed:
            raise ConnectorRejected(f"{self._tool}: table {table!r} is not in tables.{database} of this tool's config")
        return database, table

    def _run(self, conn: Connection, operation: str, table: Table, params: dict[str, Any]) -> dict[str, Any]:
        if operation == "select":
            return self._select(conn, table, params)
        if operation == "insert":
            rows = self._insert_rows(table, params)
            conn.execute(insert(table), rows)
            # Driver rowcounts for executemany vary; every row went in or the transaction failed.
            return {"rowcount": len(rows)}
        where = self._where(table, params.get("where"), required=True)
        if operation == "update":
            values = self._values(table, params.get("values"), "values")
            return {"rowcount": conn.execute(update(table).where(*where).values(values)).rowcount}
        return {"rowcount": conn.execute(delete(table).where(*where)).rowcount}

    def _select(self, conn: Connection, table: Table, params: dict[str, Any]) -> dict[str, Any]:
        columns: Sequence[Column[Any]] = list(table.columns)
        if "columns" in params:
            names = params["columns"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ConnectorRejected(f"{self._tool}: param 'columns' must be a non-empty list of column names")
            columns = [self._column(table, name, "columns") for name in names]
        limit = params.get("limit", self._max_rows)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= self._max_rows:
            raise ConnectorRejected(f"{self._tool}: param 'limit' must be an integer from 1 to {self._max_rows}")
        statement = select(*columns).where(*self._where(table, params.get("where"), required=False))
        if "order_by" in params:
            if not isinstance(params["order_by"], str):
                raise ConnectorRejected(f"{self._tool}: param 'order_by' must be a column name")
            statement = statement.order_by(self._column(table, params["order_by"], "order_by"))
        # One row more than asked says whether there were more.
        rows = conn.execute(statement.limit(limit + 1)).mappings().all()
        return {
            "rowcount": min(len(rows), limit),
            "rows": [{key: json_safe(value) for key, value in row.items()} for row in rows[:limit]],
            "truncated": len(rows) > limit,
        }

    def _column(self, table: Table, name: Any, param: str) -> Column[Any]:
        if not isinstance(name, str) or name not in table.c:
            raise ConnectorRejected(f"{self._tool}: param {param!r}: table {table.name} has no column {name!r}")
        column: Column[Any] = table.c[name]
        return column

    def _where(self, table: Table, where: Any, *, required: bool) -> list[ColumnElement[bool]]:
        if where is None and not required:
            return []
        if not isinstance(where, Mapping) or (required and not where):
            need = "a non-empty" if required else "an"
            raise ConnectorRejected(f"{self._tool}: param 'where' must be {need} object of column: value")
        conditions: list[ColumnElement[bool]] = []
        for name, value in where.items():
            column = self._column(table, name, "where")
            if value is None:
                conditions.append(column.is_(None))
            elif isinstance(value, list):
                if not all(isinstance(item, _SCALARS) for item in value):
                    raise ConnectorRejected(f"{self._tool}: param 'where.{name}': a list may hold only plain values")
                present = [_bind(column, item, f"where.{name}", self._tool) for item in value if item is not None]
                condition: ColumnElement[bool] = column.in_(present)
                # IN never matches NULL; a null in the list means "or IS NULL", as on its own.
                conditions.append(or_(condition, column.is_(None)) if None in value else condition)
            elif isinstance(value, _SCALARS):
                conditions.append(column == _bind(column, value, f"where.{name}", self._tool))
            else:
                raise ConnectorRejected(f"{self._tool}: param 'where.{name}' must be a value, null or a list of values")
        return conditions

    def _values(self, table: Table, values: Any, param: str) -> dict[str, Any]:
        if not isinstance(values, Mapping) or not values:
            raise ConnectorRejected(f"{self._tool}: param {param!r} must be a non-empty object of column: value")
        return {
            self._column(table, name, param).key: _bind(table.c[name], value, f"{param}.{name}", self._tool)
            for name, value in values.items()
        }

    def _insert_rows(self, table: Table, params: dict[str, Any]) -> list[dict[str, Any]]:
        if ("values" in params) == ("rows" in params):
            raise ConnectorRejected(f"{self._tool}: insert takes exactly one of param 'values' (one row) or 'rows'")
        if "values" in params:
            return [self._values(table, params["values"], "values")]
        rows = params["rows"]
        if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_INSERT_ROWS:
            raise ConnectorRejected(f"{self._tool}: param 'rows' must be a list of 1 to {MAX_INSERT_ROWS} objects")
        checked = [self._values(table, row, f"rows[{i}]") for i, row in enumerate(rows)]
        # One statement serves every row, so every row must name the same columns.
        for i, row in enumerate(checked):
            if row.keys() != checked[0].keys():
                raise ConnectorRejected(f"{self._tool}: param 'rows[{i}]' names other columns than rows[0]")
        return checked

    # --- engines, tables, errors -----------------------------------------------------------------------

    def _engine(self, database: str) -> Engine:
        with self._lock:
            engine = self._engines.get(database)
            if engine is None:
                engine = self._create_engine(self._urls[database])
                self._engines[database] = engine
            return engine

    def _create_engine(self, url: URL) -> Engine:
        timeout_ms = max(1, int(self._timeout * 1000))
        if url.get_backend_name() == "sqlite":
            engine = create_engine(url)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below issues BEGIN itself
                # Waiting for another writer counts against the same limit as running.
                dbapi_connection.execute(f"PRAGMA busy_timeout = {timeout_ms}")

            @event.listens_for(engine, "begin")
            def _on_begin(connection: Connection) -> None:
                # A writer takes the write lock up front: upgrading a read lock later can fail at once.
                write = connection.get_execution_options().get("pdp_write", False)
                connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args={"application_name": "pdp-executor", "connect_timeout": max(2, int(self._timeout + 0.999))},
        )

    def _table(self, database: str, name: str, mentioned: set[str]) -> Table:
        """The reflected table; reflected again once when a column is unknown, in case the schema changed.

        ``name`` is looked up in the list of the schema's user tables and views, compared exactly: the
        database's own name resolution (case-insensitive on SQLite, catalogs first on PostgreSQL) never
        picks the table. Columns are then matched exactly against the reflected ones (:meth:`_column`).
        """
        key = (database, name)
        with self._lock:
            cached = self._tables.get(key)
        if cached is not None and mentioned <= set(cached.c.keys()):
            return cached
        with self._engine(database).connect() as conn:
            schema = self._schema(conn, database)
            if name not in _user_tables(conn, schema):
                raise ConnectorRejected(
                    f"{self._tool}: database {database!r} has no table {name!r} (names match exactly, case included)"
                )
            try:
                table = Table(name, MetaData(), schema=schema, autoload_with=conn)
            except sa_exc.NoSuchTableError:  # dropped since it was listed
                raise ConnectorRejected(f"{self._tool}: database {database!r} has no table {name!r}") from None
        with self._lock:
            self._tables[key] = table
        return table

    def _schema(self, conn: Connection, database: str) -> str | None:
        """The schema tables are looked up in: None (``main``) on SQLite, ``current_schema()`` on PostgreSQL.

        Named explicitly on PostgreSQL, so statements say ``schema.table`` and no other schema on the search path
        (``pg_catalog`` is searched first, implicitly) can answer for the name.
        """
        if conn.dialect.name == "sqlite":
            return None
        schema = conn.dialect.default_schema_name
        if not schema or schema in _SYSTEM_SCHEMAS or schema.lower().startswith("pg_"):
            raise ConnectorError(
                f"{self._tool}: database {database!r}: the connection's current schema is {schema!r}, not a user "
                "schema (check the role's search_path)"
            )
        return schema

    def _database_error(self, exc: sa_exc.SQLAlchemyError) -> ConnectorError:
        """The database's own first line; never the statement, its parameters or the URL.

        Scrubbed whole before the first line is taken, and no piece of a credential is left at its end:
        a driver's message may quote a connection string across lines."""
        orig = getattr(exc, "orig", None)
        if isinstance(exc, sa_exc.DBAPIError) and _is_timeout(orig):
            return ConnectorTimeout(f"{self._tool}: statement did not finish within {self._timeout_text}")
        detail = self._redactor.text(str(orig) if isinstance(orig, BaseException) else str(exc)).strip()
        lines = detail.splitlines()
        first = (self._redactor.trim(lines[0]) if len(lines) > 1 else lines[0]) if lines else ""
        first = first or exc.__class__.__name__
        if isinstance(exc, sa_exc.IntegrityError):  # a constraint refused the agent's values: not the database's fault
            return ConnectorRejected(f"{self._tool}: {first}")
        return ConnectorError(f"{self._tool}: {first}")


def _user_tables(conn: Connection, schema: str | None) -> set[str]:
    """The names of the user tables and views of ``schema``, as the catalog spells them.

    SQLAlchemy leaves SQLite's internal ``sqlite_*`` tables out; a PostgreSQL schema named explicitly holds no
    catalog. :func:`_table_name_problem` has already refused the system prefixes in any case.
    """
    inspector = inspect(conn)
    names = set(inspector.get_table_names(schema=schema)) | set(inspector.get_view_names(schema=schema))
    if conn.dialect.name == "postgresql":
        names |= set(inspector.get_materialized_view_names(schema=schema))
    return {n for n in names if not _table_name_problem(n)}


def _mentioned_columns(params: Mapping[str, Any]) -> set[str]:
    """Every column name the params refer to (for deciding whether a cached reflection is stale)."""
    names: set[str] = set()
    for key in ("where", "values"):
        if isinstance(params.get(key), Mapping):
            names |= {n for n in params[key] if isinstance(n, str)}
    rows = params.get("rows")
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, Mapping):
            names |= {n for n in row if isinstance(n, str)}
    if isinstance(params.get("columns"), list):
        names |= {n for n in params["columns"] if isinstance(n, str)}
    if isinstance(params.get("order_by"), str):
        names.add(params["order_by"])
    return names


def _is_timeout(orig: object) -> bool:
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return "interrupted" in message or "database is locked" in message
    return getattr(orig, "sqlstate", None) in _PG_TIMEOUT_STATES


class _sqlite_deadline:  # noqa: N801 - used like a function, as a context manager
    """On SQLite, abort whatever runs on ``conn`` once ``deadline`` passes (a no-op elsewhere)."""

    def __init__(self, conn: Connection, deadline: float) -> None:
        self._raw: sqlite3.Connection | None = None
        if conn.dialect.name == "sqlite":
            driver = conn.connection.driver_connection
            self._raw = driver if isinstance(driver, sqlite3.Connection) else None
        self._deadline = deadline

    def __enter__(self) -> None:
        if self._raw is not None:
            deadline = self._deadline
            self._raw.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)

    def __exit__(self, *_exc: object) -> None:
        if self._raw is not None:
            self._raw.set_progress_handler(None, 0)


def _bind(column: Column[Any], value: Any, param: str, tool: str) -> Any:
    """``value`` as the column's type expects it: JSON has no dates or bytes, so those come as strings."""
    if not isinstance(value, str):
        return value
    kind = column.type
    try:
        if isinstance(kind, sa_types.DateTime):
            return datetime.fromisoformat(value)
        if isinstance(kind, sa_types.Date):
            return date.fromisoformat(value)
        if isinstance(kind, sa_types.Time):
            return time_of_day.fromisoformat(value)
        if isinstance(kind, sa_types.LargeBinary):
            return base64.b64decode(value, validate=True)
    except ValueError:
        raise ConnectorRejected(f"{tool}: param {param!r} is not a valid {kind.__class__.__name__} value") from None
    return value


def json_safe(value: Any) -> Any:
    """A database value as JSON: dates as ISO strings, decimals as strings (exact), bytes as base64."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)
