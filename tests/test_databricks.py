"""Databricks SQL warehouse sink (DESIGN 9, 5): against tests/fake_warehouse.py.

The fake parses every statement as Databricks SQL (sqlglot) and runs it on DuckDB, so
these tests read back what landed and compare it with the SQLite source. Faults
('resend', 'drop_reply', 'unavailable', 'forbidden', 'unauthorized', 'crash_*') are
planned on the fake; the sink's sleep and jitter are the tests' own, so retries cost
nothing.
"""

import base64
import contextlib
import datetime as dt
import io
import itertools
import json
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from unittest import mock

import sqlglot
from sqlglot import exp

from . import fake_warehouse
from .helpers import (ROOT, TempDirTestCase, insert_rows, make_db, read_state, run_main,
                      slow, up)

HOST = "adb-1234567890123456.7.azuredatabricks.net"
HTTP_PATH = "/sql/1.0/warehouses/0123456789abcdef"
TOKEN = "dapi0123456789abcdefTOPSECRET"
CLIENT_SECRET = "dose0123456789SECRETOFTHEPRINCIPAL"
TABLE = "main.sensors.raw_readings"
UTC = dt.timezone.utc

READINGS_SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "timestamp TEXT, sensor TEXT, value REAL)")


def readings(start, count):
    """Rows (timestamp, sensor, value) with ids start+1 .. start+count once inserted."""
    return [(f"2025-01-01T00:{(start + i) // 60 % 60:02d}:{(start + i) % 60:02d}Z",
             f"s-{(start + i) % 7}", (start + i) * 0.25) for i in range(count)]


def parse(sql):
    """The statement parsed as Databricks SQL (raises on a syntax error)."""
    return sqlglot.parse_one(sql, read="databricks")


def utc(*args):
    return dt.datetime(*args, tzinfo=UTC)


class WarehouseTestCase(TempDirTestCase):
    """A fresh fake warehouse plugged into the sink; sleep and jitter patched."""

    def setUp(self):
        super().setUp()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.addCleanup(setattr, fake_warehouse, "WAREHOUSE", fake_warehouse.WAREHOUSE)
        self.addCleanup(setattr, up.DatabricksSink, "connector", up.DatabricksSink.connector)
        up.DatabricksSink.connector = fake_warehouse
        self.sleeps = []
        # the sink's waits: counted, not slept; jitter at its top, so backoff is exact
        for patcher in (mock.patch.object(up.Sink, "sleep", staticmethod(self.sleeps.append)),
                        mock.patch.object(up.Sink, "jitter", staticmethod(lambda low, high: high))):
            patcher.start()
            self.addCleanup(patcher.stop)
        self.open_warehouse()

    def open_warehouse(self):
        self.warehouse = fake_warehouse.WAREHOUSE = fake_warehouse.Warehouse(
            self.path("warehouse"))
        self.addCleanup(self.warehouse.release)
        self.sleeps.clear()

    def fresh(self):
        """A new temp dir (state, source) and an empty warehouse: for each subTest."""
        TempDirTestCase.setUp(self)
        self.open_warehouse()

    def env(self, **extra):
        """A complete workspace configuration in environment variables."""
        env = {"DATABRICKS_HOST": f"https://{HOST}/", "DATABRICKS_HTTP_PATH": HTTP_PATH,
               "DATABRICKS_TOKEN": TOKEN, "DATABRICKS_DATABASE": "main.sensors",
               "STATE_DIR": self.path("state"), "SOURCE_ID": "node-1",
               "DATABRICKS_VOLUME": "none"}  # staging: VolumeTests
        for key, value in extra.items():  # None removes a setting
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def readings_db(self, count=100, name="sensors.db"):
        return make_db(self.path(name), READINGS_SCHEMA, readings(0, count),
                       columns=["timestamp", "sensor", "value"])

    def add_readings(self, db, start, count):
        conn = sqlite3.connect(db)
        insert_rows(conn, readings(start, count), ["timestamp", "sensor", "value"])
        conn.commit()
        conn.close()

    def upload(self, db, *flags, env=None):
        """One --once upload; (exit code, stdout, stderr)."""
        return run_main(["--sqlite", db, "--once", *flags], env or self.env())

    def assertUploaded(self, result):
        code, out, err = result
        self.assertEqual(code, 0, f"stdout:\n{out}\nstderr:\n{err}")

    def rows(self, table=TABLE, order_by="id"):
        return self.warehouse.rows(table, order_by)

    def statements(self, prefix=""):
        """SQL of the statements received (a resend counts twice) that start with prefix."""
        return [s["sql"] for s in self.warehouse.statements() if s["sql"].startswith(prefix)]

    def position(self):
        """The one destination record of the state file."""
        with open(self.path("state", up.STATE_FILE), encoding="utf-8") as fh:
            destinations = json.load(fh)["destinations"]
        self.assertEqual(len(destinations), 1, destinations)
        return next(iter(destinations.values()))

    def assertRowsOnce(self, ids, table=TABLE):
        """The table holds each id once and nothing else."""
        self.assertEqual([r["id"] for r in self.rows(table)], list(ids))

    def error_line(self, err):
        """The `error: ...` line main printed (log lines may precede it)."""
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        self.assertEqual(len(lines), 1, err)
        return lines[0]


# === 1. Selection and connection =====================================================

class ConnectionTests(WarehouseTestCase):
    """DATABRICKS_* settings select the warehouse; one connection is reused."""

    def test_host_with_or_without_scheme(self):
        for host in (f"https://{HOST}/", HOST, f"HTTPS://{HOST}", f"{HOST}/"):
            with self.subTest(host=host):
                self.fresh()
                db = self.readings_db(5, name=f"db{len(host)}.db")
                env = self.env(DATABRICKS_HOST=host, STATE_DIR=self.path(f"s{len(host)}"))
                self.assertUploaded(self.upload(db, env=env))
                kwargs = self.warehouse.connections[-1]
                self.assertEqual(kwargs["server_hostname"], HOST)
                self.assertEqual(kwargs["http_path"], HTTP_PATH)
                self.assertEqual(kwargs["session_configuration"], {"TIMEZONE": "UTC"})
                self.assertIn(up.TOOL, kwargs["user_agent_entry"])

    def test_catalog_and_schema_instead_of_database(self):
        env = self.env(DATABRICKS_DATABASE=None, DATABRICKS_CATALOG="main",
                       DATABRICKS_SCHEMA="sensors", DATABRICKS_TABLE="raw_custom")
        self.assertUploaded(self.upload(self.readings_db(10), env=env))
        self.assertRowsOnce(range(1, 11), "main.sensors.raw_custom")

    def test_flags_and_yaml_keys(self):
        db = self.readings_db(10)
        yaml_path = self.path("uploader.yaml")
        with open(yaml_path, "w", encoding="utf-8") as fh:
            fh.write(textwrap.dedent(f"""\
                databricks_host: https://{HOST}
                databricks_http_path: {HTTP_PATH}
                databricks_database: main.sensors
                databricks_table: from_yaml
                """))
        only_state = {"STATE_DIR": self.path("state-yaml"), "SOURCE_ID": "node-1",
                      "DATABRICKS_TOKEN": TOKEN}
        self.assertUploaded(self.upload(db, "--config", yaml_path, env=only_state))
        self.assertEqual(len(self.rows("main.sensors.raw_from_yaml")), 10)

        flags = ["--databricks-host", HOST, "--databricks-http-path", HTTP_PATH,
                 "--databricks-token", TOKEN, "--databricks-database", "main.sensors",
                 "--databricks-table", "from_flags"]
        code, out, err = self.upload(db, *flags, env={"STATE_DIR": self.path("state-flags"),
                                                      "SOURCE_ID": "node-1"})
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.rows("main.sensors.raw_from_flags")), 10)
        self.assertIn("visible to other users", err)
        self.assertNotIn(TOKEN, out + err)

    def test_missing_setting_is_named_exit_2_nothing_written(self):
        db = self.readings_db(3)
        cases = [
            ({"DATABRICKS_HTTP_PATH": None},
             ["--databricks-http-path", "DATABRICKS_HTTP_PATH", "'databricks_http_path'"]),
            ({"DATABRICKS_TOKEN": None},
             ["--databricks-token", "DATABRICKS_TOKEN", "'databricks_token'"]),
            ({"DATABRICKS_DATABASE": None},
             ["--databricks-database", "DATABRICKS_DATABASE", "'databricks_database'"]),
            ({"DATABRICKS_DATABASE": None, "DATABRICKS_CATALOG": "main"},
             ["--databricks-database", "DATABRICKS_DATABASE", "databricks_schema"]),
            ({"DATABRICKS_TOKEN": None, "DATABRICKS_CLIENT_ID": "sp-id"},
             ["--databricks-client-secret", "DATABRICKS_CLIENT_SECRET"]),
            ({"DATABRICKS_DATABASE": "sensors"}, ["catalog.schema", "DATABRICKS_DATABASE"]),
        ]
        for change, words in cases:
            with self.subTest(change=change):
                code, out, err = self.upload(db, env=self.env(**change))
                self.assertEqual((code, out), (2, ""), err)
                lines = err.splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertTrue(lines[0].startswith("error: config: "), lines[0])
                for word in words:
                    self.assertIn(word, lines[0])
                self.assertFalse(os.path.exists(self.path("state")), "state was written")
                self.assertEqual(self.warehouse.connections, [])

    def test_one_connection_across_batches_and_cycles(self):
        db = self.readings_db(20)
        self.assertUploaded(self.upload(db))  # the table exists from here on
        self.add_readings(db, 20, 150)
        before_conn, before_insert = len(self.warehouse.connections), len(
            self.statements("INSERT"))
        args = up.build_parser().parse_args(["--sqlite", db, "--batch-size", "50"])
        config = up.check_target(up.load_config(args, self.env()))
        job = up.open_job(config, False, threading.Event(), self.env())
        try:
            self.assertEqual(up.run_cycle(job), 150)
            self.add_readings(db, 170, 80)
            self.assertEqual(up.run_cycle(job), 80)
        finally:
            up.close_job(job)
        self.assertGreaterEqual(len(self.statements("INSERT")) - before_insert, 5)
        self.assertEqual(len(self.warehouse.connections) - before_conn, 1)
        self.assertRowsOnce(range(1, 251))

    def test_connection_reopened_after_a_failure(self):
        db = self.readings_db(20)
        self.assertUploaded(self.upload(db))
        self.add_readings(db, 20, 10)
        self.warehouse.plan("drop_reply", "INSERT INTO")
        before = len(self.warehouse.connections)
        self.assertUploaded(self.upload(db))
        # one for the run, one after the failed write
        self.assertEqual(len(self.warehouse.connections) - before, 2)
        self.assertRowsOnce(range(1, 31))


class OAuthTests(WarehouseTestCase):
    """OAuth through databricks-sdk against a loopback token endpoint issuing opaque
    tokens; the warehouse accepts only tokens issued there and not yet expired."""

    def setUp(self):
        super().setUp()
        self.server = fake_warehouse.TokenServer("sp-id", CLIENT_SECRET)
        self.addCleanup(self.server.close)
        self.warehouse.valid_tokens = self.server.valid
        patcher = mock.patch.object(up.DatabricksSink, "workspace_url", self.server.url)
        patcher.start()
        self.addCleanup(patcher.stop)

    def oauth_env(self, **extra):
        return self.env(DATABRICKS_TOKEN=None, DATABRICKS_CLIENT_ID="sp-id",
                        DATABRICKS_CLIENT_SECRET=CLIENT_SECRET, **extra)

    def credentials(self):
        config = up.Config(databricks_host=HOST, databricks_client_id="sp-id",
                           databricks_client_secret=CLIENT_SECRET)
        return up.WorkspaceCredentials(config, self.server.url)

    def test_client_credentials_request(self):
        headers = self.credentials()()  # as the connector calls it
        self.assertEqual(self.server.requests, [], "no request before a header is needed")
        token = headers()["Authorization"].removeprefix("Bearer ")
        self.assertTrue(self.server.valid(token))
        request, = self.server.requests
        self.assertEqual(request["form"]["grant_type"], ["client_credentials"])
        self.assertIn("all-apis", request["form"]["scope"][0])
        kind, _, encoded = request["authorization"].partition(" ")
        self.assertEqual((kind, base64.b64decode(encoded).decode()),
                         ("Basic", f"sp-id:{CLIENT_SECRET}"))
        self.assertEqual(headers()["Authorization"], f"Bearer {token}", "not cached")
        self.assertEqual(len(self.server.requests), 1)

    def sdk_clock(self):
        """Move databricks-sdk's clock (and the token endpoint's) forward at will."""
        from databricks.sdk import oauth
        offset = [0.0]

        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return dt.datetime.now(tz) + dt.timedelta(seconds=offset[0])

        patcher = mock.patch.object(oauth, "datetime", Clock)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.server.clock = lambda: time.monotonic() + offset[0]
        return offset

    def test_opaque_token_is_refreshed_before_it_expires(self):
        """An opaque token (not a JWT): only its expires_in says when it ends."""
        offset = self.sdk_clock()
        headers = self.credentials()()
        first = headers()["Authorization"]
        offset[0] = 1000
        self.assertEqual(headers()["Authorization"], first, "refreshed too early")
        self.assertEqual(len(self.server.requests), 1)
        offset[0] = 2500  # 1,100 s before it expires: past the SDK's refresh point
        headers()  # starts the refresh in the background
        for _ in range(400):  # wait for it (up to 20 s; nothing timed is asserted)
            if len(self.server.requests) == 2:
                break
            time.sleep(0.05)
        second = headers()["Authorization"]
        self.assertNotEqual(second, first)
        self.assertTrue(self.server.valid(first.removeprefix("Bearer ")),
                        "the old token had expired before it was replaced")
        self.assertTrue(self.server.valid(second.removeprefix("Bearer ")))
        offset[0] = 3700  # the first is gone; the second serves
        self.assertEqual(headers()["Authorization"], second)

    def test_upload_with_client_credentials_instead_of_a_token(self):
        code, out, err = self.upload(self.readings_db(30), env=self.oauth_env())
        self.assertEqual(code, 0, err)
        self.assertRowsOnce(range(1, 31))
        kwargs = self.warehouse.connections[0]
        self.assertNotIn("access_token", kwargs)
        self.assertEqual(len(self.server.requests), 1, "one token for the whole run")
        self.assertGreater(len(self.warehouse.auth_headers), 4)
        self.assertNotIn(CLIENT_SECRET, out + err)

    def test_refused_token_gets_one_new_token_and_one_retry(self):
        """A 401 (here: the token was revoked early) is not a missing privilege."""
        db = self.readings_db(120)
        self.assertUploaded(self.upload(db, "--batch-size", "50", env=self.oauth_env()))
        self.add_readings(db, 120, 50)
        self.warehouse.plan("unauthorized", "INSERT INTO")
        code, out, err = self.upload(db, env=self.oauth_env())
        self.assertEqual(code, 0, err)
        self.assertRowsOnce(range(1, 171))
        refused = [s for s in self.warehouse.statements() if s["outcome"] != "ok"]
        self.assertEqual([s["outcome"] for s in refused], ["refused: 401"])
        self.assertEqual(len(self.server.requests), 3, "one run's token, the next run's, "
                         "and one after the 401")
        self.assertEqual(self.sleeps, [], "a new token needs no backoff")
        self.assertIn("refused the OAuth token", err)

    def test_which_refusals_get_a_new_token(self):
        Request, Server = fake_warehouse.RequestError, fake_warehouse.ServerOperationError
        for exc, refused in [
                (fake_warehouse.unauthorized(), True),
                (Request("Error during request to server: Forbidden", {"http-code": 403}), True),
                (Request("Invalid access token", {}), True),
                (Server("[INSUFFICIENT_PERMISSIONS] User does not have MODIFY on Table"), False),
                (Request("Service Unavailable", {"http-code": 503}), False)]:
            with self.subTest(exc=str(exc)):
                self.assertEqual(up.is_refused_token(exc), refused)

    def test_a_token_refused_again_fails_once_with_a_hint(self):
        self.warehouse.valid_tokens = lambda token: False  # e.g. the principal was removed
        code, out, err = self.upload(self.readings_db(10), env=self.oauth_env())
        self.assertEqual(code, 1, err)
        line = self.error_line(err)
        self.assertIn("401", line)
        self.assertIn("service principal", line)
        self.assertNotIn("lacks a privilege", line)
        self.assertLessEqual(len(self.server.requests), 2 * up.DatabricksSink.RETRIES)

    def test_secrets_never_in_logs_or_errors(self):
        db = self.readings_db(10)
        outputs = [self.upload(db, "--log-level", "DEBUG", env=self.oauth_env()),
                   run_main(["--print-config"], self.oauth_env())]
        self.add_readings(db, 10, 5)  # rows to send: refused, then never authenticated
        self.warehouse.valid_tokens = lambda token: False
        outputs.append(self.upload(db, "--log-level", "DEBUG", env=self.oauth_env()))
        self.server.client_secret = "another"  # the token endpoint refuses the secret
        outputs.append(self.upload(db, "--log-level", "DEBUG", env=self.oauth_env()))
        self.assertEqual([o[0] for o in outputs], [0, 0, 1, 1])
        self.assertIn("invalid_client", self.error_line(outputs[-1][2]))
        for code, out, err in outputs:
            self.assertNotIn(CLIENT_SECRET, out + err)
            for token in self.server.issued:
                self.assertNotIn(token, out + err)

    def test_a_refused_token_quoted_by_the_warehouse_is_not_printed(self):
        """A gateway that quotes the refused OAuth token (databricks-sdk's, not a
        setting): the error line says 401 and why, without the token."""
        self.warehouse.valid_tokens = lambda token: False
        self.warehouse.echo = True
        code, out, err = self.upload(self.readings_db(10), "--log-level", "DEBUG",
                                     env=self.oauth_env())
        self.assertEqual(code, 1, err)
        line = self.error_line(err)
        self.assertIn("401 Unauthorized: Invalid access token. (request token [REDACTED])",
                      line)
        self.assertTrue(self.server.issued)
        for token in self.server.issued:
            self.assertNotIn(token, out + err)

    def databrickscfg(self, text):
        """A temporary HOME holding ~/.databrickscfg."""
        home = self.path("home")
        os.makedirs(home, exist_ok=True)
        with open(os.path.join(home, ".databrickscfg"), "w", encoding="utf-8") as fh:
            fh.write(textwrap.dedent(text))
        patcher = mock.patch.dict(os.environ, {"HOME": home})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_profile_from_databrickscfg(self):
        self.databrickscfg(f"""\
            [DEFAULT]
            host = https://other.cloud.databricks.com

            [edge]
            host = https://{HOST}
            client_id = sp-id
            client_secret = {CLIENT_SECRET}
            """)
        env = self.env(DATABRICKS_TOKEN=None, DATABRICKS_CONFIG_PROFILE="edge")
        code, out, err = self.upload(self.readings_db(20), env=env)
        self.assertEqual(code, 0, err)
        self.assertRowsOnce(range(1, 21))
        self.assertEqual(len(self.server.requests), 1)
        self.assertNotIn(CLIENT_SECRET, out + err)

    def test_profile_is_validated_exit_2(self):
        self.databrickscfg("""\
            [DEFAULT]
            token = dapi-of-another-workspace

            [edge]
            host = https://example.cloud.databricks.com
            """)  # the SDK does not merge DEFAULT into a profile: neither do we
        db = self.readings_db(3)
        for profile, words in [("nope", ["'nope'", "not a profile", "DEFAULT, edge"]),
                               ("edge", ["'edge'", "no credentials", "databricks auth login"])]:
            with self.subTest(profile=profile):
                code, out, err = self.upload(db, env=self.env(
                    DATABRICKS_TOKEN=None, DATABRICKS_CONFIG_PROFILE=profile))
                self.assertEqual((code, out), (2, ""), err)
                self.assertEqual(len(err.splitlines()), 1, err)
                for word in words:
                    self.assertIn(word, err)
                self.assertNotIn("dapi-of-another-workspace", err)
        os.remove(self.path("home", ".databrickscfg"))
        code, _, err = self.upload(db, env=self.env(DATABRICKS_TOKEN=None,
                                                    DATABRICKS_CONFIG_PROFILE="edge"))
        self.assertEqual(code, 2, err)
        self.assertIn("does not exist", err)
        self.assertEqual(self.server.requests, [])
        self.assertEqual(self.warehouse.connections, [])


# === 2. Throughput ===================================================================

class ThroughputTests(WarehouseTestCase):
    """Multi-row statements, cut to the statement budget."""

    def test_multi_row_statements_within_the_byte_budget(self):
        self.warehouse.max_statement_bytes = 10_000  # the server refuses bigger ones too
        self.assertUploaded(self.upload(self.readings_db(400), "--max-statement-bytes",
                                        "10000"))
        inserts = self.statements("INSERT")
        self.assertGreaterEqual(len(inserts), 3)
        self.assertLessEqual(len(inserts), 10, "statements should be near the budget")
        per_statement = []
        for sql in inserts:
            self.assertLessEqual(len(sql.encode()), 10_000)
            per_statement.append(len(parse(sql).find(exp.Values).expressions))
        self.assertEqual(sum(per_statement), 400)
        self.assertGreater(max(per_statement), 100, per_statement)
        self.assertRowsOnce(range(1, 401))


# === 3. Idempotent writes ============================================================

class IdempotenceTests(WarehouseTestCase):
    """Every write can run twice; lineage on every row; in-flight batches settled."""

    def test_lineage_columns_on_every_row(self):
        self.assertUploaded(self.upload(self.readings_db(120), "--batch-size", "50"))
        with open(self.path("state", up.STATE_FILE), encoding="utf-8") as fh:
            state_id = json.load(fh)["state_id"]
        rows = self.rows()
        self.assertEqual(len(rows), 120)
        self.assertEqual({r["_source_id"] for r in rows}, {"node-1"})
        self.assertEqual(sorted({r["_batch_id"] for r in rows}),
                         [f"{state_id}-{n}" for n in (1, 2, 3)])
        for row in rows:
            self.assertIsInstance(row["_uploaded_at"], dt.datetime)
            self.assertIsNone(row["_rescued_data"])

    def test_statement_that_arrives_twice_lands_once(self):
        for action in ("resend", "drop_reply"):
            with self.subTest(action=action):
                self.fresh()
                db = self.readings_db(120)
                self.warehouse.plan(action, "INSERT INTO")
                self.assertUploaded(self.upload(db, "--batch-size", "50"))
                inserts = self.statements("INSERT")
                self.assertEqual(inserts[0], inserts[1], "the same statement ran twice")
                self.assertEqual(len(inserts), 4)
                self.assertRowsOnce(range(1, 121))
                self.assertEqual(self.position()["cursor"], [120])

    def test_replaying_every_write_statement_changes_nothing(self):
        """CREATE and INSERT replayed (COPY INTO and ALTER: tests of their own)."""
        db = self.readings_db(150)
        self.assertUploaded(self.upload(db, "--batch-size", "60"))
        self.add_readings(db, 150, 20)
        self.assertUploaded(self.upload(db, "--max-statement-bytes", "10000"))
        before = self.rows()
        writes = [s for s in self.statements() if s.split()[0] in ("CREATE", "INSERT")]
        self.assertGreater(len(writes), 4)
        conn = fake_warehouse.connect(server_hostname=HOST, http_path=HTTP_PATH,
                                      access_token=TOKEN)
        for sql in writes:
            conn.cursor().execute(sql)
        self.assertEqual(self.rows(), before)

    def test_add_columns_that_arrives_twice(self):
        """A re-sent ALTER TABLE ... ADD COLUMNS must not fail the cycle (DESIGN 9)."""
        db = self.readings_db(10)
        self.assertUploaded(self.upload(db))
        conn = sqlite3.connect(db)
        conn.execute("ALTER TABLE readings ADD COLUMN unit TEXT")
        conn.execute("INSERT INTO readings (timestamp, sensor, value, unit) "
                     "VALUES ('2025-01-02T00:00:00Z', 's-1', 1.0, 'C')")
        conn.commit()
        conn.close()
        self.warehouse.plan("resend", "ALTER TABLE")
        self.assertUploaded(self.upload(db))
        self.assertEqual(self.rows()[-1]["unit"], "C")

    def crash(self, db, action, batch):
        """Run an upload that dies at the INSERT of batch `batch` (before or after it)."""
        self.warehouse.plan(action, f"-{batch}' OR `_batch_id` LIKE")
        try:
            self.upload(db, "--batch-size", "50")
        except fake_warehouse.Crash:
            pass
        else:
            self.fail("the upload did not reach the planted crash")
        flight = self.position()["inflight"]
        self.assertEqual(flight["seq"], batch)
        return flight

    def test_inflight_batch_already_in_table_advances_without_resending(self):
        db = self.readings_db(150)
        flight = self.crash(db, "crash_after", 2)
        self.assertEqual(len(self.rows()), 100)
        sent = len(self.warehouse.statements())
        self.assertUploaded(self.upload(db, "--batch-size", "50"))
        rerun = self.warehouse.statements()[sent:]
        self.assertFalse([s for s in rerun if f"'{flight['batch_id']}'" in s["sql"]],
                         "the landed batch was sent again")
        self.assertTrue([s for s in rerun if (s["params"] or {}).get("batch_id")
                         == flight["batch_id"]], "the warehouse was not asked")
        self.assertRowsOnce(range(1, 151))
        self.assertEqual(self.position()["cursor"], [150])
        self.assertIsNone(self.position()["inflight"])

    def test_inflight_batch_missing_from_table_is_sent_again(self):
        db = self.readings_db(150)
        flight = self.crash(db, "crash_before", 2)
        self.assertEqual(len(self.rows()), 50)
        sent = len(self.warehouse.statements())
        self.assertUploaded(self.upload(db, "--batch-size", "50"))
        rerun = [s["sql"] for s in self.warehouse.statements()[sent:]]
        self.assertTrue([s for s in rerun if f"'{flight['batch_id']}'" in s])
        self.assertRowsOnce(range(1, 151))
        self.assertEqual(self.position()["cursor"], [150])

    def test_statement_queued_when_the_node_died_runs_after_the_resend(self):
        """DESIGN 9: a warehouse runs a dead client's queued statement, maybe after the
        restarted node re-sent the batch. The re-sent batch is exactly the rows recorded
        in flight, so the late copy leaves the same rows (it replaced the re-sent rows
        with fewer of them, and rows were lost, when the re-send re-read the grown
        source under the same batch id)."""
        db = self.readings_db(120)  # batches of 50: 1-50, 51-100, 101-120 (short)
        self.warehouse.plan("queue_crash", "-3' OR `_batch_id` LIKE")
        with self.assertRaises(fake_warehouse.Crash):
            self.upload(db, "--batch-size", "50")
        flight = self.position()["inflight"]
        self.assertEqual((flight["seq"], flight["cursor_end"]), (3, [120]))
        self.add_readings(db, 120, 60)  # the source grows while the node is down
        self.assertUploaded(self.upload(db, "--batch-size", "50"))
        resent = [s for s in self.statements("INSERT") if "-3' OR `_batch_id` LIKE" in s]
        self.assertEqual(len(resent), 2, "batch 3 was not re-sent (or sent more than once)")
        uploaded = [re.search(r"TIMESTAMP'[^']*'", s).group(0) for s in resent]  # 1st
        self.assertEqual(resent[0], resent[1].replace(uploaded[1], uploaded[0], 1),
            "the re-sent batch does not carry the rows of the batch in flight")
        self.warehouse.run_held()  # the dead client's statement runs late
        self.assertRowsOnce(range(1, 181))
        self.assertEqual(self.position()["cursor"], [180])

    def test_a_batch_sent_as_several_statements_lands_once_after_any_crash(self):
        """The sink alone decides how many statements a batch takes (DESIGN 1): without a
        volume, a batch bigger than one statement goes as several, each replacing its
        own rows; the batch is in when its last statement is. A crash after any of them,
        and a dead node's queued statement that runs after the re-send, leave every row
        once."""
        for crash_at, action in ((1, "crash_after"), (2, "crash_after"), (3, "crash_before"),
                                 (2, "queue_crash")):
            with self.subTest(statement=crash_at, action=action):
                self.fresh()
                env = self.env(DATABRICKS_VOLUME="none", MAX_STATEMENT_BYTES=10_000)
                db = self.readings_db(500)
                self.warehouse.plan(action, f"-1.{crash_at}/")
                with self.assertRaises(fake_warehouse.Crash):
                    self.upload(db, env=env)
                flight = self.position()["inflight"]
                self.assertEqual(flight["cursor_end"], [500])
                self.assertUploaded(self.upload(db, env=env))
                parts = {found for sql in self.statements("INSERT")
                         for found in re.findall(r"'[0-9a-f]+-1\.(\d+/\d+)'", sql)}
                self.assertEqual(parts, {"1/3", "2/3", "3/3"})
                self.warehouse.run_held()  # a queued statement of the dead node, late
                self.assertRowsOnce(range(1, 501))
                self.assertIsNone(self.position()["inflight"])
                self.assertEqual(self.position()["seq"], 1)

    def test_sigkill_during_a_write_in_a_subprocess(self):
        """As a user runs it: the process is killed right after a write lands."""
        driver = self.path("driver.py")
        with open(driver, "w", encoding="utf-8") as fh:
            fh.write(textwrap.dedent(f"""\
                import json, os, signal, sys
                sys.path.insert(0, {ROOT!r})
                import sqlite_to_databricks_uploader as up
                from tests import fake_warehouse

                class Kill(BaseException):
                    def __init__(self, *args):
                        os.kill(os.getpid(), signal.SIGKILL)

                fake_warehouse.Crash = Kill  # a planned crash is a real SIGKILL here
                warehouse = fake_warehouse.WAREHOUSE = fake_warehouse.Warehouse(
                    os.environ["FAKE_WAREHOUSE_ROOT"])
                for action, match in json.loads(os.environ.get("FAKE_PLAN", "[]")):
                    warehouse.plan(action, match)
                up.DatabricksSink.connector = fake_warehouse
                sys.exit(up.main(sys.argv[1:]))
                """))
        db = self.readings_db(150)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "FAKE_WAREHOUSE_ROOT": self.warehouse.root, **self.env()}
        argv = [sys.executable, driver, "--sqlite", db, "--once", "--batch-size", "50"]
        plan = json.dumps([["crash_after", "-2' OR `_batch_id` LIKE"]])
        killed = subprocess.run(argv, env={**env, "FAKE_PLAN": plan}, capture_output=True,
                                text=True, timeout=60, check=False)
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        self.assertEqual(len(self.rows()), 100)
        self.warehouse.release()  # the next run (a process) opens the file
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRowsOnce(range(1, 151))
        self.assertNotIn(TOKEN, killed.stderr + done.stderr + done.stdout)


# === 4. Volume staging ===============================================================

class VolumeTests(WarehouseTestCase):
    """PUT ... OVERWRITE, COPY INTO ... FILES, REMOVE after a confirmed load."""

    VOLUME = "/Volumes/main/sensors/landing"
    ROWS = 5000  # batches bigger than one statement (10,000 bytes here) are staged
    INLINE_ROWS = 1000  # one such batch, sent inline (a dozen statements)

    def staged_upload(self, db, **env):
        return self.upload(db, "--batch-size", "2500", "--max-statement-bytes", "10000",
                           env=self.env(**{"DATABRICKS_VOLUME": self.VOLUME, **env}))

    def volume_files(self):
        found = []
        for folder, _, files in os.walk(self.warehouse.volumes):
            found += [os.path.relpath(os.path.join(folder, f), self.warehouse.volumes)
                      for f in files]
        return sorted(found)

    def test_staged_batches_load_once_and_files_are_removed(self):
        self.assertUploaded(self.staged_upload(self.readings_db(self.ROWS)))
        self.assertRowsOnce(range(1, self.ROWS + 1))
        self.assertFalse(self.statements("INSERT"))
        folder = f"{self.VOLUME}/node-1/raw_readings"
        log = self.statements()
        puts = [s for s in log if s.startswith("PUT")]
        self.assertEqual(len(puts), 2)
        batch_ids = {r["_batch_id"] for r in self.rows()}
        for put in puts:
            local, remote = re.fullmatch(r"PUT '(.*)' INTO '(.*)' OVERWRITE", put).groups()
            name = os.path.basename(local)
            self.assertEqual(remote, f"{folder}/{name}")
            self.assertIn(name.removesuffix(".parquet"), batch_ids, "name is not the batch id")
            copy = log.index(next(s for s in log if s.startswith("COPY INTO")
                                  and f"'{name}'" in s.split("FILES = ")[1]))
            remove = log.index(f"REMOVE '{folder}/{name}'")
            self.assertLess(log.index(put), copy)
            self.assertLess(copy, remove)
            self.assertIn(f"FROM '{folder}'", log[copy])
        self.assertEqual(self.volume_files(), [])

    def test_copy_into_that_runs_twice_loads_once(self):
        for action in ("resend", "drop_reply"):
            with self.subTest(action=action):
                self.fresh()
                self.warehouse.plan(action, "COPY INTO")
                self.assertUploaded(self.staged_upload(self.readings_db(self.ROWS)))
                copies = self.statements("COPY INTO")
                self.assertEqual(copies[0], copies[1])
                self.assertEqual(len(copies), 3)
                self.assertRowsOnce(range(1, self.ROWS + 1))
                self.assertEqual(self.volume_files(), [])

    def test_file_kept_until_a_load_is_confirmed(self):
        db = self.readings_db(self.ROWS)
        for _ in range(up.DatabricksSink.RETRIES):
            self.warehouse.plan("unavailable", "COPY INTO")
        code, _, err = self.staged_upload(db)
        self.assertEqual(code, 1, err)
        left, = self.volume_files()  # not removed: the load was never confirmed
        self.assertFalse(self.statements("REMOVE"))
        self.assertIsNone(self.position()["cursor"])
        first_run = len(self.statements())
        self.assertUploaded(self.staged_upload(db))
        # the batch goes again under the same name, so the file is overwritten
        again = f" INTO '/Volumes/{left}' OVERWRITE"
        self.assertTrue([s for s in self.statements()[first_run:] if s.endswith(again)])
        self.assertRowsOnce(range(1, self.ROWS + 1))
        self.assertEqual(self.volume_files(), [])

    AUTO = "/Volumes/main/sensors/" + up.AUTO_VOLUME

    def test_auto_creates_a_volume_once_and_stages_parquet_there(self):
        self.warehouse.volume_names = set()  # no volume exists until it is created
        db = self.readings_db(self.ROWS)
        self.assertUploaded(self.staged_upload(db, DATABRICKS_VOLUME=None))
        self.assertEqual(self.statements("CREATE VOLUME"), [
            f"CREATE VOLUME IF NOT EXISTS `main`.`sensors`.`{up.AUTO_VOLUME}`"])
        self.assertEqual(self.warehouse.volume_names, {f"main.sensors.{up.AUTO_VOLUME}"})
        self.assertEqual(len(self.statements("COPY INTO")), 2)
        self.assertTrue(all(f"FROM '{self.AUTO}/node-1/raw_readings'" in s
                            for s in self.statements("COPY INTO")))
        self.assertFalse(self.statements("INSERT"))
        self.assertRowsOnce(range(1, self.ROWS + 1))
        self.add_readings(db, self.ROWS, self.ROWS)  # the next run: IF NOT EXISTS again
        self.assertUploaded(self.staged_upload(db, DATABRICKS_VOLUME="AUTO"))
        self.assertEqual(len(self.statements("CREATE VOLUME")), 2)
        self.assertRowsOnce(range(1, 2 * self.ROWS + 1))
        self.assertEqual(self.volume_files(), [])

    def test_auto_without_the_privilege_sends_inline_statements_said_once(self):
        self.warehouse.volume_names, self.warehouse.may_create_volumes = set(), False
        code, out, err = self.staged_upload(self.readings_db(self.INLINE_ROWS),
                                            DATABRICKS_VOLUME=None)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.statements("CREATE VOLUME")), 1, "tried more than once")
        lines = [line for line in err.splitlines() if "staging volume" in line]
        self.assertEqual(len(lines), 1, err)
        self.assertIn("inline statements", lines[0])
        self.assertIn("INSUFFICIENT_PERMISSIONS", lines[0])
        self.assertIn(f"DATABRICKS_VOLUME={self.AUTO}", lines[0])
        self.assertFalse(self.statements("PUT") + self.statements("COPY INTO"))
        self.assertGreater(len(self.statements("INSERT")), 5)
        self.assertEqual(self.sleeps, [], "a refusal was retried")
        self.assertRowsOnce(range(1, self.INLINE_ROWS + 1))

    def test_none_sends_inline_statements_without_asking(self):
        self.assertUploaded(self.staged_upload(self.readings_db(self.INLINE_ROWS),
                                               DATABRICKS_VOLUME="none"))
        self.assertFalse([s for s in self.statements() if "VOLUME" in s or
                          s.startswith(("PUT", "COPY"))])
        self.assertRowsOnce(range(1, self.INLINE_ROWS + 1))

    def test_bad_volume_setting_is_exit_2(self):
        code, out, err = self.upload(self.readings_db(3), env=self.env(
            DATABRICKS_VOLUME="main.sensors.v"))
        self.assertEqual((code, out), (2, ""), err)
        self.assertIn("databricks_volume must be auto, none or look like /Volumes/", err)


# === 5. Tables =======================================================================

class TableTests(WarehouseTestCase):
    """CREATE when missing, ADD COLUMNS for new source columns, quoted names."""

    def test_created_with_inferred_schema_delta_and_properties(self):
        self.assertUploaded(self.upload(self.readings_db(5)))
        create, = self.statements("CREATE TABLE IF NOT EXISTS `main`.`sensors`.`raw_readings`")
        self.assertIn(" USING DELTA ", create)
        self.assertEqual(self.warehouse.properties(TABLE), {
            "delta.enableChangeDataFeed": "true", "delta.autoOptimize.optimizeWrite": "true"})
        self.assertEqual(self.warehouse.columns(TABLE), {
            "id": "bigint", "timestamp": "timestamp", "sensor": "string", "value": "double",
            "_source_id": "string", "_batch_id": "string", "_uploaded_at": "timestamp",
            "_rescued_data": "string", "_source_file": "string"})
        self.assertEqual(self.rows()[0]["timestamp"], utc(2025, 1, 1))

    def test_new_source_column_is_added(self):
        db = self.readings_db(10)
        self.assertUploaded(self.upload(db))
        conn = sqlite3.connect(db)
        conn.execute("ALTER TABLE readings ADD COLUMN unit TEXT")
        conn.execute("ALTER TABLE readings ADD COLUMN quality INTEGER")
        conn.execute("INSERT INTO readings (timestamp, sensor, value, unit, quality) "
                     "VALUES ('2025-01-02T00:00:00Z', 's-1', 1.0, 'C', 3)")
        conn.commit()
        conn.close()
        self.assertUploaded(self.upload(db))
        alter, = self.statements("ALTER")
        self.assertEqual(alter, "ALTER TABLE `main`.`sensors`.`raw_readings` ADD COLUMNS "
                                "(`unit` STRING, `quality` BIGINT)")
        columns = self.warehouse.columns(TABLE)
        self.assertEqual((columns["unit"], columns["quality"]), ("string", "bigint"))
        rows = self.rows()
        self.assertEqual([(r["unit"], r["quality"]) for r in rows],
                         [(None, None)] * 10 + [("C", 3)])

    def test_without_privileges_the_error_prints_the_ddl(self):
        self.warehouse.plan("forbidden", "CREATE TABLE")
        code, _, err = self.upload(self.readings_db(5))
        self.assertEqual(code, 1, err)
        line = self.error_line(err)
        self.assertIn("INSUFFICIENT_PERMISSIONS", line)
        ddl = line.split("ask an admin to run: ", 1)[1]
        tree = parse(ddl)
        self.assertIsInstance(tree, exp.Create)
        self.assertTrue(ddl.startswith("CREATE TABLE IF NOT EXISTS "
                                       "`main`.`sensors`.`raw_readings` ("), ddl)
        self.assertIn("'delta.enableChangeDataFeed' = 'true'", ddl)
        self.assertEqual(self.sleeps, [], "a permission error was retried")
        self.assertIsNone(self.position()["cursor"])

    def test_print_ddl_without_connecting(self):
        db = self.readings_db(5)
        code, out, err = run_main(["--sqlite", db, "--print-ddl"], self.env())
        self.assertEqual(code, 0, err)
        self.assertEqual(self.warehouse.connections, [])
        self.assertFalse(os.path.exists(self.path("state")))
        ddl = out.strip()
        self.assertTrue(ddl.endswith(";"))
        self.assertIsInstance(parse(ddl.rstrip(";")), exp.Create)
        # what --print-ddl shows is what the uploader runs
        self.assertUploaded(self.upload(db))
        self.assertEqual(self.statements("CREATE TABLE IF NOT EXISTS `main`.`sensors`.`raw_"),
                         [ddl.rstrip(";")])

    HOSTILE_COLUMNS = ("a`b", "it's", 'say"hi"', "ünï-cödé", "x--y", "$dollar", "back\\slash",
                       "``", "A`|`B")

    def hostile_db(self, table, columns):
        conn = sqlite3.connect(self.path("hostile.db"))
        cols = ", ".join(f"{up.quote_ident(c)} TEXT" for c in columns)
        conn.execute(f"CREATE TABLE {up.quote_ident(table)} (id INTEGER PRIMARY KEY "
                     f"AUTOINCREMENT, {cols})")
        for n in range(3):
            insert_rows(conn, [tuple(f"{c}|{n}" for c in columns)], columns, table)
        conn.commit()
        conn.close()
        return self.path("hostile.db")

    def assertHostileLanded(self, target, columns):
        for sql in self.statements():
            if not sql.startswith(("SHOW", "PUT", "REMOVE")):
                parse(sql)
        self.assertEqual({s["outcome"] for s in self.warehouse.statements()}, {"ok"})
        rows = self.rows(target)
        self.assertEqual(len(rows), 3)
        for n, row in enumerate(rows):
            for column in columns:
                self.assertEqual(row[column], f"{column}|{n}")
        self.assertEqual(self.warehouse.query("SELECT count(*) FROM \"main.sensors.x\"")[0][0],
                         1, "the bystander table was touched")

    def bystander(self):
        """A table named x, for statements that try to DROP TABLE x."""
        self.warehouse.query('CREATE TABLE "main.sensors.x" (keep INTEGER)')
        self.warehouse.query('INSERT INTO "main.sensors.x" VALUES (1)')

    def test_hostile_column_names_land_in_their_columns(self):
        self.bystander()
        db = self.hostile_db("readings", self.HOSTILE_COLUMNS)
        self.assertUploaded(self.upload(db))
        self.assertHostileLanded(TABLE, self.HOSTILE_COLUMNS)
        self.assertIn("`a``b` STRING, `it's` STRING", self.statements("CREATE")[0])

    def test_hostile_table_names_route_to_plain_names(self):
        for table, target in [("r`';--é\"ü", "raw_r_____é_ü"),
                              ("my readings", "raw_my_readings"),
                              ("x; DROP TABLE x; --", "raw_x__drop_table_x____")]:
            with self.subTest(table=table):
                self.fresh()
                self.bystander()
                self.assertUploaded(self.upload(self.hostile_db(table, ["v"])))
                self.assertHostileLanded(f"main.sensors.{target}", ["v"])

    def test_column_names_with_spaces_and_semicolons(self):
        """Delta refuses ' ,;{}()=' in column names unless the table maps columns."""
        self.bystander()
        columns = ["; DROP TABLE x; --", "with space", "f(x)=1, {y}"]
        db = self.hostile_db("readings", columns)
        self.assertUploaded(self.upload(db))
        self.assertHostileLanded(TABLE, columns)



# === 5b. A fleet on one table ========================================================

class FleetTests(WarehouseTestCase):
    """8 uploaders write one table at once, as Delta's optimistic concurrency lets them:
    two or more race to CREATE it, one adds a column while the others write, every
    REPLACE WHERE may meet a concurrent append. Every --once run succeeds, every row
    lands once. Real (scaled) backoff with real jitter spreads the retries."""

    NODES = 8
    round = 45  # rows each node adds before each of the two rounds

    def setUp(self):
        super().setUp()
        self.warehouse.conflicts = True
        self.warehouse.work_seconds = 0.02  # writers overlap, as on a warehouse
        for patcher in (mock.patch.object(up.Sink, "sleep",
                                          staticmethod(lambda s: time.sleep(s / 100))),
                        mock.patch.object(up.Sink, "jitter", staticmethod(random.uniform))):
            patcher.start()
            self.addCleanup(patcher.stop)
        self.dbs = [self.readings_db(0, name=f"node-{n}.db") for n in range(self.NODES)]
        self.counts = [0] * self.NODES

    def add(self, node, count):
        self.add_readings(self.dbs[node], self.counts[node], count)
        self.counts[node] += count

    def run_fleet(self, *flags, **env):
        """Every node's --once run at the same moment; their exit codes."""
        barrier, codes = threading.Barrier(self.NODES), [None] * self.NODES
        extra = env

        def node(n):
            env = self.env(SOURCE_ID=f"node-{n}", STATE_DIR=self.path(f"state-{n}"), **extra)
            barrier.wait()
            codes[n] = up.main(["--sqlite", self.dbs[n], "--once", "--batch-size", "15",
                                "--log-level", "ERROR", *flags], environ=env)

        threads = [threading.Thread(target=node, args=(n,)) for n in range(self.NODES)]
        with contextlib.redirect_stdout(io.StringIO()):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
        return codes

    def conflicts(self, prefix=""):
        """Outcomes of the statements (starting with `prefix`) that met a conflict."""
        return [s["outcome"] for s in self.warehouse.statements()
                if s["outcome"].startswith("conflict") and s["sql"].startswith(prefix)]

    @slow  # the conflicts one by one, fast: test_wire.ErrorTests, test_racing_creates_...
    def test_eight_nodes_one_adding_a_column_every_row_once(self):
        """Inline statements: each INSERT ... REPLACE WHERE meets many conflicts."""
        self.check_fleet()
        seen = set(self.conflicts())
        for kind in ("DELTA_METADATA_CHANGED", "DELTA_CONCURRENT_APPEND"):
            self.assertIn(f"conflict: {kind}", seen, "the fleet never met this conflict")
        self.assertTrue({"conflict: DELTA_PROTOCOL_CHANGED.WRITE_TO_EMPTY_DIRECTORY",
                         "conflict: TABLE_OR_VIEW_ALREADY_EXISTS"} & seen,
                        "no node lost the race to create the table")

    @slow
    def test_eight_nodes_staging_in_the_auto_volume(self):
        """Staged Parquet: COPY INTO is a blind append, only the ALTER conflicts with it."""
        self.warehouse.volume_names = set()
        self.round = 400  # batches bigger than one statement (10,000 bytes): staged
        self.check_fleet("--batch-size", "400", "--max-statement-bytes", "10000",
                         DATABRICKS_VOLUME="auto")
        self.assertTrue(self.statements("COPY INTO"))
        self.assertNotIn("conflict: DELTA_CONCURRENT_APPEND", self.conflicts("COPY INTO"))

    def check_fleet(self, *flags, **env):
        """Two rounds of 8 nodes; node 0's source gains a column before the second."""
        size = self.round
        for n in range(self.NODES):
            self.add(n, size)
        self.assertEqual(self.run_fleet(*flags, **env), [0] * self.NODES)
        conn = sqlite3.connect(self.dbs[0])  # node 0's source gains a column
        conn.execute("ALTER TABLE readings ADD COLUMN unit TEXT")
        conn.commit()
        conn.close()
        for n in range(self.NODES):
            self.add(n, size)
        conn = sqlite3.connect(self.dbs[0])
        conn.execute("UPDATE readings SET unit = 'C' WHERE id > ?", [size])
        conn.commit()
        conn.close()
        self.assertEqual(self.run_fleet(*flags, **env), [0] * self.NODES)
        rows = self.rows(order_by="_source_id, id")
        for n in range(self.NODES):
            with self.subTest(node=n):
                mine = [r for r in rows if r["_source_id"] == f"node-{n}"]
                self.assertEqual([r["id"] for r in mine], list(range(1, 2 * size + 1)))
                self.assertEqual([r["value"] for r in mine],
                                 [i * 0.25 for i in range(2 * size)])
                units = [r["unit"] for r in mine]
                self.assertEqual(units, [None] * size + [("C" if n == 0 else None)] * size)
        self.assertEqual(self.statements("ALTER"), [
            "ALTER TABLE `main`.`sensors`.`raw_readings` ADD COLUMNS (`unit` STRING)"])
        # every node's status upsert landed, its MERGEs' conflicts retried
        config = up.load_config(up.build_parser().parse_args(["--sqlite", self.dbs[0]]),
                                self.env())
        lines = up.fleet_status(config)
        self.assertEqual({x["node"]: (x["rows"], x["cursor"], x["pending_rows"]) for x in lines},
                         {f"node-{n}": (2 * size, [2 * size], 0) for n in range(self.NODES)})

    def test_racing_creates_either_answer(self):
        """The loser of a CREATE race may hear TABLE_OR_VIEW_ALREADY_EXISTS (permanent)
        or DELTA_PROTOCOL_CHANGED (a conflict): either way it goes on with the table."""
        for first in (fake_warehouse.ALREADY_EXISTS, fake_warehouse.PROTOCOL_CHANGED):
            with self.subTest(answer=first[:30]):
                self.fresh()
                self.warehouse.conflicts = True
                self.warehouse.create_races = itertools.repeat(first)
                self.dbs = [self.readings_db(20, name=f"race-{n}.db") for n in range(2)]
                sink = up.DatabricksSink(up.check_target(up.load_config(
                    up.build_parser().parse_args([]), self.env())), up.Identity("n", "t", "s"))
                self.addCleanup(sink.close)
                sink.known_kinds("raw_readings")  # the table is missing when it looks
                self.warehouse.query(  # another node creates it meanwhile
                    'CREATE TABLE "main.sensors.raw_readings" (id BIGINT, x VARCHAR, '
                    "_source_id VARCHAR, _batch_id VARCHAR, "
                    "_uploaded_at TIMESTAMP WITH TIME ZONE, _rescued_data VARCHAR)")
                self.warehouse.commits["main.sensors.raw_readings"] = ["create"]
                # its CREATE arrives as if the table were still missing: it lost the race
                with mock.patch.object(self.warehouse, "version", lambda table: None):
                    sink.ensure_table("raw_readings", ["id", "value"], [up.BIGINT, up.DOUBLE])
                # (a conflict is transient: the CREATE may go again, and conflict again here)
                self.assertEqual(set(self.conflicts()), {"conflict: " + first.split("]")[0][1:]})
                self.assertEqual(list(sink.known_kinds("raw_readings"))[:3],
                                 ["id", "x", "_source_id"])
                self.assertIn("value", sink.known_kinds("raw_readings"))


# === 5c. One view of the fleet (--fleet-status) =====================================

NODES_TABLE = "main.sensors._uploader_nodes"
NODES_TABLE_SQL = "`main`.`sensors`.`_uploader_nodes`"


class NodeStatusTests(WarehouseTestCase):
    """After each cycle a node upserts its row of `_uploader_nodes` (one MERGE, its
    failure a log line); --fleet-status reads it with each node's rows in the table."""

    def status(self):
        """{source_id: row} of the status table."""
        return {r["source_id"]: r for r in self.warehouse.rows(NODES_TABLE)}

    def node_env(self, n):
        return self.env(SOURCE_ID=f"node-{n}", STATE_DIR=self.path(f"state-{n}"))

    def fleet(self, db, *flags, n=1):
        code, out, err = run_main(["--sqlite", db, "--fleet-status", *flags], self.node_env(n))
        self.assertEqual(code, 0, err)
        return json.loads(out) if "--json" in flags else out

    def test_each_cycle_upserts_the_nodes_row(self):
        db = self.readings_db(100)
        self.assertUploaded(self.upload(db, "--batch-size", "30"))
        row = self.status()["node-1"]
        with open(self.path("state", up.STATE_FILE), encoding="utf-8") as fh:
            state_id = json.load(fh)["state_id"]
        self.assertEqual({k: row[k] for k in ("target_table", "rows", "cursor", "pending_rows",
                                               "behind_rows", "last_batch", "version",
                                               "last_error")},
                         {"target_table": "raw_readings", "rows": 100, "cursor": "[100]",
                          "pending_rows": 0, "behind_rows": 0, "last_batch": f"{state_id}-4",
                          "version": up.__version__, "last_error": None})
        self.assertIsInstance(row["reported_at"], dt.datetime)
        self.assertIsInstance(row["last_batch_at"], dt.datetime)
        self.assertGreater(row["lag_seconds"], 0)  # the readings are from 2025-01-01
        self.add_readings(db, 100, 5)
        self.assertUploaded(self.upload(db, "--batch-size", "30"))
        self.assertEqual(len(self.warehouse.rows(NODES_TABLE)), 1)
        self.assertEqual((self.status()["node-1"]["rows"], self.status()["node-1"]["cursor"]),
                         (105, "[105]"))
        merges = self.statements("MERGE INTO `main`.`sensors`.`_uploader_nodes`")
        self.assertEqual(len(merges), 2)
        self.assertEqual(self.sleeps, [])

    def test_fleet_status_one_line_per_node_silent_ones_flagged(self):
        dbs = [self.readings_db(10 * (n + 1), name=f"node-{n}.db") for n in range(3)]
        for n, db in enumerate(dbs):
            self.assertUploaded(self.upload(db, "--batch-size", "7", env=self.node_env(n)))
        self.add_readings(dbs[2], 30, 4)  # node 2 has not sent these: its report says 0
        lines = {x["node"]: x for x in self.fleet(dbs[0], "--json")}
        self.assertEqual(sorted(lines), ["node-0", "node-1", "node-2"])
        for n in range(3):
            line = lines[f"node-{n}"]
            self.assertEqual((line["table"], line["rows"], line["cursor"], line["pending_rows"]),
                             ("raw_readings", 10 * (n + 1), [10 * (n + 1)], 0))
            self.assertRegex(line["last_batch"], rf"-{(10 * (n + 1) + 6) // 7}$")
            self.assertFalse(line["silent"])
            self.assertEqual(line["version"], up.__version__)
            self.assertIsNone(line["last_error"])
        text = self.fleet(dbs[0])
        self.assertEqual(len([x for x in text.splitlines() if "node-" in x]), 3)
        self.assertIn("version", text.splitlines()[0])
        config = up.load_config(up.build_parser().parse_args(["--sqlite", dbs[0]]),
                                self.node_env(0))
        # idle at their last report: silent once the hourly report is missing
        now = dt.datetime.now(UTC)
        soon = up.fleet_status(config, now=now + dt.timedelta(seconds=3 * 300 + 60))
        self.assertEqual([x["silent"] for x in soon], [False] * 3)
        silent = up.fleet_status(config, now=now + dt.timedelta(seconds=5400 + 60))
        self.assertEqual([x["silent"] for x in silent], [True] * 3)
        self.assertIn("SILENT", up.format_fleet(silent))
        # without --sqlite: the tables the status table names
        code, out, err = run_main(["--fleet-status", "--json"], self.node_env(0))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(json.loads(out)), 3)

    def test_an_idle_node_reports_an_unchanged_status_once_an_hour(self):
        """A MERGE after every idle cycle would keep the warehouse from ever stopping."""
        sink = self.reporter("node-1")
        now = [1000.0]
        sink.clock = lambda: now[0]
        idle = {"source_id": "node-1", "table": "raw_readings", "rows": 5, "pending": 0}
        for minutes in (0, 5, 10, 59):
            now[0] = 1000.0 + 60 * minutes
            sink.report_status(dict(idle))
        self.assertEqual(len(self.statements("MERGE")), 1)
        sink.report_status({**idle, "pending": 3})  # a change goes at once
        now[0] = 1000.0 + 60 * 120
        sink.report_status({**idle, "pending": 3})  # an hour after the last: again
        self.assertEqual(len(self.statements("MERGE")), 3)
        self.warehouse.plan("unavailable", "MERGE INTO")
        sink.report_status({**idle, "pending": 4})  # not recorded: the next cycle tries
        sink.report_status({**idle, "pending": 4})
        self.assertEqual(len(self.statements("MERGE")), 5)
        self.assertEqual(self.status()["node-1"]["pending_rows"], 4)

    def test_nodes_rows_without_a_report_are_shown(self):
        """A node of an older version (no status row): its rows, no report."""
        db = self.readings_db(12)
        self.assertUploaded(self.upload(db))
        self.warehouse.query(f'DELETE FROM "{NODES_TABLE}"')
        line, = self.fleet(db, "--json")
        self.assertEqual((line["node"], line["rows"], line["last_batch"], line["cursor"]),
                         ("node-1", 12, None, None))

    def test_a_status_upsert_that_fails_does_not_fail_the_cycle(self):
        db = self.readings_db(40)
        self.warehouse.plan("unavailable", "MERGE INTO")
        code, _out, err = self.upload(db)
        self.assertEqual(code, 0, err)
        self.assertRowsOnce(range(1, 41))
        self.assertEqual(len([x for x in err.splitlines() if "status" in x]), 1, err)
        self.assertIn("not recorded", err)
        self.assertEqual(self.status(), {})
        self.assertUploaded(self.upload(db))  # the next cycle reports it
        self.assertEqual(self.status()["node-1"]["rows"], 40)

    def test_a_status_table_that_cannot_be_created_is_said_once(self):
        db = self.readings_db(40)
        self.warehouse.plan("forbidden", "CREATE TABLE IF NOT EXISTS `main`.`sensors`.`_upl")
        code, _out, err = self.upload(db)
        self.assertEqual(code, 0, err)
        self.assertRowsOnce(range(1, 41))
        warning, = [x for x in err.splitlines() if "status" in x]
        self.assertIn("ask an admin to run: CREATE TABLE IF NOT EXISTS "
                      "`main`.`sensors`.`_uploader_nodes`", warning)
        self.assertEqual(self.statements("MERGE"), [])
        # in a loop: said once, then no more tries (a permission does not come back alone)
        sink = up.DatabricksSink(up.check_target(up.load_config(
            up.build_parser().parse_args([]), self.env())), up.Identity("node-1", "t", "s"))
        self.addCleanup(sink.close)
        status = {"source_id": "node-1", "table": "raw_readings", "rows": 40}
        self.warehouse.plan("forbidden", "CREATE TABLE IF NOT EXISTS `main`.`sensors`.`_upl")
        with self.assertLogs("uploader", "WARNING") as logs:
            for _ in range(3):
                sink.report_status(status)
        self.assertEqual(len(logs.output), 1)
        self.assertEqual(len(self.statements("CREATE TABLE IF NOT EXISTS `main`.`sensors`.`_u")), 2)

    def test_a_failed_cycle_reports_its_error(self):
        db = self.readings_db(20)
        self.assertUploaded(self.upload(db))
        self.add_readings(db, 20, 5)
        self.warehouse.plan("forbidden", "INSERT INTO")
        code, _out, err = self.upload(db)
        self.assertEqual(code, 1, err)
        row = self.status()["node-1"]
        self.assertIn("INSUFFICIENT_PERMISSIONS", row["last_error"])
        self.assertEqual((row["rows"], row["pending_rows"]), (20, 5))
        text = self.fleet(db)
        self.assertIn("failing: sink: ", text)
        config = up.load_config(up.build_parser().parse_args(["--sqlite", db]), self.env())
        later = dt.datetime.now(UTC) + dt.timedelta(seconds=3 * 300 + 60)
        self.assertTrue(up.fleet_status(config, now=later)[0]["silent"],
                        "a failing node is expected back within three intervals")
        self.assertUploaded(self.upload(db))
        self.assertIsNone(self.status()["node-1"]["last_error"])

    def many(self, files, n=1, flags=(), globs=("sensor-*.db",)):
        """Node n uploads `files` ({name: rows}) of one table through `sources:` globs;
        its stderr."""
        for name, count in files.items():
            db = self.path(name)
            if os.path.exists(db):
                self.add_readings(db, 1000, count)
            else:
                self.readings_db(count, name=name)
        config = self.path("uploader.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            json.dump({"sources": [{"sqlite": self.path(glob), "tables": ["readings"]}
                                   for glob in globs]}, fh)
        code, _, err = run_main(["--config", config, "--once", "--batch-size", "4", *flags],
                                self.node_env(n))
        self.assertEqual(code, 0, err)
        return err

    def status_keys(self):
        return sorted((r["source_id"], r["source_file"], r["target_table"], r["source_table"])
                      for r in self.warehouse.rows(NODES_TABLE))

    def landed_rows(self):
        return sorted((r["_source_id"], r["_source_file"], r["id"], r["value"])
                      for r in self.warehouse.rows("main.sensors.raw_readings"))

    def test_a_forgotten_file_loses_its_status_row(self):
        """A rotated file gone for FORGET_AFTER: with its positions, its row of the
        status table goes (one DELETE, one line); the other file's row, another node's
        rows of the same file names and the rows in the target table stay."""
        self.many({"sensor-1.db": 13, "sensor-2.db": 7})
        self.many({}, n=2)
        landed = self.landed_rows()
        self.assertEqual(len(landed), 40)
        os.remove(self.path("sensor-1.db"))
        forget = ("--forget-after", "0")
        self.many({}, flags=forget)  # gone: marked, kept for FORGET_AFTER
        self.assertEqual(len(self.status_keys()), 4)
        self.assertEqual(self.statements("DELETE"), [])
        err = self.many({}, flags=forget)
        self.assertEqual(self.status_keys(),
                         [("node-1", "sensor-2.db", "raw_readings", "readings"),
                          ("node-2", "sensor-1.db", "raw_readings", "readings"),
                          ("node-2", "sensor-2.db", "raw_readings", "readings")])
        (delete,) = self.statements("DELETE")
        self.assertTrue(delete.startswith(f"DELETE FROM {NODES_TABLE_SQL} WHERE "), delete)
        said = [line for line in err.splitlines() if "--fleet-status" in line
                and "sensor-1.db" in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("INFO", said[0])
        self.assertEqual(self.landed_rows(), landed)
        self.many({}, flags=forget)  # nothing more to forget: nothing more removed
        self.assertEqual(len(self.statements("DELETE")), 1)
        self.assertEqual(len(self.status_keys()), 3)

    def test_a_status_row_that_cannot_be_removed_costs_one_warning(self):
        self.many({"sensor-1.db": 3, "sensor-2.db": 2})
        os.remove(self.path("sensor-1.db"))
        self.many({}, flags=("--forget-after", "0"))
        self.warehouse.plan("forbidden", "DELETE FROM")
        err = self.many({}, flags=("--forget-after", "0"))
        warned = [line for line in err.splitlines() if "WARNING" in line]
        self.assertEqual(len(warned), 1, err)
        self.assertIn("INSUFFICIENT_PERMISSIONS", warned[0])
        self.assertIn("sensor-1.db", warned[0])
        self.assertEqual(len(self.status_keys()), 2)  # left, the positions forgotten
        self.assertEqual([p["source"]["path"] for p in read_state(
            self.path("state-1"))["destinations"].values()], [self.path("sensor-2.db")])

    def older_status_table(self, *files):
        """The status table as a version before source_path made it, with a row of
        node-1 (3 rows) for each of `files` (table readings)."""
        fake_warehouse.connect(server_hostname="h", http_path="p", access_token="t").cursor(
        ).execute(up.status_table_sql(NODES_TABLE_SQL, [
            (n, k) for n, k in up.STATUS_COLUMNS if n != "source_path"]))
        for name in files:
            self.warehouse.query(
                f'INSERT INTO "{NODES_TABLE}" (source_id, target_table, source_file, '
                "source_table, rows, reported_at) VALUES ('node-1', 'raw_readings', "
                f"'{name}', 'readings', 3, now())")

    def test_files_named_alike_in_two_folders_have_a_row_each(self):
        """A common layout (.../a/sensor-1.db, .../b/sensor-1.db): a row each, keyed
        by the file's real path, with its own rows; the row a version before source_path
        wrote for that name (on a status table without the column) is taken over, not
        left as a third line. One file forgotten: its row goes, the other's stays."""
        self.older_status_table("sensor-1.db")
        globs = ("a/sensor-*.db", "b/sensor-*.db")
        for folder, count in (("a", 3), ("b", 5)):
            os.makedirs(self.path(folder))
            self.readings_db(count, name=f"{folder}/sensor-1.db")
        self.many({}, globs=globs)
        real = {f: os.path.realpath(self.path(f"{f}/sensor-1.db")) for f in "ab"}
        self.assertEqual(sorted((r["source_file"], r["source_path"], r["rows"])
                                for r in self.warehouse.rows(NODES_TABLE)),
                         [("sensor-1.db", real["a"], 3), ("sensor-1.db", real["b"], 5)])
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(1))
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["source_path"], x["rows"], x["cursor"]) for x in json.loads(out)],
                         [(real["a"], 3, [3]), (real["b"], 5, [5])])
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status"],
                                  self.node_env(1))
        self.assertIn(" a/sensor-1.db:readings ", out)
        self.assertIn(" b/sensor-1.db:readings ", out)
        os.remove(self.path("a/sensor-1.db"))
        for _ in range(2):
            self.many({}, flags=("--forget-after", "0"), globs=globs)
        self.assertEqual(len(read_state(self.path("state-1"))["destinations"]), 1)
        self.assertEqual(len(self.statements("DELETE")), 1)
        self.assertEqual([(r["source_path"], r["rows"]) for r in
                          self.warehouse.rows(NODES_TABLE)], [(real["b"], 5)])

    def test_a_forgotten_files_row_goes_from_a_status_table_without_source_path(self):
        """A file forgotten before any report of this version added source_path: the
        DELETE goes without it (not a warning and a row left behind)."""
        self.older_status_table("sensor-1.db", "sensor-2.db")
        sink = up.DatabricksSink(up.check_target(up.load_config(
            up.build_parser().parse_args([]), self.env(SOURCE_ID="node-1"))), up.Identity(
            "node-1", "readings", "", "sensor-1.db",
            up.source_scope(self.path("sensor-1.db"), "readings")))
        self.addCleanup(sink.close)
        with self.assertNoLogs("uploader", "WARNING"):
            sink.retire_status("raw_readings")
        self.assertEqual([r["source_file"] for r in self.warehouse.rows(NODES_TABLE)],
                         ["sensor-2.db"])

    def test_two_files_feeding_one_table_each_have_their_line(self):
        self.many({"sensor-1.db": 13, "sensor-2.db": 7})
        self.assertEqual(len(self.warehouse.rows(NODES_TABLE)), 2)  # not one overwritten
        rows = {(r["source_id"], r["source_file"], r["source_table"]): r
                for r in self.warehouse.rows(NODES_TABLE)}
        self.assertEqual(sorted(rows), [("node-1", "sensor-1.db", "readings"),
                                        ("node-1", "sensor-2.db", "readings")])
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(1))
        self.assertEqual(code, 0, err)
        lines = [(x["node"], x["source_file"], x["source_table"], x["rows"], x["cursor"],
                  x["pending_rows"], x["silent"]) for x in json.loads(out)]
        self.assertEqual(lines, [("node-1", "sensor-1.db", "readings", 13, [13], 0, False),
                                 ("node-1", "sensor-2.db", "readings", 7, [7], 0, False)])
        self.many({"sensor-2.db": 2})
        # file 1 stopped reporting two hours ago with rows pending: its line alone is
        # SILENT; with nothing pending (a rotated file, forgotten) it is done
        self.warehouse.query(
            f'UPDATE "{NODES_TABLE}" SET reported_at = reported_at - INTERVAL 2 HOUR, '
            "pending_rows = 5 WHERE source_file = 'sensor-1.db'")
        config = up.load_config(up.build_parser().parse_args(
            ["--databricks-table", "raw_readings"]), self.node_env(1))
        lines = {x["source_file"]: x for x in up.fleet_status(config)}
        self.assertEqual([(x["silent"], x["done"]) for x in lines.values()],
                         [(True, False), (False, False)])
        self.assertEqual(lines["sensor-2.db"]["cursor"], [9])
        first, second = up.format_fleet(list(lines.values())).splitlines()[2:]
        self.assertIn("sensor-1.db:readings", first)
        self.assertIn("SILENT", first)
        self.assertTrue(second.rstrip().endswith(" ok"), second)
        self.warehouse.query(f'UPDATE "{NODES_TABLE}" SET pending_rows = 0 '
                             "WHERE source_file = 'sensor-1.db'")
        lines = up.fleet_status(config)
        self.assertEqual([(x["silent"], x["done"]) for x in lines], [(False, True),
                                                                     (False, False)])
        text = up.format_fleet(lines).splitlines()
        self.assertEqual(len(text), 4, text)  # header, rule, sensor-2.db, the done count
        self.assertIn("sensor-2.db:readings", text[2])
        self.assertTrue(text[3].startswith("1 source file done"), text[3])
        # the whole node silent: its newest line says so
        later = dt.datetime.now(UTC) + dt.timedelta(hours=3)
        self.assertEqual([(x["silent"], x["done"]) for x in up.fleet_status(config, later)],
                         [(False, True), (True, False)])

    def test_each_source_reports_an_unchanged_status_once_an_hour(self):
        """Among many sources each has its own row and heartbeat: an idle source of a
        busy node costs no MERGE per cycle."""
        config = up.check_target(up.load_config(up.build_parser().parse_args([]), self.env()))
        sinks = [up.DatabricksSink(config, up.Identity("node-1", "readings", "s", name, "x"))
                 for name in ("sensor-1.db", "sensor-2.db")]
        for sink in sinks:
            self.addCleanup(sink.close)
            sink.clock = lambda: 1000.0
        status = {"source_id": "node-1", "table": "raw_readings", "rows": 5, "pending": 0}
        for rows in (5, 6, 7):  # file 2 idle, file 1 busy
            sinks[0].report_status({**status, "rows": rows})
            sinks[1].report_status(dict(status))
        self.assertEqual(len(self.statements("MERGE")), 4)
        self.assertEqual(sorted((r["source_file"], r["rows"])
                                for r in self.warehouse.rows(NODES_TABLE)),
                         [("sensor-1.db", 7), ("sensor-2.db", 5)])

    def test_a_status_table_of_an_older_version_is_read_and_gains_its_columns(self):
        conn = fake_warehouse.connect(server_hostname=HOST, http_path=HTTP_PATH,
                                      access_token=TOKEN)
        cursor = conn.cursor()
        old = [(n, k) for n, k in up.STATUS_COLUMNS if n not in ("source_file", "source_table")]
        cursor.execute(up.status_table_sql(NODES_TABLE_SQL, old))
        for node in ("node-1", "node-9"):
            cursor.execute(f"INSERT INTO {NODES_TABLE_SQL} (`source_id`, `target_table`, "
                           "`rows`, `cursor`, `pending_rows`, `reported_at`) VALUES "
                           f"('{node}', 'raw_readings', 3, '[3]', 0, current_timestamp())")
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(1))
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["node"], x["source_file"], x["cursor"]) for x in json.loads(out)],
                         [("node-1", None, [3]), ("node-9", None, [3])])
        db = self.readings_db(5, name="node-1.db")
        self.assertUploaded(self.upload(db, env=self.node_env(1)))
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(1))
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["node"], x["source_file"], x["source_table"], x["cursor"])
                          for x in json.loads(out)],
                         [("node-1", "node-1.db", "readings", [5]), ("node-9", None, None, [3])])
        self.assertEqual(len([r for r in self.warehouse.rows(NODES_TABLE)
                              if r["source_id"] == "node-1"]), 1)

    def reporter(self, node):
        sink = up.DatabricksSink(up.check_target(up.load_config(
            up.build_parser().parse_args([]), self.env())), up.Identity(node, "t", "s"))
        self.addCleanup(sink.close)
        return sink

    def report_stale(self, sink, rows, behind=1):
        """Report as if another commit landed after this MERGE arrived: its snapshot is
        `behind` commits old (once; a retry arrives afresh)."""
        real, stale = self.warehouse.version, [True]

        def version(table):
            now = real(table)
            if stale and table == NODES_TABLE and now is not None:
                stale.pop()
                return now - behind
            return now

        with mock.patch.object(self.warehouse, "version", version):
            sink.report_status({"source_id": sink.identity.source_id, "table": "raw_readings",
                                "rows": rows})

    def conflicts(self):
        return [s["outcome"] for s in self.warehouse.statements()
                if s["outcome"].startswith("conflict")]

    def test_nodes_upserting_at_once_conflict_only_on_their_own_row(self):
        """The status table has deletion vectors (row-level concurrency): a MERGE that
        meets another node's MERGE goes through; one that meets a change of its own row
        conflicts, and is sent again after a pause."""
        self.warehouse.conflicts = True
        one, two = self.reporter("node-1"), self.reporter("node-2")
        one.report_status({"source_id": "node-1", "table": "raw_readings", "rows": 1})
        two.report_status({"source_id": "node-2", "table": "raw_readings", "rows": 2})
        self.assertEqual(self.warehouse.properties(NODES_TABLE),
                         {"delta.enableDeletionVectors": "true"})
        self.report_stale(one, 3)  # met node-2's MERGE
        self.assertEqual((self.conflicts(), self.sleeps), ([], []))
        self.report_stale(one, 4)  # met its own
        self.assertEqual(self.conflicts(), ["conflict: DELTA_CONCURRENT_DELETE_READ"])
        self.assertEqual(self.sleeps, [1.5])
        self.assertEqual({k: v["rows"] for k, v in self.status().items()},
                         {"node-1": 4, "node-2": 2})

    def test_without_deletion_vectors_any_concurrent_merge_conflicts(self):
        """A status table made by hand without deletion vectors: every concurrent commit
        fails a MERGE (DELTA_CONCURRENT_APPEND); the retries absorb it."""
        self.warehouse.conflicts = True
        conn = fake_warehouse.connect(server_hostname=HOST, http_path=HTTP_PATH,
                                      access_token=TOKEN)
        conn.cursor().execute(up.status_table_sql("`main`.`sensors`.`_uploader_nodes`")
                              .split(" TBLPROPERTIES")[0])
        one, two = self.reporter("node-1"), self.reporter("node-2")
        one.report_status({"source_id": "node-1", "table": "raw_readings", "rows": 1})
        two.report_status({"source_id": "node-2", "table": "raw_readings", "rows": 2})
        self.report_stale(one, 3)
        self.assertEqual(self.conflicts(), ["conflict: DELTA_CONCURRENT_APPEND"])
        self.assertEqual({k: v["rows"] for k, v in self.status().items()},
                         {"node-1": 3, "node-2": 2})

    def test_a_late_copy_of_an_older_report_leaves_the_newer(self):
        """The MERGE is idempotent (sent twice: one row), and one queued while its node
        died and run after the node's next report changes nothing."""
        db = self.readings_db(20)
        self.warehouse.plan("resend", "MERGE INTO")
        self.assertUploaded(self.upload(db))
        self.assertEqual(len(self.statements("MERGE")), 2)
        self.assertEqual(len(self.warehouse.rows(NODES_TABLE)), 1)
        self.add_readings(db, 20, 5)
        self.warehouse.plan("queue_crash", "MERGE INTO")
        with self.assertRaises(fake_warehouse.Crash):
            self.upload(db)
        self.add_readings(db, 25, 5)
        self.assertUploaded(self.upload(db))
        self.warehouse.run_held()
        row = self.status()["node-1"]
        self.assertEqual((row["rows"], row["cursor"]), (30, "[30]"))


# === 6. Errors =======================================================================

class ErrorTests(WarehouseTestCase):
    """Transient failures retried with backoff; permanent ones fail the cycle at once."""

    def test_transient_failures_are_retried_with_backoff(self):
        db = self.readings_db(20)
        for _ in range(3):
            self.warehouse.plan("unavailable", "INSERT INTO")
        code, _, err = self.upload(db)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.sleeps, [2, 4, 8])
        self.assertEqual(err.count("retry"), 3)
        self.assertRowsOnce(range(1, 21))

    def test_backoff_is_capped(self):
        sink = up.DatabricksSink(up.Config(databricks_host=HOST), up.Identity("n", "t", "s"))
        sink.RETRIES = 10
        failures = iter([up.SinkError("503", transient=True)] * 9)

        def action():
            error = next(failures, None)
            if error:
                raise error
            return "done"

        with contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(sink.retrying("writing", action), "done")
        self.assertEqual(self.sleeps, [2, 4, 8, 16, 32, 60, 60, 60, 60])

    def test_cursor_never_advances_until_the_write_succeeds(self):
        db = self.readings_db(120)
        for _ in range(up.DatabricksSink.RETRIES):
            self.warehouse.plan("unavailable", "-2' OR `_batch_id` LIKE")
        code, _, err = self.upload(db, "--batch-size", "50")
        self.assertEqual(code, 1, err)
        self.assertIn("Service Unavailable", self.error_line(err))
        self.assertEqual(len(self.sleeps), up.DatabricksSink.RETRIES - 1)
        self.assertEqual(self.position()["cursor"], [50])
        self.assertEqual(len(self.rows()), 50)
        self.assertUploaded(self.upload(db, "--batch-size", "50"))
        self.assertRowsOnce(range(1, 121))

    def test_permanent_errors_fail_at_once_with_message_and_hint(self):
        cases = [
            ("forbidden", "INSUFFICIENT_PERMISSIONS", "lacks a privilege"),
            ("unauthorized", "401", "check DATABRICKS_TOKEN"),
            ("bad token", "Invalid access token", "check DATABRICKS_TOKEN"),
            ("missing schema", "SCHEMA_NOT_FOUND",
             "CREATE SCHEMA IF NOT EXISTS `main`.`sensors`"),
        ]
        for case, message, hint in cases:
            with self.subTest(case=case):
                self.fresh()
                db = self.readings_db(20)
                if case in ("forbidden", "unauthorized"):
                    self.warehouse.plan(case, "INSERT INTO")
                elif case == "bad token":
                    self.warehouse.valid_tokens = {"another-token"}
                else:
                    self.warehouse.schemas = {"main.default"}
                code, out, err = self.upload(db)
                self.assertEqual(code, 1, err)
                line = self.error_line(err)
                self.assertIn(message, line)
                self.assertIn(hint, line)
                self.assertEqual(self.sleeps, [], "a permanent error was retried")
                if case in ("forbidden", "unauthorized"):
                    self.assertEqual(self.rows(), [])
                self.assertNotIn(TOKEN, out + err)
                if os.path.exists(self.path("state", up.STATE_FILE)):
                    self.assertIsNone(self.position()["cursor"])

    def test_token_never_printed(self):
        db = self.readings_db(5)
        outputs = []
        for argv in (["--print-config"], ["--print-config", "--json"],
                     ["--sqlite", db, "--once", "--log-level", "DEBUG"],
                     ["--sqlite", db, "--once", "--log-format", "json"],
                     ["--run-query", "SELECT 1 AS one"], ["--test-upload"]):
            code, out, err = run_main(argv, self.env())
            self.assertEqual(code, 0, err)
            outputs.append(out + err)
        # a failure whose message carries the token, with the debug traceback
        self.add_readings(db, 5, 5)
        self.warehouse.plan("forbidden", "INSERT")
        code, out, err = run_main(["--sqlite", db, "--once", "--log-level", "DEBUG"],
                                  self.env())
        outputs.append(out + err)
        for text in outputs:
            self.assertNotIn(TOKEN, text)
        self.assertIn("(set, redacted)", outputs[0])

    def test_error_classification(self):
        config = up.Config(databricks_host=HOST, databricks_token=TOKEN,
                           databricks_database="main.sensors")
        Request, Server = fake_warehouse.RequestError, fake_warehouse.ServerOperationError
        cases = [
            (Request("Service Unavailable", {"http-code": 503}), True, ""),
            (Request("Too Many Requests", {"http-code": 429}), True, ""),
            (Request("HTTPSConnectionPool: Read timed out.", {"http-code": None}), True, ""),
            (ConnectionResetError(104, "Connection reset by peer"), True, ""),
            (Server("[DELTA_CONCURRENT_APPEND] ConcurrentAppendException"), True, ""),
            (Request(f"Invalid access token {TOKEN}", {"http-code": 401}), False,
             "check DATABRICKS_TOKEN"),
            (Request("Forbidden", {"http-code": 403}), False, "lacks a privilege"),
            (Server("[INSUFFICIENT_PERMISSIONS] User does not have MODIFY"), False,
             "lacks a privilege"),
            (Server("[TABLE_OR_VIEW_NOT_FOUND] `main`.`sensors`.`t`"), False, ""),
            (Server("[SCHEMA_NOT_FOUND] `main`.`sensors`"), False,
             "CREATE SCHEMA IF NOT EXISTS `main`.`sensors`"),
            (Server("[PARSE_SYNTAX_ERROR] Syntax error at or near 'x'"), False, ""),
        ]
        for exc, transient, hint in cases:
            with self.subTest(exc=str(exc)):
                error = up.databricks_error("writing batch b-1", exc, config)
                self.assertIsInstance(error, up.SinkError)
                self.assertEqual(error.transient, transient)
                self.assertTrue(str(error).startswith("sink: writing batch b-1 failed: "))
                self.assertIn(hint, str(error))
                self.assertNotIn(TOKEN, str(error))


# === 7. Operator actions =============================================================

class SourceChangeTests(WarehouseTestCase):
    """The source changes under the uploader (issue 11): on the warehouse too, a column
    added while it runs lands from the next batch, and rows imported behind the cursor
    are counted, then uploaded once by --backfill, kills included."""

    def test_a_column_added_between_two_cycles_of_one_run_lands(self):
        db = self.readings_db(20)
        args = up.build_parser().parse_args(["--sqlite", db, "--once"])
        config = up.check_target(up.load_config(args, self.env()))
        job = up.open_job(config, False, up.StopFlag())
        self.addCleanup(up.close_job, job)
        up.run_cycle(job)
        conn = sqlite3.connect(db)
        conn.execute("ALTER TABLE readings ADD COLUMN unit TEXT")
        conn.execute("INSERT INTO readings (timestamp, sensor, value, unit) VALUES "
                     "('2025-01-02T00:00:00Z', 's-1', 1.0, 'C')")
        conn.commit()
        conn.close()
        up.run_cycle(job)  # the same job: no restart
        rows = self.rows()
        self.assertEqual([r["unit"] for r in rows], [None] * 20 + ["C"])
        self.assertRowsOnce(range(1, 22))

    def import_behind(self, db, ids):
        conn = sqlite3.connect(db)
        conn.executemany("INSERT INTO readings (id, timestamp, sensor, value) VALUES "
                         "(?, '2024-06-01T00:00:00Z', 's-old', ?)", [(i, -i) for i in ids])
        conn.commit()
        conn.close()

    def test_backfill_with_a_crash_after_a_write_sends_each_row_once(self):
        db = make_db(self.path("sensors.db"), "CREATE TABLE readings (id INTEGER PRIMARY "
                     "KEY, timestamp TEXT, sensor TEXT, value REAL)",
                     [(i, "2025-01-01T00:00:00Z", "s", float(i)) for i in range(100, 150)])
        self.assertUploaded(self.upload(db, "--cursor", "rowid"))
        self.import_behind(db, range(1, 31))
        code, _, err = self.upload(db, "--cursor", "rowid")
        self.assertEqual(code, 0, err)
        self.assertIn("30 rows are behind the cursor", err)
        self.warehouse.plan("crash_after", "-backfill-2' OR `_batch_id` LIKE")
        with self.assertRaises(fake_warehouse.Crash):
            self.upload(db, "--cursor", "rowid", "--backfill", "--batch-size", "10")
        self.assertUploaded(self.upload(db, "--cursor", "rowid", "--backfill",
                                        "--batch-size", "10"))
        self.assertRowsOnce(list(range(1, 31)) + list(range(100, 150)))
        code, _, err = self.upload(db, "--cursor", "rowid")
        self.assertNotIn("behind the cursor", err)


class ActionTests(WarehouseTestCase):
    """--run-query INFO / SQL and --test-upload against the warehouse."""

    def test_run_query_info(self):
        db = self.readings_db(42)
        self.assertUploaded(self.upload(db))
        code, out, err = run_main(["--sqlite", db, "--run-query", "INFO"], self.env())
        self.assertEqual(code, 0, err)
        for word in ("raw_readings", "sensor", "double", "_batch_id", "row_count", "42"):
            self.assertIn(word, out)
        show, describe, count = self.statements()[-3:]
        self.assertEqual(show, "SHOW TABLES IN `main`.`sensors`")
        self.assertEqual(describe, "DESCRIBE TABLE `main`.`sensors`.`raw_readings`")
        self.assertTrue(count.startswith("SELECT count(*)"), count)

    def test_run_query_sql(self):
        self.assertUploaded(self.upload(self.readings_db(14)))
        code, out, err = run_main(
            ["--run-query", ("SELECT sensor, count(*) AS n FROM main.sensors.raw_readings "
                             "WHERE sensor IN ('s-0', 's-1') GROUP BY sensor ORDER BY sensor")],
            self.env())
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split() for line in out.splitlines()],
                         [["sensor", "n"], ["------", "-"], ["s-0", "2"], ["s-1", "2"]])

    def test_run_query_error(self):
        code, _, err = run_main(["--run-query", "SELEC 1"], self.env())
        self.assertEqual(code, 1)
        self.assertIn("PARSE_SYNTAX_ERROR", self.error_line(err))

    def test_test_upload_reports_each_step(self):
        code, out, err = run_main(["--test-upload"], self.env())
        self.assertEqual(code, 0, err)
        steps = [line for line in out.splitlines() if line.startswith("test-upload:")]
        self.assertEqual(len(steps), 5, out)
        self.assertTrue(all(line.endswith(" ok") for line in steps), out)
        for word, line in zip(("connect", "create", "insert", "read it back", "drop"), steps):
            self.assertIn(word, line)
        self.assertEqual(self.warehouse.query(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE "
            "'main.sensors.%'")[0][0], 0, "the scratch table is left behind")

    def test_test_upload_failure_stops_at_the_failed_step(self):
        self.warehouse.plan("forbidden", "CREATE TABLE")
        code, out, err = run_main(["--test-upload"], self.env())
        self.assertEqual(code, 1, err)
        steps = [line for line in out.splitlines() if line.startswith("test-upload:")]
        self.assertEqual(len(steps), 2, out)
        self.assertIn("FAILED", steps[1])
        self.assertIn("INSUFFICIENT_PERMISSIONS", steps[1])


# === 8. SQL that parses and values that land =========================================

TS = utc(2025, 1, 2, 3, 4, 5)
STRINGS = ["plain", "", "it's", "''", "back\\slash", "\\'", "ends with \\", "${x}",
           "${env:HOME}", "$${y}", "price $5", "${spark.app.name}", "é ü 中文 😀",
           "tab\there", "line\nbreak\r\n", "nul\x00byte", "ctl\x01\x1f\x7f", "\\u0041",
           "'; DROP TABLE x; --", "`backtick`", '"double"', "-- comment", "/* c */"]
REALS = [0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, 0.1, 123456789.123456789, float("nan"),
         float("inf"), float("-inf")]
INTS = [0, 1, -1, 2**63 - 1, -2**63, 2**31, 1234567890123]
BLOBS = [b"", b"\x00", b"\x00\xff'\"\\", bytes(range(256)), "é".encode()]
TIMESTAMPS = [  # (SQLite value, UTC instant)
    ("2025-01-02T03:04:05Z", TS), ("2025-01-02 03:04:05", TS),
    ("2025-01-02T05:04:05+02:00", TS), ("2025-01-01T22:04:05-05:00", TS),
    ("2025-01-02T03:04:05.123456Z", TS.replace(microsecond=123456)),
    ("2025-01-02 03:04:05.5", TS.replace(microsecond=500000)),
    (1735787045, TS), (1735787045123, TS.replace(microsecond=123000)),
    (1735787045.25, TS.replace(microsecond=250000)), ("1735787045", TS),
    ("1970-01-01T00:00:00Z", utc(1970, 1, 1)), ("1969-12-31T23:59:59Z", utc(1969, 12, 31, 23,
                                                                             59, 59)),
    ("9999-12-31T23:59:59Z", utc(9999, 12, 31, 23, 59, 59)),
]


def typed_rows():
    """Rows for the `typed` table, cycling through the values of every column."""
    count = max(len(STRINGS), len(REALS), len(INTS), len(BLOBS), len(TIMESTAMPS)) + 2
    def pick(values, i):
        """The i-th value, cycling, with a NULL after the last one."""
        i %= len(values) + 1
        return values[i] if i < len(values) else None

    rows = []
    for i in range(count):
        stamp = pick(TIMESTAMPS, i)
        rows.append((pick(STRINGS, i), pick(REALS, i), pick(INTS, i), pick(BLOBS, i),
                     None if i % 5 == 4 else i % 2, stamp and stamp[0], pick(STRINGS, i + 3)))
    return rows, count


TYPED_SCHEMA = ("CREATE TABLE typed (id INTEGER PRIMARY KEY AUTOINCREMENT, s TEXT, r REAL, "
                "i INTEGER, b BLOB, flag BOOLEAN, at DATETIME, u)")
TYPED_COLUMNS = ["s", "r", "i", "b", "flag", "at", "u"]


class ValueTests(WarehouseTestCase):
    """Values read back from the warehouse equal the SQLite source, typed."""

    def assertSameValue(self, got, want, where):
        if isinstance(want, float):
            self.assertIsInstance(got, float, where)
            if math.isnan(want):
                self.assertTrue(math.isnan(got), where)
            else:
                self.assertEqual(got, want, where)
                self.assertEqual(math.copysign(1, got), math.copysign(1, want), where)
        else:
            self.assertEqual(got, want, where)
            self.assertEqual(type(got), type(want), where)

    def check_typed_round_trip(self, env, repeat=1, *flags):
        rows, count = typed_rows()
        rows, count = rows * repeat, count * repeat
        db = make_db(self.path("typed.db"), TYPED_SCHEMA, rows, columns=TYPED_COLUMNS)
        self.assertUploaded(self.upload(db, *flags, env=env))
        self.assertEqual({s["outcome"] for s in self.warehouse.statements()}, {"ok"})
        target = "main.sensors.raw_typed"
        self.assertEqual(self.warehouse.columns(target), {
            "id": "bigint", "s": "string", "r": "double", "i": "bigint", "b": "binary",
            "flag": "boolean", "at": "timestamp", "u": "string", "_source_id": "string",
            "_batch_id": "string", "_uploaded_at": "timestamp", "_rescued_data": "string",
            "_source_file": "string"})
        got = self.rows(target)
        self.assertEqual(len(got), count)
        # the source as SQLite returns it (type affinity has had its say: NaN is NULL,
        # '1735787045' in a DATETIME column is an integer)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            source_rows = conn.execute(f"SELECT {', '.join(TYPED_COLUMNS)} FROM typed "
                                       "ORDER BY id").fetchall()
        stamps = dict(TIMESTAMPS)
        for n, (row, source) in enumerate(zip(got, source_rows), start=1):
            self.assertEqual(row["id"], n)
            s, r, i, b, flag, at, u = source
            want = {"s": s, "r": r, "i": i, "b": b, "u": u,
                    "flag": None if flag is None else bool(flag),
                    "at": None if at is None else stamps[at]}
            for column, value in want.items():
                self.assertSameValue(row[column], value, f"row {n} column {column}")

    def test_inline_statements_land_the_source_values(self):
        self.check_typed_round_trip(self.env(), 3, "--max-statement-bytes", "10000",
                                    "--batch-size", "40")
        self.assertGreater(len(self.statements("INSERT")), 1)

    def test_staged_parquet_lands_the_source_values(self):
        self.check_typed_round_trip(self.env(DATABRICKS_VOLUME="/Volumes/main/sensors/v"), 100,
                                    "--max-statement-bytes", "10000")
        self.assertTrue(self.statements("COPY INTO"))
        self.assertFalse(self.statements("INSERT"))

    def test_misfits_are_rescued_not_dropped(self):
        db = make_db(self.path("misfit.db"), "CREATE TABLE m (id INTEGER PRIMARY KEY "
                     "AUTOINCREMENT, n INTEGER, at TIMESTAMP, flag BOOLEAN)",
                     [("12abc", "not a time", 2), (7, "2025-01-02T03:04:05Z", 1)],
                     columns=["n", "at", "flag"])
        self.assertUploaded(self.upload(db))
        first, second = self.rows("main.sensors.raw_m")
        self.assertEqual((first["n"], first["at"], first["flag"]), (None, None, None))
        self.assertEqual(json.loads(first["_rescued_data"]),
                         {"n": "12abc", "at": "not a time", "flag": 2})
        self.assertEqual((second["n"], second["at"], second["flag"]), (7, TS, True))
        self.assertIsNone(second["_rescued_data"])

    def test_timestamps_before_year_1000(self):
        """Spark reads a TIMESTAMP literal's year only with 4 to 6 digits: '0999', not '999'."""
        db = make_db(self.path("old.db"), "CREATE TABLE old (id INTEGER PRIMARY KEY "
                     "AUTOINCREMENT, at DATETIME)", [("0999-06-01T00:00:00Z",),
                                                      ("0001-01-01T00:00:00Z",)],
                     columns=["at"])
        self.assertUploaded(self.upload(db))
        self.assertEqual([r["at"] for r in self.rows("main.sensors.raw_old")],
                         [utc(999, 6, 1), utc(1, 1, 1)])


class RendererTests(WarehouseTestCase):
    """sql_string, sql_literal, quote_name and the statement builders, through sqlglot."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.duckdb = fake_warehouse.duckdb.connect()  # opening one costs ~20 ms of CPU
        cls.addClassCleanup(cls.duckdb.close)

    def select(self, literal):
        """The value of `SELECT <literal>` parsed as Databricks SQL and run on DuckDB."""
        tree = parse(f"SELECT {literal}")
        with contextlib.closing(self.duckdb.cursor()) as db:
            return db.execute(tree.sql("duckdb")).fetchone()[0]

    def test_sql_string_round_trips(self):
        for text in STRINGS + ["'" * 5, "\\" * 5, "${" * 3, "}${a}{"]:
            with self.subTest(text=text):
                literal = up.sql_string(text)
                self.assertNotIn("${", literal, "Spark would substitute it")
                self.assertIsNone(re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", literal))
                self.assertEqual(parse(f"SELECT {literal}").expressions[0].name, text)
                self.assertEqual(self.select(literal), text)

    def test_sql_literal_round_trips(self):
        cases = [(up.STRING, s) for s in STRINGS] + [(up.DOUBLE, r) for r in REALS]
        cases += [(up.BIGINT, i) for i in INTS] + [(up.BINARY, b) for b in BLOBS]
        cases += [(up.BOOLEAN, True), (up.BOOLEAN, False)]
        for kind, value in cases:
            with self.subTest(kind=kind, value=value):
                literal = up.sql_literal(value, kind)
                if kind == up.DOUBLE:  # as the insert into a DOUBLE column reads it
                    literal = f"CAST({literal} AS DOUBLE)"
                got = self.select(literal)
                if kind == up.DOUBLE and math.isnan(value):
                    self.assertTrue(math.isnan(got))
                elif kind == up.DOUBLE:
                    self.assertEqual((got, math.copysign(1, got)),
                                     (value, math.copysign(1, value)))
                else:
                    self.assertEqual(got, value)
        for micros, want in [(0, utc(1970, 1, 1)), (-1, utc(1969, 12, 31, 23, 59, 59, 999999)),
                             (1735787045123456, TS.replace(microsecond=123456))]:
            literal = up.sql_literal(micros, up.TIMESTAMP)
            self.assertTrue(literal.startswith("TIMESTAMP'"), literal)
            self.assertEqual(self.select(literal), want)
        for kind in (up.STRING, up.DOUBLE, up.BIGINT, up.BINARY, up.BOOLEAN, up.TIMESTAMP):
            self.assertIsNone(self.select(up.sql_literal(None, kind)))

    def test_names_are_quoted_part_by_part(self):
        for name in ["plain", "a`b", "``", "it's", 'say "hi"', "; DROP TABLE x; --", "é ü",
                     "a.b", "`; DROP TABLE x; --`"]:
            with self.subTest(name=name):
                tree = parse(f"SELECT {up.quote_name(name)} FROM "
                             f"{up.qualified_name('main.sensors', name)}")
                self.assertIsInstance(tree, exp.Select)
                self.assertEqual(tree.expressions[0].name, name)
                table = tree.find(exp.Table)
                self.assertEqual((table.catalog, table.db, table.name),
                                 ("main", "sensors", name))

    def test_statement_builders_parse(self):
        target = up.qualified_name("main.sensors", "r`';--")
        names = ["a`b", "it's", "é"]
        kinds = [up.STRING, up.DOUBLE, up.TIMESTAMP]
        create = parse(up.create_table_sql(target, names, kinds))
        self.assertIsInstance(create, exp.Create)
        self.assertEqual([c.name for c in create.this.expressions],
                         names + list(up.LINEAGE_COLUMNS))
        alter = parse(up.add_columns_sql(target, [("n`ew", up.BIGINT)]))
        self.assertIsInstance(alter, exp.Alter)
        copy = parse(up.copy_into_sql(target, "/Volumes/m/s/v/node-1/r`';--", "it's.parquet"))
        self.assertIsInstance(copy, exp.Copy)
        self.assertEqual(copy.args["files"][0].name, "/Volumes/m/s/v/node-1/r`';--")

    def test_render_insert_replaces_its_own_batch(self):
        batch = up.Chunk(["a`b", "v"], [["x'1", None], [1.5, float("nan")]], 2, [2],
                         kinds=[up.STRING, up.DOUBLE], batch_id="state-7")
        sql = up.render_insert(up.qualified_name("main.sensors", "t"), batch,
                               up.Identity("node'1", "t", "state"))
        tree = parse(sql)
        self.assertIsInstance(tree, exp.Insert)
        where = tree.args["where"]
        self.assertEqual({c.name for c in where.find_all(exp.Column)},
                         {"_source_id", "_batch_id"})
        self.assertEqual({lit.name for lit in where.find_all(exp.Literal)},
                         {"node'1", "state-7", "state-7.%"})
        self.assertEqual(len(tree.find(exp.Values).expressions), 2)
        self.assertFalse(tree.args.get("by_name"), "Spark 4.0 refuses BY NAME REPLACE WHERE")
        self.assertEqual([e.sql("databricks") for e in tree.expression.expressions],
                         ["`a``b`", "`v`", "'node\\'1'", "'state-7'",
                          tree.expression.expressions[4].sql("databricks"), "NULL", "NULL"])

    def test_select_list_follows_the_table_columns(self):
        """Positional: the table's order, NULL for columns the batch lacks, the lineage
        tags where the table has them, whatever the case of the names."""
        batch = up.Chunk(["v", "a"], [[1.5], ["x"]], 1, [1], kinds=[up.DOUBLE, up.STRING],
                         batch_id="state-1")
        columns = ["_SOURCE_ID", "A", "extra", "_batch_id", "V", "_uploaded_at",
                   "_rescued_data"]
        sql = up.render_insert("`m`.`s`.`t`", batch, up.Identity("n", "t", "s"), columns)
        select = parse(sql).expression.expressions
        self.assertEqual([e.sql("databricks") for e in select[:5]],
                         ["'n'", "`a`", "NULL", "'state-1'", "`v`"])
        self.assertIsInstance(select[5], exp.Cast)  # TIMESTAMP'...'
        self.assertEqual(select[6].sql("databricks"), "NULL")

    def test_the_warehouse_refuses_what_spark_4_0_cannot_parse(self):
        """The fake refuses BY NAME or a column list with REPLACE WHERE, and a select
        list that does not give every column, as Spark 4.0 and Databricks do."""
        self.assertUploaded(self.upload(self.readings_db(2)))
        conn = fake_warehouse.connect(server_hostname=HOST, http_path=HTTP_PATH,
                                      access_token=TOKEN)
        where = "REPLACE WHERE `_source_id` = 'x' AND `_batch_id` = 'y'"
        values = "FROM VALUES (9, 'x', 'y') AS v(id, _source_id, _batch_id)"
        target = up.qualified_name("main.sensors", "raw_readings")
        for sql, error in [
                (f"INSERT INTO {target} BY NAME {where} SELECT * {values}",
                 "PARSE_SYNTAX_ERROR"),
                (f"INSERT INTO {target} (id, _source_id, _batch_id) {where} SELECT * {values}",
                 "PARSE_SYNTAX_ERROR"),
                (f"INSERT INTO {target} {where} SELECT * {values}",
                 "INSERT_COLUMN_ARITY_MISMATCH.NOT_ENOUGH_DATA_COLUMNS")]:
            with self.subTest(sql=sql[:60]):
                with self.assertRaisesRegex(fake_warehouse.ServerOperationError, error):
                    conn.cursor().execute(sql)
        self.assertEqual(len(self.rows()), 2)
