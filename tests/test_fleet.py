"""Fleets on the Delta path (issue 14): object stores, contention, upkeep, one view.

1. A store that ignores conditional writes is refused at start; a commit that vanished
   after it landed stops the cycle (exit 1) and the rows land at the next run.
2. Nodes that start together on a new table all succeed (creation races retried with
   jittered backoff); the loop's first wait is jittered.
3. --maintain compacts, checkpoints and vacuums; MAINTAIN_EVERY runs it in the loop;
   --status warns about a table with too many files.
4. --fleet-status: one line per node from the commit metadata; silent nodes flagged.
5. A fleet on an S3-compatible server (moto's, on loopback) with kills and lost replies.

The S3 tests need moto (`uv run --with 'moto[server]'`, as README's test command).

Run: uv run -q --with-requirements sqlite_to_databricks_uploader.py --with sqlglot \\
         --with duckdb --with 'moto[server]' python -m unittest tests.test_fleet -v
"""

import collections
import datetime as dt
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import unittest
from unittest import mock

from tests.helpers import (PipelineTestCase, delta_rows, read_delta, run_driver, run_main,
                           run_script, slow, start_driver, up)

HAS_MOTO = importlib.util.find_spec("moto") is not None
needs_moto = unittest.skipUnless(HAS_MOTO, "needs moto: uv run --with 'moto[server]'")
SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "timestamp TEXT NOT NULL, node TEXT, v INTEGER)")


class Fleet(PipelineTestCase):
    """Nodes with their own SQLite file, state dir and SOURCE_ID, one target base."""

    base = None  # DELTA_URI of the fleet; default: a local directory

    def setUp(self):
        super().setUp()
        self.counts = collections.Counter()
        for signum in (signal.SIGINT, signal.SIGTERM):  # main() installs its own
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))

    def db(self, n):
        return self.path(f"node-{n:02d}.db")

    def add(self, n, count):
        """Node n's sensor writes `count` more rows (ids continue)."""
        if not os.path.exists(self.db(n)):
            self.make(SCHEMA, name=f"node-{n:02d}.db")
        start = self.counts[n]
        self.insert(self.db(n), [(f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
                                  f"node-{n:02d}", n * 100_000 + i)
                                 for i in range(start, start + count)],
                    ["timestamp", "node", "v"])
        self.counts[n] += count

    def node_env(self, n, **extra):
        return self.base_env(STATE_DIR=self.path(f"state-{n:02d}"), SOURCE_ID=f"node-{n:02d}",
                             DELTA_URI=self.base or self.path("lake"), **extra)

    def table_uri(self):
        return (self.base or self.path("lake")).rstrip("/") + "/raw_readings"

    def rows(self):
        if self.base:
            return read_delta(self.table_uri(), table="raw_readings")
        return delta_rows(self.table_uri())

    def run_fleet(self, plan=None, argv=(), nodes=8, expect=None):
        """Start `nodes` nodes at once (node n under kill plan[n] = (hook, k)); wait; return
        {n: (exit code, log)}."""
        plan, procs = plan or {}, {}
        for n in range(nodes):
            hook, k = plan.get(n, ("none", 0))
            procs[n] = start_driver(hook, k, ["--sqlite", self.db(n), "--once",
                                              "--batch-size", "9", *argv],
                                    self.node_env(n), self.path(f"node-{n:02d}.log"))
        out = {}
        for n, proc in procs.items():
            code = proc.wait(timeout=600)
            with open(self.path(f"node-{n:02d}.log"), encoding="utf-8") as fh:
                out[n] = (code, fh.read())
            if expect is not None:
                self.assertEqual(code, expect(n), f"node {n}:\n{out[n][1][-3000:]}")
                self.assertNotIn("Traceback", out[n][1])
        return out

    def assert_every_row_once(self, nodes):
        rows = self.rows()
        by_node = collections.defaultdict(list)
        for r in rows:
            by_node[r["_source_id"]].append(r)
        for n in range(nodes):
            got = by_node[f"node-{n:02d}"]
            self.assertEqual(sorted(r["id"] for r in got), list(range(1, self.counts[n] + 1)),
                             f"node {n}: rows lost or doubled")
            self.assertEqual(sorted(r["v"] for r in got),
                             [n * 100_000 + i for i in range(self.counts[n])])
        self.assertEqual(len(rows), sum(self.counts.values()))

    def one_error_line(self, log):
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, log[-3000:])
        self.assertNotIn("Traceback", log)
        return errors[0]


class S3Fleet(Fleet):
    """The fleet's base is s3://fleet-bucket/lake on moto's server (a child process)."""

    enforcing = True

    def setUp(self):
        super().setUp()
        from tests.object_store import S3Server
        self.s3 = S3Server(enforcing=self.enforcing).start()
        self.addCleanup(self.s3.stop)
        self.base = "s3://fleet-bucket/lake"
        patcher = mock.patch.dict(os.environ, self.s3.env())  # deltalake reads os.environ
        patcher.start()
        self.addCleanup(patcher.stop)

    def node_env(self, n, **extra):
        return {**super().node_env(n, **extra), **self.s3.env()}


# === 1. Stores that lose commits =====================================================

@needs_moto
@slow
class NonEnforcingStoreTest(S3Fleet):
    enforcing = False

    def test_a_store_that_ignores_if_none_match_is_refused_at_start(self):
        self.add(0, 20)
        result = run_script(["--sqlite", self.db(0), "--once"], self.node_env(0))
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        line = self.one_error_line(result.stderr)
        self.assertIn("ignores conditional writes", line)
        self.assertIn("If-None-Match", line)
        self.assertIn("s3://fleet-bucket/lake/raw_readings", line)
        keys = self.s3.keys("lake/")
        self.assertEqual(keys, [], "nothing may be written, the probe object is removed")

    def test_test_upload_says_so(self):
        result = run_script(["--test-upload"], self.node_env(0))
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        self.assertRegex(result.stdout, r"conditional writes +FAILED: target: .*ignores "
                                        r"conditional writes")
        self.assertNotIn("write s3://", result.stdout)

    def test_the_same_store_enforcing_is_accepted(self):
        # The control: the same server without the proxy takes the rows.
        self.s3.port = self.s3.moto_port
        self.add(0, 20)
        result = run_script(["--sqlite", self.db(0), "--once", "--batch-size", "7"],
                            self.node_env(0))
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assert_every_row_once(1)
        self.assertFalse([k for k in self.s3.keys("lake/") if "_uploader_probe" in k])
        said = [x for x in result.stderr.splitlines() if "conditional writes" in x]
        self.assertEqual(len(said), 1, result.stderr[-3000:])
        self.assertRegex(said[0], r"s3://fleet-bucket/lake/raw_readings enforces conditional "
                                  r"writes \(a second PUT with If-None-Match: \* got HTTP 412\)")


class ProbeWordingTest(unittest.TestCase):
    """The probe says in one line why it did not probe a store."""

    def test_stores_that_are_not_probed_say_why(self):
        cases = [("gs://bucket/lake/t", {}, "is on Google Cloud Storage, which refuses to "
                  "create a file twice itself: not probed"),
                 ("abfss://c@acct.dfs.core.windows.net/lake/t", {}, "is on Azure Storage"),
                 ("s3://bucket/lake/t", {"AWS_REGION": "eu-west-1"},
                  "not checking that s3://bucket/lake/t enforces conditional writes: no "
                  "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")]
        for uri, env, words in cases:
            with self.subTest(uri=uri):
                with self.assertLogs("uploader", "INFO") as logs:
                    up.probe_conditional_writes(uri, env)
                self.assertEqual(len(logs.output), 1)
                self.assertIn(words, logs.output[0])

    def test_a_local_directory_is_not_probed_and_says_nothing(self):
        with self.assertNoLogs("uploader", "INFO"):
            up.probe_conditional_writes("/tmp/lake/t", {})


class VanishedCommitTest(Fleet):
    def test_a_commit_replaced_after_it_landed_is_exit_1_then_sent_again(self):
        self.add(0, 30)
        done = run_driver("vanish-commit", 2, ["--sqlite", self.db(0), "--once",
                                               "--batch-size", "10"], self.node_env(0))
        self.assertEqual(done.returncode, 1, done.stderr[-3000:])
        line = self.one_error_line(done.stderr)
        self.assertIn("its commit is not in the table's log", line)
        self.assertEqual(len(self.rows()), 10, "the second batch's commit was replaced")
        again = run_script(["--sqlite", self.db(0), "--once", "--batch-size", "10"],
                           self.node_env(0))
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
        self.assert_every_row_once(1)


# === 2. Contention ===================================================================

class RetryTest(PipelineTestCase):
    RACES = ["Failed to commit transaction: Protocol changed since last commit: protocol "
             "changed", "Failed to commit transaction: Metadata changed since last commit."]

    def sink(self, sleeps):
        config = up.validate_config(up.Config(delta_uri=self.path("lake"), source_id="n1"))
        sink = up.DeltaSink(config, up.Identity("n1", "readings", "s1"))
        sink.sleep, sink.jitter = sleeps.append, lambda low, high: high
        return sink

    def batch(self, sink, seq=1):
        ids = [3 * seq - 2, 3 * seq - 1, 3 * seq]
        chunk = up.Chunk(["id"], [ids], 3, [ids[-1]], kinds=[up.BIGINT], batch_id=f"s1-{seq}")
        return up.Batch(seq, chunk.batch_id, chunk.columns, chunk.kinds, 3,
                        [sink.encode("t", chunk)[0]], chunk.cursor_end)

    def test_races_on_a_new_table_are_retried_after_a_jittered_pause(self):
        sleeps, calls = [], []
        sink = self.sink(sleeps)
        append = sink._append

        def racing(table, batch):
            calls.append(table)
            if len(calls) <= len(self.RACES):
                raise type("CommitFailedError", (Exception,), {})(self.RACES[len(calls) - 1])
            return append(table, batch)

        with mock.patch.object(sink, "_append", racing), \
                mock.patch.object(sink, "has_committed", return_value=False):
            receipt = sink.write("t", self.batch(sink))
        self.assertEqual(receipt.rows, 3)
        self.assertEqual(sleeps, [0.2 * 2 * 1.5, 0.2 * 4 * 1.5])
        self.assertEqual(len(calls), 3)

    def test_a_read_that_times_out_is_tried_again(self):
        sleeps = []
        sink = self.sink(sleeps)
        sink.write("t", self.batch(sink))
        sink._tables.clear()
        from deltalake import DeltaTable
        answers = [OSError("Generic S3 error: operation timed out"), None]

        def flaky(uri, *args, **kwargs):
            answer = answers.pop(0)
            if answer:
                raise answer
            return DeltaTable(uri, *args, **kwargs)

        with mock.patch("deltalake.DeltaTable", flaky):
            self.assertTrue(sink.has_committed("t", 1, "s1-1"))
        self.assertEqual(sleeps, [0.2 * 2 * 1.5])

    def test_a_write_whose_table_read_times_out_is_sent_again(self):
        """Opening the table inside a write (is the batch there already?), or bringing
        an open one up to date, fails for a transient reason: the write goes again after
        one jittered pause, and the rows land once."""
        sleeps = []
        sink = self.sink(sleeps)
        sink.write("t", self.batch(sink))
        timeout = OSError("Generic S3 error: operation timed out")
        from deltalake import DeltaTable
        opens = []

        def flaky_open(uri, *args, **kwargs):
            opens.append(uri)
            if len(opens) == 1:
                raise timeout
            return DeltaTable(uri, *args, **kwargs)

        for seq, where in ((2, "opening it"), (3, "bringing it up to date")):
            with self.subTest(where):
                sleeps.clear()
                if seq == 2:
                    sink._tables.clear()
                    patcher = mock.patch("deltalake.DeltaTable", flaky_open)
                else:
                    found = sink._tables["t"]
                    patcher = mock.patch.object(found, "update_incremental",
                                                side_effect=[timeout, None, None, None])
                with patcher:
                    receipt = sink.write("t", self.batch(sink, seq))
                self.assertEqual(receipt.rows, 3)
                self.assertEqual(sleeps, [0.2 * 2 * 1.5])
                self.assertEqual(sorted(r["id"] for r in delta_rows(sink.table_uri("t"))),
                                 list(range(1, 3 * seq + 1)))

    def test_a_conditional_write_probe_cut_off_is_tried_again(self):
        """The store's probe (two PUTs) meets a connection reset (moto's server under a
        fleet's load did, and the node exited 1): tried again after a jittered pause,
        and the batch lands; a store found not to enforce them is not retried."""
        sleeps, probes = [], []
        sink = self.sink(sleeps)

        def reset_once(uri, environ):
            probes.append(uri)
            if len(probes) == 1:
                raise up.SinkError(f"sink: checking {uri} for conditional writes failed: "
                                   "[Errno 104] Connection reset by peer", transient=True)

        with mock.patch.object(up, "probe_conditional_writes", reset_once):
            self.assertEqual(sink.write("t", self.batch(sink)).rows, 3)
        self.assertEqual(len(probes), 2)
        self.assertEqual(sleeps, [0.2 * 2 * 1.5])
        self.assertEqual(len(delta_rows(sink.table_uri("t"))), 3)
        refused = up.ConfigError("target: the store ignores conditional writes")
        with mock.patch.object(up, "probe_conditional_writes", side_effect=refused) as probe:
            with self.assertRaises(up.ConfigError):
                self.sink([]).check_store("t")
        self.assertEqual(probe.call_count, 1)

    def test_what_is_retried(self):
        cases = [("Protocol changed since last commit", True),
                 ("Metadata changed since last commit.", True),
                 ("Version 3 already exists", True),
                 ("Max commit attempts exceeded", True),
                 ("Generic S3 error: connection reset", True),
                 ("Schema error: cannot cast string to int64", False),
                 ("Permission denied", False),
                 ("Invalid table version", False)]
        for text, transient in cases:
            with self.subTest(text=text):
                self.assertIs(up.is_transient_delta_error(Exception(text)), transient)


class StopAt:
    """A stop flag for run_forever that records its waits and stops after `cycles`."""

    def __init__(self, cycles):
        self.cycles, self.waits, self.stopped = cycles, [], False

    def is_set(self):
        return self.stopped

    def wait(self, timeout):
        self.waits.append(timeout)
        return self.stopped


class JitterTest(unittest.TestCase):
    def job(self, once, jitter=True):
        config = up.Config(interval=60.0, once=once, jitter=jitter)
        job = mock.Mock(config=config)
        return job

    def run_loop(self, job, stop, cycles):
        job.stop = stop

        def cycle(_job):
            stop.cycles -= 1
            stop.stopped = stop.cycles == 0

        with mock.patch.object(up, "run_cycle", cycle):
            return up.run_forever(job, rng=mock.Mock(uniform=lambda a, b: (a + b) * 0.37))

    def test_loop_mode_waits_a_random_part_of_the_interval_first(self):
        stop = StopAt(2)
        self.assertEqual(self.run_loop(self.job(once=False), stop, 2), 0)
        self.assertEqual(stop.waits, [60.0 * 0.37, 60.0, 60.0])

    def test_once_and_jitter_off_start_at_once(self):
        for once, jitter in ((True, True), (False, False)):
            with self.subTest(once=once, jitter=jitter):
                stop = StopAt(1)
                self.run_loop(self.job(once, jitter), stop, 1)
                self.assertEqual(stop.waits, [] if once else [60.0])


# === 3. Upkeep =======================================================================

@slow
class UpkeepTest(Fleet):
    def fill(self, batches=12):
        self.add(0, 5 * batches)
        self.upload_node(0, "--batch-size", "5")

    def upload_node(self, n, *flags, expect=0, **env):
        code, out, err = run_main(["--sqlite", self.db(n), "--once", *flags],
                                  self.node_env(n, **env))
        self.assertEqual(code, expect, err[-3000:])
        return out, err

    def files(self):
        from deltalake import DeltaTable
        return len(DeltaTable(self.table_uri()).file_uris())

    def test_maintain_compacts_checkpoints_and_vacuums_keeping_every_row(self):
        self.fill(12)
        self.assertEqual(self.files(), 12)
        orphan_old = os.path.join(self.table_uri(), "part-orphan-old.snappy.parquet")
        orphan_new = os.path.join(self.table_uri(), "part-orphan-new.snappy.parquet")
        for path in (orphan_old, orphan_new):
            with open(path, "wb") as fh:
                fh.write(b"PAR1 never committed")
        two_hours_ago = time.time() - 7200
        os.utime(orphan_old, (two_hours_ago, two_hours_ago))
        before = sorted(r["id"] for r in self.rows())
        code, _out, err = run_main(["--maintain", "--sqlite", self.db(0)],
                                   self.node_env(0, RETENTION_HOURS=1))
        self.assertEqual(code, 0, err)
        self.assertIn("compact raw_readings: 12 data files before, 1 after", err)
        self.assertIn("checkpoint raw_readings at version", err)
        self.assertRegex(err, r"vacuum raw_readings: \d+ unreferenced files older than 1 h")
        self.assertEqual(self.files(), 1)
        self.assertEqual(sorted(r["id"] for r in self.rows()), before)
        self.assertFalse(os.path.exists(orphan_old), "an old orphan is removed")
        self.assertTrue(os.path.exists(orphan_new), "a file younger than the retention stays")
        self.assertTrue(any(n.endswith(".checkpoint.parquet")
                            for n in os.listdir(os.path.join(self.table_uri(), "_delta_log"))))

    def test_maintain_every_n_cycles_in_the_loop(self):
        clock = [0.0]
        every = up.UpkeepSchedule("3", lambda: clock[0])
        self.assertEqual([every() for _ in range(7)],
                         [False, False, True, False, False, True, False])
        timed = up.UpkeepSchedule("2h", lambda: clock[0])
        due = []
        for hour in (0.5, 1.0, 2.0, 2.5, 4.0):
            clock[0] = hour * 3600
            due.append(timed())
        self.assertEqual(due, [False, False, True, False, True])
        self.assertFalse(up.UpkeepSchedule(None, lambda: 0)())

    def test_bad_maintain_every_is_a_config_error(self):
        for bad in ("0", "often", "1.5", "-3h"):
            with self.subTest(value=bad):
                code, _, err = run_main(["--sqlite", "x.db", "--once"],
                                        {"MAINTAIN_EVERY": bad})
                self.assertEqual(code, 2)
                self.assertIn("maintain_every", err)

    def test_the_loops_upkeep_node_compacts_after_its_cycles(self):
        self.add(0, 40)
        sink_calls = []
        original = up.DeltaSink.maintain

        def spy(sink, table):
            sink_calls.append(table)
            original(sink, table)
            raise KeyboardInterrupt  # leave the loop: the upkeep has run once

        with mock.patch.object(up.DeltaSink, "maintain", spy):
            with self.assertRaises(KeyboardInterrupt):
                run_main(["--sqlite", self.db(0), "--batch-size", "5", "--interval", "0.01"],
                         self.node_env(0, MAINTAIN_EVERY="1", JITTER="false"))
        self.assertEqual(sink_calls, ["raw_readings"])
        self.assertEqual(self.files(), 1)
        self.assertEqual(sorted(r["id"] for r in self.rows()), list(range(1, 41)))

    def test_edge_nodes_can_leave_checkpoints_out(self):
        self.add(0, 101 * 2)
        self.upload_node(0, "--batch-size", "2", WRITE_CHECKPOINTS="false")
        names = os.listdir(os.path.join(self.table_uri(), "_delta_log"))
        self.assertFalse([n for n in names if "checkpoint" in n], names)
        self.add(1, 101 * 2)
        self.upload_node(1, "--batch-size", "2")
        names = os.listdir(os.path.join(self.table_uri(), "_delta_log"))
        self.assertTrue([n for n in names if n.endswith(".checkpoint.parquet")], names)

    def test_status_warns_when_the_table_has_too_many_files(self):
        self.fill(6)
        with mock.patch.object(up.DeltaSink, "MANY_FILES", 5):
            code, _out, err = run_main(["--sqlite", self.db(0), "--status"],
                                       self.node_env(0))
        self.assertEqual(code, 0, err)
        self.assertIn("holds 6 data files (over 5)", err)
        self.assertIn("--maintain", err)
        code, _out, err = run_main(["--sqlite", self.db(0), "--status"], self.node_env(0))
        self.assertNotIn("data files", err)

    def test_a_long_running_node_opens_the_table_again_from_its_newest_checkpoint(self):
        # a DeltaTable brought up to date commit after commit replays every commit since
        # it was opened, and each commit through it gets slower (128 ms instead of 24 ms
        # at 1,500 commits): the node opens the table again every REOPEN_EVERY versions,
        # its own commits and other nodes' alike, and no marker or row is lost by it
        def node(name):
            config = up.Config(delta_uri=self.path("lake"), source_id=name)
            sink = up.DeltaSink(config, up.Identity(name, "readings", "s1"))
            self.addCleanup(sink.close)
            return sink

        def batch(sink, seq):
            chunk = up.Chunk(["id", "v"], [[seq], [float(seq)]], 1, [seq],
                             kinds=[up.BIGINT, up.DOUBLE], batch_id=f"b-{seq}")
            return up.Batch(seq, chunk.batch_id, chunk.columns, chunk.kinds, 1,
                            [sink.encode("raw_readings", chunk)[0]], chunk.cursor_end)

        mine, other = node("node-00"), node("node-01")
        with mock.patch.object(up.DeltaSink, "REOPEN_EVERY", 4):
            for seq in range(1, 16):
                self.assertFalse(mine.write("raw_readings", batch(mine, seq)).skipped)
                other.write("raw_readings", batch(other, seq))
                self.assertTrue(mine.has_committed("raw_readings", seq, f"b-{seq}"))
                table = mine._tables["raw_readings"]
                self.assertLess(table.version() - mine._opened["raw_readings"], 4,
                                "the table object replays at most REOPEN_EVERY commits")
            self.assertTrue(mine.write("raw_readings", batch(mine, 15)).skipped,
                            "a batch sent again after a reopen is recognised")
        rows = self.rows()
        for name in ("node-00", "node-01"):
            self.assertEqual(sorted(r["id"] for r in rows if r["_source_id"] == name),
                             list(range(1, 16)))


# === 4. One view of the fleet ========================================================

class FleetStatusTest(Fleet):
    def test_one_line_per_node_as_it_last_reported(self):
        for n in range(3):
            self.add(n, 10 * (n + 1) + 3)
            code, _, err = run_main(["--sqlite", self.db(n), "--once", "--batch-size", "4"],
                                    self.node_env(n, UPLOAD_INTERVAL=60))
            self.assertEqual(code, 0, err)
        self.add(2, 6)  # node 2 has rows it has not sent yet: its report says 0 pending
        code, out, err = run_main(["--sqlite", self.db(0), "--fleet-status", "--json"],
                                  self.node_env(0))
        self.assertEqual(code, 0, err)
        lines = {x["node"]: x for x in json.loads(out)}
        self.assertEqual(sorted(lines), ["node-00", "node-01", "node-02"])
        for n in range(3):
            line = lines[f"node-{n:02d}"]
            self.assertEqual(line["rows"], 10 * (n + 1) + 3)
            self.assertEqual(line["cursor"], [10 * (n + 1) + 3])
            self.assertEqual(line["pending_rows"], 0)
            self.assertTrue(line["last_batch"].endswith(f"-{(10 * (n + 1) + 3 + 3) // 4}"))
            self.assertFalse(line["silent"])
            self.assertIsNotNone(line["lag_seconds"])
        code, out, _ = run_main(["--sqlite", self.db(0), "--fleet-status"], self.node_env(0))
        self.assertEqual(len([l for l in out.splitlines() if "node-0" in l]), 3)

    def test_pending_rows_as_reported_with_the_batch(self):
        self.add(0, 20)
        seen = []
        original = up.DeltaSink.metadata

        def spy(sink, batch):
            meta = original(sink, batch)
            seen.append(int(meta["uploader.pending"]))
            return meta

        with mock.patch.object(up.DeltaSink, "metadata", spy):
            self.upload_node(0)
        self.assertEqual(seen, [14, 8, 2, 0])

    def upload_node(self, n, expect=0):
        code, _, err = run_main(["--sqlite", self.db(n), "--once", "--batch-size", "6"],
                                self.node_env(n))
        self.assertEqual(code, expect, err)

    def test_the_cycle_hands_the_sink_its_status_after_each_cycle(self):
        self.add(0, 20)
        reports = []
        with mock.patch.object(up.DeltaSink, "report_status",
                               lambda sink, status: reports.append(status)):
            self.upload_node(0)
            failing = mock.patch.object(up.DeltaSink, "write", side_effect=up.SinkError(
                "sink: writing batch x failed: the store said no"))
            self.add(0, 3)
            with failing:
                self.upload_node(0, expect=1)
        self.assertEqual(len(reports), 2)
        done, failed = reports
        self.assertEqual({k: done[k] for k in ("source_id", "table", "cursor", "pending",
                                               "behind", "rows", "last_error")},
                         {"source_id": "node-00", "table": "raw_readings", "cursor": [20],
                          "pending": 0, "behind": 0, "rows": 20, "last_error": None})
        self.assertRegex(done["last_batch"], r"^[0-9a-f]{12}-4$")
        self.assertEqual(done["version"], up.__version__)
        self.assertIsNotNone(up.parse_timestamp(done["last_upload"]))
        self.assertGreaterEqual(done["lag_seconds"], 0)
        self.assertEqual(failed["last_error"], "sink: writing batch x failed: the store said no")
        self.assertEqual((failed["rows"], failed["cursor"], failed["last_batch"]),
                         (20, [20], done["last_batch"]))

    def test_nodes_silent_for_three_intervals_are_flagged(self):
        self.add(0, 5)
        self.add(1, 5)
        self.upload_node(0)
        self.upload_node(1)
        import datetime as dt
        config = up.validate_config(up.Config(sqlite=self.db(0), delta_uri=self.path("lake")))
        now = dt.datetime.now(dt.timezone.utc)
        fresh = up.fleet_status(config, now=now)
        self.assertEqual([x["silent"] for x in fresh], [False, False])
        later = up.fleet_status(config, now=now + dt.timedelta(seconds=3 * 300 + 60))
        self.assertEqual([x["silent"] for x in later], [True, True])
        self.assertIn("SILENT", up.format_fleet(later))


class FleetLinesTest(unittest.TestCase):
    """fleet_lines: what the sinks' reports and row counts become, line by line."""

    AT = dt.datetime(2026, 11, 30, 17, tzinfo=dt.timezone.utc)

    def report(self, table, rows, path=None, file="a.db", batch="s-t1-1"):
        return {"source_id": "n1", "source_file": file, "source_path": path,
                "source_table": table, "rows": rows, "last_batch": batch,
                "last_upload": self.AT, "pending": 0}

    def test_two_source_tables_of_one_file_show_the_rows_each_reported(self):
        lines = up.fleet_lines([self.report("t1", 300), self.report("t2", 200)],
                               {("n1", "a.db"): (500, self.AT)})
        self.assertEqual([(x["source_file"], x["source_table"], x["rows"]) for x in lines],
                         [("a.db", "t1", 300), ("a.db", "t2", 200)])

    def test_files_named_alike_are_a_line_each_and_replace_their_older_report(self):
        lines = up.fleet_lines([self.report("t1", 9),  # a version before paths
                                self.report("t1", 3, "/mnt/dev1/a.db"),
                                self.report("t1", 5, "/mnt/dev2/a.db"),
                                self.report("t1", 4, file="b.db")],
                               {("n1", "a.db"): (8, self.AT), ("n1", "b.db"): (4, self.AT)})
        self.assertEqual([(x["source_path"], x["rows"]) for x in lines],
                         [("/mnt/dev1/a.db", 3), ("/mnt/dev2/a.db", 5), (None, 4)])
        self.assertEqual(up.source_names([{**x, "table": "t"} for x in lines]),
                         ["dev1/a.db", "dev2/a.db", "b.db"])

    def test_the_shortest_end_of_a_path_that_tells_files_apart(self):
        among = {"/a/x/data.db", "/b/x/data.db", "/b/y/data.db"}
        self.assertEqual([up.short_path(p, among) for p in sorted(among)],
                         ["a/x/data.db", "b/x/data.db", "y/data.db"])
        self.assertEqual(up.short_path("/a/x/data.db", {"/a/x/data.db"}), "data.db")


class ManySourcesFleetStatusTest(Fleet):
    """A node with several files feeding one table: one line per (node, file, table)."""

    def many(self, n, files, globs=("sensor-*.db", "*/sensor-*.db")):
        """Node n uploads `files` ({name: rows}) of table readings through one `sources:`
        config (globs in its folder); returns its config path."""
        folder = self.path(f"node-{n:02d}")
        for name, count in files.items():
            db = os.path.join(folder, name)
            os.makedirs(os.path.dirname(db), exist_ok=True)
            conn = sqlite3.connect(db)
            with conn:
                conn.execute(SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
                conn.executemany("INSERT INTO readings (timestamp, node, v) VALUES (?, ?, ?)",
                                 [(f"2025-01-01T00:00:{i % 60:02d}Z", name, i)
                                  for i in range(count)])
            conn.close()
        config = self.path(f"node-{n:02d}.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            json.dump({"sources": [{"sqlite": os.path.join(folder, pattern),
                                    "tables": ["readings"]} for pattern in globs]}, fh)
        code, _, err = run_main(["--config", config, "--once", "--batch-size", "4"],
                                self.node_env(n))
        self.assertEqual(code, 0, err)
        return config

    def test_two_files_feeding_one_table_are_two_lines(self):
        self.many(0, {"sensor-1.db": 13, "sensor-2.db": 7})
        self.add(1, 5)  # a single-source node in the same table
        code, _, err = run_main(["--sqlite", self.db(1), "--once"], self.node_env(1))
        self.assertEqual(code, 0, err)
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(0))
        self.assertEqual(code, 0, err)
        self.assertEqual([x["node"] for x in json.loads(out)], ["node-00", "node-00",
                                                                "node-01"])
        lines = [(x["node"], x["source_file"], x["source_table"], x["rows"], x["cursor"],
                  x["pending_rows"], x["silent"]) for x in json.loads(out)]
        self.assertEqual(lines, [("node-00", "sensor-1.db", "readings", 13, [13], 0, False),
                                 ("node-00", "sensor-2.db", "readings", 7, [7], 0, False),
                                 ("node-01", "node-01.db", "readings", 5, [5], 0, False)])
        batches = [x["last_batch"] for x in json.loads(out)]
        self.assertEqual(len(set(batches)), 3)
        self.assertTrue(batches[0].endswith("-4") and batches[1].endswith("-2"), batches)
        code, out, _ = run_main(["--databricks-table", "raw_readings", "--fleet-status"],
                                self.node_env(0))
        header, *rows = out.splitlines()
        self.assertIn("source", header.split())
        self.assertEqual(len([r for r in rows if "node-0" in r]), 3)
        self.assertTrue([r for r in rows if "sensor-1.db:readings" in r])

    def test_files_named_alike_in_two_folders_are_two_lines(self):
        self.many(0, {"dev1/sensor-1.db": 13, "dev2/sensor-1.db": 6})
        code, out, err = run_main(["--databricks-table", "raw_readings", "--fleet-status",
                                   "--json"], self.node_env(0))
        self.assertEqual(code, 0, err)
        folder = os.path.realpath(self.path("node-00"))
        self.assertEqual([(x["source_file"], x["source_path"], x["rows"], x["cursor"])
                          for x in json.loads(out)],
                         [("sensor-1.db", f"{folder}/dev1/sensor-1.db", 13, [13]),
                          ("sensor-1.db", f"{folder}/dev2/sensor-1.db", 6, [6])])
        code, out, _ = run_main(["--databricks-table", "raw_readings", "--fleet-status"],
                                self.node_env(0))
        self.assertIn(" dev1/sensor-1.db:readings ", out)
        self.assertIn(" dev2/sensor-1.db:readings ", out)

    def test_commits_of_an_older_version_without_the_file_are_read(self):
        original = up.DeltaSink.metadata

        def old(sink, batch):
            meta = original(sink, batch)
            meta.pop("uploader.source_file", None)
            return meta

        self.add(0, 6)
        with mock.patch.object(up.DeltaSink, "metadata", old):
            code, _, err = run_main(["--sqlite", self.db(0), "--once"], self.node_env(0))
        self.assertEqual(code, 0, err)
        line, = up.fleet_status(up.validate_config(up.Config(
            databricks_table="raw_readings", delta_uri=self.path("lake"))))
        self.assertEqual((line["node"], line["rows"], line["cursor"], line["source_file"]),
                         ("node-00", 6, [6], None))
        self.add(0, 2)  # the node upgraded: its older, file-less report is not a line
        code, _, err = run_main(["--sqlite", self.db(0), "--once"], self.node_env(0))
        self.assertEqual(code, 0, err)
        line, = up.fleet_status(up.validate_config(up.Config(
            databricks_table="raw_readings", delta_uri=self.path("lake"))))
        self.assertEqual((line["rows"], line["cursor"], line["source_file"]),
                         (8, [8], "node-00.db"))

    def test_a_table_without_the_source_file_column_is_read(self):
        """A table an older version made (no _source_file): one line per node."""
        import datetime as dt
        from arro3.core import Array, DataType, Table
        from deltalake import write_deltalake
        stamp = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
        write_deltalake(self.table_uri(), Table.from_pydict({
            "id": Array([1, 2, 3], DataType.int64()),
            "_source_id": Array(["old-1", "old-1", "old-2"], DataType.string()),
            "_uploaded_at": Array([int(stamp.timestamp() * 1e6)] * 3, DataType.int64())
            .cast(up.arrow_type(up.TIMESTAMP))}))
        lines = up.fleet_status(up.validate_config(up.Config(
            databricks_table="raw_readings", delta_uri=self.path("lake"))))
        self.assertEqual([(x["node"], x["rows"], x["source_file"], x["last_commit_at"])
                          for x in lines], [("old-1", 2, None, stamp), ("old-2", 1, None, stamp)])

    def test_single_source_output_has_no_source_column(self):
        self.add(0, 3)
        self.upload_node(0)
        code, out, _ = run_main(["--sqlite", self.db(0), "--fleet-status"], self.node_env(0))
        self.assertEqual(out.splitlines()[0].split(),
                         ["table", "node", "rows", "last", "batch", "last", "commit",
                          "cursor", "pending", "lag", "version", "state"])

    upload_node = FleetStatusTest.upload_node


# === 5. A fleet on an S3-compatible server ===========================================

@needs_moto
@slow
class S3FleetTest(S3Fleet):
    NODES = 8

    def test_creation_race_on_s3(self):
        for n in range(self.NODES):
            self.add(n, 12 + n)
        self.run_fleet(nodes=self.NODES, expect=lambda n: 0)
        self.assert_every_row_once(self.NODES)
        # The fleet view and the upkeep, on the object store.
        code, out, err = run_main(["--fleet-status", "--json", "--databricks-table",
                                   "readings"], self.node_env(0))
        self.assertEqual(code, 0, err)
        self.assertEqual({x["node"]: x["rows"] for x in json.loads(out)},
                         {f"node-{n:02d}": 12 + n for n in range(self.NODES)})
        code, _, err = run_main(["--maintain", "--databricks-table", "readings"],
                                self.node_env(0))
        self.assertEqual(code, 0, err)
        self.assertRegex(err, r"compact raw_readings: \d+ data files before, 1 after")
        self.assert_every_row_once(self.NODES)

    @slow
    def test_kills_and_lost_replies_every_row_once(self):
        kills = {1: ("delta-landed", 2), 4: ("delta-before", 3), 6: ("save-before", 4)}
        lost = {2: ("lost-reply", 1), 5: ("lost-reply", 3)}
        for n in range(16):
            self.add(n, 30 + 3 * n)
        first = self.run_fleet({**kills, **lost}, nodes=16,
                               expect=lambda n: -signal.SIGKILL if n in kills else 0)
        for n in lost:
            self.assertIn("injected: connection reset before the reply", first[n][1])
        for n in range(16):
            self.add(n, 7)
        self.run_fleet(nodes=16, expect=lambda n: 0)
        self.assert_every_row_once(16)


if __name__ == "__main__":
    unittest.main()
