"""Shared builders for the tests: temp SQLite files, runs of main(), Delta readers."""

import collections
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "sqlite_to_databricks_uploader.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402

FIXED_START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)

# The SIGKILL, fleet and soak suites take minutes: they run when UPLOADER_FULL_TESTS=1
# (README's full test command, and so CI, sets it); the default run stays short.
FULL_TESTS = os.environ.get("UPLOADER_FULL_TESTS", "") not in ("", "0")
slow = unittest.skipUnless(FULL_TESTS, "slow suite (kills, fleet, soak): "
                           "set UPLOADER_FULL_TESTS=1 to run it")


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


def use_fake_warehouse(case, root):
    """The warehouse sink talks to a new tests/fake_warehouse.py Warehouse at `root`
    until `case` ends; the Warehouse."""
    from tests import fake_warehouse
    case.addCleanup(setattr, fake_warehouse, "WAREHOUSE", fake_warehouse.WAREHOUSE)
    case.addCleanup(setattr, up.DatabricksSink, "connector", up.DatabricksSink.connector)
    warehouse = fake_warehouse.WAREHOUSE = fake_warehouse.Warehouse(root)
    case.addCleanup(warehouse.release)
    up.DatabricksSink.connector = fake_warehouse
    return warehouse


def child_env(env):
    """A minimal environment for a child process, plus `env`."""
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    full.update({k: str(v) for k, v in env.items()})
    return full


def run_script(argv, env, cwd=None, timeout=120):
    """Run the script as a user would, in a subprocess of this Python."""
    return subprocess.run([sys.executable, SCRIPT, *argv], env=child_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


KILL_DRIVER = os.path.join(ROOT, "tests", "kill_driver.py")


def run_driver(hook, k, argv, env, timeout=120):
    """Run main(argv) under tests/kill_driver.py, a fault planted at the k-th `hook`."""
    return subprocess.run([sys.executable, KILL_DRIVER, hook, str(k), *argv],
                          env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)


def start_driver(hook, k, argv, env, log_path):
    """run_driver in the background; its output goes to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, KILL_DRIVER, hook, str(k), *argv],
                                env=child_env(env), stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout=60, what="a condition"):
    """Poll `predicate` until true; fail after `timeout` seconds (never a timing test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_state(state_dir):
    """The parsed state file, or None when there is none (it must always parse)."""
    path = os.path.join(state_dir, up.STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def destination_of(state, uri, table=None):
    """The progress record of a target table (default: the only one) of the Delta
    destination at `uri` (None if none yet)."""
    if not state:
        return None
    base = os.path.abspath(uri)
    found = [pos for key, pos in state["destinations"].items()
             if key.rsplit("/", 1)[0].endswith(base)
             and table in (None, key.rsplit("/", 1)[1])]
    return found[0] if found else None


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


def delta_rows(table_uri, columns="*"):
    """Rows of a Delta table ([] when it does not exist yet)."""
    if "://" in table_uri:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        try:
            DeltaTable(table_uri)
        except TableNotFoundError:
            return []
    elif not os.path.isdir(os.path.join(table_uri, "_delta_log")):
        return []
    name = os.path.basename(table_uri.rstrip("/"))
    cols = columns if columns == "*" else ", ".join(f'"{c}"' for c in columns)
    return read_delta(table_uri, sql=f'SELECT {cols} FROM "{name}"')


def delta_schema(uri):
    """{column: Delta primitive type name} of a Delta table."""
    from deltalake import DeltaTable
    return {f.name: str(f.type.type) for f in DeltaTable(uri).schema().fields}


def file_digest(path):
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


class PipelineTestCase(TempDirTestCase):
    """Runs of main() against SQLite files in the temp dir, and what they left behind."""

    def env(self, where="", **extra):
        """base_env(), optionally with state and lake in a subdirectory `where`."""
        env = self.base_env(**extra)
        if where:
            env.update(STATE_DIR=self.path(where, "state"), DELTA_URI=self.path(where, "lake"))
        return env

    def make(self, schema, rows=(), columns=None, where="", name="source.db", **kw):
        """A SQLite file `name` (in subdirectory `where`) with `schema` and rows."""
        os.makedirs(self.path(where), exist_ok=True)
        return make_db(self.path(where, name), schema, rows, columns, **kw)

    def insert(self, db, rows, columns=None, table=None):
        """Insert and commit rows, as the sensor would."""
        conn = sqlite3.connect(db)
        try:
            with conn:
                insert_rows(conn, rows, columns, table)
        finally:
            conn.close()

    def upload(self, db, *flags, where="", expect=0, **extra):
        """One --once run; assert its exit code; return stderr (the log)."""
        code, _out, err = run_main(["--sqlite", db, "--once", *flags],
                                           self.env(where, **extra))
        self.assertEqual(code, expect, f"exit code {code}; stderr:\n{err}")
        return err

    def lake(self, table, where=""):
        return os.path.join(self.env(where)["DELTA_URI"], table)

    def landed(self, table, where="", key=None):
        """Rows of the target table (none if it was never created), sorted by `key`."""
        rows = delta_rows(self.lake(table, where))
        return sorted(rows, key=lambda r: r[key]) if key else rows

    def state(self, where=""):
        with open(os.path.join(self.env(where)["STATE_DIR"], up.STATE_FILE),
                  encoding="utf-8") as fh:
            return json.load(fh)

    def position(self, where=""):
        """The progress record of the only destination in the state file."""
        destinations = self.state(where)["destinations"]
        self.assertEqual(len(destinations), 1, destinations)
        return next(iter(destinations.values()))

    def assert_once(self, rows, column, expected):
        """Each expected value of `column` landed exactly once, and nothing else."""
        counts = collections.Counter(r[column] for r in rows)
        dupes = {v: n for v, n in counts.items() if n > 1}
        self.assertEqual(dupes, {}, "rows landed more than once")
        self.assertEqual(sorted(counts, key=repr), sorted(expected, key=repr))


def issue_client_token(service, headers, form):
    """OAuth client_credentials as a workspace's /oidc/v1/token answers it, for the
    loopback fakes: `service` has clients ({id: secret}), issued (tokens, in order),
    tokens (the valid ones; None accepts any), token_lifetime and lock. The reply, or
    None for an unknown client. Each token is new and opaque (not a JWT)."""
    import base64
    import uuid
    client, secret = form.get("client_id"), form.get("client_secret")
    basic = headers.get("Authorization", "")
    if basic.startswith("Basic "):
        client, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
    with service.lock:
        if form.get("grant_type") != "client_credentials" or secret is None or \
                service.clients.get(client) != secret:
            return None
        token = f"oauth-{len(service.issued) + 1}-{uuid.uuid4().hex}"
        service.issued.append(token)
        if service.tokens is not None:
            service.tokens.add(token)
    return {"access_token": token, "token_type": "Bearer",
            "expires_in": service.token_lifetime, "scope": form.get("scope", "all-apis")}
