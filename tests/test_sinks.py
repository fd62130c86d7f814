"""The sink contract (DESIGN 1, STYLE "Adapters"): one suite, run against every sink.

As Litestream runs one replica-client suite against each implementation, every sink
passes `SinkContract` before it is wired in: the Delta path on a local directory, the
Delta path on an S3-compatible server on loopback (moto's, when installed), the SQL
warehouse through tests/fake_warehouse.py, and Zerobus Ingest through
tests/zerobus_fake.py, without and with a warehouse (read through its deduplicated view:
at least once in the table, exactly once in the view; where that changes a contract
test, the Zerobus class replaces it with one that says how). Batches are made by the cycle's own code
(read from a real SQLite file, processed and encoded by `prepare_batches`), so what a
sink sees here is what it sees in a run.
"""

import base64
import collections
import dataclasses
import datetime as dt
import glob
import json
import os
import signal
import socket
import sqlite3
import threading
import unittest
import urllib.parse
from unittest import mock

from tests.helpers import TempDirTestCase, delta_rows, make_db, up, use_fake_warehouse

SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
          "sensor TEXT, value REAL, raw BLOB)")
ROWS = [("2025-01-01T00:00:00Z", "s-1", 1.5, b"\x00\x01"),
        ("2025-01-01T00:00:01Z", "s-'2'", -0.0, None),
        ("2025-01-01 00:00:02", "s-\u00e9\\3", 3.25, b"")]
UTC = dt.timezone.utc


class SinkContract:
    """What every sink must do. Subclasses give `make_config(**settings)`,
    `landed(table)` (the rows as dicts) and `lose_next_reply()` (the next write lands,
    then its reply is lost)."""

    TABLE = "raw_readings"

    def setUp(self):
        super().setUp()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.db = make_db(self.path("src.db"), SCHEMA, ROWS, ["ts", "sensor", "value", "raw"])
        self.conn = up.open_source(self.db, 5)
        self.addCleanup(self.conn.close)
        self.source = up.describe_table(self.conn, None, None, self.db)

    # --- building blocks -------------------------------------------------------

    def sink(self, source_id="node-a", state_id="s1", source_file=""):
        config = self.make_config(source_id=source_id)
        sink = up.make_sink(config, up.Identity(source_id, "readings", state_id, source_file))
        self.addCleanup(sink.close)
        return sink

    def job(self, sink, table=None, state_id="s1"):
        checkpoint = up.Checkpoint(self.path("state"))
        checkpoint.data = dict(up.new_state({}), state_id=state_id)
        return up.Job(sink.config, self.conn, self.source, checkpoint, sink,
                      table or self.TABLE, threading.Event())

    def batches(self, sink, after=None, seq=0, table=None, source=None):
        """The batches the cycle makes of the rows after cursor `after` (seq on from
        `seq`), ready for `sink.write`."""
        job = self.job(sink, table)
        chunks = up.read_batches(self.conn, source or self.source, after, 1000)
        position = {"seq": seq, "carry": None}
        return list(up.prepare_batches(job, chunks, position))

    def write_all(self, sink, after=None, seq=0, table=None, source=None):
        receipts = []
        for batch in self.batches(sink, after, seq, table, source):
            receipts.append(sink.write(table or self.TABLE, batch))
        return receipts

    def add(self, rows, columns=("ts", "sensor", "value", "raw")):
        conn = sqlite3.connect(self.db)
        conn.executemany(f"INSERT INTO readings ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})", rows)
        conn.commit()
        conn.close()

    def add_unit_column(self):
        """The source gains a column `unit` and a row with it; the source as it is now."""
        self.conn.close()
        conn = sqlite3.connect(self.db)
        conn.execute("ALTER TABLE readings ADD COLUMN unit TEXT")
        conn.commit()
        conn.close()
        self.add([("2025-01-02T00:00:00Z", "s-4", 4.0, None, "C")],
                 ("ts", "sensor", "value", "raw", "unit"))
        self.conn = up.open_source(self.db, 5)
        self.addCleanup(self.conn.close)
        source = up.describe_table(self.conn, None, None, self.db)
        return source

    def ids(self, table=None):
        return sorted(r["id"] for r in self.landed(table or self.TABLE))

    # --- the contract ----------------------------------------------------------

    def test_write_lands_rows_with_values_types_and_lineage(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        self.assertFalse(sink.has_committed(self.TABLE, batch.seq, batch.batch_id))
        receipt = sink.write(self.TABLE, batch)
        self.assertEqual(receipt.rows, 3)
        rows = {r["id"]: r for r in self.landed(self.TABLE)}
        self.assertEqual(sorted(rows), [1, 2, 3])
        self.assertEqual(rows[1]["ts"], dt.datetime(2025, 1, 1, tzinfo=UTC))
        self.assertEqual(rows[3]["ts"], dt.datetime(2025, 1, 1, 0, 0, 2, tzinfo=UTC))
        self.assertEqual((rows[2]["sensor"], rows[2]["value"]), ("s-'2'", 0.0))
        self.assertEqual(rows[3]["sensor"], "s-\u00e9\\3")
        self.assertEqual((bytes(rows[1]["raw"]), rows[2]["raw"], bytes(rows[3]["raw"])),
                         (b"\x00\x01", None, b""))
        self.assertEqual({r["_source_id"] for r in rows.values()}, {"node-a"})
        self.assertEqual({r["_batch_id"] for r in rows.values()}, {batch.batch_id})
        self.assertTrue(all(r["_rescued_data"] is None for r in rows.values()))

    def test_write_again_leaves_the_rows_once(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        sink.write(self.TABLE, batch)
        sink.write(self.TABLE, batch)
        self.assertEqual(self.ids(), [1, 2, 3])
        (again,) = self.batches(self.sink())  # a new process, the same batch
        self.sink().write(self.TABLE, again)
        self.assertEqual(self.ids(), [1, 2, 3])

    def test_has_committed_before_and_after_and_per_node(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        self.assertFalse(sink.has_committed(self.TABLE, batch.seq, batch.batch_id))
        sink.write(self.TABLE, batch)
        fresh = self.sink()
        self.assertTrue(fresh.has_committed(self.TABLE, batch.seq, batch.batch_id))
        self.assertTrue(fresh.has_committed(self.TABLE, batch.seq, batch.batch_id, "node-a"))
        self.assertFalse(fresh.has_committed(self.TABLE, batch.seq, batch.batch_id, "node-b"))
        self.assertFalse(self.sink("node-b").has_committed(self.TABLE, batch.seq,
                                                           batch.batch_id))

    def test_a_write_whose_reply_is_lost_lands_once(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        self.lose_next_reply()
        try:
            sink.write(self.TABLE, batch)
        except up.SinkError:
            pass  # the cycle would settle it: ask, then send again if it did not land
        if not sink.has_committed(self.TABLE, batch.seq, batch.batch_id):
            sink.write(self.TABLE, batch)
        self.assertEqual(self.ids(), [1, 2, 3])

    def test_a_new_source_column_becomes_a_target_column(self):
        sink = self.sink()
        self.write_all(sink)
        source = self.add_unit_column()
        self.write_all(sink, after=[3], seq=1, source=source)
        rows = {r["id"]: r for r in self.landed(self.TABLE)}
        self.assertEqual(rows[4]["unit"], "C")
        self.assertIsNone(rows[1]["unit"])

    def test_a_value_that_does_not_fit_is_rescued(self):
        sink = self.sink()
        self.write_all(sink)
        self.add([("not a time", "s-5", "warm", None)])
        self.write_all(sink, after=[3], seq=1)
        row = next(r for r in self.landed(self.TABLE) if r["id"] == 4)
        self.assertIsNone(row["value"])
        self.assertIsNone(row["ts"])
        self.assertEqual(json.loads(row["_rescued_data"]),
                         {"value": "warm", "ts": "not a time"})

    def test_hostile_names(self):
        name = 'we`ird "t\u00e4ble" x'
        db = make_db(self.path("hostile.db"),
                     f'CREATE TABLE "{name.replace(chr(34), chr(34) * 2)}" '
                     '(id INTEGER PRIMARY KEY AUTOINCREMENT, "a`b" TEXT, "c\'d" INTEGER, '
                     '"\u00fcml" REAL)', [("x`'\"", 1, 0.5)], ["a`b", "c'd", "\u00fcml"])
        conn = up.open_source(db, 5)
        self.addCleanup(conn.close)
        source = up.describe_table(conn, None, None, db)
        table = up.route_table(source.name)
        sink = self.sink()
        job = self.job(sink, table)
        job.conn, job.source = conn, source
        for batch in up.prepare_batches(job, up.read_batches(conn, source, None, 10),
                                        {"seq": 0, "carry": None}):
            sink.write(table, batch)
        (row,) = self.landed(table)
        self.assertEqual((row["a`b"], row["c'd"], row["\u00fcml"]), ("x`'\"", 1, 0.5))

    def test_count_rows_and_read_keys_per_node(self):
        self.assertEqual(self.sink().count_rows(self.TABLE, "node-a"), 0)  # no table yet
        self.write_all(self.sink())
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_all(self.sink("node-b", "s2"), after=[3], seq=0)
        sink = self.sink()
        self.assertEqual(sink.count_rows(self.TABLE, "node-a"), 3)
        self.assertEqual(sink.count_rows(self.TABLE, "node-b"), 1)
        self.assertEqual(sink.read_keys(self.TABLE, "node-a", ["id"]), {(1,), (2,), (3,)})

    def test_count_file_rows_per_node_and_file_by_batch(self):
        """Among many sources a file joining a table is checked against the rows of its
        name that no position of the state sent: the sink counts them by batch id."""
        self.assertEqual(self.sink().count_file_rows(self.TABLE, "node-a", "a.db"), {})
        self.write_all(self.sink(source_file="a.db"))
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_all(self.sink(state_id="s2", source_file="b'.db"), after=[3], seq=1)
        self.write_all(self.sink("node-b", "s3", source_file="a.db"), after=[3], seq=4)
        sink = self.sink()
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db"), {"s1-1": 3})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "b'.db"), {"s1-2": 1})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-b", "a.db"), {"s1-5": 1})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-b", "b'.db"), {})
        # rows of a version before _source_file (NULL there) may be of any file
        self.write_all(self.sink("node-b", "s4"), after=[3], seq=6)
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-b", "b'.db"), {"s1-7": 1})
        # the batches of positions the state knows (by prefix) are not counted
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db", {"s1"}), {})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db", {"s2"}),
                         {"s1-1": 3})

    def test_recover_files_newest_batch_of_each_file_with_its_row_mark(self):
        """--recover-state among many sources: each file name's newest batch and the
        mark of the row at its cursor end; a target that keeps no mark says so."""
        sink = self.sink(source_file="a.db")
        if sink.recover_files_refused:
            with self.assertRaisesRegex(up.SinkError, "^sink: --recover-state with many "
                                        "sources is not available on the"):
                sink.recover_files(self.TABLE, self.source)
            return
        self.assertEqual(sink.recover_files(self.TABLE, self.source), {})
        self.write_all(sink)
        self.write_all(self.sink(state_id="s2", source_file="b.db"))
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_all(self.sink(source_file="a.db"), after=[3], seq=1)
        self.write_all(self.sink("node-b", "s3", source_file="c.db"))
        found = self.sink().recover_files(self.TABLE, self.source)
        self.assertEqual(sorted(found), ["a.db", "b.db"])
        self.assertEqual((found["a.db"]["cursor"], found["b.db"]["cursor"]), ([4], [3]))
        mark = found["a.db"]["cursor_row"]
        self.assertTrue(up.is_marked_row(self.conn, self.source, [4], mark))
        self.assertFalse(up.is_marked_row(self.conn, self.source, [3], mark))
        self.assertEqual(self.sink("node-c").recover_files(self.TABLE, self.source), {})

    def test_recover_position_after_the_last_batch(self):
        sink = self.sink()
        self.assertIsNone(sink.recover_position(self.TABLE, self.source))
        self.write_all(sink)
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_all(sink, after=[3], seq=1)
        found = self.sink().recover_position(self.TABLE, self.source)
        self.assertEqual(found["cursor"], [4])
        self.assertIsNone(self.sink("node-b").recover_position(self.TABLE, self.source))


class DeltaLocalSinkTest(SinkContract, TempDirTestCase):
    """The Delta path on a local directory."""

    def make_config(self, **settings):
        return up.validate_config(up.Config(sqlite=self.db, delta_uri=self.path("lake"),
                                            **settings))

    def landed(self, table):
        return delta_rows(os.path.join(self.path("lake"), table))

    def test_count_file_rows_opens_the_table_once(self):
        self.write_all(self.sink(source_file="a.db"))
        sink = self.sink()
        sink.known_kinds(self.TABLE)  # opened before, as in a run: each use updates it
        with mock.patch.object(up.DeltaSink, "_load", autospec=True,
                               side_effect=up.DeltaSink._load) as load:
            self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db"), {"s1-1": 3})
        self.assertEqual(load.call_count, 1)

    def write_source(self, table, path, tag, after=None, seq=0):
        """Rows after `after` as node-a's position of (file `path`, source `table`),
        tag `tag`, among many sources."""
        sink = up.make_sink(self.make_config(source_id="node-a"), up.Identity(
            "node-a", table, f"s1-{tag}", os.path.basename(path),
            up.source_scope(path, table)))
        self.addCleanup(sink.close)
        job = self.job(sink)
        job.tag = tag
        for batch in up.prepare_batches(job, up.read_batches(self.conn, self.source, after,
                                                             1000), {"seq": seq, "carry": None}):
            sink.write(self.TABLE, batch)

    def test_fleet_tells_apart_sources_whose_rows_share_a_file_name(self):
        """Two source tables of one file feeding one table, and files of one name in two
        folders: a line each, with its own rows (those of its position's batches), and
        no line for the file's rows as a whole."""
        self.write_source("readings", self.path("a.db"), "t1")
        self.write_source("other", self.path("a.db"), "t2", after=[2])
        self.write_source("readings", self.path("dev1/data.db"), "t3", after=[1])
        self.write_source("readings", self.path("dev2/data.db"), "t4")
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_source("readings", self.path("dev2/data.db"), "t4", after=[3], seq=1)
        lines = self.sink().fleet(self.TABLE)
        self.assertEqual(
            [(x["node"], x["source_file"], x["source_path"], x["source_table"], x["rows"],
              x["last_batch"]) for x in lines],
            [("node-a", "a.db", self.path("a.db"), "other", 1, "s1-t2-1"),
             ("node-a", "a.db", self.path("a.db"), "readings", 3, "s1-t1-1"),
             ("node-a", "data.db", self.path("dev1/data.db"), "readings", 2, "s1-t3-1"),
             ("node-a", "data.db", self.path("dev2/data.db"), "readings", 4, "s1-t4-2")])
        for x in lines:
            x.update(table=self.TABLE, silent=False, silent_seconds=0, done=False)
        text = up.format_fleet(lines)
        self.assertIn(" dev1/data.db:readings ", text)
        self.assertIn(" dev2/data.db:readings ", text)
        self.assertIn(" a.db:other ", text)

    def lose_next_reply(self):
        import deltalake
        original = deltalake.write_deltalake

        def write_then_fail(*args, **kwargs):
            original(*args, **kwargs)
            patcher.stop()
            raise OSError("Generic S3 error: connection reset by peer (the commit landed)")
        patcher = mock.patch.object(deltalake, "write_deltalake", write_then_fail)
        patcher.start()
        self.addCleanup(lambda: deltalake.write_deltalake is write_then_fail and
                        patcher.stop())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


try:
    import moto.server  # noqa: F401 (a test-only package: README's test command has it)
except ImportError:
    MOTO = False
else:
    MOTO = True


def start_moto(case):
    """moto's S3 server in a child process on a free loopback port (in this process,
    deltalake's calls that hold the GIL would wait on the server's thread)."""
    import subprocess
    import sys
    import time
    import urllib.request
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.1)
    return server, port


@unittest.skipUnless(MOTO, "moto[server] is not installed")
class DeltaS3SinkTest(DeltaLocalSinkTest):
    """The Delta path on an S3-compatible server on loopback (moto's)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server, cls.port = start_moto(cls)
        cls.env = mock.patch.dict(os.environ, {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{cls.port}", "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
        cls.env.start()

    @classmethod
    def tearDownClass(cls):
        cls.env.stop()
        cls.server.kill()
        cls.server.wait()
        super().tearDownClass()

    def setUp(self):
        import urllib.request
        self.bucket = f"lake-{os.urandom(4).hex()}"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/{self.bucket}",
                                         method="PUT")
        urllib.request.urlopen(request).close()
        super().setUp()

    def make_config(self, **settings):
        return up.validate_config(up.Config(sqlite=self.db,
                                            delta_uri=f"s3://{self.bucket}/lake", **settings))

    def landed(self, table):
        return delta_rows(f"s3://{self.bucket}/lake/{table}")


class WarehouseSinkTest(SinkContract, TempDirTestCase):
    """The SQL warehouse, through the DB-API double (sqlglot + DuckDB)."""

    def setUp(self):
        from tests import fake_warehouse
        self.fake = fake_warehouse
        super().setUp()
        self.warehouse = use_fake_warehouse(self, self.path("warehouse"))
        patcher = mock.patch.object(up.Sink, "sleep", staticmethod(lambda seconds: None))
        patcher.start()
        self.addCleanup(patcher.stop)

    def make_config(self, **settings):
        config = up.Config(sqlite=self.db, databricks_host="adb-1.7.azuredatabricks.net",
                           databricks_http_path="/sql/1.0/warehouses/abc",
                           databricks_token="dapi-contract", state_dir=self.path("state"),
                           databricks_database="main.sensors", **settings)
        return up.check_target(up.validate_config(config))

    def landed(self, table):
        return self.warehouse.rows(f"main.sensors.{table}")

    def lose_next_reply(self):
        self.warehouse.plan("drop_reply", "INSERT")


class JsonLinesSink(up.Sink):
    """The reference sink: what a new target needs and no more. A batch is one file,
    <table>/<source_id>.<batch_id>.jsonl, made whole by a rename, so its name says it
    landed; its first line records the kinds and the cursor after it."""

    name = "jsonl"

    @property
    def destination(self):
        return "jsonl:" + self.config.delta_uri

    def path(self, table, source_id=None, batch_id=""):
        folder = os.path.join(self.config.delta_uri, table)
        return os.path.join(folder, f"{source_id or self.identity.source_id}.{batch_id}.jsonl")

    def encode(self, table, part):
        rescued = {}
        columns = [up.coerce_column(values, kind, name, rescued)
                   for name, kind, values in zip(part.columns, part.kinds, part.values)]
        rows = [dict(zip(part.columns, map(up.jsonable, row)), _rescued_data=extra)
                for row, extra in zip(zip(*columns), up.rescued_json(rescued, part.count))]
        return rows, len(rescued)

    def write(self, table, batch):
        if self.has_committed(table, batch.seq, batch.batch_id):
            return up.Receipt(batch.count, skipped=True)
        head = {"kinds": dict(zip(batch.columns, batch.kinds)),
                "cursor": up.encode_cursor(batch.cursor_end)}
        lines = [head] + [dict(row, _source_id=self.identity.source_id,
                               _batch_id=batch.batch_id,
                               _source_file=self.identity.source_file or None)
                          for part in batch.payload for row in part]
        final = self.path(table, batch_id=batch.batch_id)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with open(final + ".tmp", "w", encoding="utf-8") as fh:
            fh.write("\n".join(json.dumps(line) for line in lines))
        os.replace(final + ".tmp", final)
        return up.Receipt(batch.count)

    def has_committed(self, table, seq, batch_id, source_id=None):
        return os.path.exists(self.path(table, source_id, batch_id))

    def batches(self, table, source_id):
        """(head, rows) of each batch file of `source_id`, oldest first."""
        pattern = self.path(table, source_id, "*")
        for name in sorted(glob.glob(pattern), key=os.path.getmtime):
            with open(name, encoding="utf-8") as fh:
                head, *rows = [json.loads(line) for line in fh]
            yield head, rows

    def count_rows(self, table, source_id):
        return sum(len(rows) for _, rows in self.batches(table, source_id))

    def count_file_rows(self, table, source_id, source_file, sent=()):
        return up.unsent(collections.Counter(
            r["_batch_id"] for _, rows in self.batches(table, source_id) for r in rows
            if r.get("_source_file") in (source_file, None)).items(), sent)

    def read_keys(self, table, source_id, names):
        return {tuple(r.get(n) for n in names) for _, rows in self.batches(table, source_id)
                for r in rows}

    def recover_position(self, table, source):
        found = list(self.batches(table, self.identity.source_id))
        return {"cursor": found[-1][0]["cursor"], "carry": None} if found else None


class FakeClock:
    """A monotonic clock that moves only when retry() sleeps; records the sleeps."""

    def __init__(self, stop_after=None):
        self.now, self.sleeps, self.stop_after = 0.0, [], stop_after

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        return self.stop_after is not None and len(self.sleeps) >= self.stop_after


class RetryTest(unittest.TestCase):
    """up.retry, the one retry loop of every sink: sleep, clock and jitter passed in."""

    def run_retry(self, failures, clock=None, **how):
        """retry() over an action that raises each of `failures` in turn, then
        returns "done"; (result or the exception raised, the clock, runs)."""
        clock, runs, said = clock or FakeClock(), [], []
        failures = list(failures)

        def action():
            runs.append(clock.now)
            if failures:
                raise failures.pop(0)
            return "done"
        how = {"what": "writing batch b-1", "jitter": lambda low, high: high,
               "is_transient": up.is_transient_sink_error, "on_retry":
               lambda exc, n, delay: said.append((str(exc), n, delay)), **how}
        try:
            result = up.retry(action, sleep=clock.sleep, clock=lambda: clock.now, **how)
        except Exception as exc:
            result = exc
        return result, clock, runs, said

    def transient(self, text="timed out"):
        return up.SinkError(f"sink: {text}", transient=True)

    def test_a_wait_the_service_asked_for_replaces_the_backoff(self):
        """`asked(exc)`: a Retry-After (here 7 s on the second failure) is the wait;
        without one (None) the backoff goes on as before."""
        busy = self.transient("429")
        busy.retry_after = 7.0
        result, clock, runs, said = self.run_retry(
            [self.transient(), busy, self.transient()], attempts=5, first=1.0,
            asked=lambda exc: getattr(exc, "retry_after", None))
        self.assertEqual(result, "done")
        self.assertEqual(clock.sleeps, [1.0, 7.0, 4.0])

    def test_transient_failures_wait_doubling_then_the_action_goes_again(self):
        result, clock, runs, said = self.run_retry([self.transient()] * 3, attempts=5,
                                                   first=0.4, cap=1.0, spread=(0.5, 1.5))
        self.assertEqual(result, "done")
        self.assertEqual(clock.sleeps, [0.6000000000000001, 1.2000000000000002, 1.5])
        self.assertEqual([n for _, n, _ in said], [1, 2, 3])
        self.assertEqual(len(runs), 4)

    def test_attempts_end_the_retrying_with_the_last_error(self):
        errors = [self.transient(f"try {n}") for n in range(1, 6)]
        result, clock, runs, _ = self.run_retry(errors, attempts=3)
        self.assertIs(result, errors[2])
        self.assertEqual(len(runs), 3)
        self.assertEqual(clock.sleeps, [1.0, 2.0])

    def test_a_deadline_ends_the_retrying_and_the_last_wait_fits_it(self):
        result, clock, runs, _ = self.run_retry([self.transient()] * 20, deadline=10, cap=4)
        self.assertIsInstance(result, up.SinkError)
        self.assertEqual(clock.sleeps, [1.0, 2.0, 4.0, 3.0])
        self.assertEqual(runs[-1], 10.0)

    def test_a_permanent_failure_stands_at_once(self):
        refused = up.SinkError("sink: permission denied")
        result, clock, runs, said = self.run_retry([refused], attempts=5)
        self.assertIs(result, refused)
        self.assertEqual((clock.sleeps, said, len(runs)), ([], [], 1))

    def test_a_stop_during_a_wait_ends_the_retrying(self):
        result, clock, runs, _ = self.run_retry([self.transient()] * 5, attempts=9,
                                                clock=FakeClock(stop_after=2))
        self.assertIsInstance(result, up.SinkError)
        self.assertEqual(len(clock.sleeps), 2)
        self.assertEqual(len(runs), 2)

    def test_the_default_line_says_what_failed_and_when_it_goes_again(self):
        with self.assertLogs("uploader", "WARNING") as logs:
            self.run_retry([OSError("connection reset")], attempts=2, on_retry=None,
                           is_transient=lambda exc: isinstance(exc, OSError))
        self.assertEqual(logs.output, ["WARNING:uploader:sink: writing batch b-1 failed: "
                                       "connection reset; retry 1 in 1.0 s"])


class JsonLinesSinkTest(SinkContract, TempDirTestCase):
    """The reference sink passes the contract, so the contract asks no more of a sink
    than the cycle does."""

    def make_config(self, **settings):
        return up.validate_config(up.Config(sqlite=self.db, delta_uri=self.path("jsonl"),
                                            **settings))

    def sink(self, source_id="node-a", state_id="s1", source_file=""):
        return JsonLinesSink(self.make_config(source_id=source_id),
                             up.Identity(source_id, "readings", state_id, source_file))

    def landed(self, table):
        sink, out, names = self.sink(), [], set()
        for source_id in ("node-a", "node-b"):
            for head, rows in sink.batches(table, source_id):
                for row in rows:
                    out.append({n: decode(v, head["kinds"].get(n)) for n, v in row.items()})
                    names |= set(row)
        return [{n: row.get(n) for n in names} for row in out]

    def lose_next_reply(self):
        original = JsonLinesSink.write

        def write_then_fail(sink, table, batch):
            original(sink, table, batch)
            patcher.stop()
            raise up.SinkError("sink: the reply was lost", transient=True)
        patcher = mock.patch.object(JsonLinesSink, "write", write_then_fail)
        patcher.start()


def decode(value, kind):
    """A JSON value of the reference sink as the Delta reader returns it."""
    if value is None:
        return None
    if kind == up.TIMESTAMP:
        return up.EPOCH + dt.timedelta(microseconds=value)
    if kind == up.BINARY:
        return base64.b64decode(value["$binary"])
    return value


class ZerobusContract(SinkContract):
    """The contract on Zerobus Ingest through tests/zerobus_fake.py; read through the
    deduplicated view, which is what users query. Where Zerobus' semantics differ the
    test is replaced by one that says how, and checks it."""

    DATABASE = "main.sensors"
    WAREHOUSE = False

    def setUp(self):
        from tests.zerobus_fake import ZerobusFake
        super().setUp()
        self.fake = ZerobusFake()
        self.address = self.fake.start()
        self.addCleanup(self.fake.stop)

    def make_config(self, **settings):
        settings.setdefault("sqlite", self.db)
        if self.WAREHOUSE:
            settings.update(databricks_http_path="/sql/1.0/warehouses/abc",
                            databricks_token="dapi-contract")
        config = up.Config(target="zerobus", databricks_host=self.address,
                           zerobus_endpoint=f"http://{self.address}",
                           zerobus_workspace_id=self.fake.workspace_id,
                           databricks_client_id="sp-id", databricks_client_secret="sp-secret",
                           databricks_database=self.DATABASE, state_dir=self.path("state"),
                           **settings)
        return up.check_target(up.validate_config(config))

    def create(self, table, db, **settings):
        """The table as --print-ddl makes it (the view is the fake's `deduped`)."""
        config = self.make_config(sqlite=db, **settings)
        ddl = up.print_ddl(config, {})
        self.assertIn(f"VIEW `main`.`sensors`.`{table}_deduped`", ddl)
        self.fake.create_table(f"{self.DATABASE}.{table}", ddl.split(";\n")[0])

    def sink(self, source_id="node-a", state_id="s1", source_file=""):
        sink = super().sink(source_id, state_id, source_file)
        sink.sleep = lambda seconds: None
        return sink

    def lose_next_reply(self):
        self.fake.plan("drop_reply")

    def test_hostile_names(self):
        """Zerobus takes table names of ASCII letters, digits and underscores only (its
        documented limit): a hostile table name is refused before anything is sent or
        made. Hostile column names travel as JSON keys (the fake takes them; the preview
        documentation allowed only the same characters in column names, so the sink
        warns that the service may refuse them)."""
        db = make_db(self.path("hostile.db"), 'CREATE TABLE "we`ird t\u00e4ble" (id INTEGER '
                     'PRIMARY KEY AUTOINCREMENT, "a`b" TEXT, "c\'d" INTEGER, "\u00fcml" REAL)',
                     [("x`'\"", 1, 0.5)], ["a`b", "c'd", "\u00fcml"])
        conn = up.open_source(db, 5)
        self.addCleanup(conn.close)
        source = up.describe_table(conn, None, None, db)
        sink = self.sink()
        with self.assertRaisesRegex(up.SinkError, "ASCII letters, digits and underscores"):
            sink.known_kinds(up.route_table(source.name))
        self.assertEqual(self.fake.requests, [])
        job = self.job(sink, "raw_plain")
        job.conn, job.source = conn, source
        self.create("raw_plain", db, databricks_table="plain")
        with self.assertLogs("uploader", "WARNING") as logs:
            for batch in up.prepare_batches(job, up.read_batches(conn, source, None, 10),
                                            {"seq": 0, "carry": None}):
                sink.write("raw_plain", batch)
        self.assertIn("may refuse 'a`b', \"c'd\", 'üml'", "\n".join(logs.output))
        (row,) = self.landed("raw_plain")
        self.assertEqual((row["a`b"], row["c'd"], row["\u00fcml"]), ("x`'\"", 1, 0.5))


class ZerobusSinkTest(ZerobusContract, TempDirTestCase):
    """Zerobus with no SQL warehouse: the table is made beforehand from --print-ddl's
    statements, as an admin would; the view is computed on the fake's stored rows.
    Without a warehouse nothing reads the table, so has_committed, count_rows,
    read_keys and recover_position differ (below)."""

    def setUp(self):
        super().setUp()
        self.create(self.TABLE, self.db)

    def landed(self, table):
        """What users read: the deduplicated view."""
        return self.fake.deduped(f"{self.DATABASE}.{table}")

    def stored(self, table=None):
        return sorted(r["id"] for r in self.fake.rows[f"{self.DATABASE}.{table or self.TABLE}"])

    # --- where Zerobus differs ----------------------------------------------------

    def test_write_again_leaves_the_rows_once(self):
        """Zerobus has no idempotency key: a batch written again is in the table twice,
        and once in the deduplicated view (one row per _source_id and _row_key)."""
        sink = self.sink()
        (batch,) = self.batches(sink)
        sink.write(self.TABLE, batch)
        sink.write(self.TABLE, batch)
        (again,) = self.batches(self.sink())  # a new process, the same batch
        self.sink().write(self.TABLE, again)
        self.assertEqual(self.stored(), [1, 1, 1, 2, 2, 2, 3, 3, 3])
        self.assertEqual(self.ids(), [1, 2, 3])

    def test_has_committed_before_and_after_and_per_node(self):
        """Without a warehouse nothing can read the table: no batch is ever known to
        have landed, so a batch in flight is always sent again (the view drops the
        copies); the contract's 'True after the write' does not hold here."""
        sink = self.sink()
        (batch,) = self.batches(sink)
        self.assertFalse(sink.has_committed(self.TABLE, batch.seq, batch.batch_id))
        sink.write(self.TABLE, batch)
        fresh = self.sink()
        with self.assertLogs("uploader", "INFO") as logs:
            self.assertFalse(fresh.has_committed(self.TABLE, batch.seq, batch.batch_id))
        self.assertIn("sent again", "\n".join(logs.output))
        fresh.write(self.TABLE, batch)
        self.assertEqual(self.ids(), [1, 2, 3])

    def test_a_new_source_column_becomes_a_target_column(self):
        """Zerobus never changes a table's schema and there is no warehouse here: a new
        source column is refused with the reason, and lands once an admin adds it."""
        sink = self.sink()
        self.write_all(sink)
        source = self.add_unit_column()
        with self.assertRaisesRegex(up.SinkError, r"HTTP 400 INVALID_PARAMETER_VALUE.*"
                                    r"'unit' is not in table") as caught:
            self.write_all(sink, after=[3], seq=1, source=source)
        self.assertFalse(caught.exception.transient)
        self.fake.add_column(f"{self.DATABASE}.{self.TABLE}", "unit", "STRING")
        self.write_all(sink, after=[3], seq=1, source=source)
        rows = {r["id"]: r for r in self.landed(self.TABLE)}
        self.assertEqual(rows[4]["unit"], "C")
        self.assertIsNone(rows[1]["unit"])

    def test_count_rows_and_read_keys_per_node(self):
        """Reading the table needs a SQL warehouse. Without one, read_keys says so, and
        count_rows is 0 with a line saying it could not count (a table new to the state
        then starts from the beginning: what it already holds is once in the view)."""
        self.write_all(self.sink())
        with self.assertRaisesRegex(up.ConfigError, "DATABRICKS_HTTP_PATH"):
            self.sink().read_keys(self.TABLE, "node-a", ["id"])
        with self.assertLogs("uploader", "INFO") as logs:
            self.assertEqual(self.sink().count_rows(self.TABLE, "node-a"), 0)
        self.assertIn("cannot be counted", "\n".join(logs.output))

    def test_count_file_rows_per_node_and_file_by_batch(self):
        """Without a warehouse none, said in the count_rows line (rows sent again are
        once in the view: their `_row_key`s are the same)."""
        self.write_all(self.sink(source_file="a.db"))
        with self.assertLogs("uploader", "INFO") as logs:
            self.assertEqual(self.sink().count_file_rows(self.TABLE, "node-a", "a.db"), {})
        self.assertIn("cannot be counted", "\n".join(logs.output))

    def test_recover_position_after_the_last_batch(self):
        """--recover-state reads the table too: refused without a warehouse."""
        self.write_all(self.sink())
        with self.assertRaisesRegex(up.ConfigError, "--recover-state.*DATABRICKS_HTTP_PATH"):
            self.sink().recover_position(self.TABLE, self.source)


class ZerobusWarehouseSinkTest(ZerobusContract, TempDirTestCase):
    """Zerobus with a SQL warehouse (the DB-API double): the warehouse makes the table
    and its view, and the fake service materializes what it takes into that table at
    once (the real one takes seconds). Then the contract holds as it is, read through
    the view: a batch written twice is once in it, has_committed finds the batch's last
    request, a new source column is added through the warehouse, count_rows, read_keys
    and recover_position read the table. Only hostile table names differ (above)."""

    WAREHOUSE = True

    def setUp(self):
        super().setUp()
        self.warehouse = use_fake_warehouse(self, self.path("warehouse"))
        self.fake.catalog = lambda table: {n: k.upper() for n, k in
                                           self.warehouse.columns(table).items()}
        self.fake.materialize = self.materialize

    def materialize(self, table, records):
        with self.warehouse.connect_db() as db:
            for record in records:
                names = ", ".join('"' + n.replace('"', '""') + '"' for n in record)
                db.execute(f'INSERT INTO "{table}" ({names}) VALUES '
                           f'({", ".join("?" * len(record))})', list(record.values()))

    def landed(self, table):
        """What users read: the deduplicated view, through the warehouse."""
        return self.warehouse.rows(f"{self.DATABASE}.{table}_deduped")


VOLUME = "/Volumes/main/sensors/landing"


class LandingSinkTest(SinkContract, TempDirTestCase):
    """The volume landing target, through the loopback Files API (tests/files_api.py):
    each batch one Parquet file, read back as the ingestion job would."""

    def setUp(self):
        from tests import files_api
        self.service = files_api.FilesApi(volumes=[VOLUME])
        self.addCleanup(self.service.close)
        self.slept = []
        patcher = mock.patch.object(up.LandingSink, "sleep", self.slept.append)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()

    def make_config(self, **settings):
        settings = {"databricks_token": "dapi-files", **settings}
        config = up.Config(sqlite=self.db, target="landing", databricks_volume=VOLUME,
                           databricks_host=f"http://{self.service.host}",
                           state_dir=self.path("state"), **settings)
        return up.check_target(up.validate_config(config))

    def test_count_file_rows_reads_only_the_files_of_batches_not_sent(self):
        """A file is a batch: those of positions the state knows are not downloaded (a
        new file in a table other files feed must not read the node's whole history)."""
        self.write_all(self.sink(source_file="a.db"))
        self.service.requests.clear()
        sink = self.sink()
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db", {"s1"}), {})
        self.assertEqual([r for r in self.service.requests if r[0] == "GET" and
                          r[1].endswith(".parquet")], [])
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db"), {"s1-1": 3})

    def test_count_file_rows_of_files_from_before_source_file_count_for_every_file(self):
        """Files a version before _source_file landed (no such column) may be of any
        file: their rows count, as on the Delta and warehouse paths (not a sink error)."""
        original = up.to_record_batch

        def old(chunk, identity):
            batch, rescued = original(chunk, identity)
            return batch.remove_column(batch.schema.names.index("_source_file")), rescued

        with mock.patch.object(up, "to_record_batch", old):
            self.write_all(self.sink())
        sink = self.sink()
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db"), {"s1-1": 3})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db", {"s1"}), {})
        self.add([("2025-01-03T00:00:00Z", "s-9", 9.0, None)])
        self.write_all(self.sink(state_id="s2", source_file="b.db"), after=[3], seq=1)
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "a.db"), {"s1-1": 3})
        self.assertEqual(sink.count_file_rows(self.TABLE, "node-a", "b.db"),
                         {"s1-1": 3, "s1-2": 1})

    def landed(self, table):
        return self.service.ingest(f"{VOLUME}/{table}")

    def lose_next_reply(self):
        self.service.plan("drop_reply", "PUT", ".parquet")

    # --- the landing target's own promises ---------------------------------------

    def test_a_batch_is_one_parquet_file_named_by_route_node_and_batch(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        sink.write(self.TABLE, batch)
        (path,) = self.service.landed(VOLUME)
        self.assertEqual(path, f"{VOLUME}/{self.TABLE}/node-a/{batch.batch_id}.parquet")
        self.assertEqual(batch.batch_id, "s1-1")
        data = self.service.landed(VOLUME)[path]
        self.assertEqual((data[:4], data[-4:]), (b"PAR1", b"PAR1"))
        self.assertEqual(batch.mark, {"bytes": len(data)})

    def test_files_are_zstd_compressed(self):
        import duckdb
        sink = self.sink()
        self.write_all(sink)
        (data,) = self.service.landed(VOLUME).values()
        local = self.path("one.parquet")
        with open(local, "wb") as fh:
            fh.write(data)
        codecs = {row[0] for row in duckdb.sql(
            f"SELECT compression FROM parquet_metadata('{local}')").fetchall()}
        self.assertEqual(codecs, {"ZSTD"})

    def test_has_committed_checks_the_size_sealed_in_the_inflight_record(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        sink.write(self.TABLE, batch)
        self.assertTrue(sink.has_committed(self.TABLE, 1, batch.batch_id, mark=batch.mark))
        self.assertFalse(sink.has_committed(self.TABLE, 1, batch.batch_id,
                                            mark={"bytes": batch.mark["bytes"] + 1}))

    def test_known_kinds_are_the_newest_landed_files_types(self):
        sink = self.sink()
        self.assertEqual(sink.known_kinds(self.TABLE), {})
        self.write_all(sink)
        self.assertEqual(self.sink().known_kinds(self.TABLE), {
            "id": up.BIGINT, "ts": up.TIMESTAMP, "sensor": up.STRING, "value": up.DOUBLE,
            "raw": up.BINARY})
        self.assertEqual(self.sink("node-b").known_kinds(self.TABLE), {})

    def test_throttled_and_unavailable_requests_are_retried_waiting_retry_after(self):
        sink = self.sink()
        (batch,) = self.batches(sink)
        self.service.refuse(429, 1, "PUT", retry_after=7, match=".parquet")
        self.service.refuse(503, 2, "PUT", match=".parquet")
        sink.write(self.TABLE, batch)
        self.assertEqual(self.ids(), [1, 2, 3])
        self.assertEqual(self.slept[0], 7.0)  # the Retry-After, as asked
        self.assertEqual(len(self.slept), 3)
        self.assertTrue(all(s <= 30 for s in self.slept[1:]))

    def test_a_refused_token_is_a_permanent_error_with_a_hint(self):
        config = self.make_config(source_id="node-a", databricks_token="dapi-wrong")
        sink = up.make_sink(config, up.Identity("node-a", "readings", "s1"))
        (batch,) = self.batches(sink)
        with self.assertRaisesRegex(up.SinkError, "HTTP 401 UNAUTHENTICATED Invalid "
                                    "access token; check DATABRICKS_TOKEN") as caught:
            sink.write(self.TABLE, batch)
        self.assertFalse(caught.exception.transient)
        self.assertEqual(self.slept, [])
        self.assertNotIn("dapi-wrong", str(caught.exception))

    def oauth_sink(self):
        """A sink of node-a with service principal sp-1 (OAuth through databricks-sdk)."""
        self.service.clients["sp-1"] = "sp-secret"
        config = self.make_config(source_id="node-a", databricks_token=None,
                                  databricks_client_id="sp-1",
                                  databricks_client_secret="sp-secret")
        sink = up.make_sink(config, up.Identity("node-a", "readings", "s1"))
        self.addCleanup(sink.close)
        return sink

    def test_an_expired_oauth_token_is_replaced_once(self):
        sink = self.oauth_sink()
        (batch,) = self.batches(sink)
        self.assertFalse(sink.has_committed(self.TABLE, 1, batch.batch_id))
        self.service.expire(self.service.issued[-1])
        sink.write(self.TABLE, batch)
        self.assertEqual(len(self.service.issued), 2)
        self.assertEqual(self.ids(), [1, 2, 3])
        self.assertEqual(self.slept, [])

    def test_an_oauth_token_the_service_echoes_is_not_printed(self):
        """A gateway that quotes the request's token in its error: the token
        databricks-sdk obtained is in neither the error nor the log; the reason is."""
        self.service.echo = True
        sink = self.oauth_sink()
        (batch,) = self.batches(sink)
        self.service.refuse(403, 2, "PUT", match=".parquet")  # a new token, refused too
        with self.assertLogs(up.log, "INFO") as logs:
            with self.assertRaises(up.SinkError) as caught:
                sink.write(self.TABLE, batch)
        text = str(caught.exception)
        self.assertIn("HTTP 403 PERMISSION_DENIED planned refusal (request token "
                      "[REDACTED])", text)
        self.assertEqual(len(self.service.issued), 2)
        formatter = up.Formatter(False)
        for token in self.service.issued:
            self.assertNotIn(token, text)
            for record in logs.records:
                self.assertNotIn(token, formatter.format(record))

    def test_a_volume_that_does_not_exist_is_named(self):
        config = dataclasses.replace(self.make_config(source_id="node-a"),
                                     databricks_volume="/Volumes/main/sensors/nope")
        sink = up.make_sink(config, up.Identity("node-a", "readings", "s1"))
        (batch,) = self.batches(sink)
        with self.assertRaisesRegex(up.SinkError, "HTTP 404 NOT_FOUND Volume main.sensors."
                                    "nope does not exist.*/Volumes/main/sensors/nope exist"):
            sink.write(self.TABLE, batch)

    def test_list_tables_skips_the_status_folder(self):
        sink = self.sink()
        self.write_all(sink)
        sink.report_status({"cursor": [3], "table": self.TABLE, "version": up.__version__})
        self.assertEqual(sink.list_tables(), [self.TABLE])
        status = json.loads(self.service.files[f"{VOLUME}/_nodes/node-a.json"][0])
        self.assertEqual((status["cursor"], status["table"], status["version"]),
                         ([3], self.TABLE, up.__version__))


class LandingRunTest(TempDirTestCase):
    """A node on the landing target, run as a user runs it (main)."""

    def setUp(self):
        super().setUp()
        from tests import files_api
        self.service = files_api.FilesApi(volumes=[VOLUME])
        self.addCleanup(self.service.close)
        self.db = make_db(self.path("src.db"), SCHEMA, ROWS, ["ts", "sensor", "value", "raw"])
        self.env = {"TARGET": "landing", "DATABRICKS_HOST": f"http://{self.service.host}",
                    "DATABRICKS_TOKEN": "dapi-files", "DATABRICKS_VOLUME": VOLUME,
                    "STATE_DIR": self.path("state"), "SOURCE_ID": "edge-7"}

    def status(self):
        return json.loads(self.service.files[f"{VOLUME}/_nodes/edge-7.json"][0])

    def test_each_cycle_writes_the_node_status_file(self):
        from tests.helpers import run_main
        code, out, err = run_main(["--sqlite", self.db, "--once"], self.env)
        self.assertEqual(code, 0, err)
        status = self.status()
        self.assertEqual((status["cursor"], status["pending"], status["rows"],
                          status["table"], status["last_error"], status["source_id"]),
                         ([3], 0, 3, "raw_readings", None, "edge-7"))
        self.assertEqual(status["version"], up.__version__)
        self.assertTrue(status["last_batch"].endswith("-1"))
        self.service.refuse(403, 1, "PUT", match=".parquet")
        conn = sqlite3.connect(self.db)
        conn.execute("INSERT INTO readings (ts, sensor, value) VALUES ('2025-01-04', 'x', 1)")
        conn.commit()
        conn.close()
        code, out, err = run_main(["--sqlite", self.db, "--once"], self.env)
        self.assertEqual(code, 1)
        self.assertIn("HTTP 403 PERMISSION_DENIED", err)
        status = self.status()
        self.assertEqual(status["cursor"], [3])
        self.assertIn("HTTP 403 PERMISSION_DENIED", status["last_error"])
        code, out, err = run_main(["--sqlite", self.db, "--once"], self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(r["id"] for r in self.service.ingest(f"{VOLUME}/raw_readings")),
                         [1, 2, 3, 4])
        status = self.status()
        self.assertEqual((status["cursor"], status["rows"], status["last_error"]),
                         ([4], 4, None))

    def test_fleet_status_reads_every_nodes_status_file(self):
        from tests.helpers import run_main
        for node in ("edge-7", "edge-8"):
            code, out, err = run_main(["--sqlite", self.db, "--once"],
                                      {**self.env, "SOURCE_ID": node})
            self.assertEqual(code, 0, err)
        code, out, err = run_main(["--sqlite", self.db, "--fleet-status", "--json"],
                                  self.env)
        self.assertEqual(code, 0, err)
        lines = json.loads(out)
        self.assertEqual([(x["node"], x["rows"], x["cursor"], x["pending_rows"], x["silent"])
                          for x in lines], [("edge-7", 3, [3], 0, False),
                                            ("edge-8", 3, [3], 0, False)])
        self.assertEqual({x["table"] for x in lines}, {"raw_readings"})

    def test_fleet_status_of_two_files_feeding_one_table(self):
        from tests.helpers import run_main
        for name, rows in (("sensor-1.db", ROWS), ("sensor-2.db", ROWS[:2])):
            make_db(self.path(name), SCHEMA, rows, ["ts", "sensor", "value", "raw"])
        config = self.sources_config()
        code, out, err = run_main(["--config", config, "--once"], self.env)
        self.assertEqual(code, 0, err)
        # a status file of an older version (no source file or table) is read too
        self.service.files[f"{VOLUME}/_nodes/edge-9.json"] = (json.dumps(
            {"source_id": "edge-9", "table": "raw_readings", "cursor": [1], "rows": 1,
             "pending": 0, "reported_at": up.utc_now_text()}).encode(),
            dt.datetime.now(dt.timezone.utc))
        statuses = sorted(p for p in self.service.files if "/_nodes/" in p)
        self.assertEqual(len(statuses), 3, statuses)
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["node"], x["source_file"], x["source_table"], x["rows"],
                           x["cursor"], x["silent"]) for x in json.loads(out)],
                         [("edge-7", "sensor-1.db", "readings", 3, [3], False),
                          ("edge-7", "sensor-2.db", "readings", 2, [2], False),
                          ("edge-9", None, None, 1, [1], False)])
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status"],
                                  self.env)
        self.assertEqual(code, 0, err)
        self.assertIn("sensor-2.db:readings", out)

    def test_files_named_alike_in_two_folders_have_a_status_file_each(self):
        """A common layout (/mnt/loggers/dev1/data.db, .../dev2/data.db): each file
        reports in its own status file (keyed by its real path), with its own rows and
        errors; the status file an older version wrote for the node (one per node) is
        removed by the first report, once."""
        for folder, rows in (("dev1", ROWS), ("dev2", ROWS[:2])):
            os.makedirs(self.path(folder))
            make_db(self.path(f"{folder}/data.db"), SCHEMA, rows,
                    ["ts", "sensor", "value", "raw"])
        now = dt.datetime.now(dt.timezone.utc)
        older = {"source_id": "edge-7", "table": "raw_readings", "cursor": [1], "rows": 1,
                 "pending": 0, "source_file": "data.db", "source_table": "readings",
                 "reported_at": up.utc_now_text()}
        single = f"{VOLUME}/_nodes/edge-7.json"
        self.service.files[single] = (json.dumps(older).encode(), now)
        config = self.sources_config("dev*/data.db")
        from tests.helpers import run_main
        code, out, err = run_main(["--config", config, "--once"], self.env)
        self.assertEqual(code, 0, err)
        statuses = sorted(p for p in self.service.files if "/_nodes/" in p)
        self.assertEqual(len(statuses), 2, statuses)
        self.assertNotIn(single, statuses)
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual([(x["source_file"], x["source_path"], x["rows"], x["cursor"])
                          for x in json.loads(out)],
                         [("data.db", os.path.realpath(self.path("dev1/data.db")), 3, [3]),
                          ("data.db", os.path.realpath(self.path("dev2/data.db")), 2, [2])])
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status"],
                                  self.env)
        self.assertIn(" dev1/data.db:readings ", out)
        self.assertIn(" dev2/data.db:readings ", out)

    def sources_config(self, pattern="sensor-*.db"):
        """A `sources:` config of table readings in the files of a glob; its path."""
        config = self.path("uploader.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            json.dump({"sources": [{"sqlite": self.path(pattern), "tables": ["readings"]}]},
                      fh)
        return config

    def run_sources(self, *flags, node="edge-7"):
        """One --once run of a `sources:` glob of sensor files; its stderr."""
        from tests.helpers import run_main
        config = self.sources_config()
        code, out, err = run_main(["--config", config, "--once", *flags], {
            **self.env, "SOURCE_ID": node, "STATE_DIR": self.path(f"state-{node}")})
        self.assertEqual(code, 0, err)
        return err

    def status_files(self):
        return sorted((s["source_id"], s["source_file"]) for s in (
            json.loads(data) for p, (data, _) in self.service.files.items() if "/_nodes/" in p))

    def status_name(self, name, node="edge-7"):
        """The name of a file's status file (among many sources), as in a URL."""
        sink = up.LandingSink(self.config(), up.Identity(
            node, "readings", "", name, up.source_scope(self.path(name), "readings")))
        return urllib.parse.quote(sink.status_path().rsplit("/", 1)[1])

    def config(self):
        return up.check_target(up.validate_config(up.Config(
            target="landing", databricks_volume=VOLUME, databricks_token="dapi-files",
            databricks_host=f"http://{self.service.host}")))

    def test_a_forgotten_file_loses_its_status_file(self):
        """A rotated file gone for FORGET_AFTER: with its positions, its status file
        goes (one DELETE, one line); the other file's, another node's status files of
        the same file names and the landed rows stay."""
        for name, rows in (("sensor-1.db", ROWS), ("sensor-2.db", ROWS[:2])):
            make_db(self.path(name), SCHEMA, rows, ["ts", "sensor", "value", "raw"])
        self.run_sources()
        self.run_sources(node="edge-8")
        landed = sorted(map(str, self.service.ingest(f"{VOLUME}/raw_readings")))
        self.assertEqual(len(landed), 10)
        os.remove(self.path("sensor-1.db"))
        self.run_sources("--forget-after", "0")  # gone: marked, kept for FORGET_AFTER
        self.assertEqual(len(self.status_files()), 4)
        err = self.run_sources("--forget-after", "0")
        self.assertEqual(self.status_files(), [("edge-7", "sensor-2.db"),
                                               ("edge-8", "sensor-1.db"),
                                               ("edge-8", "sensor-2.db")])
        deletes = [r for r in self.service.requests if r[0] == "DELETE" and r[2] != 404]
        self.assertEqual([(m, s) for m, _, s in deletes], [("DELETE", 204)])
        self.assertIn("/_nodes/edge-7%3D", deletes[0][1])  # (an = in the URL)
        said = [line for line in err.splitlines() if "--fleet-status" in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("INFO", said[0])
        self.assertEqual(sorted(map(str, self.service.ingest(f"{VOLUME}/raw_readings"))),
                         landed)

    def test_a_status_file_that_cannot_be_removed_costs_one_warning(self):
        for name in ("sensor-1.db", "sensor-2.db"):
            make_db(self.path(name), SCHEMA, ROWS, ["ts", "sensor", "value", "raw"])
        self.run_sources()
        os.remove(self.path("sensor-1.db"))
        self.run_sources("--forget-after", "0")
        self.service.refuse(403, 1, "DELETE", match=self.status_name("sensor-1.db"))
        err = self.run_sources("--forget-after", "0")
        warned = [line for line in err.splitlines() if "WARNING" in line]
        self.assertEqual(len(warned), 1, err)
        self.assertIn("HTTP 403 PERMISSION_DENIED", warned[0])
        self.assertEqual(len(self.status_files()), 2)

    def test_test_upload_writes_reads_and_removes_a_scratch_file(self):
        from tests.helpers import run_main
        code, out, err = run_main(["--test-upload"], self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split()[-1] for line in out.splitlines()], ["ok"] * 4)
        self.assertEqual((self.service.files, self.service.folders), ({}, set()))
        self.service.refuse(403, 1, "PUT", match="probe.txt")
        code, out, err = run_main(["--test-upload"], self.env)
        self.assertEqual(code, 1)
        self.assertIn("FAILED: sink: uploading", out)
        self.assertIn("HTTP 403 PERMISSION_DENIED", out)

    def test_print_ingest_sql_names_each_route_folder_and_the_status_folder(self):
        from tests.helpers import run_main
        code, out, err = run_main(["--sqlite", self.db, "--print-ingest-sql"], self.env)
        self.assertEqual(code, 0, err)
        self.assertIn("CREATE OR REFRESH STREAMING TABLE `main`.`sensors`.`raw_readings`", out)
        self.assertIn(f"STREAM read_files('{VOLUME}/raw_readings/', format => 'parquet'", out)
        self.assertIn(f"COPY INTO `main`.`sensors`.`raw_readings` FROM '{VOLUME}/raw_readings/'",
                      out)
        self.assertIn(f"read_files('{VOLUME}/_nodes/', format => 'json'", out)
        self.assertEqual(self.service.requests, [])  # no connection
        code, out, err = run_main(["--sqlite", self.db, "--print-ingest-sql"],
                                  {**self.env, "TARGET": "delta", "DATABRICKS_HOST": ""})
        self.assertEqual(code, 2)
        self.assertIn("--print-ingest-sql is for the landing target", err)

# A process that takes its scratch folder, makes a folder in it as parquet_bytes does,
# says where, then waits for stdin to close (or kills itself: a SIGKILL mid-encode)
SCRATCH_CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import sqlite_to_databricks_uploader as up
if sys.argv[3] == "pid-7":  # another pid namespace (a container) whose pid is 7
    os.getpid = lambda: 7
root = up.scratch_root(sys.argv[2])
open(os.path.join(up.scratch_dir("parquet-"), "part.parquet"), "wb").write(b"PAR1")
print(root, flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


class ScratchTest(TempDirTestCase):
    """Temporary folders of killed processes are removed at the next start; a live
    uploader's (another state dir on the same host) are kept."""

    def child(self, how):
        import subprocess
        import sys
        from tests.helpers import ROOT
        proc = subprocess.Popen([sys.executable, "-c", SCRATCH_CHILD, ROOT, self.tmp, how],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for cleanup in (proc.wait, proc.stdout.close, proc.stdin.close):
            self.addCleanup(cleanup)
        root = proc.stdout.readline().strip()
        pid = 7 if how == "pid-7" else proc.pid
        self.assertRegex(os.path.basename(root), rf"^uploader-scratch-{pid}-[0-9a-f]{{8}}$")
        self.assertEqual(os.path.dirname(root), self.tmp)
        return proc, root

    def test_processes_with_one_pid_in_two_containers_keep_their_folders(self):
        # two containers sharing /tmp (a pod's emptyDir), each uploader pid 7 in its
        # own namespace: the second start must not take the first one's folder
        first, first_root = self.child("pid-7")
        second, second_root = self.child("pid-7")
        self.assertNotEqual(first_root, second_root)
        for root in (first_root, second_root):
            self.assertTrue(glob.glob(os.path.join(root, "parquet-*", "part.parquet")))
        self.assertEqual(up.remove_stale_scratch(self.tmp), 0)
        for proc in (first, second):
            proc.stdin.close()
            self.assertEqual(proc.wait(), 0)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_a_dead_process_folder_is_removed_and_a_live_one_kept(self):
        live, live_root = self.child("wait")
        dead, dead_root = self.child("die")
        self.assertEqual(dead.wait(), -signal.SIGKILL)
        self.assertTrue(glob.glob(os.path.join(dead_root, "parquet-*", "part.parquet")))
        with self.assertLogs(up.log, "INFO") as logs:
            self.assertEqual(up.remove_stale_scratch(self.tmp), 1)
        self.assertEqual(len(logs.records), 1)
        self.assertIn("removed 1 temporary folder left by uploader processes that were "
                      "killed", logs.output[0])
        self.assertEqual(os.listdir(self.tmp), [os.path.basename(live_root)])
        self.assertTrue(glob.glob(os.path.join(live_root, "parquet-*", "part.parquet")))
        live.stdin.close()  # its exit removes its own folder
        self.assertEqual(live.wait(), 0)
        self.assertEqual(os.listdir(self.tmp), [])
        with self.assertNoLogs(up.log, "INFO"):
            self.assertEqual(up.remove_stale_scratch(self.tmp), 0)

    def test_a_live_process_killed_later_is_removed_then(self):
        live, live_root = self.child("wait")
        self.assertEqual(up.remove_stale_scratch(self.tmp), 0)
        live.kill()
        live.wait()
        self.assertTrue(os.path.isdir(live_root))
        self.assertEqual(up.remove_stale_scratch(self.tmp), 1)
        self.assertEqual(os.listdir(self.tmp), [])
