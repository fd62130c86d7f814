"""The warehouse sink with the REAL databricks-sql-connector, on the wire (DESIGN 9).

tests/thrift_warehouse.py answers the connector's Thrift-over-HTTP calls on 127.0.0.1
and runs the statements on the engine of tests/fake_warehouse.py, so these tests go
through the connector's own HTTP layer, retry policy and error types: a warehouse that
is starting (503 + Retry-After), a reply dropped after the commit, Delta conflicts, a
refused token. Skipped when the connector cannot be imported.
"""

import base64
import datetime as dt
import json
import logging
import os
import sqlite3
import time
import unittest

from .helpers import TempDirTestCase, insert_rows, make_db, run_main, slow, up

try:
    from databricks.sql import exc as dbexc
    from databricks import sql as dbsql
    import urllib3

    from . import thrift_warehouse
except ImportError as missing:  # pragma: no cover - the README's test command installs it
    thrift_warehouse = None
    SKIP = f"databricks-sql-connector is not importable ({missing})"
else:
    SKIP = ""

HTTP_PATH = "/sql/1.0/warehouses/0123456789abcdef"
TOKEN = "dapi0123456789abcdefWIRESECRET"
TABLE = "main.sensors.raw_readings"
SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "timestamp TEXT, sensor TEXT, value REAL)")
CONFLICTS = [
    "[DELTA_CONCURRENT_APPEND.WITH_PARTITION_HINT] Transaction conflict detected. A "
    "concurrent WRITE added data to table main.sensors.raw_readings committed at version "
    "403. SQLSTATE: 2D521",
    "[DELTA_CONCURRENT_DELETE_READ] Transaction conflict detected. SQLSTATE: 2D521",
    "[DELTA_METADATA_CHANGED] MetadataChangedException: The metadata of the Delta table "
    "has been changed by a concurrent update. Please try the operation again. "
    "SQLSTATE: 2D521",
    "[DELTA_PROTOCOL_CHANGED] ProtocolChangedException: The protocol version of the Delta "
    "table has been changed by a concurrent update. SQLSTATE: 2D521",
    "io.delta.exceptions.ConcurrentAppendException: Files were added to the root of the "
    "table by a concurrent update. Please try the operation again.",
]


def readings(count):
    return [(f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z", f"s-{i % 7}", i * 0.25)
            for i in range(count)]


class Captured(logging.Handler):
    """Messages of one logger, as a test sees them."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.messages = []
        self.logger = logging.getLogger(name)
        self.level_before = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def close(self):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


@unittest.skipIf(SKIP, SKIP)
class WireTestCase(TempDirTestCase):
    """A loopback warehouse speaking Thrift; the uploader's main() with the real connector."""

    def setUp(self):
        super().setUp()
        import signal
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.addCleanup(setattr, up.DatabricksSink, "connector", up.DatabricksSink.connector)
        up.DatabricksSink.connector = None  # the real databricks.sql
        self.server = thrift_warehouse.ThriftWarehouse(self.path("warehouse"))
        self.addCleanup(self.server.close)
        self.connector_log = Captured("databricks.sql")
        self.addCleanup(self.connector_log.close)

    def env(self, **extra):
        env = {"DATABRICKS_HOST": f"http://{self.server.host}",
               "DATABRICKS_HTTP_PATH": HTTP_PATH, "DATABRICKS_TOKEN": TOKEN,
               "DATABRICKS_DATABASE": "main.sensors", "STATE_DIR": self.path("state"),
               "SOURCE_ID": "node-1"}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def upload(self, count=200, **env):
        """One --once cycle of a source holding `count` readings."""
        db = self.path("sensors.db")
        if not os.path.exists(db):
            make_db(db, SCHEMA)
        conn = sqlite3.connect(db)
        have = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        insert_rows(conn, readings(count)[have:], ["timestamp", "sensor", "value"])
        conn.commit()
        conn.close()
        return run_main(["--sqlite", db, "--once"], self.env(**env))

    def assertLanded(self, result, count=200):
        """Exit 0, and rows 1..count once each with the source's values."""
        code, out, err = result
        self.assertEqual(code, 0, err)
        rows = self.server.engine.rows(TABLE, "id")
        self.assertEqual([r["id"] for r in rows], list(range(1, count + 1)))
        for row, (stamp, sensor, value) in zip(rows, readings(count)):
            self.assertEqual((row["sensor"], row["value"], row["_source_id"]),
                             (sensor, value, "node-1"))
            self.assertEqual(row["timestamp"],
                             dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")))
        self.assertNotIn(TOKEN, out + err)

    def error_line(self, err):
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        self.assertEqual(len(lines), 1, err)
        return lines[0]

    def connector_waits(self):
        """The connector's own sleeps before re-sending a request (its debug lines)."""
        return [m for m in self.connector_log.messages if m.startswith("Retrying after")]


class RowsTests(WireTestCase):

    def test_rows_land_once_with_their_values(self):
        self.assertLanded(self.upload())
        self.assertEqual(self.server.calls("OpenSession"), [200])
        self.assertTrue(self.server.statements("CREATE TABLE IF NOT EXISTS"))

    def test_reply_dropped_after_commit_lands_the_rows_once(self):
        """The INSERT commits, the reply is lost, the statement runs again: rows once."""
        self.server.plan("drop_reply", "INSERT INTO")
        self.assertLanded(self.upload())
        inserts = self.server.statements("INSERT INTO")
        self.assertEqual(len(inserts), 2)
        self.assertEqual(inserts[0], inserts[1])

    def test_big_batches_staged_through_the_connector_land_once(self):
        """DATABRICKS_VOLUME=auto: Parquet PUT to the presigned URL, COPY INTO, REMOVE;
        the COPY INTO's reply dropped after it loaded: the file is not loaded twice."""
        self.server.plan("drop_reply", "COPY INTO")
        self.assertLanded(self.upload(12000), 12000)
        self.assertEqual(len(self.server.statements("COPY INTO")), 2)
        self.assertIn(("PUT presigned", 201), self.server.requests)
        self.assertIn(("DELETE presigned", 204), self.server.requests)
        self.assertEqual(self.volume_files(), [])

    def volume_files(self):
        return [os.path.join(d, f) for d, _, files in os.walk(self.server.engine.volumes)
                for f in files]

    def test_a_second_cycle_adds_only_new_rows(self):
        self.assertLanded(self.upload(100), 100)
        self.assertLanded(self.upload(150), 150)


@slow
class StartingWarehouseTests(WireTestCase):
    """A warehouse that is starting answers 503 + Retry-After to new sessions."""

    def test_once_waits_for_a_starting_warehouse_without_connector_stalls(self):
        self.server.refuse(503, 3, "OpenSession", retry_after=10)
        started = time.monotonic()
        result = self.upload()
        elapsed = time.monotonic() - started
        self.assertLanded(result)
        # each 503 came back to the uploader at once (no wait of max(Retry-After, 60 s)
        # inside the connector); our jittered backoff waited and tried again
        self.assertEqual(self.server.calls("OpenSession"), [503, 503, 503, 200])
        self.assertEqual(self.connector_waits(), [], f"cycle took {elapsed:.1f} s")
        starting = [line for line in result[2].splitlines()
                    if "warehouse is starting; waited 0 s of 600" in line]
        self.assertEqual(len(starting), 1, result[2])

    def test_startup_timeout_bounds_the_wait(self):
        self.server.refuse(503, 1000, "OpenSession", retry_after=10)
        code, out, err = self.upload(STARTUP_TIMEOUT=1.5)
        self.assertEqual(code, 1, err)
        line = self.error_line(err)
        self.assertIn("not ready after", line)
        self.assertIn("startup_timeout", line)
        self.assertEqual(self.connector_waits(), [])
        self.assertNotIn(TOKEN, out + err)

    def test_429_or_503_on_a_statement_is_retried_by_us_not_the_connector(self):
        """The connector would wait max(Retry-After, 60 s) before each re-send."""
        for status in (429, 503):
            with self.subTest(status=status):
                self.setUp()
                self.server.refuse(status, 1, "ExecuteStatement", retry_after=10)
                result = self.upload()
                self.assertLanded(result)
                self.assertEqual(self.connector_waits(), [])
                self.assertIn("retry 1 in", result[2])
                self.assertIn("the warehouse is starting, busy or unreachable", result[2])


class ErrorTests(WireTestCase):

    def sink(self):
        """The warehouse sink on the loopback warehouse, its retries without waiting."""
        config = up.validate_config(up.Config(**{
            "databricks_host": self.server.host, "databricks_http_path": HTTP_PATH,
            "databricks_token": TOKEN, "databricks_database": "main.sensors"}))
        sink = up.DatabricksSink(config, up.Identity("node-1", "readings", "s"))
        self.addCleanup(sink.close)
        sink.sleep = lambda seconds: None
        return sink

    def test_a_conflict_is_retried_and_the_rows_land_once(self):
        self.server.plan("fail", "INSERT INTO", CONFLICTS[0])  # '403' in its text
        result = self.upload()
        self.assertLanded(result)
        self.assertIn("retry 1 in", result[2])
        self.assertEqual(len(self.server.statements("INSERT INTO")), 1)

    def test_every_kind_of_conflict_is_retried(self):
        sink = self.sink()
        sink.execute("CREATE TABLE `main`.`sensors`.`t` (id BIGINT) USING DELTA")
        for n, message in enumerate(CONFLICTS):
            with self.subTest(message=message[:40]):
                self.server.plan("fail", "INSERT INTO", message)
                with self.assertLogs("uploader", "WARNING") as logs:
                    sink.retrying("writing", lambda: sink.execute(
                        f"INSERT INTO `main`.`sensors`.`t` VALUES ({n})"))
                self.assertIn("retry 1 in", logs.output[0])
        self.assertEqual(self.server.engine.rows("main.sensors.t", "id"),
                         [{"id": n} for n in range(len(CONFLICTS))])

    def test_refused_token_fails_fast_with_the_hint(self):
        for case in ("invalid", "expired"):
            with self.subTest(case=case):
                self.setUp()
                if case == "invalid":
                    self.server.tokens = {"another-token"}
                else:
                    self.server.expire(TOKEN)
                code, out, err = self.upload()
                self.assertEqual(code, 1, err)
                line = self.error_line(err)
                self.assertIn("check DATABRICKS_TOKEN", line)
                self.assertIn("Invalid access token" if case == "invalid"
                              else "Token is expired", line)
                self.assertEqual(self.server.calls("OpenSession"), [401])
                self.assertNotIn("retry", err)
                self.assertNotIn(TOKEN, out + err)

    def test_a_restarted_warehouse_gets_a_new_session(self):
        """The warehouse forgot the session (auto-stop, restart): reconnect, not fail."""
        sink = self.sink()
        self.assertEqual(sink.execute("SELECT 1 AS one", fetch=True), [(1,)])
        self.server.restart()
        with self.assertLogs("uploader", "WARNING") as logs:
            self.assertEqual(sink.retrying("querying", lambda: sink.execute(
                "SELECT 2 AS two", fetch=True)), [(2,)])
        self.assertIn("Invalid SessionHandle", logs.output[0])
        self.assertEqual(self.server.calls("OpenSession"), [200, 200])

    def test_oauth_token_that_expires_is_replaced(self):
        """OAuth M2M through databricks-sdk on the wire: an opaque token refused with 401
        before its expires_in gets one new token and the cycle goes on."""
        self.server.tokens, self.server.clients = set(), {"sp-id": "sp-secret"}
        env = {"DATABRICKS_TOKEN": "", "DATABRICKS_CLIENT_ID": "sp-id",
               "DATABRICKS_CLIENT_SECRET": "sp-secret"}
        self.assertLanded(self.upload(100, **env), 100)
        self.assertEqual(len(self.server.issued), 1)
        self.server.expire(self.server.issued[0])
        result = self.upload(150, **env)
        self.assertLanded(result, 150)
        self.assertEqual(len(self.server.issued), 2)
        self.assertNotIn("sp-secret", result[1] + result[2])

    def test_missing_privilege_fails_fast_with_the_ddl(self):
        self.server.plan("fail", "CREATE TABLE", "[INSUFFICIENT_PERMISSIONS] Insufficient "
                         "privileges: User does not have CREATE TABLE on Schema "
                         "'main.sensors'. SQLSTATE: 42501")
        code, out, err = self.upload()
        self.assertEqual(code, 1, err)
        line = self.error_line(err)
        self.assertIn("lacks a privilege", line)
        self.assertIn("ask an admin to run: CREATE TABLE IF NOT EXISTS", line)
        self.assertNotIn("retry", err)


@unittest.skipIf(SKIP, SKIP)
class ClassificationTests(unittest.TestCase):
    """The failures the connector really raises, sorted by structure, not by wording."""

    CONFIG = up.Config(databricks_host="adb-1.azuredatabricks.net", databricks_token=TOKEN,
                       databricks_database="main.sensors")

    def cases(self):
        pool = urllib3.HTTPConnectionPool("adb-1.azuredatabricks.net")
        gave_up = dbexc.MaxRetryDurationError(
            "Retry request would exceed Retry policy max retry duration of 1 seconds")
        return [
            # what the connector raises when it will not wait out a 429/503: the HTTP
            # code in its context is the previous request's
            (dbexc.RequestError("Error during request to server. " + str(gave_up),
                                {"http-code": 200}, None, gave_up), up.UNAVAILABLE, ""),
            (urllib3.exceptions.MaxRetryError(pool, "/sql", urllib3.exceptions.ResponseError(
                "too many 503 error responses")), up.UNAVAILABLE, ""),
            (dbexc.RequestError("Error during request to server", {"http-code": 503}),
             up.UNAVAILABLE, ""),
            (dbexc.RequestError("Error during request to server", {"http-code": 429}),
             up.UNAVAILABLE, ""),
            (urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(
                104, "Connection reset by peer")), up.TRANSIENT, ""),
            (urllib3.exceptions.NewConnectionError(None, "Failed to establish a new "
                                                   "connection: [Errno 111] refused"),
             up.TRANSIENT, ""),
            (dbexc.RequestError("Error during request to server: batch b-403 (1403 rows)",
                                {"http-code": None}, None, EOFError()), up.TRANSIENT, ""),
            *[(dbexc.ServerOperationError(m, {}), up.TRANSIENT, "") for m in CONFLICTS],
            (dbexc.DatabaseError("Invalid SessionHandle: SessionHandle [01ef-403]"),
             up.TRANSIENT, ""),
            # a setting the SDK or urllib3 cannot use is no network trouble
            (dbexc.RequestError("Error during request to server. default auth: oauth-m2m: "
                                "Invalid URL 'None': No scheme supplied.", {"http-code": None},
                                None, ValueError("default auth: oauth-m2m: Invalid URL")),
             up.PERMANENT, ""),
            (urllib3.exceptions.LocationParseError("adb-1:port"), up.PERMANENT, ""),
            (dbexc.RequestError("Error during request to server: : Invalid access token.. ",
                                {"http-code": 401}, None, EOFError()), up.PERMANENT,
             "check DATABRICKS_TOKEN"),
            (dbexc.RequestError("Error during request to server: : PERMISSION_DENIED",
                                {"http-code": 403}, None, EOFError()), up.PERMANENT,
             "lacks a privilege"),
            (dbexc.ServerOperationError("[INSUFFICIENT_PERMISSIONS] User does not have MODIFY "
                                        "on Table. SQLSTATE: 42501", {}), up.PERMANENT,
             "lacks a privilege"),
            (dbexc.ServerOperationError("[TABLE_OR_VIEW_NOT_FOUND] The table or view "
                                        "`main`.`sensors`.`t403` cannot be found. "
                                        "SQLSTATE: 42P01", {}), up.PERMANENT, ""),
            (dbexc.ServerOperationError("[PARSE_SYNTAX_ERROR] Syntax error at or near "
                                        "'503'. SQLSTATE: 42601", {}), up.PERMANENT, ""),
            (dbexc.ServerOperationError("[SCHEMA_NOT_FOUND] The schema `main`.`sensors` "
                                        "cannot be found. SQLSTATE: 42704", {}), up.PERMANENT,
             "CREATE SCHEMA IF NOT EXISTS `main`.`sensors`"),
        ]

    def test_classification_table(self):
        for exc, kind, hint in self.cases():
            with self.subTest(exc=f"{type(exc).__name__}: {exc}"[:90]):
                self.assertEqual(up.error_kind(exc), kind)
                error = up.databricks_error("writing batch b-1", exc, self.CONFIG)
                self.assertEqual(error.transient, kind != up.PERMANENT)
                self.assertIn(hint, str(error))
                if not hint:
                    self.assertNotIn("; check", str(error))


class FakeClock:
    """A monotonic clock that only moves when the sink sleeps."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class RetryTests(unittest.TestCase):
    """retrying() with sleep, clock and jitter passed in: no real waiting."""

    def sink(self, **config):
        sink = up.DatabricksSink(up.Config(databricks_host="h", **config),
                                 up.Identity("n", "t", "s"))
        self.clock = FakeClock()
        sink.sleep, sink.clock = self.clock.sleep, lambda: self.clock.now
        sink.jitter = lambda low, high: high
        return sink

    def failing(self, errors):
        errors = iter(errors)

        def action():
            error = next(errors, None)
            if error:
                raise error
            return "done"
        return action

    def test_starting_warehouse_waited_for_with_a_line_every_30_s(self):
        sink = self.sink(startup_timeout=300)
        starting = up.UnavailableError("sink: connecting failed: 503", transient=True)
        with self.assertLogs("uploader", "WARNING") as logs:
            self.assertEqual(sink.retrying("connecting", self.failing([starting] * 12)),
                             "done")
        self.assertEqual(self.clock.sleeps, [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30, 30])
        lines = [line for line in logs.output if "warehouse is starting" in line]
        self.assertEqual([line.split("waited ")[1].split(" s of")[0] for line in lines],
                         ["0", "31", "61", "91", "121", "151", "181", "211"])
        self.assertTrue(all("of 300" in line for line in lines))

    def test_startup_wait_is_bounded_by_startup_timeout(self):
        sink = self.sink(startup_timeout=100)
        starting = up.UnavailableError("sink: connecting failed: 503", transient=True)
        with self.assertLogs("uploader", "WARNING"):
            with self.assertRaises(up.SinkError) as raised:
                sink.retrying("connecting", self.failing([starting] * 1000))
        self.assertEqual(sum(self.clock.sleeps), 100)
        self.assertFalse(raised.exception.transient)
        self.assertIn("not ready after 100 s (startup_timeout 100 s)", str(raised.exception))

    def test_other_transient_failures_keep_their_retry_count(self):
        sink = self.sink()
        conflict = up.SinkError("sink: writing failed: [DELTA_CONCURRENT_APPEND]",
                                transient=True)
        with self.assertLogs("uploader", "WARNING"):
            with self.assertRaises(up.SinkError):
                sink.retrying("writing", self.failing([conflict] * 100))
        self.assertEqual(self.clock.sleeps, [2, 4, 8, 16, 32])

    def test_a_stop_ends_the_wait(self):
        sink = self.sink()
        sink.sleep = lambda seconds: True  # StopFlag.wait: a stop was requested
        starting = up.UnavailableError("sink: connecting failed: 503", transient=True)
        with self.assertLogs("uploader", "WARNING"):
            with self.assertRaises(up.UnavailableError):
                sink.retrying("connecting", self.failing([starting] * 5))

    def test_startup_timeout_setting(self):
        for env, argv, expected in [({}, [], 600.0),
                                    ({"STARTUP_TIMEOUT": "90"}, [], 90.0),
                                    ({"STARTUP_TIMEOUT": "90"}, ["--startup-timeout", "5"],
                                     5.0)]:
            with self.subTest(env=env, argv=argv):
                code, out, err = run_main(["--print-config", *argv], env)
                self.assertEqual(code, 0, err)
                self.assertRegex(out, rf"startup_timeout\s*=\s*{expected}\b")
        code, out, err = run_main(["--print-config", "--startup-timeout", "-1"], {})
        self.assertEqual(code, 2)
        self.assertIn("startup_timeout must be >= 0", err)


@unittest.skipIf(SKIP, SKIP)
class DoubleTests(TempDirTestCase):
    """The wire double's own faults, seen through the bare connector."""

    def setUp(self):
        super().setUp()
        self.server = thrift_warehouse.ThriftWarehouse(self.path("warehouse"))
        self.addCleanup(self.server.close)
        self.addCleanup(Captured("databricks.sql").close)  # keep its error lines quiet

    def connect(self, token=TOKEN):
        conn = dbsql.connect(
            server_hostname=self.server.host, http_path=HTTP_PATH, access_token=token,
            _connection_uri=f"http://{self.server.host}{HTTP_PATH}", enable_telemetry=False,
            **up.DatabricksSink.CONNECTOR_RETRY)
        self.addCleanup(conn.close)
        return conn

    def test_typed_results_and_native_parameters(self):
        cursor = self.connect().cursor()
        cursor.execute("CREATE TABLE `main`.`s`.`t` (id BIGINT, name STRING, v DOUBLE, "
                       "b BINARY, ok BOOLEAN) USING DELTA")
        cursor.execute("INSERT INTO `main`.`s`.`t` VALUES (1, 'a', 0.5, X'00ff', TRUE), "
                       "(2, NULL, NULL, NULL, NULL)")
        cursor.execute("SELECT * FROM `main`.`s`.`t` WHERE name = :name OR id > :id "
                       "ORDER BY id", {"name": "a", "id": 1})
        self.assertEqual([tuple(r) for r in cursor.fetchall()],
                         [(1, "a", 0.5, b"\x00\xff", True), (2, None, None, None, None)])
        self.assertEqual([d[:2] for d in cursor.description],
                         [("id", "bigint"), ("name", "string"), ("v", "double"),
                          ("b", "binary"), ("ok", "boolean")])

    def test_a_held_statement_runs_when_released(self):
        cursor = self.connect().cursor()
        cursor.execute("CREATE TABLE `main`.`s`.`t` (id BIGINT) USING DELTA")
        self.server.plan("hold", "INSERT")
        import threading
        worker = threading.Thread(target=cursor.execute,
                                  args=("INSERT INTO `main`.`s`.`t` VALUES (7)",))
        worker.start()
        for _ in range(200):
            if self.server.held:
                break
            time.sleep(0.01)
        self.assertEqual(self.server.engine.rows("main.s.t"), [])
        self.server.release()
        worker.join(10)
        self.assertFalse(worker.is_alive())
        self.assertEqual(self.server.engine.rows("main.s.t"), [{"id": 7}])

    def test_server_errors_and_refusals_as_the_connector_raises_them(self):
        conn = self.connect()
        self.server.plan("fail", "SELECT", CONFLICTS[0])
        with self.assertRaises(dbexc.ServerOperationError) as raised:
            conn.cursor().execute("SELECT 1")
        self.assertIn("SQLSTATE: 2D521", str(raised.exception))
        self.server.refuse(503, 1, retry_after=30)
        with self.assertRaises(dbexc.RequestError) as raised:
            conn.cursor().execute("SELECT 1")
        self.assertIsInstance(raised.exception.args[1], dbexc.MaxRetryDurationError)
        self.server.expire(TOKEN)
        with self.assertRaises(dbexc.RequestError) as raised:
            self.connect()
        self.assertEqual(raised.exception.context["http-code"], 401)

    def test_oauth_tokens_are_issued_and_can_expire(self):
        import urllib.request
        self.server.tokens, self.server.clients = set(), {"sp-id": "sp-secret"}
        self.server.token_lifetime = 120
        base = f"http://{self.server.host}/oidc"
        with urllib.request.urlopen(base + "/.well-known/oauth-authorization-server") as r:
            endpoint = json.loads(r.read())["token_endpoint"]
        request = urllib.request.Request(endpoint, data=b"grant_type=client_credentials&"
                                         b"scope=all-apis", headers={
                                             "Authorization": "Basic " + base64.b64encode(
                                                 b"sp-id:sp-secret").decode()})
        with urllib.request.urlopen(request) as r:
            reply = json.loads(r.read())
        self.assertEqual(reply["expires_in"], 120)
        token = reply["access_token"]
        self.assertEqual(self.server.issued, [token])
        self.connect(token).cursor().execute("SELECT 1")
        self.server.expire(token)
        with self.assertRaises(dbexc.RequestError) as raised:
            self.connect(token)
        self.assertEqual(raised.exception.context["http-code"], 401)
        wrong = urllib.request.Request(endpoint, data=b"grant_type=client_credentials&"
                                       b"client_id=sp-id&client_secret=guess")
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong)
        self.assertEqual(refused.exception.code, 401)
        refused.exception.close()


if __name__ == "__main__":
    unittest.main()
