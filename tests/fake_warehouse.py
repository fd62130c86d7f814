"""A DB-API stand-in for `databricks.sql` that checks what a warehouse would check.

Every statement is parsed as Databricks SQL by sqlglot (a parse error is refused the
way the warehouse refuses it, as [PARSE_SYNTAX_ERROR]); then it runs on DuckDB, so the
rows that land, their values and their types can be read back. The statements the
uploader uses are given Databricks semantics:

- CREATE TABLE ... USING DELTA TBLPROPERTIES, ALTER TABLE ... ADD COLUMNS, DESCRIBE
  TABLE (Databricks type names), SHOW TABLES IN, DROP TABLE, SELECT;
- MERGE INTO t USING (SELECT ...) AS s ON ... WHEN MATCHED [AND c] THEN UPDATE SET ...
  WHEN NOT MATCHED THEN INSERT (...) VALUES (...), run by DuckDB's MERGE (one commit);
- DELETE FROM t WHERE p (one commit);
- INSERT INTO t REPLACE WHERE p <query>: delete where p, then insert, as one
  transaction (one Delta commit); the select list is positional and names every column
  of the table ([INSERT_COLUMN_ARITY_MISMATCH] otherwise), and `BY NAME` or a column
  list with REPLACE WHERE is a [PARSE_SYNTAX_ERROR], as in Spark 4.0's grammar (newer
  Databricks docs list `BY NAME REPLACE WHERE`; older warehouses refuse it);
- CREATE VOLUME IF NOT EXISTS `c`.`s`.`v` (refused as INSUFFICIENT_PERMISSIONS when
  `may_create_volumes` is False; when `volume_names` is a set, only volumes in it, or
  created, exist), PUT 'local' INTO '/Volumes/...' OVERWRITE, REMOVE '/Volumes/...'
  (files under a local volume root), COPY INTO t FROM '/Volumes/...' FILEFORMAT = PARQUET FILES = (...)
  which, like Databricks, skips files it has already loaded.

Checks a real warehouse makes and DuckDB would not: Spark's `${var}` substitution in
the statement text (an unknown variable becomes ''), TIMESTAMP literals in Spark's
format (a year has 4 to 6 digits), Unity Catalog object names (no '.', ' ', '/' or
control characters), Delta column names (none of ' ,;{}()\n\t=' unless the table has
delta.columnMapping.mode), REPLACE WHERE rows that must match their predicate, missing
schemas (when `Warehouse.schemas` is set) and the token (when `valid_tokens` is set). The
credentials provider is called the way the connector calls it: once at connect for a
header factory, then the factory before every request (headers kept in `auth_headers`).

Writers on one table conflict as Delta's optimistic concurrency makes them (when
`Warehouse.conflicts` is set; a statement's snapshot is taken when it arrives, and a
statement waits for the one before it, and spends `Warehouse.work_seconds` between its
snapshot and its commit, as a real statement scans and writes): an ALTER fails a concurrent writer with
[DELTA_METADATA_CHANGED], an INSERT ... REPLACE WHERE (not blind: the table is not
partitioned), a MERGE and a DELETE fail when any commit landed meanwhile with
[DELTA_CONCURRENT_APPEND], except that on a table with deletion vectors
('delta.enableDeletionVectors' = 'true': row-level concurrency, DBR 14.3+) a MERGE fails
only when a concurrent MERGE changed one of its rows (the target rows its ON clause
matches) with [DELTA_CONCURRENT_DELETE_READ], and a DELETE never (taken to touch no row
a concurrent MERGE changed: the uploader deletes only its own node's rows, which it
writes one statement at a time); blind INSERTs and COPY INTO never conflict with each other, and the loser of two racing
CREATE TABLE IF NOT EXISTS gets [DELTA_PROTOCOL_CHANGED] or [TABLE_OR_VIEW_ALREADY_EXISTS],
in turn.

Faults are planned with `Warehouse.plan(action, match)`: 'resend' runs the statement
twice (the connector's HTTP retry after a dropped reply), 'drop_reply' runs it and then
raises a transient error (so the caller retries it), 'unavailable' raises 503 before
running it, 'forbidden' raises a permission error, 'unauthorized' a 401; 'crash_before'
and 'crash_after' raise `Crash` (a BaseException: the process dies) before or after
running it; 'queue_crash' holds the statement in the warehouse's queue and raises
`Crash` (the client died while it waited), and `run_held()` runs the held statements
later, as a warehouse runs a dead client's queued statement.
"""

import base64
import http.server
import itertools
import json
import os
import re
import secrets
import shutil
import threading
import time
import urllib.parse

import duckdb
import sqlglot
from sqlglot import exp

# serve_forever() looks for shutdown() this often (default 0.5 s: each test would wait)
POLL = 0.05

apilevel = "2.0"
threadsafety = 1
paramstyle = "named"


class Error(Exception):
    """Base of the errors, as in databricks.sql.exc."""


class DatabaseError(Error):
    pass


class ServerOperationError(DatabaseError):
    """The warehouse refused the statement; the message carries [ERROR_CLASS]."""


class Crash(BaseException):
    """The uploader's process dies here (planned with 'crash_before' / 'crash_after')."""


class RequestError(Error):
    """A failed HTTP request; `context['http-code']` as the real connector sets it."""

    def __init__(self, message, context=None):
        super().__init__(message)
        self.context = context or {}


# Delta refuses these in column names unless the table maps columns by name or id.
DELTA_BAD_COLUMN_CHARS = set(" ,;{}()\n\t=")
# Unity Catalog refuses these in catalog, schema and table names.
UC_BAD_NAME = re.compile(r"[./ \x00-\x1f\x7f]")
# A string Spark reads as a TIMESTAMP (DateTimeUtils.stringToTimestamp, simplified):
# the year has 4 to 6 digits.
SPARK_TIMESTAMP = re.compile(
    r"\s*[+-]?\d{4,6}(-\d{1,2}(-\d{1,2}([ T]\d{1,2}(:\d{1,2}(:\d{1,2}(\.\d{0,9})?)?)?)?)?)?"
    r"\s*(Z|UTC|GMT|[+-]\d{1,2}(:?\d{2})?|[A-Za-z]+/[A-Za-z_]+)?\s*")
# Spark's ConfigReader pattern for ${var} and ${prefix:var}.
SPARK_VARIABLE = re.compile(r"\$\{(?:(\w+?):)?(\S+?)\}")

# What Databricks answers when Delta's optimistic concurrency fails a statement.
METADATA_CHANGED = (
    "[DELTA_METADATA_CHANGED] MetadataChangedException: The metadata of the Delta table "
    "has been changed by a concurrent update. Please try the operation again. SQLSTATE: 2D521")
CONCURRENT_APPEND = (
    "[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: Files were added to the root of "
    "the table by a concurrent update. Please try the operation again. SQLSTATE: 2D521")
PROTOCOL_CHANGED = (
    "[DELTA_PROTOCOL_CHANGED.WRITE_TO_EMPTY_DIRECTORY] ProtocolChangedException: The "
    "protocol version of the Delta table has been changed by a concurrent update. This "
    "happens when multiple writers are writing to an empty directory. Creating the table "
    "ahead of time will avoid this conflict. SQLSTATE: 2D521")
CONCURRENT_DELETE_READ = (
    "[DELTA_CONCURRENT_DELETE_READ] ConcurrentDeleteReadException: This transaction "
    "attempted to read one or more files that were deleted by a concurrent update. Please "
    "try the operation again. SQLSTATE: 2D521")
ALREADY_EXISTS = (
    "[TABLE_OR_VIEW_ALREADY_EXISTS] Cannot create table or view because it already "
    "exists. SQLSTATE: 42P07")
WRITE_STATEMENT = re.compile(r"(INSERT INTO|ALTER TABLE|COPY INTO|MERGE INTO|DELETE FROM|"
                             r"CREATE TABLE IF NOT EXISTS)"
                             r" ((?:`(?:[^`]|``)+`\.){2}`(?:[^`]|``)+`)")

TYPE_NAMES = {"BIGINT": "bigint", "DOUBLE": "double", "VARCHAR": "string",
              "BLOB": "binary", "BOOLEAN": "boolean", "TIMESTAMP WITH TIME ZONE": "timestamp",
              "INTEGER": "int", "TIMESTAMP": "timestamp_ntz"}


HOLDERS = {}  # DuckDB file -> the Warehouse that holds it open in this process


class Warehouse:
    """The shared state behind every connection: DuckDB file, volume root, log, faults."""

    def __init__(self, root, max_statement_bytes=None, schemas=None, valid_tokens=None):
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.db_path = os.path.join(root, "warehouse.duckdb")
        self.volumes = os.path.join(root, "volumes")
        self.log_path = os.path.join(root, "statements.jsonl")
        self.max_statement_bytes = max_statement_bytes
        self.current_catalog = "main"
        self.faults = []
        self.held = []  # statements queued by 'queue_crash', run by run_held()
        self.connections = []
        self.auth_headers = []
        # None: every catalog.schema exists and every token is good
        self.schemas = None if schemas is None else {x.lower() for x in schemas}
        self.valid_tokens = None if valid_tokens is None else set(valid_tokens)
        self.echo = False  # a refusal quotes the request's token
        # None: every volume exists; else the c.s.v names that do (CREATE VOLUME adds)
        self.volume_names = None
        self.may_create_volumes = True
        # Delta conflicts between writers (off unless a test turns them on)
        self.conflicts = False
        self.work_seconds = 0.0  # between a statement's snapshot and its commit
        self.commits = {}  # "c.s.t" -> kinds of its commits: create, append, replace, metadata
        self.merged = {}  # ("c.s.t", index of a merge commit) -> keys of the rows it matched
        self.create_races = itertools.cycle([PROTOCOL_CHANGED, ALREADY_EXISTS])
        self.lock = threading.Lock()
        self.database = None  # the DuckDB file, held open between statements
        self.database_lock = threading.Lock()

    def connect_db(self):
        """A new connection to the warehouse's DuckDB file. The file stays open between
        statements (opening a DuckDB database costs ~20 ms of CPU; a connection to an open
        one, ~1 ms); release() closes it, so that another process can open it."""
        with self.database_lock:
            if self.database is None:
                holder = HOLDERS.get(self.db_path)
                if holder is not None and holder is not self:
                    # DuckDB hands out an open database by its path: a new warehouse at
                    # the path of an old one (a test that removed the old folder) would
                    # get the old one's tables
                    holder.release()
                self.database = duckdb.connect(self.db_path)
                HOLDERS[self.db_path] = self
                # its log is enough for the next opener: no checkpoint at each release()
                self.database.execute("PRAGMA disable_checkpoint_on_shutdown")
            return self.database.cursor()

    def release(self):
        """Close the DuckDB file (before another process opens it; at the end)."""
        with self.database_lock:
            if self.database is not None:
                self.database.close()
                self.database = None
                if HOLDERS.get(self.db_path) is self:
                    del HOLDERS[self.db_path]

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
        with self.connect_db() as db:
            return db.execute(sql).fetchall()

    def rows(self, table, order_by=None):
        """All rows of a table as dicts."""
        with self.connect_db() as db:
            quoted = '"' + table.replace('"', '""') + '"'
            cursor = db.execute(f"SELECT * FROM {quoted}"
                                + (f" ORDER BY {order_by}" if order_by else ""))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def properties(self, table):
        """{key: value} of a table's TBLPROPERTIES."""
        with self.connect_db() as db:
            return table_properties(db, table)

    def columns(self, table):
        """{column: Databricks type name} of a table."""
        with self.connect_db() as db:
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
        write = written_table(sql)
        seen = self.version(write[1]) if write else None  # its snapshot: when it arrives
        if write and self.work_seconds:
            time.sleep(self.work_seconds)
        with self.lock:
            if write and self.conflicts:
                self.check_conflict(sql, params, *write, seen)
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
            if action == "unauthorized":
                self.record(sql, params, "refused: 401")
                raise unauthorized()
            if action == "queue_crash":
                self.record(sql, params, "queued")
                self.held.append((sql, params, staging_paths))
                raise Crash(sql)
            if action == "crash_before":
                self.record(sql, params, "crashed before")
                raise Crash(sql)
            result = self.run_and_commit(sql, params, staging_paths, write)
            if action == "resend":
                result = self.run_and_commit(sql, params, staging_paths, write)
            if action == "drop_reply":
                raise RequestError("HTTPSConnectionPool: Read timed out.",
                                   {"http-code": None})
            if action == "crash_after":
                raise Crash(sql)
            return result

    def run_held(self):
        """Run the statements held in the queue, oldest first (their client is gone)."""
        with self.lock:
            held, self.held = self.held, []
            for sql, params, staging_paths in held:
                self.run(sql, params, staging_paths)

    def run_and_commit(self, sql, params, staging_paths, write):
        result = self.run(sql, params, staging_paths)
        if write:
            kind, table = write
            if kind == "merge":
                self.merged[table, len(self.commits.get(table, []))] = merge_keys(sql, params)
            if kind != "create":
                self.commits.setdefault(table, []).append(kind)
            elif table not in self.commits:  # IF NOT EXISTS on a table: no commit
                self.commits[table] = ["create"]
        return result

    def version(self, table):
        """Commits on a table so far; None while it does not exist."""
        log = self.commits.get(table)
        return None if log is None else len(log)

    def check_conflict(self, sql, params, kind, table, seen):
        """Delta's optimistic concurrency, as Databricks reports it: a commit that landed
        on the table after this statement arrived may fail it (DESIGN 9)."""
        error = None
        if kind == "create":
            if seen is None and table in self.commits:  # two racing to create it
                error = next(self.create_races)
        elif seen is not None:
            since = self.commits.get(table, [])[seen:]
            if "metadata" in since:
                error = METADATA_CHANGED
            elif kind in ("merge", "delete") and self.has_row_concurrency(table):
                mine = merge_keys(sql, params) if kind == "merge" else set()
                if any(mine & self.merged.get((table, i), set())
                       for i in range(seen, seen + len(since))):
                    error = CONCURRENT_DELETE_READ
            elif kind in ("replace", "merge", "delete") and since:  # not blind: unpartitioned
                error = CONCURRENT_APPEND
        if error:
            self.record(sql, params, "conflict: " + error.split("]")[0][1:])
            raise ServerOperationError(error)

    def has_row_concurrency(self, table):
        """Row-level concurrency: the table has deletion vectors (and no partitions)."""
        return self.properties(table).get("delta.enableDeletionVectors") == "true"

    def authenticate(self, headers):
        """Check the Authorization header of one request (the connector sends one each)."""
        self.auth_headers.append(headers)
        value = headers.get("Authorization", "")
        if not value.startswith("Bearer ") or not value[len("Bearer "):]:
            raise unauthorized()
        token = value[len("Bearer "):]
        quoted = token if self.echo else None
        if callable(self.valid_tokens) and not self.valid_tokens(token):
            raise unauthorized(quoted)
        if self.valid_tokens is not None and not callable(self.valid_tokens) and \
                token not in self.valid_tokens:
            raise unauthorized(quoted)

    def record(self, sql, params, outcome="ok"):
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps({"sql": sql, "params": params, "outcome": outcome,
                                 "bytes": len(sql.encode())}) + "\n")

    def run(self, sql, params, staging_paths):
        self.record(sql, params)
        if self.max_statement_bytes and len(sql.encode()) > self.max_statement_bytes:
            raise ServerOperationError("[STATEMENT_TOO_LARGE] statement exceeds the limit")
        # Spark substitutes ${var} in the statement text before parsing it
        sql = SPARK_VARIABLE.sub("", sql)
        stripped = sql.strip()
        put = re.fullmatch(r"PUT '((?:[^'\\]|\\.)*)' INTO '((?:[^'\\]|\\.)*)' OVERWRITE",
                           stripped, re.S)
        if put:
            return self.put(unescape(put.group(1)), unescape(put.group(2)), staging_paths)
        volume = re.fullmatch(r"CREATE VOLUME IF NOT EXISTS ((?:`(?:[^`]|``)+`\.?){3})",
                              stripped)
        if volume:
            return self.create_volume(volume.group(1))
        remove = re.fullmatch(r"REMOVE '((?:[^'\\]|\\.)*)'", stripped, re.S)
        if remove:
            return self.remove(unescape(remove.group(1)))
        show = re.fullmatch(r"SHOW TABLES IN (?:(`(?:[^`]|``)+`)\.)?(`(?:[^`]|``)+`)",
                            stripped)
        if show:
            catalog = unquote(show.group(1)) if show.group(1) else self.current_catalog
            schema = unquote(show.group(2))
            if "." in schema:  # one quoted part: no Unity Catalog schema has a '.'
                raise ServerOperationError(
                    f"[SCHEMA_NOT_FOUND] The schema `{catalog}`.`{schema}` cannot be found. "
                    "SQLSTATE: 42704")
            self.check_schema(catalog, schema)
            return self.show_tables(f"{catalog}.{schema}.")
        try:
            tree = sqlglot.parse_one(sql, read="databricks")
        except sqlglot.errors.ParseError as exc:
            raise ServerOperationError(f"[PARSE_SYNTAX_ERROR] Syntax error: {exc}") from None
        check_timestamp_literals(tree)
        bind(tree, params or {})
        if isinstance(tree, exp.Create):
            self.check_create(tree)
        flatten_tables(tree)
        with self.connect_db() as db:
            try:
                return self.dispatch(db, tree)
            except duckdb.CatalogException as exc:
                if "already exists" in str(exc):
                    kind = "FIELDS" if "Column" in str(exc) else "TABLE_OR_VIEW"
                    raise ServerOperationError(f"[{kind}_ALREADY_EXISTS] {exc}") from None
                raise ServerOperationError(f"[TABLE_OR_VIEW_NOT_FOUND] {exc}") from None
            except duckdb.BinderException as exc:
                raise ServerOperationError(f"[UNRESOLVED_COLUMN] {exc}") from None
            except duckdb.ConversionException as exc:
                raise ServerOperationError(f"[CAST_INVALID_INPUT] {exc}") from None

    def check_schema(self, catalog, schema):
        if self.schemas is not None and f"{catalog}.{schema}".lower() not in self.schemas:
            raise ServerOperationError(
                f"[SCHEMA_NOT_FOUND] The schema `{catalog}`.`{schema}` cannot be found. "
                "Verify the spelling and correctness of the schema and catalog. "
                "SQLSTATE: 42704")

    def check_create(self, tree):
        """Unity Catalog names and an existing schema, as CREATE TABLE needs them."""
        table = tree.find(exp.Table)
        parts = [p.name for p in (table.args.get("catalog"), table.args.get("db"),
                                  table.this) if p is not None]
        for part in parts:
            if UC_BAD_NAME.search(part) or len(part) > 255:
                raise ServerOperationError(
                    f"[INVALID_SCHEMA_OR_RELATION_NAME] `{part}` is not a valid name for "
                    "tables/schemas (Unity Catalog names cannot contain '.', ' ', '/' or "
                    "control characters). SQLSTATE: 42602")
        if len(parts) == 3:
            self.check_schema(parts[0], parts[1])

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
        if isinstance(tree, exp.Drop):
            return self.drop(db, tree)
        cursor = db.execute(tree.sql("duckdb"))
        return cursor_result(cursor)

    def create(self, db, tree):
        if str(tree.args.get("kind")).upper() == "VIEW":  # (the Zerobus sink's view)
            db.execute(tree.sql("duckdb"))
            return [], None
        properties = tree.args.get("properties")
        text = properties.sql("databricks") if properties else ""
        if "USING DELTA" not in text.upper():
            raise ServerOperationError("fake warehouse: tables must be created USING DELTA")
        props = property_dict(properties)
        name = tree.this.this.name
        exists = db.execute("SELECT count(*) FROM information_schema.tables WHERE "
                            "table_name = ?", [name]).fetchone()[0]
        if exists and tree.args.get("exists"):
            return [], None
        check_column_names([c.name for c in tree.this.expressions
                            if isinstance(c, exp.ColumnDef)], props)
        tree.set("properties", None)
        db.execute(tree.sql("duckdb"))
        save_properties(db, name, props)
        return [], None

    def alter(self, db, tree):
        table = tree.this.sql("duckdb")
        name = tree.this.name
        for action in tree.args.get("actions") or []:
            if isinstance(action, exp.AlterSet):
                props = table_properties(db, name)
                for group in action.expressions:
                    props.update(property_dict(group))
                save_properties(db, name, props)
                continue
            defs = action.expressions if isinstance(action, exp.Schema) else [action]
            check_column_names([d.name for d in defs], table_properties(db, name))
            for column in defs:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column.sql('duckdb')}")
        return [], None

    def drop(self, db, tree):
        db.execute(tree.sql("duckdb"))
        for table in tree.args.get("tables") or [tree.this]:
            for helper in ("__properties", "__copy_history"):
                db.execute(f"CREATE TABLE IF NOT EXISTS {helper} (tbl VARCHAR, x VARCHAR)")
                db.execute(f"DELETE FROM {helper} WHERE tbl = ?", [table.name])
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
        """INSERT [BY NAME | (columns)] query, or INSERT REPLACE WHERE p query: one
        atomic replace, its select list positional (Spark 4.0's grammar takes neither
        BY NAME nor a column list with REPLACE WHERE)."""
        where = tree.args.get("where")
        if where is not None and (tree.args.get("by_name") or isinstance(tree.this, exp.Schema)):
            raise ServerOperationError(
                "[PARSE_SYNTAX_ERROR] Syntax error at or near 'REPLACE'. SQLSTATE: 42601")
        table = tree.this.sql("duckdb")
        if not tree.args.get("by_name") and not isinstance(tree.this, exp.Schema):
            check_arity(db, table, tree.expression)
        db.execute("BEGIN")
        try:
            if where is not None:
                predicate = where.this.sql("duckdb") if isinstance(where, exp.Where) \
                    else where.sql("duckdb")
                db.execute(f"DELETE FROM {table} WHERE {predicate}")
                tree.set("where", None)
                before = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            db.execute(tree.sql("duckdb"))
            if where is not None:
                after = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                matching = db.execute(f"SELECT count(*) FROM {table} WHERE "
                                      f"{predicate}").fetchone()[0]
                if matching != after - before:
                    raise ServerOperationError(
                        "[DELTA_REPLACE_WHERE_MISMATCH] Written data does not conform to "
                        f"partial table overwrite condition or constraint '{predicate}'. "
                        "SQLSTATE: 44000")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [], None

    def copy_into(self, db, tree):
        table = tree.this.sql("duckdb")
        folder = tree.args["files"][0].name
        params = {p.this.name.upper(): p for p in tree.args.get("params") or []}
        names = []
        if "FILES" in params:
            files = params["FILES"]
            listed = files.expression if files.expression is not None else files
            # FILES = ('a') parses as a Paren, ('a', 'b') as a Tuple
            names = [e.name for e in (listed.expressions or [listed.this])]
        db.execute("CREATE TABLE IF NOT EXISTS __copy_history (tbl VARCHAR, x VARCHAR)")
        inserted = 0
        for name in names:
            path = self.volume_path(folder.rstrip("/") + "/" + name)
            done = db.execute("SELECT count(*) FROM __copy_history WHERE tbl = ? AND x = ?",
                              [tree.this.name, path]).fetchone()[0]
            if done:
                continue
            db.execute("BEGIN")
            before = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            db.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [path])
            inserted += db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] - before
            db.execute("INSERT INTO __copy_history VALUES (?, ?)", [tree.this.name, path])
            db.execute("COMMIT")
        return [(inserted, inserted)], [("num_affected_rows",), ("num_inserted_rows",)]

    def create_volume(self, quoted):
        """CREATE VOLUME IF NOT EXISTS `c`.`s`.`v` (a managed volume)."""
        parts = [unquote(p) for p in re.findall(r"`(?:[^`]|``)+`", quoted)]
        self.check_schema(parts[0], parts[1])
        if not self.may_create_volumes:
            raise ServerOperationError(
                "[INSUFFICIENT_PERMISSIONS] Insufficient privileges: User does not have "
                f"CREATE VOLUME on Schema '{parts[0]}.{parts[1]}'. SQLSTATE: 42501")
        if self.volume_names is not None:
            self.volume_names.add(".".join(parts))
        return [], None

    def volume_path(self, path):
        if not path.startswith("/Volumes/"):
            raise ServerOperationError(f"[INVALID_PARAMETER_VALUE] not a volume path: {path}")
        name = ".".join(path[len("/Volumes/"):].split("/")[:3])
        if self.volume_names is not None and name not in self.volume_names:
            raise ServerOperationError(f"[RESOURCE_DOES_NOT_EXIST] Volume '{name}' does not "
                                       "exist. SQLSTATE: 42704")
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
        with self.connect_db() as db:
            names = [n for (n,) in db.execute("SELECT table_name FROM information_schema."
                                              "tables").fetchall() if n.startswith(prefix)]
        database = prefix.rstrip(".").split(".")[-1]
        return ([(database, n[len(prefix):], False) for n in sorted(names)],
                [("database",), ("tableName",), ("isTemporary",)])


def written_table(sql):
    """(kind of commit, "c.s.t") of a statement that writes a table, else None."""
    match = WRITE_STATEMENT.match(sql.strip())
    if not match:
        return None
    table = ".".join(unquote(p) for p in re.findall(r"`(?:[^`]|``)+`", match.group(2)))
    verb = match.group(1)
    if verb == "INSERT INTO":
        return ("replace" if " REPLACE WHERE " in sql else "append"), table
    return {"ALTER TABLE": "metadata", "COPY INTO": "append", "MERGE INTO": "merge",
            "DELETE FROM": "delete"}.get(verb, "create"), table


def merge_keys(sql, params):
    """The keys (values of the ON clause's source columns) of the rows a MERGE matches."""
    tree = sqlglot.parse_one(SPARK_VARIABLE.sub("", sql), read="databricks")
    bind(tree, params or {})
    using = tree.args["using"]
    columns = [c for c in tree.args["on"].find_all(exp.Column)
               if c.table == using.alias_or_name]
    with duckdb.connect() as db:
        return set(db.execute(f"SELECT {', '.join(c.sql('duckdb') for c in columns)} "
                              f"FROM {using.sql('duckdb')}").fetchall())


def unauthorized(token=None):
    """The connector's error for a refused token (quoting it, as some gateways do)."""
    return RequestError("Error during request to server: 401 Unauthorized: Invalid access "
                        "token." + (f" (request token {token})" if token else ""),
                        {"http-code": 401})


def property_dict(properties):
    """{key: value} of the TBLPROPERTIES in a Properties node."""
    out = {}
    for prop in (properties.expressions if properties is not None else []):
        if type(prop) is exp.Property:
            out[prop.this.name] = prop.args["value"].name
    return out


def table_properties(db, name):
    db.execute("CREATE TABLE IF NOT EXISTS __properties (tbl VARCHAR, x VARCHAR)")
    row = db.execute("SELECT x FROM __properties WHERE tbl = ?", [name]).fetchone()
    return json.loads(row[0]) if row else {}


def save_properties(db, name, props):
    db.execute("CREATE TABLE IF NOT EXISTS __properties (tbl VARCHAR, x VARCHAR)")
    db.execute("DELETE FROM __properties WHERE tbl = ?", [name])
    db.execute("INSERT INTO __properties VALUES (?, ?)", [name, json.dumps(props)])


def check_column_names(names, props):
    """Delta refuses some characters in column names unless columns are mapped."""
    if props.get("delta.columnMapping.mode", "none").lower() in ("name", "id"):
        return
    bad = [n for n in names if DELTA_BAD_COLUMN_CHARS & set(n)]
    if bad:
        raise ServerOperationError(
            "[DELTA_INVALID_CHARACTERS_IN_COLUMN_NAMES] Found invalid character(s) among "
            "' ,;{}()\\n\\t=' in the column names of your schema. Invalid column names: "
            f"{', '.join(bad)}. Please use other characters and try again. Alternatively, "
            "enable Column Mapping to keep using these characters. SQLSTATE: 42K05")


def check_arity(db, table, query):
    """A positional insert gives every column of the table, as Spark requires."""
    want = len(db.execute(f"SELECT * FROM {table} LIMIT 0").description)
    got = len(db.execute(f"SELECT * FROM ({query.sql('duckdb')}) LIMIT 0").description)
    if got != want:
        reason = "not enough" if got < want else "too many"
        raise ServerOperationError(
            f"[INSERT_COLUMN_ARITY_MISMATCH.{reason.upper().replace(' ', '_')}_DATA_COLUMNS] "
            f"Cannot write to {table}, the reason is {reason} data columns: the table has "
            f"{want} columns but the inserted data has {got}. SQLSTATE: 21S01")


def check_timestamp_literals(tree):
    """TIMESTAMP '...' (and CAST of a string to TIMESTAMP) must be in Spark's format."""
    for cast in tree.find_all(exp.Cast):
        if (cast.to.is_type(exp.DataType.Type.TIMESTAMP, exp.DataType.Type.TIMESTAMPTZ,
                            exp.DataType.Type.TIMESTAMPLTZ)
                and isinstance(cast.this, exp.Literal) and cast.this.is_string
                and not SPARK_TIMESTAMP.fullmatch(cast.this.name)):
            raise ServerOperationError(
                f"[INVALID_TYPED_LITERAL] The value of the typed literal \"TIMESTAMP\" is "
                f"invalid: '{cast.this.name}'. SQLSTATE: 42604")


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


# --- the workspace's OAuth token endpoint ---------------------------------------------

class TokenServer:
    """A workspace's OIDC endpoints on 127.0.0.1: host metadata, discovery, and a
    client-credentials token endpoint issuing opaque tokens that expire after
    `expires_in` seconds. `valid(token)` is what the warehouse checks (set
    `Warehouse.valid_tokens = server.valid`); `requests` records each token request."""

    def __init__(self, client_id, client_secret, expires_in=3600, clock=time.monotonic):
        self.client_id, self.client_secret, self.expires_in = client_id, client_secret, expires_in
        self.clock = clock
        self.issued = {}  # token -> monotonic expiry
        self.requests = []
        self.revoked = set()
        self.counter = itertools.count(1)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                base = server.url
                if self.path == "/.well-known/databricks-config":
                    return self.reply(200, {"oidc_endpoint": f"{base}/oidc",
                                            "workspace_id": "1234567890123456"})
                if self.path == "/oidc/.well-known/oauth-authorization-server":
                    return self.reply(200, {"issuer": f"{base}/oidc",
                                            "token_endpoint": f"{base}/oidc/v1/token",
                                            "authorization_endpoint": f"{base}/oidc/v1/authorize"})
                self.reply(404, {"error_code": "NOT_FOUND", "message": self.path})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.reply(*server.token(self.path, self.headers.get("Authorization", ""),
                                         urllib.parse.parse_qs(body.decode())))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(POLL,), daemon=True)
        self.thread.start()

    def token(self, path, authorization, form):
        self.requests.append({"path": path, "authorization": authorization, "form": form})
        basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if path != "/oidc/v1/token" or authorization != f"Basic {basic}":
            return 401, {"error": "invalid_client",
                         "error_description": "Client authentication failed"}
        token = f"opaque{next(self.counter)}.{secrets.token_hex(8)}"  # not a JWT
        self.issued[token] = self.clock() + self.expires_in
        return 200, {"access_token": token, "token_type": "Bearer", "scope": "all-apis",
                     "expires_in": self.expires_in}

    def valid(self, token):
        """Issued here, not revoked, not expired."""
        expiry = self.issued.get(token)
        return expiry is not None and token not in self.revoked and self.clock() < expiry

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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
    if kwargs.get("access_token"):
        def header_factory():
            return {"Authorization": f"Bearer {kwargs['access_token']}"}
    elif kwargs.get("credentials_provider"):
        # as databricks.sql.auth.authenticators.ExternalAuthProvider does
        header_factory = kwargs["credentials_provider"]()
    else:
        raise Error("connect() needs credentials")
    WAREHOUSE.connections.append(kwargs)
    WAREHOUSE.authenticate(header_factory())  # OpenSession is a request too
    return Connection(WAREHOUSE, kwargs, header_factory)


class Connection:
    def __init__(self, warehouse, kwargs, header_factory):
        self.warehouse, self.kwargs, self.closed = warehouse, kwargs, False
        self.header_factory = header_factory

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
        if self.conn.closed:
            raise Error("connection is closed")
        self.conn.warehouse.authenticate(self.conn.header_factory())
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
