"""Reliability (issue 6): every row once, whatever happens to the process or its input.

1. SIGKILL at random points, many times, with filter + sanitize on, with a windowed
   aggregate on, during the state-file write (old or new, never torn), and on the
   warehouse path (tests/fake_warehouse.py in the killed process) and on the landing
   target (tests/files_api.py, a loopback Files API).
2. A live sensor process writes while the uploader loops; source and target match,
   the writer never waits out its busy timeout, and the uploader holds no read
   transaction between batches (a probe that fails on a reader that does).
3. Hostile input not covered elsewhere (the map below says where the rest is).
4. A fleet of 16 uploaders appending to one Delta table, with nodes killed and restarted.
5. --recover-state: a lost state file rebuilt from the target, Delta and warehouse.

The kill driver (tests/kill_driver.py, shared with tests/test_crash.py) imports the
uploader, plants os.kill(SIGKILL) at the K-th call of one function and runs main(). Kill
points and K are drawn from a seeded generator (RELIABILITY_SEED), so a failure replays.

Run: uv run -q --with-requirements sqlite_to_databricks_uploader.py --with sqlglot \
         --with duckdb python -m unittest tests.test_reliability -v
"""

# Issue 6, item 3: hostile input -> the test that covers it.
#   missing file ............. test_source.ReadOnlyTest.test_missing_file_is_exit_2_*,
#                              test_cli.SourceInputTest.test_bad_sqlite_files
#   file not SQLite .......... test_source.ReadOnlyTest.test_not_a_sqlite_file_*,
#                              test_cli.SourceInputTest.test_not_sqlite_file_is_left_untouched
#   corrupt page ............. here: HostileSourceTest.test_corrupt_page_*
#   locked database .......... here: LockedSourceTest
#   empty table .............. here: HostileSourceTest.test_empty_table_*
#   names with spaces, quotes,
#     backticks, unicode ..... test_source.BatchTest.test_names_with_spaces_quotes_and_unicode
#                              (Delta), test_databricks.TableTests.test_hostile_* (warehouse);
#                              backticks on Delta: here, HostileSourceTest.test_backticks_*
#   wrong-type values ........ test_types.RescuedDataTest,
#                              test_databricks.ValueTests.test_misfits_are_rescued_not_dropped
#   huge TEXT/BLOB ........... here: HugeValueTest (Delta; warehouse with a small budget)
#   NULL timestamps .......... test_source.NullTimestampTest
#   five timestamp formats ... test_source.IncrementalTest.test_text_and_epoch_timestamps_* (one
#                              run); across runs, both cursors: here, TimestampFormatTest
#   source replaced by an
#     older copy ............. test_source.ReplacedSourceTest,
#                              test_cli.RunTest.test_source_replaced_behind_the_cursor_*
#   source replaced by another
#     file with more rows, or
#     by a copy .............. test_source.ReplacedSourceTest, test_sources.ManySourcesTest
#                              and GoneFileTest (test_file_replaced_*, test_copy_*)
#   state dir not writable
#     at start ............... test_checkpoint.StateDirTest.test_explicit_state_dir_*; on a
#                              real read-only tmpfs: here, StateDiskTest
#   state dir full (ENOSPC)
#     or read-only in a run .. here: StateDiskTest
#   corrupt state file ....... test_checkpoint.BadStateTest
#   malformed YAML ........... test_config.ValueErrorsTest.test_yaml_file_problems,
#                              test_cli.BadConfigTest.test_bad_values
#   JSON configs of the wrong
#     shape .................. test_config.ValueErrorsTest, test_cli.BadConfigTest,
#                              test_processing.ValidationTest; shapes none of them tried:
#                              here, ConfigShapeTest

import collections
import contextlib
import datetime as dt
import errno
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

from tests import fake_warehouse
from tests.helpers import (slow, TempDirTestCase, child_env, delta_rows, destination_of,
                           read_state, run_driver, run_main, run_script, start_driver, up,
                           wait_for)

SEED = int(os.environ.get("RELIABILITY_SEED", "20250106"))
WAL_HEADER = 32  # bytes of a WAL file that holds no frame (sqlite.org/fileformat2.html)
START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
UTC = dt.timezone.utc

# === The kill driver (tests/kill_driver.py) =========================================

# Calls of each hook per batch, to draw K from a range where the kill fires.
CALLS_PER_BATCH = {"save-before": 2, "save-after": 2, "delta-before": 1, "delta-after": 1,
                   "process-before": 1, "process-after": 1, "torn-state": 2,
                   "rename-before": 2, "rename-after": 2, "fsync-before": 4,
                   "insert-before": 1, "insert-after": 1, "statement-before": 3,
                   "statement-after": 3, "upload-before": 1, "upload-after": 1}
DELTA_HOOKS = ["save-before", "save-after", "delta-before", "delta-after",
               "process-before", "process-after", "torn-state", "rename-before",
               "rename-after", "fsync-before"]
WAREHOUSE_HOOKS = ["insert-before", "insert-after", "statement-before", "statement-after",
                   "save-before", "save-after", "torn-state", "rename-after"]
LANDING_HOOKS = ["upload-before", "upload-after", "save-before", "save-after", "torn-state",
                 "rename-after", "process-after"]


# === Sources: the sensor side ========================================================

READINGS = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "timestamp TEXT NOT NULL, sensor TEXT NOT NULL, temperature REAL, "
            "note TEXT, serial TEXT)")
READING_COLUMNS = ("timestamp", "sensor", "temperature", "note", "serial")
DATA_COLUMNS = ("id",) + READING_COLUMNS


class Sensor:
    """A growing readings table, written as a sensor would: increasing time, runs of
    identical timestamps, a few rows late by up to 90 s."""

    def __init__(self, path, seed, wal=False):
        self.path, self.rng, self.clock = path, random.Random(seed), 0
        conn = sqlite3.connect(path)
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(READINGS)
        conn.commit()
        conn.close()

    def rows(self, count):
        rng, out = self.rng, []
        for _ in range(count):
            self.clock += rng.choice((0, 0, 1, 2, 3))
            second = self.clock - rng.randint(5, 90) if rng.random() < 0.03 else self.clock
            out.append(((START + dt.timedelta(seconds=max(second, 0))).strftime(
                "%Y-%m-%dT%H:%M:%SZ"), f"s{rng.randrange(5)}",
                round(rng.gauss(21, 3), 2), f"call 555-{rng.randrange(10000):04d} now",
                f"SN-{rng.randrange(100):04d}"))
        return out

    def add(self, count):
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                conn.executemany(f"INSERT INTO readings ({', '.join(READING_COLUMNS)}) "
                                 "VALUES (?, ?, ?, ?, ?)", self.rows(count))
        finally:
            conn.close()
        return count

    def read(self):
        """{id: row tuple} of the source."""
        conn = sqlite3.connect(self.path)
        try:
            return {r[0]: r for r in conn.execute(
                f"SELECT {', '.join(DATA_COLUMNS)} FROM readings ORDER BY id")}
        finally:
            conn.close()

    def max_id(self):
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0]
        finally:
            conn.close()


def warehouse_rows(root, table):
    """Rows of a table of the fake warehouse at `root` ([] when it does not exist)."""
    warehouse = fake_warehouse.Warehouse(root)
    if not os.path.exists(warehouse.db_path):
        return []
    try:
        return warehouse.rows(table)
    except Exception as exc:  # duckdb.CatalogException: not created yet
        if "does not exist" in str(exc):
            return []
        raise
    finally:
        warehouse.release()  # the next node (a process) opens the file


def duplicates(values):
    return {v: n for v, n in collections.Counter(values).items() if n > 1}


def pos_cursor(state, key_suffix):
    """(cursor id, in-flight cursor_end id or None) of the destination ending with key."""
    if not state:
        return 0, None
    found = [p for k, p in state["destinations"].items()
             if k.rsplit("/", 1)[0].endswith(key_suffix)]
    if not found:
        return 0, None
    pos = found[0]
    cursor = pos["cursor"][0] if pos["cursor"] else 0
    flight = pos["inflight"]["cursor_end"][0] if pos["inflight"] else None
    return cursor, flight


# === Figures =========================================================================

TOTALS = collections.Counter()


def report(test, **figures):
    """Print one test's figures and add them to the module's totals."""
    TOTALS.update(figures)
    text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in figures.items())
    print(f"\n  reliability [{test._testMethodName}]: {text}", file=sys.stderr)


def tearDownModule():
    if TOTALS:
        print(f"\nreliability totals (seed {SEED}): {TOTALS['kills']} SIGKILLs fired in "
              f"{TOTALS['runs']} driver runs; {TOTALS['rows_checked']} target rows checked "
              f"against the source; {TOTALS['duplicates']} duplicates, "
              f"{TOTALS['losses']} losses, {TOTALS['wrong_aggregates']} (group, window) "
              "rows that differ from an uninterrupted run", file=sys.stderr)


class ReliabilityTestCase(TempDirTestCase):
    """Temp dir, kill driver, restored signal handlers (main() installs its own)."""

    def setUp(self):
        super().setUp()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.side = self.path("side")
        os.makedirs(self.side)

    def one_error_line(self, stderr):
        """The one `error:` line, ending stderr, with no traceback before it."""
        self.assertNotIn("Traceback", stderr)
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        self.assertEqual(len(errors), 1, f"expected one error line:\n{stderr[-3000:]}")
        self.assertEqual(lines[-1], errors[0], f"the error must end stderr:\n{stderr[-3000:]}")
        return errors[0]

    def run_in_process(self, argv, env):
        """main(argv) in this process; an exception other than SystemExit is a bug."""
        try:
            return run_main(argv, env)
        except Exception as exc:  # noqa: BLE001 - what escapes main() is the finding
            import traceback
            self.fail(f"main({argv}) raised instead of printing one error line:\n"
                      f"{''.join(traceback.format_exception(exc))}")


# === 1. SIGKILL anywhere =============================================================

FILTER = {"sensor": {"in": ["s0", "s1", "s3"]}, "temperature": {">": 20.0}}
SANITIZE = {"note": "[0-9]{3}-[0-9]{4}", "serial": {"hash": True}, "temperature": {"round": 1}}
WINDOWED = {"group_by": ["sensor"], "window": "1m", "grace": "10s",
            "aggregations": {"temperature": ["avg", "min", "max"], "records": "count"}}
HASH_KEY = "reliability-test-key"


def passes_filter(row, sanitized):
    """The filter of FILTER on a source row, after SANITIZE when it is on."""
    _id, _ts, sensor, temperature, _note, _serial = row
    if temperature is not None and sanitized:
        temperature = round(temperature, 1)
    return sensor in ("s0", "s1", "s3") and temperature is not None and temperature > 20.0


class KillLoop(ReliabilityTestCase):
    """Random kill points, many times, on a source that grows between runs."""

    BATCH = 7
    START_ROWS = 120
    KILLS = 60
    HOOKS = DELTA_HOOKS
    SALT = 0

    def setUp(self):
        super().setUp()
        self.rng = random.Random(SEED + self.SALT)
        self.sensor = Sensor(self.path("sensor.db"), SEED + self.SALT)
        self.sensor.add(self.START_ROWS)
        self.env = {**self.base_env(), "SANITIZE_HASH_KEY": HASH_KEY}
        self.added = self.START_ROWS

    def argv(self):
        return ["--sqlite", self.sensor.path, "--once", "--batch-size", str(self.BATCH)]

    def pending_batches(self):
        cursor, _ = pos_cursor(read_state(self.path("state")), self.dest_suffix())
        return (self.sensor.max_id() - cursor) // self.BATCH + 1

    def dest_suffix(self):
        return os.path.abspath(self.path("lake"))

    def draw(self):
        hook = self.rng.choice(self.HOOKS)
        return hook, self.rng.randint(1, CALLS_PER_BATCH[hook] * self.pending_batches())

    def grow(self):
        self.added += self.sensor.add(self.rng.randint(5, 40))

    def uninterrupted_run(self):
        """The same config, one clean --once run into ref-lake; return that lake."""
        ref_env = {**self.env, "DELTA_URI": self.path("ref-lake"),
                   "STATE_DIR": self.path("ref-state")}
        code, _, err = self.run_in_process(["--sqlite", self.sensor.path, "--once"], ref_env)
        self.assertEqual(code, 0, err)
        return self.path("ref-lake")

    def kill_loop(self):
        """Kill until KILLS kills fired; then one clean run; returns (kills, runs)."""
        kills, runs, points = 0, 0, collections.Counter()
        while kills < self.KILLS:
            self.assertLess(runs, self.KILLS * 3, "the planted kills stopped firing")
            hook, k = self.draw()
            done = run_driver(hook, k, self.argv(), self.env)
            runs += 1
            if done.returncode == 0:
                self.grow()
                continue
            self.assertEqual(done.returncode, -signal.SIGKILL,
                             f"{hook} #{k}: exit {done.returncode}\n{done.stderr[-3000:]}")
            kills += 1
            points[hook] += 1
            self.check_after_kill(f"{hook} #{k} (seed {SEED}, run {runs})")
            if self.rng.random() < 0.3:
                self.grow()
        done = run_driver("none", 0, self.argv(), self.env)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertNotIn(up.STATE_FILE + ".tmp", os.listdir(self.path("state")))
        return kills, runs + 1, points

    def check_after_kill(self, where):
        """Right after a kill (scenarios override)."""
        read_state(self.path("state"))  # must parse


@slow
class FilterSanitizeKillTest(KillLoop):
    """filtered_ and secure_ tables: each source row that passes, exactly once."""

    SALT = 1
    KILLS = 70

    def configure(self, sanitize):
        self.sanitize = sanitize
        self.table = "secure_readings" if sanitize else "filtered_readings"
        self.env.update(ENABLE_FILTER="true", FILTER_CONFIG=json.dumps(FILTER))
        if sanitize:
            self.env.update(ENABLE_SANITIZE="true", SANITIZE_CONFIG=json.dumps(SANITIZE))

    def expected_ids(self, upto=None):
        return {i for i, row in self.sensor.read().items()
                if passes_filter(row, self.sanitize) and (upto is None or i <= upto)}

    def check_after_kill(self, where):
        state = read_state(self.path("state"))
        ids = [r["id"] for r in delta_rows(self.path("lake", self.table), ["id"])]
        self.assertEqual(duplicates(ids), {}, f"duplicates after a kill at {where}")
        cursor, flight = pos_cursor(state, self.dest_suffix())
        landed = {frozenset(self.expected_ids(cursor))}
        if flight is not None:
            landed.add(frozenset(self.expected_ids(flight)))
        self.assertIn(frozenset(ids), landed, f"after a kill at {where} the table holds "
                      f"{len(ids)} rows, which is neither the rows up to the cursor "
                      f"{cursor} nor up to the in-flight end {flight}")

    def check_final(self, kills, runs, points):
        source = self.sensor.read()
        got = delta_rows(self.path("lake", self.table))
        ids = [r["id"] for r in got]
        want = self.expected_ids()
        dupes, lost = duplicates(ids), want - set(ids)
        report(self, kills=kills, runs=runs, rows_checked=len(got), source_rows=len(source),
               duplicates=sum(n - 1 for n in dupes.values()), losses=len(lost))
        print(f"  kill points: {dict(points)}", file=sys.stderr)
        self.assertEqual(dupes, {}, "duplicates")
        self.assertEqual(lost, set(), "rows lost")
        self.assertEqual(set(ids) - want, set(), "rows that should have been filtered out")
        # the values are those of an uninterrupted run of the same config
        ref_lake = self.uninterrupted_run()
        names = [c for c in got[0] if not c.startswith("_")]
        reference = {r["id"]: tuple(r[c] for c in names)
                     for r in delta_rows(os.path.join(ref_lake, self.table))}
        self.assertEqual({r["id"]: tuple(r[c] for c in names) for r in got}, reference)
        if self.sanitize:
            self.assertFalse([r for r in got if "555-" in r["note"]], "note not sanitized")
        self.assertEqual(len(source), self.added)

    def test_filter_on_kill_anywhere(self):
        self.rng = random.Random(SEED + 11)
        self.configure(sanitize=False)
        self.check_final(*self.kill_loop())

    def test_filter_and_sanitize_on_kill_anywhere(self):
        self.configure(sanitize=True)
        self.check_final(*self.kill_loop())


AGG_COLUMNS = ("sensor", "window_start", "window_end", "temperature_avg", "temperature_min",
               "temperature_max", "temperature_sum", "temperature_count", "records")


def agg_rows(table_uri):
    """The AGG_COLUMNS of each row of an aggregated_ table, as tuples."""
    return [tuple(r[c] for c in AGG_COLUMNS) for r in delta_rows(table_uri, AGG_COLUMNS)]


@slow
class AggregateKillTest(KillLoop):
    """aggregated_: each (group, window) once, identical to an uninterrupted run."""

    SALT = 2
    KILLS = 80
    START_ROWS = 150

    def setUp(self):
        super().setUp()
        self.env.update(ENABLE_AGGREGATE="true", AGGREGATE_CONFIG=json.dumps(WINDOWED))
        self.table = self.path("lake", "aggregated_readings")

    def landed_and_reference(self):
        """Aggregate rows (AGG_COLUMNS tuples) landed, and those of an uninterrupted run."""
        ref_lake = self.uninterrupted_run()
        return agg_rows(self.table), agg_rows(os.path.join(ref_lake, "aggregated_readings"))

    def check_after_kill(self, where):
        read_state(self.path("state"))
        keys = [(r["sensor"], r["window_start"])
                for r in delta_rows(self.table, ["sensor", "window_start"])]
        self.assertEqual(duplicates(keys), {}, f"a (group, window) twice after {where}")

    def test_windowed_aggregate_kill_anywhere(self):
        kills, runs, points = self.kill_loop()
        got, reference = self.landed_and_reference()
        dupes = duplicates((r[0], r[1]) for r in got)
        differ = set(got) ^ set(reference)
        report(self, kills=kills, runs=runs, rows_checked=len(got),
               source_rows=len(self.sensor.read()),
               duplicates=sum(n - 1 for n in dupes.values()),
               losses=len({(r[0], r[1]) for r in reference} - {(r[0], r[1]) for r in got}),
               wrong_aggregates=len({(r[0], r[1]) for r in differ}))
        print(f"  kill points: {dict(points)}", file=sys.stderr)
        self.assertEqual(dupes, {})
        self.assertGreater(len(reference), 20)
        self.assertEqual(sorted(differ, key=repr), [],
                         "(group, window) rows that differ from an uninterrupted run "
                         "(got ^ reference)")


    def test_a_failed_write_retried_in_the_same_process_counts_rows_once(self):
        # Deterministic form of what the kill loop finds: batch 3's write is refused;
        # the loop's next cycle abandons it and reads it again from the cursor, with
        # the open windows of the checkpoint. Those must not already hold batch 3's
        # values (the read-ahead thread processed batch 3 before its write failed).
        log_path = self.path("loop.log")
        proc = start_driver("fail-delta-write", 3,
                            ["--sqlite", self.sensor.path, "--interval", "0.2",
                             "--batch-size", str(self.BATCH)], self.env, log_path)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)

        def settled():
            cursor, flight = pos_cursor(read_state(self.path("state")), self.dest_suffix())
            return (cursor == self.sensor.max_id() and flight is None
                    or proc.poll() is not None)
        wait_for(settled, what="the loop to retry and drain the source")
        self.sensor.add(150)  # later rows close the windows that were open at the failure
        wait_for(settled, what="the loop to upload the later rows")
        proc.send_signal(signal.SIGTERM)
        with open(log_path) as fh:
            log = fh.read()
        self.assertEqual(proc.wait(timeout=60), 0, log[-3000:])
        self.assertIn("injected", log)
        got, reference = self.landed_and_reference()
        wrong = sorted(set(got) ^ set(reference), key=repr)
        report(self, runs=1, rows_checked=len(got),
               wrong_aggregates=len({(r[0], r[1]) for r in wrong}))
        self.assertEqual(wrong, [], "(group, window) rows that differ from an "
                         "uninterrupted run (got ^ reference)")


class CarryTest(unittest.TestCase):
    """The open windows handed to the checkpoint are a value, not a live object."""

    def test_processing_the_next_batch_leaves_the_previous_carry_alone(self):
        spec = up.Aggregation(("sensor",), (("v", ("sum",)),), window=60_000_000,
                              timestamp_col="ts")
        plan = up.Plan(aggregate=spec)

        def batch(stamps, values):
            return up.Chunk(["ts", "sensor", "v"], [stamps, ["a"] * len(stamps), values],
                            len(stamps), [len(stamps)],
                            kinds=[up.TIMESTAMP, up.STRING, up.DOUBLE])

        _, carry = up.process_batch(plan, batch(["2025-01-01T00:00:01Z",
                                                 "2025-01-01T00:00:02Z"], [1.0, 2.0]), None)
        saved = json.dumps(carry)
        up.process_batch(plan, batch(["2025-01-01T00:00:03Z"], [100.0]), carry)
        self.assertEqual(json.dumps(carry), saved, "the checkpoint's open windows changed "
                         "when the next batch was processed")


@slow
class StateWriteKillTest(KillLoop):
    """A kill at each step of the state-file write leaves the old file or the new one,
    byte for byte: never torn, never a mix, never missing once it existed."""

    SALT = 3
    BATCH = 10
    START_ROWS = 60
    # point -> what the state file must hold after a kill there
    POINTS = {"open": "old", "dump": "old", "fsync-file": "old", "rename": "old",
              "fsync-dir": "new", "synced": "new"}
    PER_POINT = 8

    def test_state_file_is_old_or_new_after_a_kill_inside_the_write(self):
        kills = runs = 0
        table = self.path("lake", "raw_readings")
        state_file = self.path("state", up.STATE_FILE)
        env = {**self.env, "DRIVER_SIDE": self.side}
        side = os.path.join(self.side, "old-new.json")
        for point, expect in self.POINTS.items():
            fired = 0
            while fired < self.PER_POINT:
                # k = 1: the first save of a run; for the first point, the first save
                # of the state itself, when there is no old file
                k = 1 if fired == 0 else self.rng.randint(1, 6)
                if os.path.exists(side):
                    os.remove(side)
                done = run_driver(f"state:{point}", k, self.argv(), env)
                runs += 1
                if done.returncode == 0:
                    self.grow()
                    continue
                self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr[-3000:])
                fired += 1
                with open(side, encoding="utf-8") as fh:
                    wanted = json.load(fh)[expect]
                if wanted is None:
                    self.assertFalse(os.path.exists(state_file),
                                     f"killed at {point} of the first save: no state yet")
                else:
                    with open(state_file, encoding="utf-8") as fh:
                        self.assertEqual(fh.read(), wanted,
                                         f"killed at {point} (save #{k}): the state file "
                                         f"is not the {expect} one")
                ids = [r["id"] for r in delta_rows(table, ["id"])]
                self.assertEqual(duplicates(ids), {})
                if self.rng.random() < 0.3:
                    self.grow()
            kills += fired
        done = run_driver("none", 0, self.argv(), env)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        ids = [r["id"] for r in delta_rows(table, ["id"])]
        dupes, lost = duplicates(ids), set(self.sensor.read()) - set(ids)
        report(self, kills=kills, runs=runs + 1, rows_checked=len(ids),
               duplicates=sum(n - 1 for n in dupes.values()), losses=len(lost))
        self.assertEqual((dupes, lost), ({}, set()))


class RowsKillLoop(KillLoop):
    """A kill loop on a target read back as rows (`target_rows()`): after each kill the
    target holds the rows up to the cursor, or up to the batch in flight, once each."""

    def check_after_kill(self, where):
        state = read_state(self.path("state"))
        ids = sorted(r["id"] for r in self.target_rows())
        self.assertEqual(duplicates(ids), {}, f"duplicates after a kill at {where}")
        cursor, flight = pos_cursor(state, self.dest_suffix())
        self.assertIn(ids, [list(range(1, cursor + 1))] +
                      ([list(range(1, flight + 1))] if flight else []),
                      f"after a kill at {where}: cursor {cursor}, in flight {flight}")

    def kill_and_check_every_row(self):
        """The kill loop, then every source row once in the target with its values;
        (the rows, the kill points)."""
        kills, runs, points = self.kill_loop()
        source = self.sensor.read()
        got = self.target_rows()
        ids = [r["id"] for r in got]
        dupes, lost = duplicates(ids), set(source) - set(ids)
        report(self, kills=kills, runs=runs, rows_checked=len(got),
               duplicates=sum(n - 1 for n in dupes.values()), losses=len(lost))
        print(f"  kill points: {dict(points)}", file=sys.stderr)
        self.assertEqual((dupes, lost), ({}, set()))
        for row in got:
            want = source[row["id"]]
            self.assertEqual((row["sensor"], row["temperature"], row["note"], row["serial"]),
                             want[2:], row["id"])
            self.assertEqual(row["timestamp"].replace(tzinfo=UTC) if row["timestamp"].tzinfo
                             is None else row["timestamp"],
                             dt.datetime.strptime(want[1], "%Y-%m-%dT%H:%M:%SZ")
                             .replace(tzinfo=UTC))
        return got, points


@slow
class WarehouseKillTest(RowsKillLoop):
    """The warehouse path (fake connector in the killed process): every row once."""

    SALT = 4
    KILLS = 50
    BATCH = 9
    START_ROWS = 80
    HOOKS = WAREHOUSE_HOOKS
    TABLE = "main.sensors.raw_readings"

    def setUp(self):
        super().setUp()
        self.root = self.path("warehouse")
        self.env = {"STATE_DIR": self.path("state"), "SOURCE_ID": "node-1",
                    "DATABRICKS_HOST": "adb-1234567890123456.7.azuredatabricks.net",
                    "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/0123456789abcdef",
                    "DATABRICKS_TOKEN": "dapi-reliability", "DATABRICKS_DATABASE":
                    "main.sensors", "FAKE_WAREHOUSE_ROOT": self.root, "DRIVER_WAREHOUSE": "1",
                    "DATABRICKS_VOLUME": "none"}

    def dest_suffix(self):
        return "main.sensors"

    def target_rows(self):
        return warehouse_rows(self.root, self.TABLE)

    def test_warehouse_kill_anywhere(self):
        self.kill_and_check_every_row()


@slow
class LandingKillTest(RowsKillLoop):
    """The volume landing target (a loopback Files API, the killed process its client):
    every row in exactly one landed file, read as the ingestion job reads them."""

    SALT = 6
    KILLS = 40
    BATCH = 9
    START_ROWS = 80
    HOOKS = LANDING_HOOKS
    VOLUME = "/Volumes/main/sensors/landing"

    def setUp(self):
        super().setUp()
        from tests import files_api
        self.service = files_api.FilesApi(volumes=[self.VOLUME])
        self.addCleanup(self.service.close)
        self.env = {"STATE_DIR": self.path("state"), "SOURCE_ID": "node-1",
                    "TARGET": "landing", "DATABRICKS_HOST": f"http://{self.service.host}",
                    "DATABRICKS_TOKEN": "dapi-files", "DATABRICKS_VOLUME": self.VOLUME}

    def dest_suffix(self):
        return self.VOLUME

    def target_rows(self):
        return self.service.ingest(f"{self.VOLUME}/raw_readings")

    def test_landing_kill_anywhere(self):
        got, points = self.kill_and_check_every_row()
        self.assertGreater(points["upload-after"], 0)  # files landed, state not moved
        files = self.service.landed(self.VOLUME)
        self.assertEqual(len(files), len({r["_batch_id"] for r in got}))  # one per batch


# === 2. A live writer ================================================================

WRITER = r'''
"""The sensor: bursts of rows with one timestamp each, each burst its own transaction.

usage: writer.py DB OUT ROWS SEED. Writes a JSON report to OUT when done.
"""
import datetime as dt, json, os, random, sqlite3, sys, time
db, out, total, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)  # busy_timeout 5 s
conn.execute("PRAGMA journal_mode=WAL")
report = {"committed": 0, "errors": [], "max_wait": 0.0, "bursts": 0, "checkpoints": [],
          "max_wal": 0}
start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
seq = 0
while seq < total:
    size = min(rng.randint(1, 9), total - seq)
    stamp = (start + dt.timedelta(seconds=report["bursts"])).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    rows = [(stamp, f"s{(seq + i) % 4}", seq + i, round(rng.uniform(10, 30), 3))
            for i in range(size)]
    began = time.monotonic()
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO readings (timestamp, sensor, seq, value) "
                         "VALUES (?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        report["errors"].append(f"{type(exc).__name__}: {exc}")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        continue
    report["max_wait"] = max(report["max_wait"], time.monotonic() - began)
    seq += size
    report["committed"] = seq
    report["bursts"] += 1
    if os.path.exists(db + "-wal"):
        report["max_wal"] = max(report["max_wal"], os.path.getsize(db + "-wal"))
    if report["bursts"] % 15 == 0:
        began = time.monotonic()
        for _ in range(100):  # (1, -1, -1): another connection is checkpointing; wait
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if (busy, frames, done) != (1, -1, -1):
                break
            time.sleep(0.01)
        report["checkpoints"].append([busy, frames, done, time.monotonic() - began,
                                      os.path.getsize(db + "-wal")])
    time.sleep(rng.uniform(0, 0.006))
with open(out, "w") as fh:
    json.dump(report, fh)
'''

LIVE_SCHEMA = ("CREATE TABLE readings (timestamp TEXT NOT NULL, sensor TEXT, seq INTEGER, "
               "value REAL); CREATE INDEX idx_readings_ts ON readings(timestamp);")


@slow
class LiveWriterTest(ReliabilityTestCase):
    """A sensor process writes while the uploader loops (pair cursor: bursts of rows
    share a timestamp, and batch boundaries fall inside bursts)."""

    def setUp(self):
        super().setUp()
        self.db = self.path("live.db")
        conn = sqlite3.connect(self.db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(LIVE_SCHEMA)
        conn.close()
        self.writer = self.path("writer.py")
        with open(self.writer, "w", encoding="utf-8") as fh:
            fh.write(WRITER)
        self.env = {**self.base_env(), "DRIVER_SIDE": self.side, "DRIVER_DB": self.db}

    def start_writer(self, rows):
        out = self.path("writer.json")
        with open(self.path("writer.log"), "w") as log:
            proc = subprocess.Popen([sys.executable, self.writer, self.db, out, str(rows),
                                     str(SEED)], env=child_env({}), stdout=log, stderr=log)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc, out

    def start_uploader(self, hook, k, **env):
        log_path = self.path(f"uploader-{hook}.log")
        proc = start_driver(hook, k,
                            ["--sqlite", self.db, "--interval", "0.2", "--batch-size", "13"],
                            {**self.env, **env}, log_path)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc, log_path

    def read(self, path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()

    def probes(self):
        path = os.path.join(self.side, "probes.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    def last_key(self):
        conn = sqlite3.connect(self.db)
        try:
            return list(conn.execute("SELECT timestamp, rowid FROM readings "
                                     "ORDER BY timestamp DESC, rowid DESC LIMIT 1").fetchone())
        finally:
            conn.close()

    def test_source_and_target_match_while_a_sensor_writes(self):
        rows = 1500
        uploader, log_path = self.start_uploader("wal-probe", 40, DRIVER_PROBE_EVERY="3")
        writer, out = self.start_writer(rows)
        self.assertEqual(writer.wait(timeout=120), 0, self.read(self.path("writer.log")))
        with open(out, encoding="utf-8") as fh:
            sensor = json.load(fh)
        last = self.last_key()
        wait_for(lambda: (destination_of(read_state(self.path("state")), self.path("lake"))
                          or {}).get("cursor") == last or uploader.poll() is not None,
                 timeout=120, what="the uploader to reach the writer's last row")
        uploader.send_signal(signal.SIGTERM)
        with open(log_path) as fh:
            log = fh.read()
        self.assertEqual(uploader.wait(timeout=60), 0, log[-3000:])
        self.assertNotIn("Traceback", log)

        # source and target match exactly
        probes = self.probes()
        conn = sqlite3.connect(self.db)
        source = {r[2]: r for r in conn.execute(
            "SELECT timestamp, sensor, seq, value FROM readings")}
        conn.close()
        got = delta_rows(self.path("lake", "raw_readings"),
                         ["timestamp", "sensor", "seq", "value"])
        seqs = [r["seq"] for r in got]
        dupes, lost = duplicates(seqs), set(source) - set(seqs)
        report(self, rows_checked=len(got), writer_max_wait_ms=int(sensor["max_wait"] * 1000),
               writer_checkpoints=len(sensor["checkpoints"]), probes=len(probes),
               probes_with_a_wal=len([p for p in probes if p["wal_before"] > 0]),
               duplicates=len(dupes), losses=len(lost))
        self.assertEqual((dupes, lost), ({}, set()))

        # the sensor never failed, never came near its busy timeout
        self.assertEqual(sensor["errors"], [], "the writer saw errors")
        self.assertEqual(sensor["committed"], rows)
        self.assertLess(sensor["max_wait"], 2.0, "an insert waited long for the uploader")
        # its own TRUNCATE checkpoints all completed: the WAL never grew without bound
        self.assertTrue(sensor["checkpoints"])
        self.assertEqual([c for c in sensor["checkpoints"] if c[0] != 0 or c[4] != 0], [],
                         "a writer checkpoint could not complete (busy, frames, done, "
                         "seconds, WAL bytes after)")
        self.assertLess(sensor["max_wal"], 1 << 20)
        # between batches, no read transaction: TRUNCATE completes from a 2nd connection
        self.assertGreaterEqual(len([p for p in probes if p["wal_before"] > 0]), 5,
                                "too few probes found a WAL to checkpoint")
        # (a WAL of 32 bytes is the header alone: the sensor began its next transaction
        # between the TRUNCATE and the size check, and it holds no frame)
        self.assertEqual([p for p in probes if p["busy"] or p["wal"] > WAL_HEADER], [],
                         "between two batches the uploader held a read transaction")
        self.assertEqual(len(source), rows)
        for r in got:
            stamp, sensor_name, seq, value = source[r["seq"]]
            self.assertEqual((r["sensor"], r["value"]), (sensor_name, value))
            self.assertEqual(r["timestamp"], dt.datetime.strptime(
                stamp, "%Y-%m-%dT%H:%M:%S.000Z").replace(tzinfo=UTC))

    def test_the_probe_catches_a_reader_that_holds_its_transaction(self):
        # The control: the same probe fails when the reader keeps one read transaction
        # open across its batches, so the test above can fail.
        uploader, log_path = self.start_uploader("wal-probe-held-read", 3,
                                                 DRIVER_PROBE_TIMEOUT="0.3")
        writer, _ = self.start_writer(10 ** 6)  # writes until stopped
        wait_for(lambda: len(self.probes()) >= 3 or uploader.poll() is not None,
                 what="three probes")
        writer.kill()
        uploader.send_signal(signal.SIGTERM)
        uploader.wait(timeout=60)
        probes = self.probes()
        self.assertEqual(len(probes), 3, self.read(log_path)[-3000:])
        self.assertEqual([p for p in probes if p["wal_before"] > 0 and not p["busy"]], [],
                         "the probe missed a held read transaction")
        self.assertTrue([p for p in probes if p["busy"]], probes)


# === 3. Hostile input ================================================================

WAREHOUSE_ENV = {"DATABRICKS_HOST": "adb-1234567890123456.7.azuredatabricks.net",
                 "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/0123456789abcdef",
                 "DATABRICKS_TOKEN": "dapi-reliability",
                 "DATABRICKS_DATABASE": "main.sensors", "DATABRICKS_VOLUME": "none"}


class InProcessWarehouse:
    """Mixin: the fake warehouse as the connector of main() run in this process."""

    def open_warehouse(self, **kwargs):
        self.addCleanup(setattr, fake_warehouse, "WAREHOUSE", fake_warehouse.WAREHOUSE)
        self.addCleanup(setattr, up.DatabricksSink, "connector",
                        up.DatabricksSink.connector)
        up.DatabricksSink.connector = fake_warehouse
        self.warehouse = fake_warehouse.WAREHOUSE = fake_warehouse.Warehouse(
            self.path("warehouse"), **kwargs)
        self.addCleanup(self.warehouse.release)
        return self.warehouse

    def warehouse_env(self, **extra):
        return {**WAREHOUSE_ENV, "STATE_DIR": self.path("wh-state"), "SOURCE_ID": "node-1",
                **extra}


class HostileSourceTest(InProcessWarehouse, ReliabilityTestCase):
    """Corrupt pages, an empty table, backticks in names."""

    def payload_db(self, rows, name="payload.db"):
        path = self.path(name)
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY "
                     "AUTOINCREMENT, timestamp TEXT NOT NULL, payload TEXT)")
        first = conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0]
        with conn:
            conn.executemany("INSERT INTO readings (timestamp, payload) VALUES (?, ?)",
                             [(f"2025-01-01T00:00:{i % 60:02d}Z", f"{i:06d}" + "x" * 200)
                              for i in range(first, first + rows)])
        conn.close()
        return path

    def ids(self, lake="lake"):
        return [r["id"] for r in delta_rows(self.path(lake, "raw_readings"), ["id"])]

    def test_corrupt_page_fails_in_one_line_and_loses_nothing(self):
        # Pages of rows not yet uploaded are overwritten: the cycle must stop with one
        # error line (no traceback), the cursor must not pass unread rows, and once the
        # file is good again every row lands exactly once.
        damage = {
            "a whole page (header included)": lambda size: (size * 7 // 8 // 4096 * 4096,
                                                            4096),
            "bytes inside a page": lambda size: (size * 7 // 8 // 4096 * 4096 + 1500, 1000),
            "the database header": lambda size: (0, 100),
        }
        for name, where in damage.items():
            with self.subTest(name):
                case = name.split()[1]
                db = self.payload_db(3000, name=f"{case}.db")
                env = self.base_env(STATE_DIR=self.path(f"state-{case}"),
                                    DELTA_URI=self.path(f"lake-{case}"))
                argv = ["--sqlite", db, "--once", "--batch-size", "400"]
                self.assertEqual(run_script(argv, env).returncode, 0)
                self.payload_db(3000, name=f"{case}.db")
                good = self.path(f"{case}.good")
                shutil.copyfile(db, good)
                offset, length = where(os.path.getsize(db))
                with open(db, "r+b") as fh:
                    fh.seek(offset)
                    fh.write(random.Random(SEED).randbytes(length))
                done = run_script(argv, env)
                self.assertIn(done.returncode, (1, 2), done.stderr[-3000:])
                self.one_error_line(done.stderr)
                ids = self.ids(f"lake-{case}")
                cursor, flight = pos_cursor(read_state(self.path(f"state-{case}")),
                                            self.path(f"lake-{case}"))
                self.assertIsNone(flight)
                self.assertEqual(sorted(ids), list(range(1, cursor + 1)))
                shutil.copyfile(good, db)
                done = run_script(argv, env)
                self.assertEqual(done.returncode, 0, done.stderr[-3000:])
                ids = self.ids(f"lake-{case}")
                self.assertEqual(sorted(ids), list(range(1, 6001)))
                TOTALS.update(rows_checked=len(ids))

    def test_empty_table_is_a_cycle_of_no_rows_then_rows_land_once(self):
        # Documented behaviour: exit 0, "0 rows read", no target table until a row comes.
        db = self.path("empty.db")
        conn = sqlite3.connect(db)
        conn.execute(READINGS)
        conn.close()
        cases = {"Delta raw": ([], self.base_env(), lambda: self.ids()),
                 "Delta windowed aggregate": (
                     ["--enable-aggregate", "--aggregate-config", json.dumps(WINDOWED)],
                     self.base_env(STATE_DIR=self.path("agg-state"),
                                   DELTA_URI=self.path("agg-lake")), None),
                 "warehouse": ([], self.warehouse_env(), lambda: [
                     r["id"] for r in self.warehouse.rows("main.sensors.raw_readings")])}
        self.open_warehouse()
        for name, (flags, env, landed) in cases.items():
            with self.subTest(name):
                for _ in range(2):
                    code, _, err = self.run_in_process(["--sqlite", db, "--once", *flags],
                                                       env)
                    self.assertEqual(code, 0, err)
                    self.assertIn("0 rows read", err)
                self.assertFalse(os.path.exists(self.path("lake")))
                self.assertFalse(os.path.exists(self.path("agg-lake")))
                # the node's status row may be written (the fleet sees it alive);
                # the data table is neither created nor written
                self.assertEqual([s["sql"] for s in self.warehouse.statements()
                                  if "raw_readings" in s["sql"]
                                  and not s["sql"].startswith(("SELECT", "DESCRIBE"))
                                  and "_uploader_nodes" not in s["sql"]], [])
        conn = sqlite3.connect(db)
        with conn:
            conn.executemany(f"INSERT INTO readings ({', '.join(READING_COLUMNS)}) VALUES "
                             "(?, ?, ?, ?, ?)", Sensor(self.path("x.db"), SEED).rows(30))
        conn.close()
        for name, (flags, env, landed) in cases.items():
            with self.subTest(name):
                code, _, err = self.run_in_process(["--sqlite", db, "--once", *flags], env)
                self.assertEqual(code, 0, err)
                if landed:
                    self.assertEqual(sorted(landed()), list(range(1, 31)))

    def test_backticks_quotes_spaces_and_unicode_in_delta_names(self):
        table, ts, cols = "rea`dings 'q' \"dq\" ✓", "time `of` día", ["a`b", "it's",
                                                                      'say "hi"',
                                                                      "ünï cödé", "``"]
        q = up.quote_ident
        db = self.path("names.db")
        conn = sqlite3.connect(db)
        conn.execute(f"CREATE TABLE {q(table)} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     f"{q(ts)} TEXT NOT NULL, {', '.join(q(c) + ' TEXT' for c in cols)})")

        def add(first, count):
            with conn:
                conn.executemany(
                    f"INSERT INTO {q(table)} ({q(ts)}, {', '.join(q(c) for c in cols)}) "
                    f"VALUES ({', '.join('?' * (len(cols) + 1))})",
                    [(f"2025-01-01T00:00:{i:02d}Z", *(f"{c}|{i}" for c in cols))
                     for i in range(first, first + count)])
        add(0, 7)
        argv = ["--sqlite", db, "--once", "--batch-size", "3", "--timestamp-col", ts]
        code, _, err = self.run_in_process(argv, self.base_env())
        self.assertEqual(code, 0, err)
        add(7, 5)
        code, _, err = self.run_in_process(argv, self.base_env())
        self.assertEqual(code, 0, err)
        conn.close()
        (name,) = os.listdir(self.path("lake"))
        self.assertEqual(name, up.route_table(table))
        rows = delta_rows(self.path("lake", name))
        self.assertEqual(sorted(r["id"] for r in rows), list(range(1, 13)))
        for row in rows:
            i = row["id"] - 1
            self.assertEqual({c: row[c] for c in cols}, {c: f"{c}|{i}" for c in cols})
            self.assertEqual(row[ts], dt.datetime(2025, 1, 1, 0, 0, i, tzinfo=UTC))


@slow
class LockedSourceTest(ReliabilityTestCase):
    """A writer holds an EXCLUSIVE lock (rollback journal: it keeps readers out) for
    longer than --busy-timeout."""

    def setUp(self):
        super().setUp()
        self.sensor = Sensor(self.path("locked.db"), SEED)
        self.sensor.add(50)

    def hold_lock(self, rows, seconds):
        """A connection with an EXCLUSIVE lock and `rows` uncommitted rows, committed
        after `seconds` by a thread."""
        holder = sqlite3.connect(self.sensor.path, isolation_level=None,
                                 check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        holder.executemany(f"INSERT INTO readings ({', '.join(READING_COLUMNS)}) VALUES "
                           "(?, ?, ?, ?, ?)", self.sensor.rows(rows))
        release = threading.Timer(seconds, lambda: (holder.execute("COMMIT"),
                                                    holder.close()))
        release.start()
        self.addCleanup(release.join)
        return release

    def landed(self):
        return [r["id"] for r in delta_rows(self.path("lake", "raw_readings"), ["id"])]

    def test_once_fails_in_one_line_then_uploads_everything(self):
        release = self.hold_lock(20, 3.0)
        argv = ["--sqlite", self.sensor.path, "--once", "--busy-timeout", "0.5"]
        done = run_script(argv, self.base_env())
        self.assertTrue(release.is_alive(), "the lock was released too early")
        self.assertIn(done.returncode, (1, 2), done.stderr)
        self.assertIn("locked", self.one_error_line(done.stderr))
        self.assertEqual(self.landed(), [])
        release.join()
        done = run_script(argv, self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(self.landed()), list(range(1, 71)))

    def test_loop_retries_while_locked_and_loses_nothing(self):
        log_path = self.path("loop.log")
        proc = start_driver("none", 0,
                            ["--sqlite", self.sensor.path, "--interval", "0.2",
                             "--busy-timeout", "0.5", "--batch-size", "9"],
                            self.base_env(), log_path)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        wait_for(lambda: len(self.landed()) == 50 or proc.poll() is not None,
                 what="the first rows")
        release = self.hold_lock(20, 2.5)
        release.join()
        wait_for(lambda: len(self.landed()) == 70 or proc.poll() is not None,
                 what="the rows committed when the lock was released")
        with open(log_path) as fh:
            log = fh.read()
        self.assertIsNone(proc.poll(), f"the loop died while the file was locked:\n"
                                       f"{log[-3000:]}")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=60), 0)
        with open(log_path) as fh:
            log = fh.read()
        self.assertNotIn("Traceback", log)
        self.assertRegex(log, r"ERROR .*locked.*retrying in")
        self.assertEqual(sorted(self.landed()), list(range(1, 71)))


@slow
class HugeValueTest(InProcessWarehouse, ReliabilityTestCase):
    """A 20 MB BLOB and a 10 MB TEXT among small rows."""

    BLOB = 20 * 1024 * 1024

    def setUp(self):
        super().setUp()
        rng = random.Random(SEED)
        self.big_blob = rng.randbytes(self.BLOB)
        self.big_text = "é✓x" * (10 * 1024 * 1024 // 6)
        self.db = self.path("huge.db")
        conn = sqlite3.connect(self.db)
        conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     "timestamp TEXT NOT NULL, note TEXT, payload BLOB)")
        rows = [(f"2025-01-01T00:00:{i % 60:02d}Z", f"n{i}", bytes([i]) * 50)
                for i in range(40)]
        rows[17] = ("2025-01-01T00:00:17Z", self.big_text, self.big_blob)
        conn.executemany("INSERT INTO readings (timestamp, note, payload) VALUES (?, ?, ?)",
                         rows)
        conn.commit()
        conn.close()
        self.rows = {i + 1: r for i, r in enumerate(rows)}

    def assert_all_landed(self, got):
        self.assertEqual(sorted(r["id"] for r in got), list(self.rows))
        for row in got:
            _ts, note, payload = self.rows[row["id"]]
            self.assertEqual(row["note"], note)
            self.assertEqual(bytes(row["payload"]), payload)
        TOTALS.update(rows_checked=len(got))

    def test_delta(self):
        code, _, err = self.run_in_process(["--sqlite", self.db, "--once", "--batch-size",
                                            "8"], self.base_env())
        self.assertEqual(code, 0, err)
        self.assert_all_landed(delta_rows(self.path("lake", "raw_readings")))

    def test_warehouse_with_a_small_statement_budget(self):
        # One row cannot be split: it goes alone, over the budget; every other
        # statement keeps to the budget, and every value lands intact.
        self.open_warehouse()
        budget = 20_000
        code, _, err = self.run_in_process(
            ["--sqlite", self.db, "--once", "--batch-size", "8", "--max-statement-bytes",
             str(budget)], self.warehouse_env())
        self.assertEqual(code, 0, err)
        self.assert_all_landed(self.warehouse.rows("main.sensors.raw_readings"))
        inserts = [s for s in self.warehouse.statements() if s["sql"].startswith("INSERT")]
        over = [s for s in inserts if s["bytes"] > budget]
        self.assertEqual(len(over), 1, [s["bytes"] for s in inserts])
        self.assertEqual(over[0]["sql"].count(" REPLACE WHERE "), 1)

    def test_warehouse_that_refuses_the_huge_statement(self):
        # A warehouse with a statement limit: without a volume the cycle stops in one
        # line, before the huge row, rows before it landed; with a volume configured
        # the row goes as a staged Parquet file and lands.
        volume = "/Volumes/main/sensors/staging"
        for name, batch, env_extra in (("no volume", 8, {}),
                                       ("volume", 8, {"DATABRICKS_VOLUME": volume}),
                                       ("volume, the row alone in its batch", 1,
                                        {"DATABRICKS_VOLUME": volume})):
            with self.subTest(name):
                self.fresh_dirs()
                self.open_warehouse(max_statement_bytes=16 * 1024 * 1024)
                argv = ["--sqlite", self.db, "--once", "--batch-size", str(batch),
                        "--max-statement-bytes", "20000"]
                code, _, err = self.run_in_process(argv, self.warehouse_env(**env_extra))
                if not env_extra:
                    self.assertEqual(code, 1, err)
                    self.assertIn("STATEMENT_TOO_LARGE", self.one_error_line(err))
                    got = self.warehouse.rows("main.sensors.raw_readings", "id")
                    self.assertEqual([r["id"] for r in got], list(range(1, 18)))
                    with open(self.path("wh-state", up.STATE_FILE)) as fh:
                        pos = next(iter(json.load(fh)["destinations"].values()))
                    # the batch of rows 17-24 went as statements: row 17's landed, the
                    # huge row's was refused, so the batch stays in flight (re-sent whole)
                    self.assertEqual(pos["cursor"], [16])
                    self.assertEqual(pos["inflight"]["cursor_end"], [24])
                else:
                    self.assertEqual(code, 0, err)
                    self.assert_all_landed(self.warehouse.rows("main.sensors.raw_readings"))

    def fresh_dirs(self):
        for name in ("wh-state", "warehouse"):
            shutil.rmtree(self.path(name), ignore_errors=True)


class TimestampFormatTest(ReliabilityTestCase):
    """Five timestamp formats mixed in one column, uploaded over several runs."""

    @staticmethod
    def stamp(i):
        moment = START + dt.timedelta(seconds=i)
        return [moment.strftime("%Y-%m-%dT%H:%M:%S"), moment.strftime("%Y-%m-%d %H:%M:%S"),
                moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                moment.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat(),
                int(moment.timestamp())][i % 5]

    def run_formats(self, schema, where):
        """Four runs, ten new rows before each; returns (rows, [(log, new misses)])."""
        db = self.path(f"{where}.db")
        conn = sqlite3.connect(db)
        conn.executescript(schema)
        env = self.base_env(STATE_DIR=self.path(f"state-{where}"),
                            DELTA_URI=self.path(f"lake-{where}"))
        runs, missing = [], set()
        for run in range(4):
            with conn:
                conn.executemany("INSERT INTO t (timestamp, v) VALUES (?, ?)",
                                 [(self.stamp(i), i) for i in range(run * 10, run * 10 + 10)])
            code, _, err = self.run_in_process(["--sqlite", db, "--once", "--batch-size",
                                                "3"], env)
            self.assertEqual(code, 0, err)
            landed = {r["v"] for r in delta_rows(self.path(f"lake-{where}", "raw_t"), ["v"])}
            now_missing = set(range(run * 10 + 10)) - landed
            runs.append((err, sorted(now_missing - missing)))
            missing = now_missing
        conn.close()
        return delta_rows(self.path(f"lake-{where}", "raw_t")), runs

    def test_rowid_cursor_uploads_every_format_once_at_the_right_instant(self):
        rows, _ = self.run_formats("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                                   "timestamp NOT NULL, v INTEGER)", "rowid")
        self.assertEqual(sorted(r["v"] for r in rows), list(range(40)))
        for r in rows:
            self.assertEqual(r["timestamp"], START + dt.timedelta(seconds=r["v"]), r)
            self.assertIsNone(r["_rescued_data"])

    def test_pair_cursor_skips_no_row_in_silence(self):
        # In pair mode SQLite orders the column as it holds it: numbers before text,
        # text byte by byte ('2025-01-01 00:00:06' < '2025-01-01T00:00:05'). A row that
        # sorts before the cursor although it came later is not uploaded; the README
        # promises that nothing is skipped in silence, so each such row must land, or
        # the run that leaves it behind must say so, with the count, in a WARNING line.
        rows, runs = self.run_formats("CREATE TABLE t (timestamp NOT NULL, v INTEGER); "
                                      "CREATE INDEX t_ts ON t(timestamp);", "pair")
        self.assertEqual(duplicates(r["v"] for r in rows), {})
        silent = []
        for n, (log, left_behind) in enumerate(runs, start=1):
            if left_behind and not re.search(rf"WARNING .*\b{len(left_behind)} rows?\b",
                                             log):
                silent.append(f"run {n}: v = {left_behind}")
        self.assertEqual(silent, [], "rows never uploaded and never reported")


class FullDisk:
    """From the `fail_from`-th write operation in `root` on, every one fails with
    `code` (ENOSPC: a full disk; EROFS: remounted read-only): open for writing, the
    first write to a file, fsync, rename. Lock files are left alone
    (test_lock_file_that_cannot_be_written covers them)."""

    def __init__(self, root, fail_from, code=errno.ENOSPC):
        self.root, self.fail_from, self.code, self.ops = root, fail_from, code, 0
        self.failed = []

    def op(self, what, path):
        self.ops += 1
        if self.ops >= self.fail_from:
            self.failed.append(what)
            raise OSError(self.code, os.strerror(self.code), path)

    def __enter__(self):
        import builtins
        real_open, real_fsync, real_replace = builtins.open, os.fsync, os.replace
        disk = self

        class Proxy:
            def __init__(self, fh, path):
                self._fh, self._path, self._written = fh, path, False

            def write(self, data):
                if not self._written:
                    self._written = True
                    disk.op("write", self._path)
                return self._fh.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._fh.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._fh, name)

        def is_ours(path):
            path = os.path.abspath(os.fspath(path))
            return path.startswith(self.root + os.sep) and not path.endswith(".lock")

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and is_ours(file) and \
                    set(mode) & set("wax+"):
                self.op("open", file)
                return Proxy(real_open(file, mode, *args, **kwargs), file)
            return real_open(file, mode, *args, **kwargs)

        def fake_fsync(fd):
            self.op("fsync", fd)
            return real_fsync(fd)

        def fake_replace(src, dst, *args, **kwargs):
            if is_ours(dst):
                self.op("rename", dst)
            return real_replace(src, dst, *args, **kwargs)

        self.patches = [mock.patch("builtins.open", fake_open),
                        mock.patch("os.fsync", fake_fsync),
                        mock.patch("os.replace", fake_replace)]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in reversed(self.patches):
            patch.stop()


@slow
class StateDiskTest(ReliabilityTestCase):
    """The state directory fills up or turns read-only: one error line, exit 1, and
    nothing lost when the run is retried on a disk that works again."""

    def setUp(self):
        super().setUp()
        self.sensor = Sensor(self.path("disk.db"), SEED)

    def argv(self):
        return ["--sqlite", self.sensor.path, "--once", "--batch-size", "10"]

    def assert_exactly_once(self, lake=None):
        ids = [r["id"] for r in delta_rows(os.path.join(lake or self.path("lake"),
                                                        "raw_readings"), ["id"])]
        self.assertEqual(sorted(ids), list(range(1, self.sensor.max_id() + 1)))
        return len(ids)

    def test_disk_full_or_read_only_at_every_state_write_of_a_run(self):
        # The k-th state write fails, and every one after it (a full disk stays full; a
        # file system remounted read-only stays so), for every k of a three-batch run;
        # then the same run on a working disk. (A real remount cannot be done while the
        # uploader holds its lock file open for writing: "mount point is busy".)
        state = os.path.abspath(self.path("state"))
        faults = checked = 0
        for code_, text in ((errno.ENOSPC, "No space left on device"),
                            (errno.EROFS, "Read-only file system")):
            for k in range(1, 200):
                self.sensor.add(25)
                # the first write of a new state records the target table at start
                # (exit 2, as for a disk already full at start); later ones, mid-run (1)
                expected = 1 if os.path.exists(os.path.join(state, up.STATE_FILE)) else 2
                with FullDisk(state, k, code_) as disk:
                    code, _, err = self.run_in_process(self.argv(), self.base_env())
                if not disk.failed:  # the run had fewer than k writes: the sweep is done
                    self.assertEqual(code, 0, err)
                    break
                faults += 1
                with self.subTest(k=k, failed=disk.failed[0], error=text):
                    self.assertEqual(code, expected if k == 1 else 1, err)
                    self.assertIn(text, self.one_error_line(err))
                code, _, err = self.run_in_process(self.argv(), self.base_env())
                self.assertEqual(code, 0, err)
                checked = self.assert_exactly_once()
        self.assertGreater(faults, 20)
        report(self, state_write_faults=faults, rows_checked=checked)

    def test_lock_file_that_cannot_be_written(self):
        # The first thing a run writes is the lock file (its pid); on a full disk that
        # write fails: one error line, not a traceback, and nothing uploaded.
        import builtins
        real_open = builtins.open

        class FullFile:
            def __init__(self, fh):
                self._fh = fh

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            flush = write

            def __getattr__(self, name):
                return getattr(self._fh, name)

        state_lock = os.path.join(self.path("state"), "")

        def full_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            name = os.fspath(file)  # the state's lock, not the scratch folder's
            return FullFile(fh) if name.endswith(".lock") and name.startswith(state_lock) \
                else fh

        self.sensor.add(20)
        with mock.patch("builtins.open", full_open):
            code, _, err = self.run_in_process(self.argv(), self.base_env())
        self.assertIn(code, (1, 2), err)
        self.assertIn("No space left on device", self.one_error_line(err))
        self.assertFalse(os.path.exists(self.path("lake")))
        code, _, err = self.run_in_process(self.argv(), self.base_env())
        self.assertEqual(code, 0, err)
        self.assert_exactly_once()

    # --- a real tmpfs (needs root and mount; skipped where mounting is not allowed) ---

    def mount_tmpfs(self, size="256k"):
        mnt = self.path("mnt")
        os.makedirs(mnt)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt],
                              capture_output=True, text=True)
        if done.returncode:
            self.skipTest(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", mnt], capture_output=True)
        return mnt

    def fill(self, mnt):
        filler = os.path.join(mnt, "filler")
        with open(filler, "ab", buffering=0) as fh:
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        return filler

    def remount(self, mnt, mode):
        subprocess.run(["mount", "-o", f"remount,{mode}", mnt], check=True)

    def test_real_full_tmpfs_at_start(self):
        mnt = self.mount_tmpfs()
        env = self.base_env(STATE_DIR=os.path.join(mnt, "state"))
        os.makedirs(env["STATE_DIR"])
        self.sensor.add(30)
        filler = self.fill(mnt)
        done = run_script(self.argv(), env)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("No space left on device", self.one_error_line(done.stderr))
        self.assertFalse(os.path.exists(self.path("lake")))
        os.remove(filler)
        done = run_script(self.argv(), env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_exactly_once()

    def test_real_tmpfs_fills_up_during_a_run(self):
        mnt = self.mount_tmpfs()
        env = self.base_env(STATE_DIR=os.path.join(mnt, "state"))
        self.sensor.add(60)
        commit, calls, filler = up.Checkpoint.commit, [0], []

        def commit_on_a_filling_disk(checkpoint, destination):
            calls[0] += 1
            if calls[0] == 3:
                filler.append(self.fill(mnt))
            return commit(checkpoint, destination)

        with mock.patch.object(up.Checkpoint, "commit", commit_on_a_filling_disk):
            code, _, err = self.run_in_process(self.argv(), env)
        self.assertEqual(code, 1, err)
        self.assertIn("No space left on device", self.one_error_line(err))
        os.remove(filler[0])
        code, _, err = self.run_in_process(self.argv(), env)
        self.assertEqual(code, 0, err)
        self.assert_exactly_once()

    def test_real_read_only_tmpfs_at_start_is_exit_2(self):
        # Documented (test_checkpoint): a state dir that cannot be written at start is
        # bad configuration, exit 2, one line naming it.
        mnt = self.mount_tmpfs()
        env = self.base_env(STATE_DIR=os.path.join(mnt, "state"))
        os.makedirs(env["STATE_DIR"])
        self.remount(mnt, "ro")
        self.sensor.add(10)
        done = run_script(self.argv(), env)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn(env["STATE_DIR"], self.one_error_line(done.stderr))
        self.remount(mnt, "rw")
        done = run_script(self.argv(), env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_exactly_once()


class ConfigShapeTest(ReliabilityTestCase):
    """Processing configs of shapes no other test tried: exit 2, one line naming the
    setting and where it came from, nothing read or written."""

    CASES = [
        ("AGGREGATE_CONFIG", {"group_by": 5, "aggregations": {"temperature": "avg"}}),
        ("AGGREGATE_CONFIG", {"group_by": [["sensor"]],
                              "aggregations": {"temperature": "avg"}}),
        ("AGGREGATE_CONFIG", {"group_by": [{"sensor": 1}],
                              "aggregations": {"temperature": "avg"}}),
        ("AGGREGATE_CONFIG", {"group_by": ["sensor"], "aggregations": {"temperature": []}}),
        ("AGGREGATE_CONFIG", {"group_by": ["sensor"], "aggregations": {"temperature": "avg"},
                              "window": 60}),
        ("AGGREGATE_CONFIG", 5),
        ("FILTER_CONFIG", {"sensor": {"in": [["s0"]]}}),
        ("FILTER_CONFIG", {"temperature": {">": None}}),
        ("SANITIZE_CONFIG", {"note": ["x"]}),
        ("SANITIZE_CONFIG", {"note": {"round": "two"}}),
        ("yaml", "enable_aggregate: true\naggregate_config:\n  group_by: 5\n"
                 "  aggregations: {temperature: avg}\n"),
        ("yaml", "enable_aggregate: true\naggregate_config:\n  group_by: [[sensor]]\n"
                 "  aggregations: {temperature: avg}\n"),
    ]

    def test_wrong_shapes(self):
        sensor = Sensor(self.path("shape.db"), SEED)
        sensor.add(5)
        for n, (where, spec) in enumerate(self.CASES):
            with self.subTest(where=where, spec=spec):
                env, argv = self.base_env(DELTA_URI=self.path(f"lake-{n}"),
                                          STATE_DIR=self.path(f"state-{n}")), []
                if where == "yaml":
                    path = self.path(f"c{n}.yaml")
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(spec)
                    argv, origin, setting = ["--config", path], path, "aggregate_config"
                else:
                    stage = where.split("_")[0]
                    env.update({f"ENABLE_{stage}": "true", where: json.dumps(spec)})
                    origin, setting = where, where.lower()
                code, _, err = self.run_in_process(["--sqlite", sensor.path, "--once",
                                                    *argv], env)
                self.assertEqual(code, 2, err)
                line = self.one_error_line(err)
                self.assertIn(setting, line)
                self.assertIn(origin, line)
                self.assertFalse(os.path.exists(self.path(f"lake-{n}")))


# === 4. A fleet on one table =========================================================

FLEET_SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "timestamp TEXT NOT NULL, node TEXT, v INTEGER)")


@slow
class FleetTest(ReliabilityTestCase):
    """16 uploaders, each with its own SQLite file, state and SOURCE_ID, append to one
    Delta table at once; some are killed in the middle and restarted."""

    NODES = 16
    BATCH = 9

    def setUp(self):
        super().setUp()
        self.rng = random.Random(SEED + 16)
        self.counts = [0] * self.NODES
        for n in range(self.NODES):
            conn = sqlite3.connect(self.db(n))
            conn.execute(FLEET_SCHEMA)
            conn.close()
            self.add(n, 30 + self.rng.randrange(40))

    def db(self, n):
        return self.path(f"node-{n:02d}.db")

    def add(self, n, count):
        conn = sqlite3.connect(self.db(n))
        with conn:
            conn.executemany("INSERT INTO readings (timestamp, node, v) VALUES (?, ?, ?)",
                             [(f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
                               f"node-{n:02d}", n * 100_000 + i)
                              for i in range(self.counts[n], self.counts[n] + count)])
        conn.close()
        self.counts[n] += count

    def run_fleet(self, plan):
        """Start every node at once (node n with kill plan[n] = (hook, k)); wait."""
        procs = []
        for n in range(self.NODES):
            hook, k = plan.get(n, ("none", 0))
            env = self.base_env(STATE_DIR=self.path(f"state-{n:02d}"),
                                SOURCE_ID=f"node-{n:02d}")
            procs.append(start_driver(hook, k,
                                      ["--sqlite", self.db(n), "--once", "--batch-size",
                                       str(self.BATCH)], env, self.path(f"node-{n:02d}.log")))
        codes = [p.wait(timeout=300) for p in procs]
        for n, code in enumerate(codes):
            with open(self.path(f"node-{n:02d}.log")) as fh:
                log = fh.read()
            expected = -signal.SIGKILL if n in plan else 0
            self.assertEqual(code, expected, f"node {n}:\n{log[-3000:]}")
            self.assertNotIn("Traceback", log)
        return codes

    def test_sixteen_nodes_one_table_with_kills_and_restarts(self):
        # Round 1: all nodes at once; three die at planted points (after a commit
        # landed, before the in-flight record, inside the state write).
        kills = {3: ("delta-after", 2), 8: ("save-before", 4), 12: ("torn-state", 3)}
        started = time.monotonic()
        self.run_fleet(kills)
        for n in range(self.NODES):
            self.add(n, 5 + self.rng.randrange(20))
        # Round 2: everyone again, the killed nodes restart where they stood.
        self.run_fleet({})
        took = time.monotonic() - started
        rows = delta_rows(self.path("lake", "raw_readings"), ["_source_id", "id", "node", "v"])
        by_node = collections.defaultdict(list)
        for r in rows:
            by_node[r["_source_id"]].append(r)
        dupes = lost = 0
        for n in range(self.NODES):
            ids = [r["id"] for r in by_node[f"node-{n:02d}"]]
            dupes += sum(c - 1 for c in collections.Counter(ids).values())
            lost += len(set(range(1, self.counts[n] + 1)) - set(ids))
        report(self, kills=len(kills), runs=2 * self.NODES, rows_checked=len(rows),
               duplicates=dupes, losses=lost, fleet_seconds=int(took))
        self.assertEqual(sorted(by_node), [f"node-{n:02d}" for n in range(self.NODES)])
        for n in range(self.NODES):
            got = by_node[f"node-{n:02d}"]
            ids = [r["id"] for r in got]
            self.assertEqual(sorted(ids), list(range(1, self.counts[n] + 1)), f"node {n}")
            self.assertEqual({r["node"] for r in got}, {f"node-{n:02d}"},
                             "a row carries another node's _source_id")
            self.assertEqual(sorted(r["v"] for r in got),
                             [n * 100_000 + i for i in range(self.counts[n])])
        self.assertEqual(len(rows), sum(self.counts))


# === 5. Recovery without state =======================================================

class RecoverStateTest(InProcessWarehouse, ReliabilityTestCase):
    """--recover-state rebuilds a lost state file from what the target holds."""

    def setUp(self):
        super().setUp()
        self.sensor = Sensor(self.path("recover.db"), SEED + 5)
        self.state_file = self.path("state", up.STATE_FILE)

    def upload(self, *flags, env=None, expect=0):
        code, _, err = self.run_in_process(["--sqlite", self.sensor.path, "--once",
                                            "--batch-size", "11", *flags],
                                           env or self.base_env())
        self.assertEqual(code, expect, err)
        return err

    def lose_state(self, state_dir=None):
        state_dir = state_dir or self.path("state")
        for name in os.listdir(state_dir):
            os.remove(os.path.join(state_dir, name))

    def lake_ids(self, table="raw_readings", lake="lake"):
        return [r["id"] for r in delta_rows(self.path(lake, table), ["id"])]

    def assert_once(self, ids, total=None):
        total = self.sensor.max_id() if total is None else total
        counts = collections.Counter(ids)
        dupes = {i: c for i, c in counts.items() if c > 1}
        lost = sorted(set(range(1, total + 1)) - set(counts))
        TOTALS.update(rows_checked=len(ids), duplicates=len(dupes), losses=len(lost))
        self.assertEqual((dupes, lost[:20]), ({}, []), "duplicates, lost ids")
        self.assertEqual(len(ids), total)

    def test_delta_raw(self):
        self.sensor.add(60)
        self.upload()
        self.sensor.add(30)
        self.upload()
        self.lose_state()
        self.sensor.add(40)
        err = self.upload("--recover-state")
        self.assertIn("recovered the cursor", err)
        self.assert_once(self.lake_ids())
        pos = destination_of(read_state(self.path("state")), self.path("lake"))
        self.assertEqual(pos["cursor"], [130])
        self.sensor.add(5)
        self.upload()
        self.assert_once(self.lake_ids())

    def test_delta_raw_after_a_kill_with_a_batch_in_flight(self):
        # The state is lost right after a kill: the batch in flight either landed
        # (its commit records the cursor after it) or did not (the last commit's does).
        for hook in ("delta-after", "delta-before", "save-before"):
            with self.subTest(hook):
                lake, state = self.path(f"lake-{hook}"), self.path(f"state-{hook}")
                env = self.base_env(DELTA_URI=lake, STATE_DIR=state)
                if self.sensor.max_id() == 0:
                    self.sensor.add(100)
                done = run_driver(hook, 4, ["--sqlite", self.sensor.path,
                                                         "--once", "--batch-size", "11"], env)
                self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr[-2000:])
                TOTALS.update(kills=1, runs=1)
                self.lose_state(state)
                self.upload("--recover-state", env=env)
                self.assert_once(self.lake_ids(lake=f"lake-{hook}"))

    def test_delta_windowed_aggregate(self):
        flags = ["--enable-aggregate", "--aggregate-config", json.dumps(WINDOWED)]
        for chunk in range(4):
            self.sensor.add(120)
            if chunk == 2:
                self.lose_state()
                self.upload(*flags, "--recover-state")
            else:
                self.upload(*flags)
        ref_env = self.base_env(DELTA_URI=self.path("ref-lake"),
                                STATE_DIR=self.path("ref-state"))
        self.upload(*flags, env=ref_env)
        got = agg_rows(self.path("lake", "aggregated_readings"))
        reference = agg_rows(self.path("ref-lake", "aggregated_readings"))
        differ = set(got) ^ set(reference)
        report(self, rows_checked=len(got),
               wrong_aggregates=len({(r[0], r[1]) for r in differ}))
        self.assertEqual(duplicates((r[0], r[1]) for r in got), {})
        self.assertGreater(len(reference), 20)
        self.assertEqual(sorted(differ, key=repr), [],
                         "(group, window) rows that differ from an uninterrupted run")

    def test_warehouse(self):
        self.open_warehouse()
        env = self.warehouse_env()
        self.sensor.add(50)
        self.upload(env=env)
        self.sensor.add(25)
        self.upload(env=env)
        self.lose_state(env["STATE_DIR"])
        self.sensor.add(30)
        err = self.upload("--recover-state", env=env)
        self.assertIn("recovered the cursor", err)
        self.assert_once([r["id"] for r in self.warehouse.rows("main.sensors.raw_readings")])

    def test_refused_when_the_state_has_a_cursor(self):
        # As a user runs it (a subprocess; the fake connector through the driver).
        self.sensor.add(30)
        root = self.path("warehouse")
        for name, env, landed in (
                ("Delta", self.base_env(), self.lake_ids),
                ("warehouse", {**self.warehouse_env(), "FAKE_WAREHOUSE_ROOT": root,
                               "DRIVER_WAREHOUSE": "1"},
                 lambda: [r["id"] for r in warehouse_rows(root, "main.sensors.raw_readings")])):
            with self.subTest(name):
                argv = ["--sqlite", self.sensor.path, "--once"]
                done = run_driver("none", 0, argv, env)
                self.assertEqual(done.returncode, 0, done.stderr[-2000:])
                state_file = os.path.join(env["STATE_DIR"], up.STATE_FILE)
                with open(state_file, "rb") as fh:
                    before = fh.read()
                self.sensor.add(10)
                done = run_driver("none", 0, [*argv, "--recover-state"], env)
                self.assertEqual(done.returncode, 2, done.stderr[-2000:])
                self.assertIn("--recover-state", self.one_error_line(done.stderr))
                with open(state_file, "rb") as fh:
                    self.assertEqual(fh.read(), before)
                self.assertEqual(len(landed()), self.sensor.max_id() - 10)

    def test_a_node_that_uploaded_nothing_starts_from_the_beginning(self):
        # Node A shares the table; node B has never uploaded: B's recovery finds none
        # of its rows, starts at its first row, and leaves A's rows alone.
        self.open_warehouse()
        other = Sensor(self.path("other.db"), SEED + 6)
        other.add(40)
        self.sensor.add(35)
        for name, a_env, b_env, rows in (
                ("Delta", self.base_env(SOURCE_ID="node-a"),
                 self.base_env(SOURCE_ID="node-b", STATE_DIR=self.path("state-b")),
                 lambda: delta_rows(self.path("lake", "raw_readings"), ["_source_id", "id"])),
                ("warehouse", self.warehouse_env(SOURCE_ID="node-a"),
                 self.warehouse_env(SOURCE_ID="node-b", STATE_DIR=self.path("wh-state-b")),
                 lambda: self.warehouse.rows("main.sensors.raw_readings"))):
            with self.subTest(name):
                code, _, err = self.run_in_process(["--sqlite", other.path, "--once"], a_env)
                self.assertEqual(code, 0, err)
                for _ in range(2):  # the table exists (A) / B's own rows now exist
                    err = self.upload("--recover-state", env=b_env) if _ == 0 else \
                        self.upload(env=b_env)
                    if _ == 0:
                        self.assertIn("holds nothing from node node-b", err)
                by_node = collections.defaultdict(list)
                for r in rows():
                    by_node[r["_source_id"]].append(r["id"])
                self.assert_once(by_node["node-b"])
                self.assertEqual(sorted(by_node["node-a"]), list(range(1, 41)))

    def test_no_table_yet_starts_from_the_beginning(self):
        self.sensor.add(20)
        err = self.upload("--recover-state")
        self.assertIn("holds nothing", err)
        self.assert_once(self.lake_ids())


if __name__ == "__main__":
    unittest.main()
