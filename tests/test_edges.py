"""Edges of start-up (issue 11, points 7-10): config mistakes that would leak or lose
rows, a source next to a crashed or busy writer, where the state lives by default, and
--run-query INFO on the local lakehouse."""

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import unittest

from tests.helpers import PipelineTestCase, delta_rows, file_digest, run_main, up

# A writer in rollback-journal mode that commits 200 rows, then begins a transaction
# big enough to spill into the database file (a 5-page cache), says "ready" and
# waits: killed there, it leaves a hot journal behind.
CRASHING_WRITER = textwrap.dedent("""\
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA cache_size=5")
    conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO readings (v) VALUES (?)", [("x" * 500,)] * 200)
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO readings (v) VALUES (?)", [("y" * 500,)] * 2000)
    print("ready", flush=True)
    sys.stdin.read()
    """)

# A writer that holds an EXCLUSIVE lock (rollback journal: readers are kept out) until
# its stdin closes.
LOCKING_WRITER = textwrap.dedent("""\
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()
    conn.execute("COMMIT")
    """)


def start_writer(script, db):
    """Run a writer process on `db`; return it once it says it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", script, db], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        raise AssertionError(f"the writer did not start: exit {proc.wait()}")
    return proc


def crash_writer(db):
    """Leave a real hot journal next to `db`: a writer killed mid-transaction."""
    proc = start_writer(CRASHING_WRITER, db)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    assert os.path.getsize(db + "-journal") > 0, "no hot journal was left"


def roll_back(db):
    """What the writer does when it opens the file again: a read-write open rolls back."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        conn.close()


class FakeTime:
    """A clock that only moves when slept on; `on_sleep(n)` runs at the n-th sleep."""

    def __init__(self, on_sleep=None):
        self.now, self.slept, self.on_sleep = 1000.0, [], on_sleep

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.slept))


class EdgeTestCase(PipelineTestCase):

    def error_line(self, err):
        """The one `error:` line of a run's stderr."""
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(lines), 1, err)
        return lines[0]

    def refused(self, argv, env=None, expect=2):
        """A run that must stop before reading a row: its error line."""
        code, _, err = run_main(argv, env or self.env())
        self.assertEqual(code, expect, err)
        return self.error_line(err)


# === 7. Config mistakes that would leak or lose rows ===============================

READINGS = """CREATE TABLE readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT NOT NULL, sensor_id TEXT,
    temperature REAL, latitude REAL, serial BLOB, note TEXT)"""


class ConfigMistakeTest(EdgeTestCase):
    """Each mistake stops the run with exit 2 and one line naming the setting and where
    it came from, before a row is read: no target table appears."""

    def setUp(self):
        super().setUp()
        self.db = self.make(READINGS, [
            (i, f"2025-01-01T00:00:0{i}", f"s-{i % 2}", 18.0 + i, 38.123456 + i,
             b"\x00\x01", f"note {i}") for i in range(1, 7)])

    def assert_nothing_went_out(self):
        self.assertEqual(os.listdir(self.path("lake")) if os.path.isdir(self.path("lake"))
                         else [], [], "a target table was written")
        self.assertFalse(os.path.exists(self.path("state")), "a checkpoint was written")

    def refuse(self, *argv, **env):
        line = self.refused(["--sqlite", self.db, "--once", *argv], self.env(**env))
        self.assert_nothing_went_out()
        return line

    def yaml(self, **settings):
        path = self.path("uploader.yaml")
        with open(path, "w") as fh:
            json.dump(settings, fh)  # JSON is YAML
        return path

    def test_a_stage_config_without_its_stage_is_refused(self):
        sanitize = '{"serial": {"drop": true}}'
        for name, argv, env, words in (
                ("sanitize from env", [], {"SANITIZE_CONFIG": sanitize},
                 ["sanitize_config", "SANITIZE_CONFIG", "enable_sanitize is off (from "
                  "default)", "ENABLE_SANITIZE=true", "in the clear"]),
                ("filter from a flag, stage off in env",
                 ["--filter-config", '{"temperature": {">": 20}}'], {"ENABLE_FILTER": "no"},
                 ["filter_config", "--filter-config", "(from ENABLE_FILTER)",
                  "unfiltered"]),
                ("aggregate from YAML",
                 ["--config", self.yaml(aggregate_config={"aggregations": {
                     "temperature": "avg"}})], {},
                 ["aggregate_config", "uploader.yaml: aggregate_config", "--enable-aggregate",
                  "not aggregated"])):
            with self.subTest(name):
                line = self.refuse(*argv, **env)
                for word in words:
                    self.assertIn(word, line)

    def test_round_on_a_text_or_blob_column_is_refused(self):
        for column, kind in (("note", "STRING"), ("serial", "BINARY")):
            with self.subTest(column):
                line = self.refuse("--enable-sanitize", SANITIZE_CONFIG=json.dumps(
                    {column: {"round": 1}}))
                self.assertIn(f"round for {column!r} needs a numeric column", line)
                self.assertIn(kind, line)
                self.assertIn("SANITIZE_CONFIG", line)

    def test_column_names_match_whatever_their_case_as_in_sqlite(self):
        self.upload(self.db, "--enable-sanitize", "--enable-filter",
                    SANITIZE_CONFIG='{"LATITUDE": {"round": 1}, "Serial": {"drop": true}}',
                    FILTER_CONFIG='{"Temperature": {">": 21}}')
        rows = self.landed("secure_readings", key="id")
        self.assertEqual([(r["id"], r["temperature"], r["latitude"]) for r in rows],
                         [(i, 18.0 + i, round(38.123456 + i, 1)) for i in range(4, 7)])
        self.assertNotIn("serial", rows[0])
        self.upload(self.db, "--enable-aggregate", STATE_DIR=self.path("state-agg"),
                    AGGREGATE_CONFIG='{"group_by": ["Sensor_ID"], '
                                     '"aggregations": {"TEMPERATURE": "max"}}')
        rows = self.landed("aggregated_readings", key="sensor_id")
        self.assertEqual([(r["sensor_id"], r["temperature_max"], r["records"])
                          for r in rows], [("s-0", 24.0, 3), ("s-1", 23.0, 3)])

    def test_a_near_miss_gets_did_you_mean_in_every_stage(self):
        for stage, spec, expected in (
                ("sanitize", {"temprature": {"round": 1}}, "temperature"),
                ("filter", {"sensorid": "s-1"}, "sensor_id"),
                ("aggregate", {"group_by": ["sensor"], "aggregations": {
                    "temperature": "avg"}}, "sensor_id"),
                ("aggregate", {"aggregations": {"Temperatur": "avg"}}, "temperature")):
            with self.subTest(stage=stage, spec=spec):
                line = self.refuse(f"--enable-{stage}",
                                   **{f"{stage.upper()}_CONFIG": json.dumps(spec)})
                self.assertIn(f"(did you mean {expected!r}?)", line)
                self.assertIn(f"{stage.upper()}_CONFIG", line)

    def test_two_spellings_of_one_column_are_refused(self):
        line = self.refuse("--enable-sanitize", SANITIZE_CONFIG=json.dumps(
            {"latitude": {"drop": True}, "Latitude": {"round": 2}}))
        self.assertIn("'latitude' and 'Latitude' name the same column", line)

    def test_a_view_named_as_the_source_table_says_why_it_cannot_be_read(self):
        conn = sqlite3.connect(self.db)
        conn.execute("CREATE VIEW warm AS SELECT * FROM readings WHERE temperature > 20")
        conn.close()
        line = self.refuse("--table", "Warm")
        self.assertIn("'warm'", line)
        self.assertIn("is a view, not a table", line)
        self.assertIn("no rowid", line)
        self.assertIn("tables: readings", line)


# === 8. Start-up next to a crashed or busy writer ==================================

class HotJournalTest(EdgeTestCase):
    """A writer killed mid-transaction left a hot journal: the read-only uploader waits
    for BUSY_TIMEOUT, then exits 1 naming the cause; it never touches the files."""

    def setUp(self):
        super().setUp()
        self.db = self.path("station.db")
        crash_writer(self.db)
        self.digests = (file_digest(self.db), file_digest(self.db + "-journal"))

    def test_once_exits_1_naming_the_hot_journal_and_touches_nothing(self):
        line = self.refused(["--sqlite", self.db, "--once", "--busy-timeout", "0"],
                            expect=1)
        self.assertIn("hot journal", line)
        self.assertIn(self.db + "-journal", line)
        self.assertNotIn("readonly", line)
        self.assertEqual((file_digest(self.db), file_digest(self.db + "-journal")),
                         self.digests, "the uploader changed the source or its journal")
        self.assertEqual(delta_rows(self.lake("raw_readings")), [])
        # once the writer (or any read-write open) rolls it back, the committed rows go
        roll_back(self.db)
        self.upload(self.db)
        self.assertEqual(len(delta_rows(self.lake("raw_readings"))), 200)

    def test_waits_busy_timeout_with_one_line_then_gives_up(self):
        fake = FakeTime()
        with self.assertLogs("uploader", "WARNING") as logs, \
                self.assertRaises(up.SourceBusyError) as caught:
            up.open_source(self.db, 5, clock=fake.clock, sleep=fake.sleep)
        self.assertEqual(caught.exception.exit_code, 1)
        self.assertAlmostEqual(sum(fake.slept), 5)
        self.assertGreater(len(fake.slept), 3, "it did not retry")
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn("hot journal", logs.output[0])
        self.assertIn("5 s (BUSY_TIMEOUT)", logs.output[0])

    def test_opens_once_the_writer_has_rolled_back(self):
        fake = FakeTime(on_sleep=lambda n: n == 3 and roll_back(self.db))
        with self.assertLogs("uploader", "WARNING"):
            conn = up.open_source(self.db, 30, clock=fake.clock, sleep=fake.sleep)
        with contextlib.closing(conn):
            self.assertEqual(conn.execute("SELECT count(*) FROM readings").fetchone(),
                             (200,))
        self.assertEqual(len(fake.slept), 3)


class LockedAtStartTest(EdgeTestCase):
    """Another process holds an EXCLUSIVE lock on the source when the uploader starts."""

    def setUp(self):
        super().setUp()
        self.db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "v TEXT)", [(i, f"v{i}") for i in range(1, 11)])
        self.writer = start_writer(LOCKING_WRITER, self.db)
        self.addCleanup(self.release)

    def release(self):
        if self.writer.poll() is None:
            self.writer.stdin.close()
            self.writer.wait()
            self.writer.stdout.close()

    def test_once_waits_then_exits_1_naming_the_lock(self):
        code, _, err = run_main(["--sqlite", self.db, "--once", "--busy-timeout", "0.2"],
                                self.env())
        self.assertEqual(code, 1, err)
        self.assertIn("locked", self.error_line(err))
        self.assertNotIn("readonly", err)
        self.assertIn("waiting up to 0.2 s (BUSY_TIMEOUT)", err)
        self.assertEqual(delta_rows(self.lake("raw_readings")), [])
        self.release()
        self.upload(self.db)
        self.assertEqual(len(delta_rows(self.lake("raw_readings"))), 10)

    def test_opens_when_the_lock_is_released_within_busy_timeout(self):
        fake = FakeTime(on_sleep=lambda n: n == 2 and self.release())
        with self.assertLogs("uploader", "WARNING") as logs:
            conn = up.open_source(self.db, 30, clock=fake.clock, sleep=fake.sleep)
        with contextlib.closing(conn):
            self.assertEqual(conn.execute("SELECT count(*) FROM readings").fetchone(),
                             (10,))
        self.assertIn("locked", logs.output[0])


# === 9. Where the state lives by default ===========================================

class StateDirDefaultTest(EdgeTestCase):
    """/state is used when it is a mounted, writable directory; otherwise ./state, said
    in one line; the tool never creates /state. The default path is injected the way a
    default reaches the code: a Config whose state_dir has the origin "default"."""

    def setUp(self):
        super().setUp()
        os.makedirs(self.path("cwd"))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.path("cwd"))
        self.fallback = os.path.join(self.path("cwd"), "state")

    def default_config(self, volume):
        config = dataclasses.replace(up.Config(), state_dir=volume, origins={})
        self.assertEqual(config.origin("state_dir"), "default")
        return config

    def test_a_mounted_volume_is_used_without_a_word(self):
        os.makedirs(self.path("volume"))
        with self.assertNoLogs("uploader", "INFO"):
            chosen = up.resolve_state_dir(self.default_config(self.path("volume")))
        self.assertEqual(chosen, self.path("volume"))
        self.assertFalse(os.path.exists(self.fallback))

    def test_no_volume_is_never_created_and_the_fallback_is_said_in_one_line(self):
        volume = self.path("volume")
        with self.assertLogs("uploader", "INFO") as logs:
            chosen = up.resolve_state_dir(self.default_config(volume))
        self.assertEqual(os.path.realpath(chosen), os.path.realpath(self.fallback))
        self.assertFalse(os.path.exists(volume), "the tool created the default state dir")
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn(f"no volume at {volume}; keeping state in {self.fallback}",
                      logs.output[0])

    def test_a_volume_that_is_not_a_writable_directory_is_a_warning(self):
        volume = self.path("volume")
        with open(volume, "w") as fh:
            fh.write("not a directory")
        with self.assertLogs("uploader", "WARNING") as logs:
            chosen = up.resolve_state_dir(self.default_config(volume))
        self.assertEqual(os.path.realpath(chosen), os.path.realpath(self.fallback))
        self.assertIn(f"{volume} is not a writable directory", logs.output[0])

    def test_an_explicit_state_dir_is_created(self):
        wanted = self.path("deep", "er", "state")
        self.upload(self.make("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
                              [(1, "a")]), STATE_DIR=wanted)
        self.assertTrue(os.path.exists(os.path.join(wanted, up.STATE_FILE)))

    def test_run_and_status_without_state_dir_use_the_local_fallback(self):
        if os.path.exists("/state"):
            self.skipTest("this machine has a /state")
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [(1, "a")])
        env = {k: v for k, v in self.env().items() if k != "STATE_DIR"}
        code, _, err = run_main(["--sqlite", db, "--once"], env)
        self.assertEqual(code, 0, err)
        self.assertFalse(os.path.exists("/state"), "the tool created /state")
        self.assertIn(f"no volume at /state; keeping state in {self.fallback}", err)
        self.assertTrue(os.path.exists(os.path.join(self.fallback, up.STATE_FILE)))
        code, out, err = run_main(["--status"], env)
        self.assertEqual(code, 0, err)
        self.assertIn(os.path.join(self.fallback, up.STATE_FILE), out)
        self.assertIn("uploaded     1 rows", out)


# === 10. --run-query INFO on the local lakehouse ===================================

class LakehouseInfoTest(EdgeTestCase):
    """INFO lists the tables, then the target's columns and types and its row count."""

    def setUp(self):
        super().setUp()
        self.db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "ts TEXT, sensor TEXT, temp REAL)",
                            [(i, f"2025-01-01T00:00:0{i}", f"s-{i % 2}", i * 1.5)
                             for i in range(1, 8)])

    def info(self, *argv):
        """Run INFO; return its result tables as lists of split lines, headers first."""
        code, out, err = run_main([*argv, "--run-query", "INFO"], self.env())
        self.assertEqual(code, 0, err)
        return [[line.split() for line in part.splitlines() if not line.startswith("-")]
                for part in out.split("\n\n")]

    def test_info_describes_the_target_of_the_source(self):
        self.upload(self.db)
        self.upload(self.db, "--enable-filter", "--filter-config", '{"temp": {">": 5}}',
                    STATE_DIR=self.path("state-filtered"))
        tables, columns, count = self.info("--sqlite", self.db)
        self.assertEqual(tables, [["table"], ["filtered_readings"], ["raw_readings"]])
        self.assertEqual(columns[0], ["table", "col_name", "data_type"])
        self.assertEqual([row[1:] for row in columns[1:]],
                         [["id", "bigint"], ["ts", "timestamp"], ["sensor", "string"],
                          ["temp", "double"], ["_source_id", "string"],
                          ["_batch_id", "string"], ["_uploaded_at", "timestamp"],
                          ["_rescued_data", "string"], ["_source_file", "string"]])
        self.assertEqual({row[0] for row in columns[1:]}, {"raw_readings"})
        self.assertEqual(count, [["table", "row_count"], ["raw_readings", "7"]])

    def test_info_without_a_source_describes_every_table(self):
        self.upload(self.db)
        self.upload(self.db, "--enable-filter", "--filter-config", '{"temp": {">": 5}}',
                    STATE_DIR=self.path("state-filtered"))
        parts = self.info()
        self.assertEqual(len(parts), 5, parts)
        self.assertEqual(parts[2], [["table", "row_count"], ["filtered_readings", "4"]])
        self.assertEqual(parts[4], [["table", "row_count"], ["raw_readings", "7"]])

    def test_info_before_the_first_upload_names_the_missing_table(self):
        line = self.refused(["--sqlite", self.db, "--run-query", "INFO"])
        self.assertIn("no table raw_readings under", line)

    def test_a_remote_delta_uri_is_named_not_taken_for_a_local_path(self):
        line = self.refused(["--run-query", "INFO"],
                            self.env(DELTA_URI="s3://bucket/lake"))
        self.assertIn("delta_uri is s3://bucket/lake (from DELTA_URI)", line)


if __name__ == "__main__":
    unittest.main()
