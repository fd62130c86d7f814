"""Operator experience: --demo, --status, --run-query, --test-upload, progress, logs."""

import io
import json
import os
import sqlite3

from tests import helpers
from tests.helpers import TempDirTestCase, read_delta, run_main, run_script, sensor_db, up


class DemoTest(TempDirTestCase):
    """README's first command: sample data, an upload, a summary that says where to look."""

    def test_demo_twice_uploads_then_only_new_rows(self):
        first = run_script(["--demo"], {}, cwd=self.tmp)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("raw_sensor_readings: 72,000 rows", first.stdout)
        self.assertIn("--run-query", first.stdout)
        rows = read_delta(self.path("lakehouse", "raw_sensor_readings"))
        self.assertEqual(len(rows), 72_000)
        self.assertEqual(len({r["id"] for r in rows}), 72_000)
        self.assertEqual(len(rows[0]), 21 + 5)  # the Bacalhau schema and the lineage
        second = run_script(["--demo"], {}, cwd=self.tmp)
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertIn("raw_sensor_readings: 84,000 rows", second.stdout)
        self.assertIn("12000 rows uploaded", second.stderr)
        # the printed command works as printed
        command = next(l for l in first.stdout.splitlines() if "--run-query" in l)
        sql = command.split("--run-query ", 1)[1].strip().strip('"')
        query = run_script(["--run-query", sql], {}, cwd=self.tmp)
        self.assertEqual(query.returncode, 0, query.stderr)
        self.assertIn("SENSOR_000", query.stdout)

    def test_demo_refuses_a_real_database(self):
        code, _, err = run_main(["--demo", "--sqlite", "mine.db"], {})
        self.assertEqual(code, 2)
        self.assertIn("--demo", err)


class StatusTest(TempDirTestCase):
    """--status says where the upload stands without uploading."""

    def test_status_before_and_after(self):
        db = sensor_db(self.path("s.db"), 10)
        env = self.base_env()
        code, out, err = run_main(["--sqlite", db, "--status", "--json"], env)
        self.assertEqual(code, 0, err)
        before = json.loads(out)
        self.assertEqual(before["pending_rows"], 200)
        self.assertFalse(before["state_exists"])
        self.assertFalse(os.path.exists(self.path("lake")))
        self.assertFalse(os.path.exists(self.path("state", "last_upload.json")))
        code, _, err = run_main(["--sqlite", db, "--once"], env)
        self.assertEqual(code, 0, err)
        conn = sqlite3.connect(db)
        helpers.insert_rows(conn, list(up.sensor_rows(helpers.FIXED_START, 1))[:7],
                            up.DEMO_COLUMNS)
        conn.commit()
        conn.close()
        code, out, err = run_main(["--sqlite", db, "--status", "--json"], env)
        after = json.loads(out)
        self.assertEqual(after["pending_rows"], 7)
        self.assertEqual(after["uploaded_rows"], 200)
        self.assertEqual(after["cursor"], [200])
        self.assertEqual(after["cursor_kind"], "rowid")
        self.assertEqual(after["target_table"], "raw_sensor_readings")
        self.assertIsNone(after["in_flight"])
        self.assertTrue(after["last_upload_at"])
        code, text, _ = run_main(["--sqlite", db, "--status"], env)
        self.assertIn("pending      7 rows", text)
        self.assertIn("raw_sensor_readings", text)

    def test_status_needs_a_source(self):
        code, _, err = run_main(["--status"], self.base_env())
        self.assertEqual(code, 2)
        self.assertIn("--sqlite", err)
        self.assertIn(self.path("state", "last_upload.json"), err)

    def test_status_finds_the_source_in_the_state_file(self):
        db = sensor_db(self.path("s.db"), 10)
        env = self.base_env()
        code, _, err = run_main(["--sqlite", db, "--once"], env)
        self.assertEqual(code, 0, err)
        code, out, err = run_main(["--status", "--json"], env)  # no --sqlite
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertEqual(report["source"], os.path.realpath(db))
        self.assertEqual((report["uploaded_rows"], report["pending_rows"]), (200, 0))
        with open(self.path("state", "last_upload.json"), "w") as fh:
            fh.write("{not json")
        code, _, err = run_main(["--status"], env)
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("no readable state file", err)


class QueryAndSelfTest(TempDirTestCase):
    """--run-query and --test-upload on the local lakehouse."""

    def test_run_query_reads_what_was_uploaded(self):
        db = sensor_db(self.path("s.db"), 5)
        env = self.base_env()
        self.assertEqual(run_main(["--sqlite", db, "--once"], env)[0], 0)
        code, out, err = run_main(["--run-query", "SELECT count(*) AS n, "
                                   "count(DISTINCT sensor_id) AS s FROM raw_sensor_readings"],
                                  env)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[-1].split(), ["100", "20"])

    def test_run_query_error_is_one_line(self):
        code, _, err = run_main(["--run-query", "SELECT * FROM nowhere"], self.base_env())
        self.assertEqual(code, 2)
        self.assertEqual(len([l for l in err.splitlines() if l.startswith("error:")]), 1)

    def test_test_upload_reports_each_step_and_cleans_up(self):
        code, out, err = run_main(["--test-upload"], self.base_env())
        self.assertEqual(code, 0, err)
        self.assertEqual([l.split()[-1] for l in out.splitlines()], ["ok", "ok", "ok"])
        self.assertEqual(os.listdir(self.path("lake")), [])

    def test_test_upload_failure_exits_1(self):
        blocker = self.path("file")
        open(blocker, "w").close()
        code, out, _ = run_main(["--test-upload"], self.base_env(DELTA_URI=blocker))
        self.assertEqual(code, 1)
        self.assertIn("FAILED", out)


class ProgressTest(TempDirTestCase):
    """The progress line shows on a terminal only."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def test_progress_counts_rows_and_erases_itself(self):
        screen = self.Terminal()
        progress = up.Progress(screen)
        progress.show(250, 1000, 125.0)
        self.assertIn("250/1,000 rows (25%)", screen.getvalue())
        self.assertIn("0m06s left", screen.getvalue())
        progress.clear()
        self.assertTrue(screen.getvalue().endswith("\r\x1b[K"))

    def test_silent_when_not_a_terminal(self):
        pipe = io.StringIO()
        progress = up.Progress(pipe)
        progress.show(1, 10, 1.0)
        progress.clear()
        self.assertEqual(pipe.getvalue(), "")

    def test_uploads_through_a_pipe_print_no_progress(self):
        db = sensor_db(self.path("s.db"), 30)
        result = run_script(["--sqlite", db, "--once", "--batch-size", "100"],
                            self.base_env())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("\r", result.stderr)
        self.assertNotIn("rows/s  ", result.stderr)


class LogFormatTest(TempDirTestCase):
    """--log-format json gives one JSON object per line, batch lines included."""

    def test_json_lines(self):
        db = sensor_db(self.path("s.db"), 10)
        result = run_script(["--sqlite", db, "--once", "--log-format", "json",
                             "--batch-size", "50"], self.base_env())
        self.assertEqual(result.returncode, 0, result.stderr)
        records = [json.loads(line) for line in result.stderr.splitlines()]
        self.assertTrue(all({"time", "level", "message"} <= set(r) for r in records))
        batches = [r for r in records if r["message"].startswith("batch ")]
        self.assertEqual(len(batches), 4)
        self.assertIn("raw_sensor_readings", batches[0]["message"])
        self.assertIn("pending", batches[0]["message"])
