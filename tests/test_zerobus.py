"""The Zerobus Ingest sink against tests/zerobus_fake.py: the token per table, requests
under the size limit, the service's faults (429 with Retry-After, 503, a reply lost
after the commit, an expired token), refusals at start, settings, the warehouse path
(table and view made through the SQL warehouse double, batches settled by asking it),
and whole runs through main()."""

import collections
import json
import sqlite3
import threading
import unittest
from unittest import mock

from tests.helpers import (slow, TempDirTestCase, make_db, read_state, run_main, up,
                           use_fake_warehouse)
from tests.test_crash import CrashTestCase, parse_ts, rising, source_rows
from tests.zerobus_fake import ZerobusFake

SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
          "sensor TEXT, value REAL)")
ROWS = [(f"2025-01-01T00:00:{i % 60:02d}Z", f"s-{i % 7}", i / 4) for i in range(1, 301)]
DATABASE = "main.sensors"
TABLE = "raw_readings"
FQN = f"{DATABASE}.{TABLE}"


class ZerobusCase(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.db = make_db(self.path("src.db"), SCHEMA, ROWS, ["ts", "sensor", "value"])
        self.fake = ZerobusFake()
        self.address = self.fake.start()
        self.addCleanup(self.fake.stop)

    def settings(self, **extra):
        return dict(dict(sqlite=self.db, target="zerobus", databricks_host=self.address,
                         zerobus_endpoint=f"http://{self.address}",
                         zerobus_workspace_id=self.fake.workspace_id,
                         databricks_client_id="sp-id", databricks_client_secret="sp-secret",
                         databricks_database=DATABASE, state_dir=self.path("state")),
                    **extra)

    def config(self, **extra):
        return up.check_target(up.validate_config(up.Config(**self.settings(**extra))))

    def create(self, **extra):
        """The table as --print-ddl makes it."""
        ddl = up.print_ddl(self.config(**extra), {})
        self.fake.create_table(FQN, ddl.split(";\n")[0])

    def sink(self, sleeps=None, **extra):
        sink = up.make_sink(self.config(**extra), up.Identity("node-a", "readings", "s1"))
        sink.sleep = (sleeps.append if sleeps is not None else (lambda s: None))
        sink.jitter = lambda low, high: high
        self.addCleanup(sink.close)
        return sink

    def batches(self, sink, batch_size=1000, table=TABLE, chunk_rows=up.CHUNK_ROWS):
        conn = up.open_source(self.db, 5)
        self.addCleanup(conn.close)
        source = up.describe_table(conn, None, None, self.db)
        checkpoint = up.Checkpoint(self.path("state"))
        checkpoint.data = dict(up.new_state({}), state_id="s1")
        job = up.Job(sink.config, conn, source, checkpoint, sink, table,
                     threading.Event(), up.compile_plan(sink.config, source, {}))
        return list(up.prepare_batches(job, up.read_batches(conn, source, None, batch_size,
                                                            chunk_rows),
                                       {"seq": 0, "carry": None}))

    def write(self, sink):
        for batch in self.batches(sink):
            sink.write(TABLE, batch)

    def ids(self):
        return sorted(r["id"] for r in self.fake.deduped(FQN))

    def stored(self):
        return sorted(r["id"] for r in self.fake.rows[FQN])

    def env(self, **extra):
        env = {k.upper() if k != "sqlite" else "SQLITE_PATH": str(v)
               for k, v in self.settings(**extra).items()}
        env["SQLITE_TABLE_NAME"] = "readings"
        return env


class TokenAndRequests(ZerobusCase):
    def test_each_table_gets_its_own_scoped_token(self):
        self.create()
        self.fake.create_table(f"{DATABASE}.other", {"id": "BIGINT"})
        sink = self.sink()
        self.write(sink)
        self.assertEqual(len(self.fake.token_requests), 1)
        form = self.fake.token_requests[0]
        self.assertEqual(form["resource"], "api://databricks/workspaces/1234567890123456/"
                                           "zerobusDirectWriteApi")
        details = json.loads(form["authorization_details"])
        self.assertIn({"type": "unity_catalog_privileges", "privileges": ["SELECT", "MODIFY"],
                       "object_type": "TABLE", "object_full_path": FQN}, details)
        # that token is good for its table only: the fake answers 403 elsewhere
        sink._tokens["other"] = sink._tokens[TABLE]
        with self.assertRaisesRegex(up.SinkError, "HTTP 403 PERMISSION_DENIED.*grant"):
            sink.check_table("other")
        del sink._tokens["other"]
        sink.check_table("other")
        self.assertEqual(len(self.fake.token_requests), 2)

    def test_a_batch_goes_in_requests_under_the_limit_and_lands_once(self):
        self.create(zerobus_max_request_bytes=10_000)
        self.fake.max_request_bytes = 10_000
        sink = self.sink(zerobus_max_request_bytes=10_000)
        (batch,) = self.batches(sink)
        sink.write(TABLE, batch)
        inserts = [r for r in self.fake.inserts(FQN) if r[2] > 2]
        self.assertGreater(len(inserts), 3)
        self.assertTrue(all(size <= 10_000 for _, _, size in inserts))
        self.assertEqual(self.ids(), list(range(1, 301)))
        ids = {r["_batch_id"] for r in self.fake.rows[FQN]}
        n = len(inserts)
        self.assertEqual(ids, {f"{batch.batch_id}.{k}/{n}" for k in range(1, n + 1)})
        first = min(self.fake.rows[FQN], key=lambda r: r["id"])
        self.assertEqual(json.loads(first["_row_key"]), ["readings", 1])
        self.assertEqual((first["sensor"], first["value"], first["_source_id"]),
                         ("s-1", 0.25, "node-a"))

    def test_a_request_over_the_service_limit_is_refused_with_the_fix(self):
        self.create()
        self.fake.max_request_bytes = 10_000  # the service takes less than configured
        with self.assertRaisesRegex(up.SinkError, "HTTP 413 .*lower zerobus_max_request_"
                                    "bytes") as caught:
            self.write(self.sink())
        self.assertFalse(caught.exception.transient)
        self.assertEqual(self.fake.rows[FQN], [])

    def test_a_row_key_follows_its_row_through_the_filter(self):
        self.create(enable_filter=True, filter_config={"value": {">": 70}})
        sink = self.sink(enable_filter=True, filter_config={"value": {">": 70}})
        table = up.target_table(sink.config, up.describe_table(
            up.open_source(self.db, 5), None, None, self.db))
        self.assertEqual(table, "filtered_readings")
        self.fake.create_table(f"{DATABASE}.{table}", self.fake.tables.pop(FQN))
        for batch in self.batches(sink, table=table):
            sink.write(table, batch)
        rows = self.fake.rows[f"{DATABASE}.{table}"]
        self.assertEqual(sorted(r["id"] for r in rows), list(range(281, 301)))
        self.assertTrue(all(json.loads(r["_row_key"]) == ["readings", r["id"]] for r in rows))

    def test_a_pair_cursor_keys_rows_by_timestamp_and_rowid(self):
        self.db = make_db(self.path("pair.db"), "CREATE TABLE readings (ts TEXT, v REAL)",
                          [("2025-01-01T00:00:01Z", 1.0), ("2025-01-01T00:00:01Z", 2.0),
                           ("2025-01-01T00:00:00Z", 3.0)], ["ts", "v"])
        self.create()
        self.write(self.sink())
        keys = {r["v"]: json.loads(r["_row_key"]) for r in self.fake.rows[FQN]}
        self.assertEqual(keys, {1.0: ["readings", "2025-01-01T00:00:01Z", 1],
                                2.0: ["readings", "2025-01-01T00:00:01Z", 2],
                                3.0: ["readings", "2025-01-01T00:00:00Z", 3]})

    def test_aggregated_rows_are_keyed_by_batch_and_row_number(self):
        spec = {"group_by": ["sensor"], "aggregations": {"value": ["max"]}}
        sink = self.sink(enable_aggregate=True, aggregate_config=spec)
        table = "aggregated_readings"
        ddl = up.print_ddl(sink.config, {})
        self.fake.create_table(f"{DATABASE}.{table}", ddl.split(";\n")[0])
        batches = self.batches(sink, batch_size=100, table=table)
        for batch in batches:
            sink.write(table, batch)
        rows = self.fake.rows[f"{DATABASE}.{table}"]
        self.assertEqual(len(rows), 3 * 7)  # 7 sensors in each of 3 batches
        self.assertEqual(sorted(r["_row_key"] for r in rows),
                         sorted(f"{b.batch_id}:{i}" for b in batches[:3] for i in range(7)))
        self.assertEqual(len(self.fake.deduped(f"{DATABASE}.{table}")), 21)

    def test_aggregated_rows_of_a_batch_read_in_parts_keep_their_keys(self):
        """A batch read in several chunks: row numbers run on across its parts, and a
        new process numbers the same batch the same way (a re-send is recognised)."""
        spec = {"group_by": ["sensor"], "aggregations": {"value": ["max"]}}
        table = "aggregated_readings"

        def keys(sink=None):
            sink = sink or self.sink(enable_aggregate=True, aggregate_config=spec)
            (batch, *_) = self.batches(sink, batch_size=300, table=table, chunk_rows=100)
            return [json.loads(b"[" + b",".join(part) + b"]") for part in batch.payload]
        first, again = keys(), keys()
        numbers = [r["_row_key"] for part in first for r in part]
        self.assertEqual(len(first), 3)
        self.assertEqual(numbers, [f"s1-1:{i}" for i in range(len(numbers))])
        self.assertEqual(numbers, [r["_row_key"] for part in again for r in part])
        # the same process encoding the batch again (re-sent after a failed write)
        same = self.sink(enable_aggregate=True, aggregate_config=spec)
        keys(same)
        self.assertEqual(numbers, [r["_row_key"] for part in keys(same) for r in part])


class Faults(ZerobusCase):
    def setUp(self):
        super().setUp()
        self.create()

    def test_429_waits_as_retry_after_says(self):
        sleeps = []
        sink = self.sink(sleeps)
        sink.check_table(TABLE)
        self.fake.plan("429", retry_after=7)
        self.write(sink)
        self.assertEqual(sleeps, [7 * 1.2])  # Retry-After, and up to 20% more (the jitter)
        self.assertEqual(self.stored(), list(range(1, 301)))

    def test_503_is_retried_with_capped_backoff(self):
        sleeps = []
        sink = self.sink(sleeps)
        sink.check_table(TABLE)
        self.fake.plan("503", count=3)
        self.write(sink)
        self.assertEqual(sleeps, [2, 4, 8])
        self.assertEqual(self.stored(), list(range(1, 301)))

    def test_503_without_end_fails_the_write_as_transient(self):
        sink = self.sink()
        sink.check_table(TABLE)
        self.fake.plan("503", count=up.ZerobusSink.RETRIES)
        with self.assertRaisesRegex(up.SinkError, "HTTP 503 TEMPORARILY_UNAVAILABLE") as caught:
            self.write(sink)
        self.assertTrue(caught.exception.transient)
        self.assertEqual(self.stored(), [])

    def test_a_reply_lost_after_the_commit_is_a_duplicate_the_view_drops(self):
        sink = self.sink()
        self.fake.plan("drop_reply")
        self.write(sink)
        self.assertEqual(len(self.stored()), 600)  # sent again: at least once
        self.assertEqual(self.ids(), list(range(1, 301)))  # once in the view

    def test_an_expired_token_is_replaced_once(self):
        sink = self.sink()
        sink.check_table(TABLE)
        self.fake.plan("expire")
        with self.assertLogs("uploader", "INFO") as logs:
            self.write(sink)
        self.assertEqual(len(self.fake.token_requests), 2)
        self.assertIn("refused the token", "\n".join(logs.output))
        self.assertEqual(self.stored(), list(range(1, 301)))

    def test_a_token_endpoint_503_is_retried(self):
        sleeps = []
        self.fake.plan("token_503")
        self.write(self.sink(sleeps))
        self.assertEqual(sleeps, [2])
        self.assertEqual(self.stored(), list(range(1, 301)))

    def test_an_unreachable_endpoint_is_transient_and_retried(self):
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]  # nothing listens there once closed
        sleeps = []
        sink = self.sink(sleeps, zerobus_endpoint=f"http://127.0.0.1:{closed}")
        with self.assertRaisesRegex(up.SinkError, "refused") as caught:
            self.write(sink)
        self.assertTrue(caught.exception.transient)
        self.assertEqual(sleeps, [2, 4, 8, 16, 32, 60, 60])

    def test_a_token_is_renewed_before_it_expires(self):
        self.fake.token_lifetime = 120
        now = [0.0]
        sink = self.sink()
        sink.clock = lambda: now[0]
        sink.check_table(TABLE)
        now[0] = 59.0
        sink.check_table.__self__._checked.clear()
        sink.check_table(TABLE)
        self.assertEqual(len(self.fake.token_requests), 1)
        now[0] = 61.0
        sink._checked.clear()
        sink.check_table(TABLE)
        self.assertEqual(len(self.fake.token_requests), 2)

    def test_a_row_of_the_wrong_type_is_refused_with_the_reason(self):
        self.fake.tables[FQN]["value"] = "BIGINT"  # the table is not what the rows are
        sink = self.sink()
        with self.assertRaisesRegex(up.SinkError, r"HTTP 400 INVALID_PARAMETER_VALUE: "
                                    r"column 'value' \(BIGINT\) cannot take 0.25") as caught:
            self.write(sink)
        self.assertFalse(caught.exception.transient)
        self.assertEqual(self.stored(), [])


class AtStart(ZerobusCase):
    def test_a_missing_table_is_refused_at_start_with_the_fix(self):
        with self.assertRaisesRegex(up.SinkError, r"NOT_FOUND: Table \"main.sensors."
                                    r"raw_readings\" cannot be found; create it.*--print-ddl"):
            self.sink().known_kinds(TABLE)

    def test_a_table_the_principal_may_not_write_is_refused_at_start(self):
        self.create()
        self.fake.grants["sp-id"] = [f"{DATABASE}.other"]
        with self.assertRaisesRegex(up.SinkError, "HTTP 403 PERMISSION_DENIED.*grant the "
                                    "service principal USE CATALOG") as caught:
            self.sink().known_kinds(TABLE)
        self.assertFalse(caught.exception.transient)

    def test_bad_credentials_are_refused_without_the_secret(self):
        sink = self.sink(databricks_client_secret="wrong-secret")
        with self.assertRaises(up.SinkError) as caught:
            sink.known_kinds(TABLE)
        self.assertIn("HTTP 401 invalid_client", str(caught.exception))
        self.assertNotIn("wrong-secret", str(caught.exception))
        self.assertFalse(caught.exception.transient)

    def test_a_token_the_service_echoes_is_not_printed(self):
        """A proxy that quotes the request's credential in its error: the table's OAuth
        token (and the Basic client credentials) never reach the error, the log or the
        state; the service's reason does."""
        self.create()
        self.fake.echo = True
        self.fake.grants["sp-id"] = [f"{DATABASE}.other"]
        with self.assertRaises(up.SinkError) as caught:
            self.sink().known_kinds(TABLE)
        self.assertIn("HTTP 403 PERMISSION_DENIED: The token may not write", str(caught.exception))
        self.assertIn("request credential [REDACTED]", str(caught.exception))
        self.assertNotIn("zb-token-1", str(caught.exception))
        code, out, err = run_main(["--once", "--log-level", "DEBUG"], self.env())
        self.assertEqual(code, up.EXIT_FAILED)
        self.assertIn("PERMISSION_DENIED", err)
        state = json.dumps(read_state(self.path("state")))
        self.assertIn("PERMISSION_DENIED", state)
        for token in self.fake.tokens:
            self.assertNotIn(token, out + err + state)
        self.fake.clients["sp-id"] = "rotated"  # the token endpoint echoes Basic id:secret
        code, out, err = run_main(["--once"], self.env())
        self.assertIn("HTTP 401 invalid_client", err)
        self.assertNotIn("c3AtaWQ6c3Atc2VjcmV0", out + err)  # base64 of sp-id:sp-secret

    def test_a_run_reports_the_refused_table_and_fails(self):
        code, out, err = run_main(["--once"], self.env())
        self.assertEqual(code, up.EXIT_FAILED)
        self.assertIn("NOT_FOUND", err)
        self.assertNotIn("sp-secret", out + err)


class Settings(ZerobusCase):
    def test_settings_are_checked(self):
        cases = [
            (dict(zerobus_endpoint=None), "zerobus_endpoint is required"),
            (dict(databricks_client_secret=None), "databricks_client_secret is required"),
            (dict(zerobus_endpoint="http://1234.zerobus.us-west-2.cloud.databricks.com"),
             "must use https://"),
            (dict(zerobus_endpoint="zerobus.example.com", zerobus_workspace_id=None),
             "zerobus_workspace_id is required"),
            (dict(databricks_database="main"), "catalog.schema"),
            (dict(zerobus_max_request_bytes=100), "at least 10000"),
        ]
        for extra, message in cases:
            with self.subTest(**{k: str(v) for k, v in extra.items()}):
                with self.assertRaisesRegex(up.ConfigError, message):
                    self.config(**extra)

    def test_the_workspace_id_comes_from_the_endpoint(self):
        config = self.config(zerobus_endpoint="1234567.zerobus.us-west-2.cloud.databricks.com",
                             zerobus_workspace_id=None)
        self.assertEqual(config.zerobus_workspace_id, "1234567")
        sink = up.make_sink(config, up.Identity("n", "readings", "s"))
        self.assertEqual(sink.endpoint, "https://1234567.zerobus.us-west-2.cloud.databricks.com")

    def test_print_ddl_prints_the_table_and_its_view(self):
        code, out, _ = run_main(["--print-ddl"], self.env())
        self.assertEqual(code, 0)
        self.assertIn("`_row_key` STRING", out)
        self.assertIn("CREATE OR REPLACE VIEW `main`.`sensors`.`raw_readings_deduped`", out)
        self.assertIn("PARTITION BY `_source_id`, `_source_file`, `_row_key`", out)


class Runs(ZerobusCase):
    def test_runs_land_every_row_once_in_the_view(self):
        self.create()
        code, _, err = run_main(["--once"], self.env())
        self.assertEqual(code, 0, err)
        conn = sqlite3.connect(self.db)
        conn.executemany("INSERT INTO readings (ts, sensor, value) VALUES (?, ?, ?)",
                         [("2025-01-02T00:00:00Z", "s-9", 9.0)])
        conn.commit()
        conn.close()
        code, _, err = run_main(["--once"], self.env())
        self.assertEqual(code, 0, err)
        self.assertEqual(self.ids(), list(range(1, 302)))
        self.assertEqual(self.stored(), list(range(1, 302)))

    def test_a_run_needs_only_the_standard_library(self):
        """No gRPC, no SDK, nothing outside Python's standard library: a run in a child
        process where every installed package is hidden lands the rows."""
        import subprocess
        import sys
        from tests.helpers import SCRIPT, child_env
        self.create()
        hide = ("import sys\n"
                "sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
                f"sys.argv = [{SCRIPT!r}, '--once']\n"
                f"exec(compile(open({SCRIPT!r}).read(), {SCRIPT!r}, 'exec'))\n")
        done = subprocess.run([sys.executable, "-S", "-c", hide], env=child_env(self.env()),
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.ids(), list(range(1, 301)))

    def test_a_batch_in_flight_is_sent_again_and_the_view_has_it_once(self):
        self.create()
        original = up.Checkpoint.commit
        calls = [0]

        def crash_after_the_ack(checkpoint, key):
            calls[0] += 1
            if calls[0] == 1:
                raise up.UploaderError("crashed after the ack")  # the state keeps inflight
            return original(checkpoint, key)
        with mock.patch.object(up.Checkpoint, "commit", crash_after_the_ack):
            run_main(["--once"], self.env())
        code, _, err = run_main(["--once"], self.env())
        self.assertEqual(code, 0, err)
        self.assertIn("sent again", err)
        self.assertEqual(len(self.stored()), 600)
        self.assertEqual(self.ids(), list(range(1, 301)))


class ThroughTheWarehouse(ZerobusCase):
    """With DATABRICKS_HTTP_PATH the table and view are made through the warehouse (the
    DB-API double); here the Zerobus fake also puts what it takes into that warehouse,
    as the service materializes rows into the Delta table."""

    def setUp(self):
        super().setUp()
        self.warehouse = use_fake_warehouse(self, self.path("warehouse"))
        self.fake.catalog = lambda table: {name: kind.upper() for name, kind in
                                           self.warehouse.columns(table).items()}

    def settings(self, **extra):
        return super().settings(**dict(dict(databricks_http_path="/sql/1.0/warehouses/x",
                                            databricks_token="dapi-warehouse"), **extra))

    def mirror(self):
        """The fake's rows so far, into the warehouse table the sink created."""
        columns = list(self.fake.tables[FQN])
        with self.warehouse.connect_db() as db:
            db.execute(f'DELETE FROM "{FQN}"')
            for row in self.fake.rows[FQN]:
                db.execute(f'INSERT INTO "{FQN}" ({", ".join(map(json.dumps, columns))}) '
                           f'VALUES ({", ".join("?" * len(columns))})',
                           [row.get(c) for c in columns])

    def test_the_table_and_view_are_created_and_batches_settled_by_asking(self):
        sink = self.sink()
        self.assertEqual(sink.known_kinds(TABLE), {})  # no table yet: made at first write
        (batch,) = self.batches(sink)
        statements = [s["sql"] for s in self.warehouse.statements()]
        sink.prepare(TABLE, batch)  # CREATE TABLE, CREATE VIEW through the warehouse
        statements = [s["sql"] for s in self.warehouse.statements()][len(statements):]
        self.assertTrue(any(s.startswith("CREATE TABLE") for s in statements))
        self.assertTrue(any(s.startswith("CREATE OR REPLACE VIEW") for s in statements))
        self.assertIn("_row_key", self.fake.tables[FQN])  # the service sees that table
        self.assertFalse(sink.has_committed(TABLE, batch.seq, batch.batch_id))
        sink.write(TABLE, batch)
        self.assertFalse(sink.has_committed(TABLE, batch.seq, batch.batch_id))  # not seen yet
        self.mirror()
        self.assertTrue(self.sink().has_committed(TABLE, batch.seq, batch.batch_id))
        self.assertFalse(self.sink().has_committed(TABLE, batch.seq, batch.batch_id, "node-b"))
        self.sink().prepare(TABLE, batch)  # another process: the view is as it should be
        self.assertEqual(sum(s["sql"].startswith("CREATE OR REPLACE VIEW")
                             for s in self.warehouse.statements()), 1)
        sink.write(TABLE, batch)  # a second copy: the view keeps one
        self.mirror()
        view = self.warehouse.query(f'SELECT count(*), count(DISTINCT id) FROM '
                                    f'"{FQN}_deduped"')
        self.assertEqual(view, [(300, 300)])
        self.assertEqual(self.sink().count_rows(TABLE, "node-a"), 600)  # copies and all
        self.assertEqual(len(self.sink().read_keys(TABLE, "node-a", ["id"])), 300)
        self.warehouse.query(f'INSERT INTO "{FQN}" (id, _source_id) VALUES (900, \'old\'), '
                             f'(901, \'old\')')  # rows another target wrote: no _row_key
        self.assertEqual(self.warehouse.query(f'SELECT count(*) FROM "{FQN}_deduped" '
                                              f"WHERE _source_id = 'old'"), [(2,)])

    def test_fleet_status_and_queries_go_through_the_warehouse(self):
        self.fake.materialize = lambda table, records: self.mirror()
        sink = self.sink()
        for batch in self.batches(sink, batch_size=100):
            sink.write(TABLE, batch)
        code, out, err = run_main(["--fleet-status", "--json"], self.env())
        self.assertEqual(code, 0, err)
        (line,) = json.loads(out)
        self.assertEqual((line["node"], line["rows"], line["last_batch"], line["silent"]),
                         ("node-a", 300, "s1-3", False))
        code, out, err = run_main(["--run-query", f"SELECT count(*) AS n FROM "
                                   f"{FQN}_deduped"], self.env())
        self.assertEqual(code, 0, err)
        self.assertIn("300", out)
        env = self.env()
        del env["DATABRICKS_HTTP_PATH"]
        for action in ("--fleet-status", "--run-query"):
            code, _, err = run_main([action] + ["INFO"] * (action == "--run-query"), env)
            self.assertEqual(code, up.EXIT_BAD_INPUT)
            self.assertIn(f"{action} reads the table through a SQL warehouse", err)

    def test_fleet_status_of_two_files_feeding_one_table(self):
        """A node with many sources: a line per source file, its rows in the view."""
        self.fake.materialize = lambda table, records: self.mirror()
        for n, name in enumerate(("sensor-1.db", "sensor-2.db")):
            sink = up.make_sink(self.config(), up.Identity("node-a", "readings", f"s{n}",
                                                           name, f" <- {name}:readings"))
            sink.jitter = lambda low, high: high
            self.addCleanup(sink.close)
            for batch in self.batches(sink, batch_size=100)[:n + 1]:
                sink.write(TABLE, batch)
        code, out, err = run_main(["--fleet-status", "--json"], self.env())
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["node"], x["source_file"], x["rows"], x["last_batch"])
                          for x in json.loads(out)],
                         [("node-a", "sensor-1.db", 100, "s1-1"),
                          ("node-a", "sensor-2.db", 200, "s1-2")])

    def test_fleet_status_of_a_table_from_before_source_file(self):
        """A table and view an older version made (no _source_file): a line per node
        (as the warehouse target gives), not an UNRESOLVED_COLUMN error."""
        self.warehouse.query(f'CREATE TABLE "{FQN}" (id BIGINT, _source_id VARCHAR, '
                             "_batch_id VARCHAR, _uploaded_at TIMESTAMP WITH TIME ZONE, "
                             "_row_key VARCHAR)")
        self.warehouse.query(f'CREATE VIEW "{FQN}_deduped" AS SELECT * FROM "{FQN}"')
        self.warehouse.query(
            f'INSERT INTO "{FQN}" VALUES (1, \'old-1\', \'f00d-1\', now() - INTERVAL 1 '
            "MINUTE, '1'), (2, 'old-1', 'f00d-2', now(), '2'), (1, 'old-2', 'beef-1', now(), "
            "'1')")
        code, out, err = run_main(["--fleet-status", "--json"], self.env())
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["node"], x["source_file"], x["rows"], x["last_batch"])
                          for x in json.loads(out)],
                         [("old-1", None, 2, "f00d-2"), ("old-2", None, 1, "beef-1")])

    def test_test_upload_sends_a_row_to_a_scratch_table(self):
        code, out, err = run_main(["--test-upload"], self.env())
        self.assertEqual(code, 0, out + err)
        lines = out.splitlines()
        self.assertEqual([line.split()[-1] for line in lines], ["ok"] * 4, out)
        (scratch,) = [t for t in self.fake.rows if "_uploader_selftest_" in t]
        self.assertEqual([r["note"] for r in self.fake.rows[scratch]], ["it works"])
        self.assertNotIn(scratch.split(".")[-1], str(self.warehouse.query(
            "SELECT table_name FROM information_schema.tables")))

    def test_test_upload_without_a_warehouse_says_what_it_needs(self):
        env = self.env()
        del env["DATABRICKS_HTTP_PATH"]
        code, _, err = run_main(["--test-upload"], env)
        self.assertEqual(code, up.EXIT_BAD_INPUT)
        self.assertIn("--test-upload reads the table through a SQL warehouse", err)


@slow
class KillTest(CrashTestCase):
    """SIGKILL the uploader (tests/kill_driver.py) around its Zerobus requests and its
    checkpoint, restarting until a run completes (the crash tests' loop): every source
    row is exactly once in the deduplicated view (computed on the rows the fake service
    stored), with its values; the table itself may hold copies (at least once)."""

    ROWS_SECONDS, SENSORS, BATCH = 60, 20, 100  # 1,200 rows in 12 batches

    def setUp(self):
        super().setUp()
        self.fake = ZerobusFake()
        address = self.fake.start()
        self.addCleanup(self.fake.stop)
        self.fqn = f"{DATABASE}.{self.table}"
        self.env.update({"TARGET": "zerobus", "DATABRICKS_HOST": address,
                         "ZEROBUS_ENDPOINT": f"http://{address}",
                         "ZEROBUS_WORKSPACE_ID": self.fake.workspace_id,
                         "DATABRICKS_CLIENT_ID": "sp-id",
                         "DATABRICKS_CLIENT_SECRET": "sp-secret",
                         "DATABRICKS_DATABASE": DATABASE})
        code, ddl, err = run_main(["--sqlite", self.db, "--print-ddl"], self.env)
        self.assertEqual(code, 0, err)
        self.fake.create_table(self.fqn, ddl.split(";\n")[0])

    def position(self):
        state = read_state(self.path("state"))
        return next((v for k, v in state["destinations"].items() if self.table in k), None)

    def check_after_kill(self, where, at_batch_boundary=True):
        """The view has no copies and no gaps, and ends where the state says the
        upload got (its cursor, or the end of the batch in flight)."""
        ids = [r["id"] for r in self.fake.deduped(self.fqn)]
        self.assertEqual(sorted(ids), list(range(1, max(ids, default=0) + 1)),
                         f"the view has gaps or copies after a kill {where}")
        pos = self.position()
        cursor = pos["cursor"][0] if pos and pos["cursor"] else 0
        flight = pos and pos["inflight"]
        end = flight["cursor_end"][0] if flight else cursor
        self.assertTrue(cursor <= max(ids, default=0) <= end, f"view up to "
                        f"{max(ids, default=0)}, cursor {cursor}, in flight up to {end} "
                        f"after a kill {where}")

    def assert_exactly_once(self, db, lake=None, state_dir=None, label=""):
        source = source_rows(db)
        view = self.fake.deduped(self.fqn)
        counts = collections.Counter(r["id"] for r in view)
        wrong = [r["id"] for r in view if r["id"] in source and (
            r["timestamp"], r["sensor_id"], r["temperature"]) != (
            parse_ts(source[r["id"]][0]), *source[r["id"]][1:])]
        copies = len(self.fake.rows[self.fqn]) - len(view)
        figures = (f"{label}{len(source)} rows, {sum(counts.values()) - len(counts)} "
                   f"duplicates and {len(set(source) - set(counts))} missing in the view, "
                   f"{len(wrong)} with wrong values; {copies} copies in the table")
        self.assertEqual((set(counts), max(counts.values()), wrong),
                         (set(source), 1, []), figures)
        pos = self.position()
        self.assertEqual(pos["cursor"], [max(source)])
        self.assertIsNone(pos["inflight"])
        self.copies = copies
        return figures

    def test_kill_before_a_request(self):
        kills = self.crash_loop(rising(["zerobus-before"]))
        self.assertGreaterEqual(len(kills), 3)
        self.assertEqual(self.copies, 0)

    def test_kill_after_the_service_took_the_rows(self):
        """The rows are in the table and the state says in flight: without a warehouse
        the batch is sent again, and the view keeps one copy of each row."""
        self.crash_loop(rising(["zerobus-after"]))
        self.assertGreater(self.copies, 0)

    def test_kill_around_the_checkpoint(self):
        self.crash_loop(rising(["begin-after", "commit-after", "save-before"]))

if __name__ == "__main__":
    unittest.main()
