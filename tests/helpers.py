"""Shared builders for the tests: temp SQLite files, runs of main(), Delta readers."""

import contextlib
import datetime as dt
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "sqlite_to_databricks_uploader.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402

FIXED_START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


class TempDirTestCase(unittest.TestCase):
    """A test case with a fresh temporary directory in self.tmp."""

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="uploader-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def base_env(self, **extra):
        """A minimal environment: local state dir and lakehouse under self.tmp."""
        env = {"STATE_DIR": self.path("state"), "DELTA_URI": self.path("lake"),
               "SOURCE_ID": "test-node"}
        env.update({k: str(v) for k, v in extra.items()})
        return env


def make_db(path, schema, rows=(), columns=None, wal=False):
    """Create a SQLite file with `schema` (one CREATE statement or a script) and rows."""
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(schema)
        if rows:
            insert_rows(conn, rows, columns)
        conn.commit()
    finally:
        conn.close()
    return path


def insert_rows(conn, rows, columns=None, table=None):
    """Insert rows into `table` (default: the only table) of an open connection."""
    table = table or conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
    ).fetchone()[0]
    rows = list(rows)
    width = len(columns) if columns else len(rows[0])
    cols = f" ({', '.join(up.quote_ident(c) for c in columns)})" if columns else ""
    conn.executemany(f"INSERT INTO {up.quote_ident(table)}{cols} VALUES "
                     f"({', '.join('?' * width)})", rows)


def sensor_db(path, seconds, sensors=20, start=FIXED_START):
    """A database of the Bacalhau sensor schema with seconds*sensors readings."""
    conn = sqlite3.connect(path)
    conn.execute(up.DEMO_SCHEMA)
    conn.execute("CREATE INDEX IF NOT EXISTS idx_timestamp ON sensor_readings(timestamp)")
    marks = ", ".join("?" * len(up.DEMO_COLUMNS))
    conn.executemany(f"INSERT INTO sensor_readings ({', '.join(up.DEMO_COLUMNS)}) "
                     f"VALUES ({marks})", up.sensor_rows(start, seconds, sensors))
    conn.commit()
    conn.close()
    return path


def run_main(argv, env):
    """Run main(argv) in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = up.main(list(argv), environ=dict(env))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run_script(argv, env, cwd=None, timeout=120):
    """Run the script as a user would, in a subprocess of this Python."""
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env)
    return subprocess.run([sys.executable, SCRIPT, *argv], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def read_delta(uri, sql=None, table=None):
    """Rows of a Delta table as dicts (via deltalake's QueryBuilder, no pyarrow)."""
    from deltalake import DeltaTable, QueryBuilder
    name = table or os.path.basename(uri.rstrip("/"))
    builder = QueryBuilder().register(name, DeltaTable(uri))
    reader = builder.execute(sql or f'SELECT * FROM "{name}"')
    names = [f.name for f in reader.schema]
    rows = []
    for batch in reader:
        columns = [c.to_pylist() for c in batch.columns]
        rows.extend(dict(zip(names, values)) for values in zip(*columns))
    return rows


def delta_schema(uri):
    """{column: Delta primitive type name} of a Delta table."""
    from deltalake import DeltaTable
    return {f.name: str(f.type.type) for f in DeltaTable(uri).schema().fields}


def file_digest(path):
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()
