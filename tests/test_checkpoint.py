"""Checkpoint (DESIGN 5): the state file, its lock, its errors and where it lives."""

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import unittest
from unittest import mock

from tests.helpers import (SCRIPT, TempDirTestCase, slow, child_env, destination_of, file_digest,
                           make_db, read_state, run_main, run_script, sensor_db, up, wait_for)
from tests.test_crash import UploadChecks, add_rows, target_ids

TOKEN = "dapi-0123456789abcdef-NEVER-IN-STATE"


class CheckpointTestCase(UploadChecks, TempDirTestCase):
    """A 600-row sensor database and a state dir under the temp dir."""

    def setUp(self):
        super().setUp()
        self.db = sensor_db(self.path("sensors.db"), 30)  # 600 rows
        self.state_dir = self.path("state")
        self.state_file = os.path.join(self.state_dir, up.STATE_FILE)
        for signum in (signal.SIGINT, signal.SIGTERM):  # main() sets its own
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))

    def upload(self, *extra, env=None, **env_extra):
        """One --once run of main() in this process (a process costs ~0.2 s of CPU; the
        runs across processes: LockTest, BadStateTest); returns a CompletedProcess."""
        argv = ["--sqlite", self.db, "--once", "--batch-size", "250", *extra]
        code, out, err = run_main(argv, env if env is not None else self.base_env(**env_extra))
        return subprocess.CompletedProcess(argv, code, out, err)

    def assert_ok(self, done):
        self.assertEqual(done.returncode, 0, done.stderr)


class StateFileTest(CheckpointTestCase):

    def test_state_is_versioned_json_with_a_cursor_per_destination(self):
        lake_a, lake_b = self.path("lake-a"), self.path("lake-b")
        self.assert_ok(self.upload(DELTA_URI=lake_a))
        with open(self.state_file, encoding="utf-8") as fh:
            state = json.load(fh)
        self.assertEqual(state["version"], up.STATE_VERSION)
        self.assertEqual(state["source"]["path"], os.path.realpath(self.db))
        self.assertEqual(state["source"]["table"], "sensor_readings")
        self.assertEqual(state["source"]["cursor"]["kind"], "rowid")
        self.assertEqual(destination_of(state, lake_a)["cursor"], [600])

        add_rows(self.db, 100)
        # A new destination starts from the beginning; the first keeps its cursor.
        self.assert_ok(self.upload("--delta-uri", lake_b))
        self.assertEqual(sorted(target_ids(self.table_uri(lake_b))), list(range(1, 701)))
        state = read_state(self.state_dir)
        self.assertEqual(len(state["destinations"]), 2)
        self.assertEqual(destination_of(state, lake_a)["cursor"], [600])
        self.assertEqual(destination_of(state, lake_b)["cursor"], [700])
        self.assertEqual(sorted(target_ids(self.table_uri(lake_a))), list(range(1, 601)))

        # Switching back continues where the first destination stood.
        self.assert_ok(self.upload(DELTA_URI=lake_a))
        self.assert_exactly_once(self.db, lake=lake_a)
        self.assert_exactly_once(self.db, lake=lake_b)

    @slow
    def test_writes_are_atomic_the_file_always_parses_and_no_tmp_is_left(self):
        # Small batches: hundreds of state writes while this process keeps reading.
        sensor_db(self.db, 100)  # 600 + 2,000 rows
        log_path = self.path("uploader.log")
        with open(log_path, "w") as log:
            argv = [SCRIPT, "--sqlite", self.db, "--once", "--batch-size", "10"]
            env = child_env(self.base_env())
            proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=log,
                                    stderr=log)
        self.addCleanup(proc.kill)
        reads, torn, deadline = 0, [], time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with open(self.state_file, encoding="utf-8") as fh:
                    text = fh.read()
            except FileNotFoundError:
                time.sleep(0.001)
                continue
            reads += 1
            try:
                json.loads(text)
            except ValueError as exc:
                torn.append(f"{exc}: {text[:80]!r}")
        with open(log_path) as fh:
            self.assertEqual(proc.wait(timeout=60), 0, fh.read())
        self.assertEqual(torn, [], f"{len(torn)} of {reads} reads did not parse")
        self.assertEqual(read_state(self.state_dir)["version"], up.STATE_VERSION)
        leftovers = [n for n in os.listdir(self.state_dir) if "tmp" in n.lower()]
        self.assertEqual(leftovers, [])
        self.assert_exactly_once(self.db)

    def test_token_never_appears_in_the_state_dir(self):
        for how in ("env", "flag"):
            with self.subTest(token_from=how):
                state_dir = self.path(f"state-{how}")
                env = self.base_env(STATE_DIR=state_dir, DELTA_URI=self.path(f"lake-{how}"))
                extra = ("--databricks-token", TOKEN) if how == "flag" else ()
                if how == "env":
                    env["DATABRICKS_TOKEN"] = TOKEN
                done = self.upload(*extra, env=env)
                self.assert_ok(done)
                self.assertNotIn(TOKEN, done.stderr)
                for name in os.listdir(state_dir):
                    with open(os.path.join(state_dir, name), "rb") as fh:
                        self.assertNotIn(TOKEN.encode(), fh.read(), name)


    def test_the_row_at_the_cursor_is_kept_as_a_digest_with_the_file_it_was_read_from(self):
        # what tells a copy of the file from another database under its name; the
        # state holds no row data
        secret = "patient-4711-NEVER-IN-STATE"
        db = make_db(self.path("notes.db"), "CREATE TABLE notes (id INTEGER PRIMARY KEY "
                     "AUTOINCREMENT, body TEXT)", [("a",), (secret,)], ["body"])
        self.db = db
        self.assert_ok(self.upload())
        pos = next(iter(read_state(self.state_dir)["destinations"].values()))
        info = os.stat(db)
        self.assertEqual(pos["file_id"], [info.st_dev, info.st_ino])
        self.assertEqual(pos["cursor"], [2])
        with open(self.state_file, encoding="utf-8") as fh:
            text = fh.read()
        self.assertNotIn("patient-4711", text)
        # the column names are a digest too (the state is written at every batch), as
        # in the in-flight record
        self.assertNotIn('"body"', text)
        self.assertEqual(pos["cursor_row"]["n"], 2)
        # keyed with the state's id: a value guessed cannot be checked against the
        # digest without this state, and another state marks the same row otherwise
        values = repr([("int", 2), ("str", secret)]).encode()
        self.assertNotIn(hashlib.sha256(values).hexdigest()[:16], text)
        self.assertNotIn(hashlib.blake2b(values, digest_size=8).hexdigest(), text)
        os.rename(self.state_file, self.state_file + ".first")
        self.assert_ok(self.upload("--reset-state", "--start-at", "now"))
        again = next(iter(read_state(self.state_dir)["destinations"].values()))
        self.assertEqual(again["cursor"], [2])
        self.assertNotEqual(again["cursor_row"]["digest"], pos["cursor_row"]["digest"])

    def test_the_in_flight_record_carries_the_mark_that_its_commit_keeps(self):
        checkpoint = up.Checkpoint(self.state_dir)
        os.makedirs(self.state_dir)
        checkpoint.data = up.new_state({"path": "x", "table": "t", "cursor": None})
        mark = {"names": "0123456789abcdef", "n": 1, "digest": "0123456789abcdef"}
        batch = up.Batch(1, "b-1", ["v"], ["long"], 1, [], [7], cursor_row=mark)
        checkpoint.begin("k", batch, "raw_t", "node")
        pos = read_state(self.state_dir)["destinations"]["k"]
        self.assertEqual((pos.get("cursor_row"), pos["inflight"]["cursor_row"]), (None, mark))
        checkpoint.commit("k")  # (as a crash's settle does, reading the in-flight record)
        pos = read_state(self.state_dir)["destinations"]["k"]
        self.assertEqual((pos["cursor"], pos["cursor_row"]), ([7], mark))


class RouteProgressTest(CheckpointTestCase):
    """DESIGN 3: progress is kept per target table, so switching a stage on and off
    never leaves a gap in any table (one cursor per destination left one in raw_)."""

    FILTER = ("--enable-filter", "--filter-config", '{"status_code": {"in": [0, 1]}}')

    def test_a_stage_switched_on_then_off_leaves_no_gap_in_either_table(self):
        self.assert_ok(self.upload())  # raw_: 1-600
        add_rows(self.db, 100)
        done = self.upload(*self.FILTER)  # filtered_ is new: its history is uploaded
        self.assert_ok(done)
        self.assertIn("filtered_sensor_readings is new to this state", done.stderr)
        self.assertEqual(sorted(target_ids(os.path.join(self.path("lake"), "filtered_sensor_readings"))),
                         list(range(1, 701)))
        add_rows(self.db, 100)
        self.assert_ok(self.upload())  # back to raw_: 601-800, nothing skipped
        self.assert_exactly_once(self.db)
        state = read_state(self.state_dir)
        self.assertEqual({k.rsplit("/", 1)[1]: p["cursor"] for k, p in
                          state["destinations"].items()},
                         {"raw_sensor_readings": [800], "filtered_sensor_readings": [700]})

    def test_start_at_now_leaves_a_new_table_the_history(self):
        self.assert_ok(self.upload())
        done = self.upload(*self.FILTER, "--start-at", "now")
        self.assert_ok(done)
        self.assertIn("starting at the current end of the source", done.stderr)
        add_rows(self.db, 50)
        self.assert_ok(self.upload(*self.FILTER))
        self.assertEqual(sorted(target_ids(os.path.join(self.path("lake"), "filtered_sensor_readings"))),
                         list(range(601, 651)))

    def test_a_version_1_state_file_keeps_its_cursor(self):
        lake = os.path.abspath(self.path("lake"))
        self.assert_ok(self.upload())
        state = read_state(self.state_dir)
        (key, pos), = state["destinations"].items()
        # The state as version 1 wrote it: one position per destination.
        state.update(version=1, destinations={key.rsplit("/", 1)[0]: pos})
        with open(self.state_file, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        add_rows(self.db, 40)
        done = self.upload()
        self.assert_ok(done)
        self.assertIn("is of version 1", done.stderr)
        self.assert_exactly_once(self.db)
        state = read_state(self.state_dir)
        self.assertEqual(state["version"], up.STATE_VERSION)
        self.assertEqual(list(state["destinations"]),
                         [f"delta:{lake}/raw_sensor_readings"])

    def test_a_lost_state_file_is_refused_not_uploaded_twice(self):
        self.assert_ok(self.upload())
        os.remove(self.state_file)
        done = self.upload()
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("already holds 600 rows from node test-node",
                      self.error_line(done.stderr))
        self.assertEqual(sorted(target_ids(self.table_uri())), list(range(1, 601)))
        self.assert_ok(self.upload("--recover-state"))
        add_rows(self.db, 10)
        self.assert_ok(self.upload())
        self.assert_exactly_once(self.db)


    def test_recover_state_refuses_another_file_under_the_name(self):
        # the state is lost and the file now under the name is another one (other rows
        # at the cursor): going on after the last commit would skip its first 600 rows
        self.assert_ok(self.upload())
        os.remove(self.state_file)
        os.remove(self.db)
        sensor_db(self.db, 40, start=up.dt.datetime(2025, 6, 1, tzinfo=up.dt.timezone.utc))
        done = self.upload("--recover-state")
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("not the file those rows came from", self.error_line(done.stderr))
        self.assertEqual(sorted(target_ids(self.table_uri())), list(range(1, 601)))

    def test_recover_state_after_a_purge_of_the_row_at_the_cursor(self):
        # a retention purge deleted the rows up to past the cursor (the row uploaded
        # last is gone) and the state is lost: the file holds no row up to the cursor,
        # only rows after it, so going on skips none of them
        self.assert_ok(self.upload("--cursor", "timestamp"))
        add_rows(self.db, 50)
        with sqlite3.connect(self.db) as conn:
            conn.execute("DELETE FROM sensor_readings WHERE id <= 620")
        conn.close()
        os.remove(self.state_file)
        done = self.upload("--cursor", "timestamp", "--recover-state")
        self.assert_ok(done)
        self.assertIn("has no row up to it, only rows after it", done.stderr)
        self.assert_ok(self.upload("--cursor", "timestamp"))
        self.assertEqual(sorted(target_ids(self.table_uri())),  # 601-620: purged unsent
                         list(range(1, 601)) + list(range(621, 651)))

class LockTest(CheckpointTestCase):
    """The lock is between processes: each uploader here is one."""

    def upload(self, *extra, env=None, **env_extra):
        return run_script(["--sqlite", self.db, "--once", "--batch-size", "250", *extra],
                          env if env is not None else self.base_env(**env_extra))

    def test_second_uploader_fails_while_the_lock_is_held(self):
        os.makedirs(self.state_dir)
        with open(self.state_file + ".lock", "a+", encoding="utf-8") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.truncate(0)
            holder.write(str(os.getpid()))
            holder.flush()
            done = self.upload()
        self.assertNotEqual(done.returncode, 0)
        line = self.error_line(done.stderr)
        self.assertIn(f"pid {os.getpid()}", line)
        self.assertFalse(os.path.exists(self.state_file), "the loser wrote state")
        self.assertEqual(target_ids(self.table_uri()), [])
        # Released: the next run goes ahead.
        self.assert_ok(self.upload())
        self.assert_exactly_once(self.db)

    def test_second_uploader_fails_while_a_looping_uploader_runs(self):
        log_path = self.path("first.log")
        with open(log_path, "w") as log:
            first = subprocess.Popen(
                [sys.executable, SCRIPT, "--sqlite", self.db, "--interval", "0.2"],
                env=child_env(self.base_env()), stdout=log, stderr=log)
        self.addCleanup(first.kill)
        wait_for(lambda: (destination_of(read_state(self.state_dir), self.path("lake"))
                          or {}).get("cursor") == [600] or first.poll() is not None,
                 what="the first uploader to upload")
        self.assertIsNone(first.poll(), "the looping uploader exited")
        before = file_digest(self.state_file)
        done = self.upload(DELTA_URI=self.path("other-lake"))
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"pid {first.pid}", self.error_line(done.stderr))
        self.assertEqual(file_digest(self.state_file), before)
        first.send_signal(signal.SIGTERM)
        with open(log_path) as fh:
            self.assertEqual(first.wait(timeout=60), 0, fh.read())
        self.assert_ok(self.upload(DELTA_URI=self.path("other-lake")))


class BadStateTest(CheckpointTestCase):
    """Unreadable or foreign state is an error, never a silent reset."""

    def assert_refused(self, done, digest, lake):
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("--reset-state", self.error_line(done.stderr))
        self.assertEqual(file_digest(self.state_file), digest, "state file was changed")
        self.assertEqual(sorted(os.listdir(self.state_dir)),
                         [up.STATE_FILE, up.STATE_FILE + ".lock"], "state dir changed")
        self.assertEqual(target_ids(self.table_uri(lake)), [], "rows were uploaded")

    def test_corrupt_state_is_an_error_and_left_untouched(self):
        self.assert_ok(self.upload())
        with open(self.state_file, "rb") as fh:
            good = fh.read()
        cases = {
            "garbage bytes": b"\x00\xff\xfeGARBAGE\x89PNG\r\n\x1a\n" * 20,
            "empty file": b"",
            "truncated JSON": good[: len(good) // 2],
            "JSON of another tool": json.dumps(
                {"last_upload": "2025-01-01 00:00:00"}).encode(),
            "a JSON list": b"[1, 2, 3]",
            "newer version": json.dumps({**json.loads(good), "version": 99}).encode(),
        }
        for name, content in cases.items():
            with self.subTest(name):
                with open(self.state_file, "wb") as fh:
                    fh.write(content)
                lake = self.path(f"lake-{len(name)}")
                self.assert_refused(self.upload(DELTA_URI=lake),
                                    file_digest(self.state_file), lake)

    def test_state_with_a_mangled_body_is_an_error_not_a_traceback(self):
        # Our tool's header, but a body that no run of it writes (hand-edited, or
        # damaged): the same one-line error and exit 2 as any unreadable state.
        self.assert_ok(self.upload())
        good = read_state(self.state_dir)
        dest = next(iter(good["destinations"]))
        cases = {
            "source is not an object": {**good, "source": "sensors.db"},
            "destination is not an object": {**good, "destinations": {dest: "600"}},
            "cursor is not a list": {**good, "destinations": {
                dest: {**good["destinations"][dest], "cursor": "600"}}},
        }
        for name, data in cases.items():
            with self.subTest(name):
                with open(self.state_file, "w", encoding="utf-8") as fh:
                    json.dump(data, fh)
                done = self.upload()
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn("--reset-state", self.error_line(done.stderr))

    def test_state_of_another_sqlite_file_is_an_error(self):
        self.assert_ok(self.upload())
        other = sensor_db(self.path("other.db"), 10)
        digest = file_digest(self.state_file)
        lake = self.path("other-lake")
        done = run_script(["--sqlite", other, "--once"], self.base_env(DELTA_URI=lake))
        self.assert_refused(done, digest, lake)
        self.assertIn(os.path.realpath(self.db), done.stderr)

    def test_state_of_another_table_is_an_error(self):
        db = make_db(self.path("two.db"), """
            CREATE TABLE a (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
            CREATE TABLE b (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
            INSERT INTO a (v) VALUES ('a1'), ('a2');
            INSERT INTO b (v) VALUES ('b1');""")
        done = run_script(["--sqlite", db, "--table", "a", "--once"], self.base_env())
        self.assert_ok(done)
        digest = file_digest(self.state_file)
        lake = self.path("lake-b")
        done = run_script(["--sqlite", db, "--table", "b", "--once"],
                          self.base_env(DELTA_URI=lake))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("--reset-state", self.error_line(done.stderr))
        self.assertEqual(file_digest(self.state_file), digest)
        self.assertFalse(os.path.exists(os.path.join(lake, "b")))


class ResetStateTest(CheckpointTestCase):

    def test_reset_state_uploads_everything_again_and_keeps_a_backup(self):
        self.assert_ok(self.upload())
        with open(self.state_file, "rb") as fh:
            old = fh.read()
        fresh = self.path("fresh-lake")
        self.assert_ok(self.upload("--reset-state", DELTA_URI=fresh))
        self.assert_exactly_once(self.db, lake=fresh)
        backups = glob.glob(self.state_file + ".reset-*")
        self.assertEqual(len(backups), 1, os.listdir(self.state_dir))
        with open(backups[0], "rb") as fh:
            self.assertEqual(fh.read(), old)
        state = read_state(self.state_dir)
        self.assertNotEqual(state["state_id"], json.loads(old)["state_id"])
        self.assertIsNone(destination_of(state, self.path("lake")),
                          "the reset state still carries the old destination")
        # The old lake was not touched.
        self.assertEqual(sorted(target_ids(self.table_uri())), list(range(1, 601)))

    def test_reset_state_replaces_corrupt_or_foreign_state(self):
        os.makedirs(self.state_dir)
        with open(self.state_file, "wb") as fh:
            fh.write(b"{not json")
        self.assertEqual(self.upload().returncode, 2)
        self.assert_ok(self.upload("--reset-state"))
        self.assert_exactly_once(self.db)
        with open(glob.glob(self.state_file + ".reset-*")[0], "rb") as fh:
            self.assertEqual(fh.read(), b"{not json")

    def test_two_resets_in_the_same_second_keep_both_backups(self):
        # The backup is named after the clock's second: a second reset within that
        # second must not overwrite the first backup (the only copy of the old cursor).
        self.assert_ok(self.upload())
        with open(self.state_file, "rb") as fh:
            original = fh.read()
        saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        self.addCleanup(signal.signal, signal.SIGINT, saved[1])
        self.addCleanup(signal.signal, signal.SIGTERM, saved[0])
        argv = ["--sqlite", self.db, "--once", "--reset-state"]
        with mock.patch.object(up.Checkpoint, "clock", staticmethod(lambda: 1_767_225_600.0)):
            for lake in ("reset-1", "reset-2"):
                code, _, err = run_main(argv, self.base_env(DELTA_URI=self.path(lake)))
                self.assertEqual(code, 0, err)
        backups = {}
        for path in glob.glob(self.state_file + ".reset-*"):
            with open(path, "rb") as fh:
                backups[path] = fh.read()
        self.assertTrue(original in backups.values(), "the state before the first "
                        f"reset was lost; backups left: {sorted(backups)}")
        self.assertEqual(len(backups), 2)


class ManySourcesStateTest(TempDirTestCase):
    """The positions of one file among many: moved together, forgotten, and back."""

    def state(self, *files):
        """A state of many sources with a position per (file, table) of `files`, each
        file (path, (device, inode))."""
        checkpoint = up.Checkpoint(self.path())
        checkpoint.load_many()
        for path, found in files:
            for table in ("readings", "events"):
                checkpoint.update(f"delta:/lake/raw_{table}" + up.source_scope(path, table),
                                  source={"path": path, "table": table}, file_id=list(found),
                                  cursor=[3], tag=f"{table[0]}{found[1]}")
        return checkpoint

    def test_a_file_s_positions_move_in_one_save_never_onto_another_s(self):
        a, b, c = (self.path(n) for n in ("a.db", "b.db", "c.db"))
        checkpoint = self.state((a, (1, 10)), (b, (1, 20)))
        with mock.patch.object(checkpoint, "save", wraps=checkpoint.save) as save:
            self.assertEqual(checkpoint.move_file(a, c), 2)
        self.assertEqual(save.call_count, 1)  # a crash leaves both at one name
        on_disk = read_state(self.path())["destinations"]
        self.assertEqual(sorted((p["source"]["path"], p["tag"]) for p in on_disk.values()),
                         [(b, "e20"), (b, "r20"), (c, "e10"), (c, "r10")])
        self.assertTrue(all(c in k for k, p in on_disk.items() if p["source"]["path"] == c))
        with self.assertRaises(up.StateError):  # b's positions are there
            checkpoint.move_file(c, b)
        self.assertEqual(read_state(self.path())["destinations"], on_disk)

    def test_forgotten_positions_are_kept_a_while_and_come_back_with_their_file(self):
        a = self.path("a.db")
        checkpoint = self.state((a, (1, 10)))
        checkpoint.forget(list(checkpoint.data["destinations"]))
        self.assertEqual(read_state(self.path())["destinations"], {})
        self.assertEqual(len(read_state(self.path())["forgotten"]), 2)
        self.assertEqual(checkpoint.move_file(a, self.path("b.db"), (1, 11)), 0)  # not it
        self.assertEqual(checkpoint.move_file(a, self.path("b.db"), (1, 10)), 2)
        state = read_state(self.path())
        self.assertEqual(state["forgotten"], [])
        self.assertEqual(sorted(p["tag"] for p in state["destinations"].values()),
                         ["e10", "r10"])
        for n in range(up.FORGOTTEN_KEPT):
            checkpoint.update(f"k{n}", source={"path": "x", "table": "t"}, tag=str(n))
        checkpoint.forget([f"k{n}" for n in range(up.FORGOTTEN_KEPT)] +
                          list(checkpoint.data["destinations"]))
        kept = read_state(self.path())["forgotten"]
        self.assertEqual(len(kept), up.FORGOTTEN_KEPT)  # the newest
        self.assertEqual(sorted(p["tag"] for p in kept[-2:]), ["e10", "r10"])
        self.assertNotIn("0", [p["tag"] for p in kept])  # the oldest went


class StateDirTest(CheckpointTestCase):

    def test_explicit_state_dir_that_cannot_be_written_is_exit_2(self):
        blocker = self.path("a-regular-file")
        with open(blocker, "w") as fh:
            fh.write("not a directory")
        wanted = os.path.join(blocker, "state")
        for origin, argv, env in (
                ("STATE_DIR", [], {"STATE_DIR": wanted}),
                ("--state-dir", ["--state-dir", wanted], {})):
            with self.subTest(origin):
                done = self.upload(*argv, env={**self.base_env(), **env})
                self.assertEqual(done.returncode, 2, done.stderr)
                line = self.error_line(done.stderr)
                self.assertIn(wanted, line)
                self.assertIn(origin, line)
                self.assertEqual(target_ids(self.table_uri()), [])

    def test_default_state_dir_not_writable_falls_back_to_local_state(self):
        blocker = self.path("a-regular-file")
        with open(blocker, "w") as fh:
            fh.write("not a directory")
        cwd = self.path("cwd")
        os.makedirs(cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        unusable = os.path.join(blocker, "state")
        config = dataclasses.replace(up.Config(), state_dir=unusable, origins={})
        self.assertEqual(config.origin("state_dir"), "default")
        with self.assertLogs("uploader", "INFO") as logs:
            chosen = up.resolve_state_dir(config)
        self.assertEqual(os.path.realpath(chosen), os.path.realpath(cwd + "/state"))
        self.assertTrue(os.path.isdir(chosen))
        self.assertIn(unusable, "\n".join(logs.output), "the fallback is not logged")

    def test_default_state_dir_when_writable_is_used(self):
        os.makedirs(self.path("default-state"))
        config = dataclasses.replace(up.Config(), state_dir=self.path("default-state"),
                                     origins={})
        self.assertEqual(up.resolve_state_dir(config), self.path("default-state"))


if __name__ == "__main__":
    unittest.main()
