"""Crash safety (DESIGN 5): SIGKILL the uploader anywhere; every row still lands once.

The kill driver (tests/kill_driver.py) imports the uploader, plants an os.kill(SIGKILL)
at the k-th call of one function (before or after it runs) and calls main(). Each scenario kills a --once upload again and again, each run at a later
call, restarting until a run completes; after every kill the state file must parse
and agree with the Delta table, and at the end every source row must be in the table
exactly once and the cursor must equal the last id. A last scenario kills at random
moments instead of at planted points.
"""

import collections
import glob
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import unittest

from tests.helpers import (slow, FIXED_START, SCRIPT, TempDirTestCase, child_env, delta_rows,
                           destination_of, read_delta, read_state, run_driver, sensor_db, up)

SEED = int(os.environ.get("CRASH_SEED", "20250101"))

def cursor_id(pos):
    """The rowid cursor of a progress record as an int (0 before the first batch)."""
    return pos["cursor"][0] if pos and pos["cursor"] else 0


def target_ids(table_uri):
    """The ids in a Delta table, in no particular order ([] if it does not exist)."""
    return [r["id"] for r in delta_rows(table_uri, ["id"])]


def source_rows(db):
    """{id: (timestamp, sensor_id, temperature)} of the sensor table."""
    conn = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT id, timestamp, sensor_id, temperature FROM sensor_readings")}
    finally:
        conn.close()


def add_rows(db, count, seed=1):
    """Append `count` sensor readings, as the sensor would, after the existing ones."""
    conn = sqlite3.connect(db)
    try:
        marks = ", ".join("?" * len(up.DEMO_COLUMNS))
        start = FIXED_START.replace(year=2026) + up.dt.timedelta(seconds=seed * 1000)
        rows = up.sensor_rows(start, count // 20 + 1, 20, seed=seed)
        columns = ", ".join(up.DEMO_COLUMNS)
        with conn:
            conn.executemany(f"INSERT INTO sensor_readings ({columns}) VALUES ({marks})",
                             itertools.islice(rows, count))
    finally:
        conn.close()


def parse_ts(text):
    """A source timestamp as an aware datetime (text without a zone is UTC)."""
    stamp = up.dt.datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=up.dt.timezone.utc)


def compare_target(db, table_uri):
    """(source rows, duplicates, missing, extra, wrong values) of an upload."""
    source = source_rows(db)
    got = read_delta(table_uri, sql=f'SELECT id, "timestamp", sensor_id, temperature '
                     f'FROM "{os.path.basename(table_uri)}"')
    counts = collections.Counter(r["id"] for r in got)
    duplicates = sum(n - 1 for n in counts.values())
    missing = len(set(source) - set(counts))
    extra = len(set(counts) - set(source))
    wrong = sum(1 for r in got if r["id"] in source and
                (r["timestamp"], r["sensor_id"], r["temperature"]) !=
                (parse_ts(source[r["id"]][0]), *source[r["id"]][1:]))
    return len(source), duplicates, missing, extra, wrong


class UploadChecks:
    """Checks shared by the checkpoint, crash and cycle tests (mix into a TestCase)."""

    table = "raw_sensor_readings"

    def table_uri(self, lake=None):
        return os.path.join(lake or self.path("lake"), self.table)

    def error_line(self, stderr):
        """The one `error:` line, which must end stderr: no traceback, no second line."""
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        self.assertNotIn("Traceback", stderr)
        self.assertEqual(len(errors), 1, f"expected one error line:\n{stderr}")
        self.assertEqual(lines[-1], errors[0],
                         f"the error must be one line, nothing after it:\n{stderr}")
        return errors[0]

    def assert_exactly_once(self, db, lake=None, state_dir=None, label=""):
        """Every source row is in the table once with its values; cursor at the end."""
        uri = self.table_uri(lake)
        total, duplicates, missing, extra, wrong = compare_target(db, uri)
        figures = (f"{label}{total} rows, {duplicates} duplicates, {missing} missing, "
                   f"{extra} extra, {wrong} with wrong values")
        self.assertEqual((duplicates, missing, extra, wrong), (0, 0, 0, 0), figures)
        state = read_state(state_dir or self.path("state"))
        pos = destination_of(state, lake or self.path("lake"), self.table)
        self.assertIsNotNone(pos, "no progress record for the destination")
        self.assertEqual(pos["cursor"], [max(source_rows(db))])
        self.assertIsNone(pos["inflight"])
        self.assertEqual(pos["rows"], total)
        return figures


class CrashTestCase(UploadChecks, TempDirTestCase):
    """Kill-and-restart loops over one multi-batch upload."""

    ROWS_SECONDS, SENSORS, BATCH = 200, 20, 50  # 4,000 rows in 80 batches

    def setUp(self):
        super().setUp()
        self.db = sensor_db(self.path("sensors.db"), self.ROWS_SECONDS, self.SENSORS)
        os.makedirs(self.path("tmp"))  # the runs' system temp folder (TMPDIR)
        self.env = self.base_env(TMPDIR=self.path("tmp"))
        self.argv = ["--sqlite", self.db, "--once", "--batch-size", str(self.BATCH)]

    def check_after_kill(self, where, at_batch_boundary=True):
        """Right after a SIGKILL: state parses and agrees with the Delta table."""
        state = read_state(self.path("state"))  # raises if it does not parse
        ids = target_ids(self.table_uri())
        counts = collections.Counter(ids)
        self.assertEqual([i for i, n in counts.items() if n > 1], [],
                         f"duplicates in the target after a kill {where}")
        high = max(ids, default=0)
        self.assertEqual(sorted(ids), list(range(1, high + 1)),
                         f"the target has gaps after a kill {where}")
        pos = destination_of(state, self.path("lake"))
        cursor = cursor_id(pos)
        flight = pos and pos["inflight"]
        landed = {cursor} | ({flight["cursor_end"][0]} if flight else set())
        self.assertIn(high, landed, f"target holds ids 1..{high} but the state says "
                      f"cursor {cursor}, in flight {flight} after a kill {where}")
        if at_batch_boundary:
            boundary = cursor % self.BATCH == 0 or cursor == len(source_rows(self.db))
            self.assertTrue(boundary, f"cursor {cursor} is not at a batch boundary "
                            f"after a kill {where}")
        return cursor

    def crash_loop(self, plan, limit=40):
        """Run the driver with each (hook, k) of `plan` until a run completes."""
        kills = []
        for hook, k in itertools.islice(plan, limit):
            done = run_driver(hook, k, self.argv, self.env)
            if done.returncode == 0:
                break
            self.assertEqual(done.returncode, -signal.SIGKILL,
                             f"{hook} #{k}: exit {done.returncode}\n{done.stderr}")
            kills.append((hook, k))
            self.check_after_kill(f"{hook} #{k}")
            self.after_kill(hook, k)
        else:
            self.fail(f"no run completed after {limit} kills: {kills}")
        self.assertTrue(kills, f"the planted hooks never fired: {plan}")
        figures = self.assert_exactly_once(self.db, label=f"{len(kills)} kills, ")
        self.assertEqual(os.listdir(self.path("state")).count(up.STATE_FILE + ".tmp"), 0)
        self.assertEqual(os.listdir(self.path("tmp")), [], "temporary files left behind")
        hooks = collections.Counter(hook for hook, _ in kills)
        points = ", ".join(f"{hook} x{n}" for hook, n in hooks.items())
        report(self, figures, len(kills), f"kill points {points}, k = 1..{kills[-1][1]}")
        return kills

    def after_kill(self, hook, k):
        """Extra checks after one kill (scenarios override)."""


def rising(hooks):
    """(hook, k) with k = 1, 2, 3, ...: each run dies one call later than the last."""
    for k in itertools.count(1):
        yield hooks[(k - 1) % len(hooks)], k


@slow
class PlantedKillTest(CrashTestCase):
    """SIGKILL at the points that matter, each a different number of calls in."""

    def after_kill(self, hook, k):
        if hook == "delta-after":
            pos = destination_of(read_state(self.path("state")), self.path("lake"))
            self.assertIsNotNone(pos["inflight"], "killed after the commit: in flight")
            self.assertEqual(max(target_ids(self.table_uri())),
                             pos["inflight"]["cursor_end"][0])
        if hook == "torn-state":
            tmp = os.path.join(self.path("state"), up.STATE_FILE + ".tmp")
            with open(tmp, encoding="utf-8") as fh:
                torn = fh.read()
            with self.assertRaises(ValueError, msg="the temp file should be torn"):
                json.loads(torn)

    def test_kill_after_inflight_saved_before_delta_write(self):
        # The batch is recorded in flight but never reached the table: on restart it
        # is abandoned and read again (same rows, same sequence number).
        self.crash_loop(rising(["begin-after", "delta-before"]))

    def test_kill_after_delta_commit_before_checkpoint_commit(self):
        # The rows are in the table, the state still says in flight: on restart the
        # transaction marker settles it and the batch is not sent again.
        kills = self.crash_loop(rising(["delta-after"]))
        self.assertGreaterEqual(len(kills), 3)

    def test_kill_in_the_middle_of_the_state_file_write(self):
        # Torn temp file, temp file complete but not renamed, renamed but the
        # directory not yet synced: the state file itself always parses.
        self.crash_loop(rising(["torn-state", "rename-before",
                                "rename-after"]))

    def test_kill_between_batches(self):
        self.crash_loop(rising(["commit-after"]))


@slow
class RandomKillTest(CrashTestCase):
    """SIGKILL at random moments of real runs, with the sensor adding rows meanwhile."""

    ROWS_SECONDS, BATCH = 300, 50  # 6,000 rows in 120 batches
    KILLS = 25

    def test_kill_at_random_moments(self):
        rng = random.Random(SEED)
        state_file = os.path.join(self.path("state"), up.STATE_FILE)
        kills, added, completed = [], 0, False
        for attempt in range(self.KILLS + 1):
            log_path = self.path(f"run-{attempt}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, SCRIPT, *self.argv],
                                        env=child_env(self.env), stdout=log, stderr=log)
            if attempt < self.KILLS:
                # Mostly: wait until this run changes the state (it is past its
                # start-up), let it go on for a random while, kill it. Sometimes: kill
                # it early, during start-up or while it settles the in-flight batch.
                if rng.random() < 0.8:
                    before = stat_key(state_file)
                    deadline = time.monotonic() + 60
                    while (proc.poll() is None and stat_key(state_file) == before
                           and time.monotonic() < deadline):
                        time.sleep(0.003)
                    time.sleep(rng.uniform(0, 0.2))
                else:
                    time.sleep(rng.uniform(0.05, 0.6))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=120)
            if code == 0:
                completed = True
                break
            with open(log_path) as fh:
                self.assertEqual(code, -signal.SIGKILL, f"exit {code}:\n{fh.read()}")
            kills.append(attempt)
            self.check_after_kill(f"at random (run {attempt})", at_batch_boundary=False)
            if rng.random() < 0.5:
                count = rng.randint(1, 130)
                add_rows(self.db, count, seed=attempt + 1)
                added += count
        self.assertTrue(completed, "the last run, never killed, did not complete")
        figures = self.assert_exactly_once(self.db, label=f"{len(kills)} kills, ")
        self.assertEqual(os.listdir(self.path("tmp")), [], "temporary files left behind")
        report(self, figures, len(kills), f"seed {SEED}, {added} rows added meanwhile")


@slow
class ScratchKillTest(CrashTestCase):
    """The landing target encodes each batch's Parquet in a temporary folder: runs killed
    mid-encode leave theirs behind, and the next start removes them (saying so); every
    row lands once and no temporary folder is left."""

    VOLUME = "/Volumes/main/sensors/landing"

    def test_folders_of_runs_killed_mid_encode_are_removed_at_the_restart(self):
        from tests import files_api
        service = files_api.FilesApi(volumes=[self.VOLUME])
        self.addCleanup(service.close)
        env = {**self.env, "TARGET": "landing", "DATABRICKS_HOST": f"http://{service.host}",
               "DATABRICKS_TOKEN": "dapi-files", "DATABRICKS_VOLUME": self.VOLUME}
        said = []
        for k in (1, 3):  # deltalake has written the Parquet; it is not read back yet
            done = run_driver("delta-after", k, self.argv, env)
            self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr[-3000:])
            said.append(done.stderr)
            (left,) = os.listdir(self.path("tmp"))  # this run's: the last one's is gone
            self.assertRegex(left, r"^uploader-scratch-\d+-[0-9a-f]{8}$")
            self.assertEqual(len(glob.glob(self.path("tmp", left, "parquet-*", "**",
                                                     "*.parquet"), recursive=True)), 1)
        done = run_driver("none", 0, self.argv, env)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        for stderr in said[1:] + [done.stderr]:
            self.assertIn("removed 1 temporary folder left by uploader processes that were "
                          "killed", stderr)
        self.assertEqual(os.listdir(self.path("tmp")), [])
        landed = service.ingest(f"{self.VOLUME}/{self.table}")
        self.assertEqual(sorted(r["id"] for r in landed), sorted(source_rows(self.db)))


TOTALS = collections.Counter()


def report(test, figures, kills, detail):
    """Print one scenario's figures and add them to the module's totals."""
    TOTALS.update(kills=kills, scenarios=1)
    print(f"\n  crash figures [{test._testMethodName}]: {figures}; {detail}",
          file=sys.stderr)


def tearDownModule():
    if TOTALS:
        print(f"\ncrash totals: {TOTALS['kills']} SIGKILLs over {TOTALS['scenarios']} "
              "passing scenarios, each ending with 0 duplicates and 0 missing rows",
              file=sys.stderr)


def stat_key(path):
    """Identity of a file's current version (a rename or a write changes it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


if __name__ == "__main__":
    unittest.main()
