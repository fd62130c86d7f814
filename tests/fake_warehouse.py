"""A DB-API stand-in for `databricks.sql` that checks what a warehouse would check.

Every statement is parsed as Databricks SQL by sqlglot (a parse error is refused the
way the warehouse refuses it, as [PARSE_SYNTAX_ERROR]); then it runs on DuckDB, so the
rows that land, their values and their types can be read back. The statements the
uploader uses are given Databricks semantics:

- CREATE TABLE ... USING DELTA TBLPROPERTIES, ALTER TABLE ... ADD COLUMNS, DESCRIBE
  TABLE (Databricks type names), SHOW TABLES IN, DROP TABLE, SELECT;
- INSERT INTO t [BY NAME] REPLACE WHERE p <query>: delete where p, then insert, as one
  transaction (one Delta commit);
- PUT 'local' INTO '/Volumes/...' OVERWRITE, REMOVE '/Volumes/...' (files under a
  local volume root), COPY INTO t FROM '/Volumes/...' FILEFORMAT = PARQUET FILES = (...)
  which, like Databricks, skips files it has already loaded.

Faults are planned with `Warehouse.plan(action, match)`: 'resend' runs the statement
twice (the connector's HTTP retry after a dropped reply), 'drop_reply' runs it and then
raises a transient error (so the caller retries it), 'unavailable' raises 503 before
running it, 'forbidden' raises a permission error.
"""

import json
import os
import re
import shutil
import threading

import duckdb
import sqlglot
from sqlglot import exp

apilevel = "2.0"
threadsafety = 1
paramstyle = "named"


class Error(Exception):
    """Base of the errors, as in databricks.sql.exc."""


class DatabaseError(Error):
    pass


class ServerOperationError(DatabaseError):
    """The warehouse refused the statement; the message carries [ERROR_CLASS]."""


class RequestError(Error):
    """A failed HTTP request; `context['http-code']` as the real connector sets it."""

    def __init__(self, message, context=None):
        super().__init__(message)
        self.context = context or {}


TYPE_NAMES = {"BIGINT": "bigint", "DOUBLE": "double", "VARCHAR": "string",
              "BLOB": "binary", "BOOLEAN": "boolean", "TIMESTAMP WITH TIME ZONE": "timestamp",
              "INTEGER": "int", "TIMESTAMP": "timestamp_ntz"}


class Warehouse:
    """The shared state behind every connection: DuckDB file, volume root, log, faults."""

    def __init__(self, root, max_statement_bytes=None):
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.db_path = os.path.join(root, "warehouse.duckdb")
        self.volumes = os.path.join(root, "volumes")
        self.log_path = os.path.join(root, "statements.jsonl")
        self.max_statement_bytes = max_statement_bytes
        self.faults = []
        self.connections = []
        self.lock = threading.Lock()

    # --- test-facing helpers -------------------------------------------------------

    def plan(self, action, match=""):
        """Apply `action` to the next statement whose text contains `match`."""
        self.faults.append((action, match))

    def statements(self):
        """Every statement received (a resend counts twice), oldest first."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as fh:
            return [json.loads(line) for line in fh]

    def query(self, sql):
        """Rows of a DuckDB query on the warehouse (table names as `c.s.t`)."""
        with duckdb.connect(self.db_path) as db:
            return db.execute(sql).fetchall()

    def rows(self, table, order_by=None):
        """All rows of a table as dicts."""
        with duckdb.connect(self.db_path) as db:
            cursor = db.execute(f'SELECT * FROM "{table}"'
                                + (f" ORDER BY {order_by}" if order_by else ""))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def columns(self, table):
        """{column: Databricks type name} of a table."""
        with duckdb.connect(self.db_path) as db:
            rows = db.execute("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = ? ORDER BY ordinal_position",
                              [table]).fetchall()
        return {name: TYPE_NAMES.get(dtype, dtype.lower()) for name, dtype in rows}

    # --- execution -----------------------------------------------------------------

    def take_fault(self, sql):
        for i, (action, match) in enumerate(self.faults):
            if match in sql:
                del self.faults[i]
                return action
        return None

    def execute(self, sql, params, staging_paths):
        with self.lock:
            action = self.take_fault(sql)
            if action == "unavailable":
                self.record(sql, params, "refused: 503")
                raise RequestError("Error during request to server: Service Unavailable",
                                   {"http-code": 503})
            if action == "forbidden":
                self.record(sql, params, "refused: 403")
                raise ServerOperationError(
                    "[INSUFFICIENT_PERMISSIONS] Insufficient privileges: User does not "
                    "have MODIFY on Table. SQLSTATE: 42501")
            result = self.run(sql, params, staging_paths)
            if action == "resend":
                result = self.run(sql, params, staging_paths)
            if action == "drop_reply":
                raise RequestError("HTTPSConnectionPool: Read timed out.",
                                   {"http-code": None})
            return result

    def record(self, sql, params, outcome="ok"):
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps({"sql": sql, "params": params, "outcome": outcome,
                                 "bytes": len(sql.encode())}) + "\n")

    def run(self, sql, params, staging_paths):
        self.record(sql, params)
        if self.max_statement_bytes and len(sql.encode()) > self.max_statement_bytes:
            raise ServerOperationError("[STATEMENT_TOO_LARGE] statement exceeds the limit")
        stripped = sql.strip()
        put = re.fullmatch(r"PUT '((?:[^'\\]|\\.)*)' INTO '((?:[^'\\]|\\.)*)' OVERWRITE",
                           stripped, re.S)
        if put:
            return self.put(unescape(put.group(1)), unescape(put.group(2)), staging_paths)
        remove = re.fullmatch(r"REMOVE '((?:[^'\\]|\\.)*)'", stripped, re.S)
        if remove:
            return self.remove(unescape(remove.group(1)))
        show = re.fullmatch(r"SHOW TABLES IN (`(?:[^`]|``)+`)\.(`(?:[^`]|``)+`)", stripped)
        if show:
            prefix = f"{unquote(show.group(1))}.{unquote(show.group(2))}."
            return self.show_tables(prefix)
        try:
            tree = sqlglot.parse_one(sql, read="databricks")
        except sqlglot.errors.ParseError as exc:
            raise ServerOperationError(f"[PARSE_SYNTAX_ERROR] Syntax error: {exc}") from None
        bind(tree, params or {})
        flatten_tables(tree)
        with duckdb.connect(self.db_path) as db:
            try:
                return self.dispatch(db, tree)
            except duckdb.CatalogException as exc:
                raise ServerOperationError(f"[TABLE_OR_VIEW_NOT_FOUND] {exc}") from None
            except duckdb.BinderException as exc:
                raise ServerOperationError(f"[UNRESOLVED_COLUMN] {exc}") from None
            except duckdb.ConversionException as exc:
                raise ServerOperationError(f"[CAST_INVALID_INPUT] {exc}") from None

    def dispatch(self, db, tree):
        if isinstance(tree, exp.Insert):
            return self.insert(db, tree)
        if isinstance(tree, exp.Copy):
            return self.copy_into(db, tree)
        if isinstance(tree, exp.Describe):
            return self.describe(db, tree)
        if isinstance(tree, exp.Create):
            return self.create(db, tree)
        if isinstance(tree, exp.Alter):
            return self.alter(db, tree)
        cursor = db.execute(tree.sql("duckdb"))
        return cursor_result(cursor)

    def create(self, db, tree):
        properties = tree.args.get("properties")
        text = properties.sql("databricks") if properties else ""
        if "USING DELTA" not in text.upper():
            raise ServerOperationError("fake warehouse: tables must be created USING DELTA")
        tree.set("properties", None)
        db.execute(tree.sql("duckdb"))
        name = tree.this.this.name
        db.execute("CREATE TABLE IF NOT EXISTS __properties (tbl VARCHAR, props VARCHAR)")
        db.execute("INSERT INTO __properties VALUES (?, ?)", [name, text])
        return [], None

    def alter(self, db, tree):
        table = tree.this.sql("duckdb")
        for action in tree.args.get("actions") or []:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {action.sql('duckdb')}")
        return [], None

    def describe(self, db, tree):
        name = tree.this.name
        rows = db.execute("SELECT column_name, data_type FROM information_schema.columns "
                          "WHERE table_name = ? ORDER BY ordinal_position", [name]).fetchall()
        if not rows:
            raise ServerOperationError(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view "
                                       f"`{name}` cannot be found. SQLSTATE: 42P01")
        out = [(col, TYPE_NAMES.get(dtype, dtype.lower()), None) for col, dtype in rows]
        return out, [("col_name",), ("data_type",), ("comment",)]

    def insert(self, db, tree):
        """INSERT [BY NAME] [REPLACE WHERE p] query: one atomic replace."""
        where = tree.args.get("where")
        table = tree.this.sql("duckdb")
        db.execute("BEGIN")
        try:
            if where is not None:
                db.execute(f"DELETE FROM {table} WHERE {where.sql('duckdb')}")
                tree.set("where", None)
            db.execute(tree.sql("duckdb"))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [], None

    def copy_into(self, db, tree):
        table = tree.this.sql("duckdb")
        folder = tree.args["files"][0].name
        params = {p.this.name.upper(): p for p in tree.args.get("params") or []}
        names = [e.name for e in params["FILES"].expressions] if "FILES" in params else []
        db.execute("CREATE TABLE IF NOT EXISTS __copy_history (tbl VARCHAR, path VARCHAR)")
        inserted = 0
        for name in names:
            path = self.volume_path(folder.rstrip("/") + "/" + name)
            done = db.execute("SELECT count(*) FROM __copy_history WHERE tbl = ? AND path = ?",
                              [table, path]).fetchone()[0]
            if done:
                continue
            db.execute("BEGIN")
            before = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            db.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [path])
            inserted += db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] - before
            db.execute("INSERT INTO __copy_history VALUES (?, ?)", [table, path])
            db.execute("COMMIT")
        return [(inserted, inserted)], [("num_affected_rows",), ("num_inserted_rows",)]

    def volume_path(self, path):
        if not path.startswith("/Volumes/"):
            raise ServerOperationError(f"[INVALID_PARAMETER_VALUE] not a volume path: {path}")
        return os.path.join(self.volumes, path[len("/Volumes/"):])

    def put(self, local, remote, staging_paths):
        allowed = [os.path.abspath(p) for p in ([staging_paths] if isinstance(
            staging_paths, str) else staging_paths or [])]
        if not any(os.path.abspath(local).startswith(p + os.sep) for p in allowed):
            raise Error("Local file operations are restricted to paths within the "
                        "configured staging_allowed_local_path")
        target = self.volume_path(remote)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(local, target)
        return [], None

    def remove(self, remote):
        target = self.volume_path(remote)
        if os.path.exists(target):
            os.remove(target)
        return [], None

    def show_tables(self, prefix):
        with duckdb.connect(self.db_path) as db:
            names = [n for (n,) in db.execute("SELECT table_name FROM information_schema."
                                              "tables").fetchall() if n.startswith(prefix)]
        database = prefix.rstrip(".").split(".")[-1]
        return ([(database, n[len(prefix):], False) for n in sorted(names)],
                [("database",), ("tableName",), ("isTemporary",)])


def unescape(text):
    """A Databricks string literal's body as text."""
    return sqlglot.parse_one(f"SELECT '{text}'", read="databricks").expressions[0].name


def unquote(ident):
    return ident[1:-1].replace("``", "`")


def bind(tree, params):
    """Replace :name placeholders by literals, as the warehouse binds native parameters."""
    for node in list(tree.find_all(exp.Placeholder)):
        name = node.name
        if name not in params:
            raise ServerOperationError(f"[UNBOUND_SQL_PARAMETER] :{name}")
        value = params[name]
        node.replace(exp.Literal.string(value) if isinstance(value, str)
                     else exp.Literal.number(value))


def flatten_tables(tree):
    """`c`.`s`.`t` -> one DuckDB table named "c.s.t" (three-part names are required)."""
    for table in tree.find_all(exp.Table):
        if isinstance(table.this, exp.Identifier) and table.args.get("catalog") is None:
            if isinstance(table.parent, (exp.Values,)) or table.find_ancestor(exp.Values):
                continue
            if table.name.startswith(("__", "read_parquet")):
                continue
        catalog, db = table.args.get("catalog"), table.args.get("db")
        if catalog is None or db is None:
            continue
        flat = f"{catalog.name}.{db.name}.{table.name}"
        table.set("this", exp.Identifier(this=flat, quoted=True))
        table.set("db", None)
        table.set("catalog", None)


def cursor_result(cursor):
    if cursor.description is None:
        return [], None
    return cursor.fetchall(), [(d[0],) for d in cursor.description]


# --- DB-API surface -------------------------------------------------------------------

WAREHOUSE = None  # set by the tests, or from FAKE_WAREHOUSE_ROOT in a subprocess


def connect(**kwargs):
    """databricks.sql.connect(...) stand-in."""
    global WAREHOUSE
    if WAREHOUSE is None:
        WAREHOUSE = Warehouse(os.environ["FAKE_WAREHOUSE_ROOT"])
    for key in ("server_hostname", "http_path"):
        if not kwargs.get(key):
            raise Error(f"connect() needs {key}")
    if not (kwargs.get("access_token") or kwargs.get("credentials_provider")):
        raise Error("connect() needs credentials")
    conn = Connection(WAREHOUSE, kwargs)
    WAREHOUSE.connections.append(kwargs)
    return conn


class Connection:
    def __init__(self, warehouse, kwargs):
        self.warehouse, self.kwargs, self.closed = warehouse, kwargs, False

    def cursor(self):
        if self.closed:
            raise Error("connection is closed")
        return Cursor(self)

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Cursor:
    def __init__(self, conn):
        self.conn, self.rows, self.description = conn, [], None

    def execute(self, operation, parameters=None):
        if not isinstance(operation, str):
            raise Error("operation must be a string")
        self.rows, self.description = self.conn.warehouse.execute(
            operation, parameters, self.conn.kwargs.get("staging_allowed_local_path"))
        return self

    def executemany(self, operation, seq_of_parameters):
        raise AssertionError("the uploader must never use executemany")

    def fetchall(self):
        rows, self.rows = self.rows, []
        return rows

    def fetchone(self):
        return self.rows.pop(0) if self.rows else None

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
