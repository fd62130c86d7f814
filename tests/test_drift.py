"""A source that changes under a running uploader (DESIGN 4, issue 11): columns added
while it runs, and rows that appear behind the cursor."""

import json
import os
import signal
import sqlite3

from tests.helpers import slow, delta_rows, make_db, read_state, run_main, run_script, wait_for
from tests.test_crash import add_rows, cursor_id
from tests.test_cycle import CycleTestCase


class ColumnAddedWhileRunningTest(CycleTestCase):
    """A column added to the source while the uploader loops is read from the next batch
    on: its values land (never silently NULL) and the target gains the column."""

    def test_a_new_column_lands_without_a_restart(self):
        proc = self.start("--sqlite", self.db, "--interval", "0.2", "--batch-size", "250")
        wait_for(lambda: cursor_id(self.position()) == 600 or proc.poll() is not None,
                 what="the first upload")
        conn = sqlite3.connect(self.db)
        conn.execute("ALTER TABLE sensor_readings ADD COLUMN firmware_build INTEGER")
        conn.commit()
        conn.close()
        add_rows(self.db, 40)
        conn = sqlite3.connect(self.db)
        conn.execute("UPDATE sensor_readings SET firmware_build = id * 10 WHERE id > 600")
        conn.commit()
        conn.close()
        wait_for(lambda: cursor_id(self.position()) == 640 or proc.poll() is not None,
                 what="the rows with the new column")
        self.assertEqual(self.stop(proc), 0, self.log())
        rows = delta_rows(self.table_uri(), ["id", "firmware_build"])
        self.assertEqual(sorted((r["id"], r["firmware_build"]) for r in rows if r["id"] > 600),
                         [(i, i * 10) for i in range(601, 641)])
        self.assertTrue(all(r["firmware_build"] is None for r in rows if r["id"] <= 600))
        self.assertIn("columns added: firmware_build", self.log())
        self.assert_exactly_once(self.db)


WEEWX_LIKE = ("CREATE TABLE archive (dateTime INTEGER NOT NULL UNIQUE PRIMARY KEY, "
              "usUnits INTEGER NOT NULL, interval INTEGER NOT NULL, outTemp REAL)")


class RowsBehindTheCursorTest(CycleTestCase):
    """A time-keyed table (the key is the rowid) gets older records imported: a rowid
    cursor has passed them. Each cycle counts them and says so; --status shows them."""

    def setUp(self):
        super().setUp()
        self.db = make_db(self.path("weather.db"), WEEWX_LIKE,
                          [(1_700_000_000 + 300 * i, 1, 5, 10.0 + i) for i in range(100)])

    def import_older(self, count, start=0):
        conn = sqlite3.connect(self.db)
        conn.executemany("INSERT INTO archive VALUES (?, 1, 5, ?)",
                         [(1_600_000_000 + 300 * i, -1.0 * i)
                          for i in range(start, start + count)])
        conn.commit()
        conn.close()

    def test_rows_imported_behind_the_cursor_are_counted_every_cycle(self):
        argv = ["--sqlite", self.db, "--once"]
        self.assertEqual(run_script(argv, self.base_env()).returncode, 0)
        self.import_older(7)
        for run in range(2):  # said again each cycle until they are uploaded
            done = run_script(argv, self.base_env())
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertRegex(done.stderr, r"WARNING .*\b7 rows are behind the cursor")
        done = run_script(argv + ["--status", "--json"], self.base_env())
        self.assertEqual(json.loads(done.stdout)["behind_rows"], 7, done.stderr)
        self.import_older(3, start=7)  # 3 more, seen by --status before any cycle
        done = run_script(argv + ["--status"], self.base_env())
        self.assertRegex(done.stdout, r"behind\s+10 rows behind the cursor")
        self.assertEqual(len(delta_rows(os.path.join(self.path("lake"), "raw_archive"),
                                        ["dateTime"])), 100)

    def test_backfill_uploads_the_rows_behind_the_cursor_once(self):
        argv = ["--sqlite", self.db, "--once"]
        self.assertEqual(run_script(argv, self.base_env()).returncode, 0)
        self.import_older(30)
        self.assertEqual(run_script(argv, self.base_env()).returncode, 0)
        done = run_script(argv + ["--backfill", "--batch-size", "8"], self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("backfill: 30 rows behind the cursor were missing", done.stderr)
        table = os.path.join(self.path("lake"), "raw_archive")
        self.assert_archive_once(table, 130)
        # Nothing behind any more, and a second backfill sends nothing.
        done = run_script(argv + ["--backfill"], self.base_env())
        self.assertIn("backfill: 0 rows behind the cursor were missing", done.stderr)
        done = run_script(argv, self.base_env())
        self.assertNotIn("behind the cursor", done.stderr)
        self.assert_archive_once(table, 130)

    @slow
    def test_backfill_killed_anywhere_sends_each_row_once(self):
        from tests.helpers import run_driver
        argv = ["--sqlite", self.db, "--once", "--batch-size", "5"]
        self.assertEqual(run_script(argv, self.base_env()).returncode, 0)
        self.import_older(40)
        table = os.path.join(self.path("lake"), "raw_archive")
        kills = 0
        for hook, k in (("delta-after", 2), ("begin-after", 3), ("delta-before", 1),
                        ("save-after", 4), ("delta-after", 1)):
            done = run_driver(hook, k, argv + ["--backfill"], self.base_env())
            kills += done.returncode == -signal.SIGKILL
        self.assertGreaterEqual(kills, 3, "the planted kills did not fire")
        done = run_script(argv + ["--backfill"], self.base_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assert_archive_once(table, 140)

    def test_backfill_refuses_a_table_whose_key_the_target_does_not_hold(self):
        db = make_db(self.path("plain.db"), "CREATE TABLE t (v INTEGER)", [(1,), (2,)])
        argv = ["--sqlite", db, "--once"]
        self.assertEqual(run_script(argv, self.base_env()).returncode, 0)
        done = run_script(argv + ["--backfill"], self.base_env())
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("--backfill needs a key", done.stderr.splitlines()[-1])

    def assert_archive_once(self, table, count):
        conn = sqlite3.connect(self.db)
        source = dict(conn.execute("SELECT dateTime, outTemp FROM archive"))
        conn.close()
        rows = delta_rows(table, ["dateTime", "outTemp"])
        self.assertEqual(len(rows), count)  # no key twice
        # dateTime is epoch seconds in the source and a TIMESTAMP in the target
        self.assertEqual({int(r["dateTime"].timestamp()): r["outTemp"] for r in rows},
                         source)
