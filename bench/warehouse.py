"""What the Databricks sink sends to a warehouse, counted without a warehouse.

A recording DB-API double stands in for `databricks.sql`: `connect(**kw)` returns a
connection whose cursors record each statement (its UTF-8 size, plus the size of the
local file a PUT uploads) and execute nothing. DESCRIBE raises TABLE_OR_VIEW_NOT_FOUND
the first time, as for a missing table, so the sink creates it; SELECT count(*)
returns [(0,)]; everything else returns no rows. (tests/fake_warehouse.py parses and
runs every statement: right for tests, far too slow for a million rows.)

The uploader runs in this process, the way a user would run it (`main([...])` with
the workspace settings in its environment, --once), with the double as its connector.
The figures are compared with (a) the rows as SQL literals, rendered by the uploader's
own `render_columns`, (b) the Parquet files it stages, and (c) the original uploader's
`executemany`: one `INSERT ... VALUES (...)` per row, its %s parameters inlined the
way databricks-sql-connector's legacy inline escaper does.

Run by bench.py inside the script's environment:
    uv run --with-requirements sqlite_to_databricks_uploader.py \
        python bench/warehouse.py DB STATE_DIR {inline|staging|auto|literals|seed}
prints one JSON object.
"""

import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sqlite_to_databricks_uploader as up  # noqa: E402

DATABASE = "main.sensors"
VOLUME = "/Volumes/main/sensors/staging"
PUT_LOCAL = re.compile(r"PUT\s+'((?:[^'\\]|\\.)*)'", re.I)


# --- the recording double -------------------------------------------------------

class Recorder:
    """Statements seen, by kind, and the bytes they carried."""

    def __init__(self):
        self.statements = {}
        self.bytes = {}
        self.put_file_bytes = 0
        self.described = set()

    def record(self, sql, params):
        kind = " ".join(sql.split(None, 2)[:2]).upper() if sql.upper().startswith(
            ("COPY", "CREATE", "ALTER")) else sql.split(None, 1)[0].upper()
        size = len(sql.encode("utf-8"))
        if params:
            size += len(json.dumps(params, default=str).encode("utf-8"))
        match = PUT_LOCAL.match(sql)
        if match:  # the file travels with the PUT
            local = re.sub(r"\\(.)", r"\1", match.group(1))
            file_size = os.path.getsize(local)
            self.put_file_bytes += file_size
            size += file_size
        self.statements[kind] = self.statements.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + size
        return kind


class Error(Exception):
    """As databricks.sql.exc.Error."""


class ServerOperationError(Error):
    """The warehouse refused a statement; the message carries [ERROR_CLASS]."""


class Cursor:
    def __init__(self, recorder):
        self.recorder = recorder
        self.rows = []
        self.description = None

    def execute(self, sql, parameters=None):
        kind = self.recorder.record(sql, parameters)
        self.rows, self.description = [], None
        if kind == "DESCRIBE":
            table = sql.split()[-1]
            if table not in self.recorder.described:
                self.recorder.described.add(table)
                raise ServerOperationError(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view "
                                           f"{table} cannot be found. SQLSTATE: 42P01")
        elif kind == "SELECT" and "count(*)" in sql.lower():
            self.rows, self.description = [(0,)], [("count(1)", "bigint")]
        return self

    def fetchall(self):
        return list(self.rows)

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def close(self):
        pass


class Connection:
    def __init__(self, recorder, kwargs):
        self.recorder, self.kwargs = recorder, kwargs

    def cursor(self):
        return Cursor(self.recorder)

    def close(self):
        pass


class RecordingWarehouse:
    """A DB-API module: `connect(**kw)` -> a recording connection."""

    apilevel, threadsafety, paramstyle = "2.0", 1, "named"
    Error = Error

    def __init__(self):
        self.recorder = Recorder()
        self.connections = 0

    def connect(self, **kwargs):
        self.connections += 1
        return Connection(self.recorder, kwargs)


# --- runs -----------------------------------------------------------------------

def run_uploader(db, state_dir, volume="none"):
    """One --once cycle of the uploader against the recording double (volume: none for
    inline statements, auto to create the staging volume, or a /Volumes path)."""
    double = RecordingWarehouse()
    up.DatabricksSink.connector = double
    environ = {"DATABRICKS_HOST": "bench.cloud.databricks.com",
               "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/bench",
               "DATABRICKS_TOKEN": "dapi-bench", "DATABRICKS_DATABASE": DATABASE,
               "DATABRICKS_VOLUME": volume}
    began = time.perf_counter()
    code = up.main(["--sqlite", db, "--once", "--state-dir", state_dir,
                    "--log-level", "WARNING"], environ=environ)
    seconds = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"warehouse: the uploader exited {code}")
    rec = double.recorder
    return {"seconds": round(seconds, 2), "statements": rec.statements,
            "bytes": rec.bytes, "put_file_bytes": rec.put_file_bytes,
            "total_statements": sum(rec.statements.values()),
            "total_bytes": sum(rec.bytes.values())}


def source_batches(db, batch_size=100_000):
    """The source's batches as the uploader reads and types them."""
    conn = up.open_source(db, 30.0)
    source = up.describe_table(conn, None, None, db)
    known = {}
    for batch in up.read_batches(conn, source, None, batch_size):
        batch.kinds = up.resolve_kinds(batch, known)
        yield source, batch
    conn.close()


def literal_bytes(db):
    """Rows as SQL literal rows `(v1,v2,...)`, rendered by the uploader's renderer."""
    rows = total = 0
    for _, batch in source_batches(db):
        columns, _ = up.render_columns(batch)
        for row in zip(*columns):
            total += len(("(" + ",".join(row) + ")").encode("utf-8"))
        rows += batch.count
    return {"rows": rows, "bytes": total}


def seed_escape(value):
    """databricks-sql-connector's legacy inline escaper (ParamEscaper), as the seed used."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def seed_bytes(db):
    """The original uploader: executemany of `INSERT ... VALUES (%s, ...)`, one per row."""
    rows = total = 0
    for source, batch in source_batches(db):
        table = f"{DATABASE}.{up.route_table(source.name)}"
        head = (f"INSERT INTO {table} ({', '.join(batch.columns)}) VALUES (").encode()
        for row in zip(*batch.values):
            total += len(head) + len(", ".join(map(seed_escape, row)).encode("utf-8")) + 1
        rows += batch.count
    return {"rows": rows, "statements": rows, "bytes": total}


def main():
    db, state_dir, what = sys.argv[1:4]
    if what == "inline":
        out = run_uploader(db, state_dir)
    elif what == "staging":
        out = run_uploader(db, state_dir, VOLUME)
    elif what == "auto":  # the default: the volume is created, then staged to
        out = run_uploader(db, state_dir, "auto")
    elif what == "literals":
        out = literal_bytes(db)
    elif what == "seed":
        out = seed_bytes(db)
    else:
        raise SystemExit(f"warehouse: unknown measurement {what!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
