"""The cycle (DESIGN 1, 5, 8): loop mode, signals, --once and ONCE, failures, batches."""

import os
import signal
import sqlite3
import subprocess
import sys
import unittest
from unittest import mock

from tests.helpers import (slow, KILL_DRIVER, SCRIPT, TempDirTestCase, child_env, destination_of,
                           read_state, run_driver, run_main, run_script, sensor_db, up,
                           wait_for)
from tests.test_crash import UploadChecks, add_rows, cursor_id, target_ids


class CycleTestCase(UploadChecks, TempDirTestCase):
    """A sensor database, a state dir and a lake under the temp dir."""

    ROWS_SECONDS = 30  # x 20 sensors = 600 rows

    def setUp(self):
        super().setUp()
        self.db = sensor_db(self.path("sensors.db"), self.ROWS_SECONDS)
        self.state_dir = self.path("state")

    def position(self, lake=None):
        """The progress record of the lake (default self.path('lake')), or {}."""
        return destination_of(read_state(self.state_dir), lake or self.path("lake")) or {}

    def start(self, *argv, env=None, command=(SCRIPT,)):
        """Start the uploader (loop mode unless told); its log goes to self.log()."""
        self.log_path = self.path(f"uploader-{len(os.listdir(self.tmp))}.log")
        with open(self.log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, *command, *argv],
                                    env=child_env({**(env or self.base_env()),
                                                   "PYTHONFAULTHANDLER": "1"}),
                                    stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc

    def log(self):
        with open(self.log_path, encoding="utf-8") as fh:
            return fh.read()

    def stop(self, proc, sig=signal.SIGTERM):
        """Send `sig` and return the exit code."""
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is
            proc.wait(timeout=10)
            self.fail(f"no exit 60 s after {sig.name}:\n{self.log()[-6000:]}")

    def broken_lakes(self):
        """(name, DELTA_URI) pairs whose cycles fail."""
        blocker = self.path("a-regular-file")
        with open(blocker, "w") as fh:
            fh.write("not a directory")
        yield "DELTA_URI under a regular file", os.path.join(blocker, "lake")
        lake = self.path("corrupt-lake")
        done = run_script(["--sqlite", self.db, "--once"],
                          self.base_env(DELTA_URI=lake))
        self.assertEqual(done.returncode, 0, done.stderr)
        corrupt_delta_log(self.table_uri(lake))
        yield "Delta log with a corrupt commit", lake

    def wait_cursor(self, proc, predicate, what):
        wait_for(lambda: predicate(cursor_id(self.position())) or proc.poll() is not None,
                 what=what)
        self.assertIsNone(proc.poll(), f"the uploader exited early:\n{self.log()}")


@slow
class LoopTest(CycleTestCase):

    def test_loop_picks_up_new_rows_and_exits_0_on_sigterm(self):
        writer = sqlite3.connect(self.db)
        writer.execute("PRAGMA journal_mode=WAL")  # the sensor's mode
        self.addCleanup(writer.close)
        proc = self.start("--sqlite", self.db, "--interval", "0.2", "--batch-size", "250")
        self.wait_cursor(proc, lambda c: c == 600, "the first 600 rows")
        add_rows(self.db, 130, seed=1)
        self.wait_cursor(proc, lambda c: c == 730, "rows inserted while it runs")
        add_rows(self.db, 70, seed=2)
        self.wait_cursor(proc, lambda c: c == 800, "more rows inserted while it runs")
        self.assertEqual(self.stop(proc), 0, self.log())
        self.assertNotIn("Traceback", self.log())
        self.assert_exactly_once(self.db)

    def test_signal_during_a_batch_finishes_it_and_exits_0(self):
        # The signal arrives while the 3rd batch is in flight (planted just before its
        # Delta write): that batch completes and is checkpointed, no 4th one starts.
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig.name):
                lake = self.path(f"lake-{sig.name}")
                hook = f"{sig.name.lower()}-delta-before"
                done = run_driver(hook, 3, ["--sqlite", self.db, "--interval",
                                                    "0.2", "--batch-size", "100"],
                                  self.base_env(DELTA_URI=lake), timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertNotIn("Traceback", done.stderr)
                pos = self.position(lake)
                self.assertEqual((pos["cursor"], pos["inflight"]), ([300], None))
                self.assertEqual(sorted(target_ids(self.table_uri(lake))),
                                 list(range(1, 301)))

    def test_signal_from_outside_mid_upload_exits_0_with_state_consistent(self):
        sensor_db(self.db, 170)  # 600 + 3,400 rows: 200 batches of 20
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig.name):
                lake = self.path(f"lake-{sig.name}")
                env = self.base_env(DELTA_URI=lake)
                proc = self.start("--sqlite", self.db, "--interval", "0.2",
                                  "--batch-size", "20", env=env)
                wait_for(lambda: cursor_id(self.position(lake)) >= 40
                         or proc.poll() is not None, what="the first batches")
                self.assertEqual(self.stop(proc, sig), 0, self.log())
                self.assertNotIn("Traceback", self.log())
                pos = self.position(lake)
                self.assertIsNone(pos["inflight"], "stopped with a batch in flight")
                cursor = cursor_id(pos)
                self.assertTrue(cursor % 20 == 0 or cursor == 4000, cursor)
                self.assertEqual(sorted(target_ids(self.table_uri(lake))),
                                 list(range(1, cursor + 1)))
                # The next run uploads the rest, once.
                done = run_script(["--sqlite", self.db, "--once"], env)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assert_exactly_once(self.db, lake=lake)

    def test_loop_retries_a_failing_cycle_until_stopped(self):
        # Exit 1 is for --once; a loop logs the failure, backs off and tries again.
        for name, lake in self.broken_lakes():
            with self.subTest(name):
                proc = self.start("--sqlite", self.db, "--interval", "0.2",
                                  env=self.base_env(DELTA_URI=lake))
                wait_for(lambda: self.log().count("retrying in") >= 2
                         or proc.poll() is not None, what="two retries")
                self.assertIsNone(proc.poll(), f"the loop died:\n{self.log()}")
                self.assertEqual(self.stop(proc), 0, self.log())

    def test_failed_cycle_settles_its_inflight_batch_before_the_next(self):
        # The Delta commit of a short batch lands but the write reports an error; the
        # sensor adds rows meanwhile. The next cycle (same process) must not reuse the
        # batch's sequence number for a bigger batch: the marker says "committed" and
        # the new rows would be skipped.
        db = sensor_db(self.path("small.db"), 13, sensors=10)  # 130 rows: 100 + 30
        env = {**self.base_env(), "DRIVER_ADD_DB": db, "DRIVER_ADD_ROWS": "50"}
        proc = self.start("commit-add-rows-then-fail", "2", "--sqlite", db, "--interval",
                          "0.2", "--batch-size", "100", env=env, command=(KILL_DRIVER,))
        # 130 + the 50 rows added while the failing write ran: all of them, then stop
        self.wait_cursor(proc, lambda c: c >= 180, "the cycle after the failure")
        wait_for(lambda: not self.position().get("inflight"), what="a settled state")
        self.assertEqual(self.stop(proc), 0, self.log())
        self.assertIn("injected", self.log())
        self.assert_exactly_once(db)


def corrupt_delta_log(table_uri):
    """Add a torn commit after the table's last version: reading the table fails."""
    from deltalake import DeltaTable
    version = DeltaTable(table_uri).version()
    torn = os.path.join(table_uri, "_delta_log", f"{version + 1:020d}.json")
    with open(torn, "w", encoding="utf-8") as fh:
        fh.write('{"add": {"path": "part-0')


class OnceTest(CycleTestCase):

    def test_once_failing_cycle_exits_1_and_the_cursor_does_not_advance(self):
        for name, lake in self.broken_lakes():
            with self.subTest(name):
                before = self.position(lake)
                add_rows(self.db, 10, seed=len(name))
                done = run_script(["--sqlite", self.db, "--once"],
                                  self.base_env(DELTA_URI=lake))
                self.assertEqual(done.returncode, 1, done.stderr)
                after = self.position(lake)
                self.assertEqual(after.get("cursor"), before.get("cursor"))
                self.assertEqual(after.get("rows", 0), before.get("rows", 0))

    def test_once_failing_cycle_says_why_in_one_error_line(self):
        for name, lake in self.broken_lakes():
            with self.subTest(name):
                done = run_script(["--sqlite", self.db, "--once"],
                                  self.base_env(DELTA_URI=lake))
                self.assertEqual(done.returncode, 1, done.stderr)
                self.assertIn(os.path.basename(lake), self.error_line(done.stderr))

    def test_once_env_works_like_the_flag(self):
        for value in ("true", "1"):
            with self.subTest(ONCE=value):
                lake = self.path(f"lake-{value}")
                done = run_script(["--sqlite", self.db],
                                  self.base_env(ONCE=value, DELTA_URI=lake), timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assert_exactly_once(self.db, lake=lake)

    def test_rows_inserted_during_a_run_are_picked_up_by_the_next_cycle(self):
        # In-process, to insert at a known point: while the last (short) batch is
        # written, after the cycle has read its last row.
        original, added = up.DeltaSink.write, []

        def write(sink, table, batch):
            if batch.count < 250 and not added:
                add_rows(self.db, 70, seed=3)
                added.append(70)
            return original(sink, table, batch)

        saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        self.addCleanup(signal.signal, signal.SIGINT, saved[1])
        self.addCleanup(signal.signal, signal.SIGTERM, saved[0])
        argv = ["--sqlite", self.db, "--once", "--batch-size", "250"]
        with mock.patch.object(up.DeltaSink, "write", write):
            code, _, err = run_main(argv, self.base_env())
        self.assertEqual((code, added), (0, [70]), err)
        self.assertEqual(cursor_id(self.position()), 600)
        self.assertEqual(sorted(target_ids(self.table_uri())), list(range(1, 601)))
        done = run_script(argv, self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_exactly_once(self.db)

    def test_cycle_with_no_new_rows_writes_nothing(self):
        from deltalake import DeltaTable
        argv = ["--sqlite", self.db, "--once", "--batch-size", "250"]
        done = run_script(argv, self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        version = DeltaTable(self.table_uri()).version()
        before = self.position()
        for _ in range(2):
            done = run_script(argv, self.base_env())
            self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(DeltaTable(self.table_uri()).version(), version)
        after = self.position()
        for key in ("cursor", "rows", "inflight"):
            self.assertEqual(after[key], before[key], key)
        self.assert_exactly_once(self.db)


class BatchTest(CycleTestCase):

    ROWS_SECONDS = 50  # 1,000 rows

    def test_checkpoint_advances_after_each_batch(self):
        # Kill right after the k-th checkpoint commit: the state stands at exactly k
        # batches, and the table holds exactly those rows.
        argv = ["--sqlite", self.db, "--once", "--batch-size", "150"]
        expected = 0
        for k in (3, 1, 2):
            done = run_driver("commit-after", k, argv, self.base_env())
            self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
            expected += 150 * k
            pos = self.position()
            self.assertEqual(pos["cursor"], [expected])
            self.assertIsNone(pos["inflight"])
            self.assertEqual(pos["rows"], expected)
            self.assertEqual(sorted(target_ids(self.table_uri())),
                             list(range(1, expected + 1)))
        done = run_script(argv, self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_exactly_once(self.db)


@slow
class StopFlagTest(unittest.TestCase):
    """A SIGTERM must never deadlock the loop's wait (threading.Event could: its set()
    takes the lock that wait() holds for a few bytecodes on the same thread)."""

    CHILD = """
import os, random, signal, sys, threading
sys.path.insert(0, {root!r})
import sqlite_to_databricks_uploader as up
for _ in range({tries}):
    stop = {flag}
    up.install_signal_handlers(stop)
    timer = threading.Timer(random.uniform(0, 0.002), os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    while not stop.is_set():
        stop.wait(0)  # the loop's wait, entered and left many times over
    timer.join()
    if hasattr(stop, "close"):
        stop.close()
print("all stopped")
"""

    def test_thousands_of_signals_each_stop_the_wait(self):
        code = self.CHILD.format(root=os.path.dirname(SCRIPT), tries=3000,
                                 flag="up.StopFlag()")
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("a SIGTERM left the wait deadlocked")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "all stopped"),
                         done.stderr[-2000:])


class MemoryTest(CycleTestCase):
    """A batch is read in chunks; the Python values of one chunk live at a time."""

    ROWS_SECONDS = 600  # 12,000 rows

    def python_peak(self, batch_size, name):
        """Peak of the Python heap (tracemalloc) over one --once upload, 1,000-row chunks."""
        import tracemalloc
        lake, state = self.path(name), self.path(name + "-state")
        env = self.base_env(DELTA_URI=lake, STATE_DIR=state)
        argv = ["--sqlite", self.db, "--once", "--batch-size", str(batch_size)]
        with mock.patch.object(up.read_batches, "__defaults__", (1000,)):
            tracemalloc.start()
            try:
                code, _, err = run_main(argv, env)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        self.assertEqual(code, 0, err)
        self.assert_exactly_once(self.db, lake, state)
        return peak

    def test_a_big_batch_holds_no_more_python_values_than_a_small_one(self):
        self.python_peak(2_000, "warm-up")  # imports and caches are not the batch's
        small = self.python_peak(2_000, "small")  # 6 batches of 2 chunks
        big = self.python_peak(12_000, "big")  # 1 batch of 12 chunks
        # Holding every chunk of the big batch until its write would be about 6x.
        self.assertLess(big, 2 * small, f"peak {big:,} B vs {small:,} B")


if __name__ == "__main__":
    unittest.main()
