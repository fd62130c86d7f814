"""Source (SQLite) and cursor: read-only access, table and timestamp detection, the
cursor of DESIGN section 4, incremental runs, preflight, replaced sources, batches.

Most tests drive the real pipeline (main() with --once into a local Delta table under
the test's temp dir) and assert on the rows that landed.
"""

import collections
import hashlib
import json
import os
import shutil
import sqlite3
import unittest
from unittest import mock

from tests import helpers

up = helpers.up


# === Local helpers ===================================================================

PipelineTestCase = helpers.PipelineTestCase


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def describe(schema, table=None, ts=None):
    """describe_table() of an in-memory database built from `schema`."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(schema)
        return up.describe_table(conn, table, ts, ":memory:")
    finally:
        conn.close()


TS = "2025-01-01T00:00:00"


def stamp(second):
    """ISO text of FIXED_START + second, as a sensor writes it."""
    return (helpers.FIXED_START + up.dt.timedelta(seconds=second)).strftime(
        "%Y-%m-%dT%H:%M:%S")


# === Read-only access ================================================================

class ReadOnlyTest(PipelineTestCase):

    def assert_untouched(self, paths, run):
        before = {p: (helpers.file_digest(p), os.stat(p).st_mtime_ns) for p in paths}
        run()
        after = {p: (helpers.file_digest(p), os.stat(p).st_mtime_ns) for p in paths}
        self.assertEqual(after, before)

    def test_run_leaves_file_bytes_and_mtime_unchanged(self):
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v REAL)",
                       [(stamp(i), i / 2) for i in range(5)], ["timestamp", "v"])
        self.assert_untouched([db], lambda: self.upload(db))
        self.assertEqual(len(self.landed("raw_readings")), 5)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["lake", "source.db", "state"])

    def test_wal_database_with_live_writer_is_read_and_not_changed(self):
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v REAL)",
                       [(stamp(0), 0.0)], ["timestamp", "v"], wal=True)
        writer = sqlite3.connect(db)
        self.addCleanup(writer.close)
        self.assertEqual(writer.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        writer.execute("PRAGMA wal_autocheckpoint=0")  # committed rows stay in the WAL
        with writer:
            helpers.insert_rows(writer, [(stamp(i), float(i)) for i in range(1, 4)],
                                ["timestamp", "v"])
        self.assertGreater(os.path.getsize(db + "-wal"), 0)
        self.assert_untouched([db, db + "-wal"], lambda: self.upload(db))
        self.assert_once(self.landed("raw_readings"), "v", [0.0, 1.0, 2.0, 3.0])

    def test_wal_database_without_writer_is_read_and_not_changed(self):
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, v)",
                       [(1,), (2,)], ["v"], wal=True)
        self.assert_untouched([db], lambda: self.upload(db))
        self.assert_once(self.landed("raw_readings"), "v", [1, 2])

    def test_missing_file_is_exit_2_with_one_error_line_and_not_created(self):
        db = self.path("nowhere.db")
        err = self.upload(db, expect=2)
        lines = error_lines(err)
        self.assertEqual(len(lines), 1, err)
        self.assertIn(db, lines[0])
        self.assertFalse(os.path.exists(db))
        self.assertFalse(os.path.exists(db + "-journal") or os.path.exists(db + "-wal"))

    def test_not_a_sqlite_file_is_exit_2_and_left_alone(self):
        junk = self.path("junk.db")
        with open(junk, "wb") as fh:
            fh.write(b"this is not a database" * 100)
        for path in (junk, self.tmp):
            with self.subTest(path=path):
                before = helpers.file_digest(junk)
                err = self.upload(path, expect=2)
                self.assertEqual(len(error_lines(err)), 1, err)
                self.assertEqual(helpers.file_digest(junk), before)

    def test_path_with_space_hash_question_mark_and_percent(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v)",
                       [(1,), (2,)], ["v"], name="my data #1 ?x=%20.db")
        self.assert_untouched([db], lambda: self.upload(db))
        self.assert_once(self.landed("raw_t"), "v", [1, 2])


# === Table and timestamp detection ===================================================

class TableDetectionTest(PipelineTestCase):

    def test_the_only_user_table_is_chosen(self):
        # sqlite_sequence (from AUTOINCREMENT), an index and a view are not tables to pick
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, v);"
                       "CREATE INDEX idx_v ON readings(v);"
                       "CREATE VIEW big AS SELECT * FROM readings WHERE v > 1;",
                       [(1,), (2,)], ["v"])
        self.upload(db)
        self.assert_once(self.landed("raw_readings"), "v", [1, 2])

    def test_several_tables_is_exit_2_listing_them(self):
        db = self.make("CREATE TABLE alpha (v); CREATE TABLE beta (v); CREATE TABLE gamma (v);")
        err = self.upload(db, expect=2)
        lines = error_lines(err)
        self.assertEqual(len(lines), 1, err)
        for name in ("alpha", "beta", "gamma", "--table"):
            self.assertIn(name, lines[0])
        self.assertFalse(os.path.exists(self.path("lake")))

    def test_table_flag_picks_one(self):
        db = self.make("CREATE TABLE alpha (id INTEGER PRIMARY KEY AUTOINCREMENT, v);"
                       "CREATE TABLE beta (id INTEGER PRIMARY KEY AUTOINCREMENT, v);")
        self.insert(db, [(1,)], ["v"], table="alpha")
        self.insert(db, [(20,), (21,)], ["v"], table="beta")
        self.upload(db, "--table", "beta")
        self.assert_once(self.landed("raw_beta"), "v", [20, 21])
        self.assertFalse(os.path.exists(self.lake("raw_alpha")))

    def test_table_from_env(self):
        db = self.make("CREATE TABLE alpha (v); CREATE TABLE beta (v);")
        self.insert(db, [(7,)], table="alpha")
        self.upload(db, SQLITE_TABLE_NAME="alpha")
        self.assert_once(self.landed("raw_alpha"), "v", [7])

    def test_unknown_table_is_exit_2_listing_the_tables(self):
        db = self.make("CREATE TABLE alpha (v); CREATE TABLE beta (v);")
        err = self.upload(db, "--table", "gamma", expect=2)
        lines = error_lines(err)
        self.assertEqual(len(lines), 1, err)
        for name in ("gamma", "alpha", "beta"):
            self.assertIn(name, lines[0])

    def test_file_without_tables_is_exit_2(self):
        db = self.make("PRAGMA user_version = 1;")
        err = self.upload(db, expect=2)
        self.assertEqual(len(error_lines(err)), 1, err)


class TimestampDetectionTest(PipelineTestCase):

    def test_detected_by_name(self):
        for name in ("timestamp", "created_at", "date", "ts", "time", "Recorded_At"):
            with self.subTest(name=name):
                source = describe(f'CREATE TABLE t (v REAL, "{name}" TEXT, w INTEGER)')
                self.assertEqual(source.timestamp_col, name)

    def test_detected_by_declared_type(self):
        for decl in ("DATETIME", "TIMESTAMP", "DATE", "datetime"):
            with self.subTest(decl=decl):
                source = describe(f"CREATE TABLE t (v REAL, happened {decl}, w TEXT)")
                self.assertEqual(source.timestamp_col, "happened")

    def test_detected_by_declared_type_with_precision_or_zone(self):
        # declared_kind() types these columns TIMESTAMP, but detection only matches the
        # exact words, so the cursor falls back to the rowid
        for decl in ("DATETIME(6)", "TIMESTAMP WITH TIME ZONE"):
            with self.subTest(decl=decl):
                self.assertEqual(up.declared_kind(decl, False), up.TIMESTAMP)
                source = describe(f"CREATE TABLE t (v REAL, happened {decl})")
                self.assertEqual(source.timestamp_col, "happened")

    def test_none_found(self):
        source = describe("CREATE TABLE t (v REAL, label TEXT)")
        self.assertIsNone(source.timestamp_col)
        self.assertEqual(source.cursor.kind, "rowid")

    def test_given_explicitly_overrides_detection(self):
        source = describe("CREATE TABLE t (timestamp TEXT, seen_at TEXT)", ts="SEEN_AT")
        self.assertEqual(source.timestamp_col, "seen_at")
        self.assertEqual(source.cursor.columns, ("seen_at", "rowid"))

    def test_given_explicitly_end_to_end(self):
        db = self.make("CREATE TABLE t (timestamp TEXT, seen_at TEXT, v INTEGER)",
                       [("garbage", stamp(1), 1), ("junk", stamp(2), 2)])
        self.upload(db, "--timestamp-col", "seen_at")
        self.assertEqual(self.state()["source"]["cursor"]["columns"], ["seen_at", "rowid"])
        self.assertEqual(self.position()["cursor"], [stamp(2), 2])
        schema = helpers.delta_schema(self.lake("raw_t"))
        self.assertEqual((schema["seen_at"], schema["timestamp"]), ("timestamp", "string"))
        self.assert_once(self.landed("raw_t"), "v", [1, 2])

    def test_unknown_timestamp_column_is_exit_2_listing_columns(self):
        db = self.make("CREATE TABLE t (timestamp TEXT, v INTEGER, label TEXT)", [(TS, 1, "a")])
        err = self.upload(db, "--timestamp-col", "when", expect=2)
        lines = error_lines(err)
        self.assertEqual(len(lines), 1, err)
        for name in ("when", "timestamp", "v", "label"):
            self.assertIn(name, lines[0])
        self.assertFalse(os.path.exists(self.lake("raw_t")))


# === Cursor choice (DESIGN 4) ========================================================

class CursorChoiceTest(unittest.TestCase):

    CASES = [
        # (schema, kind, columns, hidden)
        ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT, v)",
         "rowid", ("id",), False),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v)", "rowid", ("id",), False),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY, timestamp TEXT, v)",
         "pair", ("timestamp", "id"), False),
        ("CREATE TABLE t (timestamp TEXT, v)", "pair", ("timestamp", "rowid"), True),
        ("CREATE TABLE t (k TEXT PRIMARY KEY, created_at TEXT)",
         "pair", ("created_at", "rowid"), True),
        ("CREATE TABLE t (rowid TEXT, timestamp TEXT)",
         "pair", ("timestamp", "_rowid_"), True),
        ("CREATE TABLE t (v REAL)", "rowid", ("rowid",), True),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY, v)", "rowid", ("id",), False),
        ("CREATE TABLE t (k TEXT PRIMARY KEY, timestamp TEXT, v) WITHOUT ROWID",
         "pair", ("timestamp", "k"), False),
        ("CREATE TABLE t (a TEXT, b INTEGER, timestamp TEXT, PRIMARY KEY (a, b)) "
         "WITHOUT ROWID", "pair", ("timestamp", "a", "b"), False),
        ("CREATE TABLE t (a TEXT, b INTEGER, v REAL, PRIMARY KEY (b, a)) WITHOUT ROWID",
         "key", ("b", "a"), False),
        ("CREATE TABLE t (timestamp TEXT PRIMARY KEY, v REAL) WITHOUT ROWID",
         "key", ("timestamp",), False),
    ]

    def test_cursor_by_table_shape(self):
        for schema, kind, columns, hidden in self.CASES:
            with self.subTest(schema=schema):
                cursor = describe(schema).cursor
                self.assertEqual((cursor.kind, cursor.columns, cursor.hidden),
                                 (kind, columns, hidden))

    def test_without_rowid_timestamp_inside_the_key_leads_the_cursor(self):
        # BUG: with PRIMARY KEY (sensor_id, timestamp) the cursor is the key in key order,
        # (sensor_id, timestamp), so a new reading of an earlier sensor sorts before the
        # cursor. The timestamp must come first: (timestamp, sensor_id).
        source = describe("CREATE TABLE t (sensor_id TEXT, timestamp TEXT, v REAL, "
                          "PRIMARY KEY (sensor_id, timestamp)) WITHOUT ROWID")
        self.assertEqual(source.cursor.columns[0], "timestamp")
        self.assertEqual(set(source.cursor.columns), {"timestamp", "sensor_id"})

    SAMPLED = [
        # (schema, rows inserted, mode, kind, columns, timestamp column)
        ("CREATE TABLE t (id INTEGER PRIMARY KEY, response_time REAL, v)",
         "(NULL, 0.25, 1), (NULL, 3.5, 2)", "auto", "rowid", ("id",), None),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY, created_ts REAL, v)",
         "(NULL, 1700000000.5, 1)", "auto", "pair", ("created_ts", "id"), "created_ts"),
        ("CREATE TABLE t (a DATETIME, b_time INTEGER, v)",
         "(NULL, 1700000000, 1)", "auto", "pair", ("b_time", "rowid"), "b_time"),
        ("CREATE TABLE t (day TEXT, date TEXT, v)",
         "('x', 'Jan 1 2000', 1), ('y', 'Feb 1 2000', 2)", "auto", "rowid", ("rowid",),
         "date"),
        ("CREATE TABLE t (timestamp TEXT, v)", "('2025-01-01T00:00:00', 1)", "rowid",
         "rowid", ("rowid",), "timestamp"),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT, v)",
         "(NULL, '2025-01-01T00:00:00', 1)", "timestamp", "pair", ("timestamp", "id"),
         "timestamp"),
        ("CREATE TABLE t (k TEXT PRIMARY KEY, timestamp TEXT, v) WITHOUT ROWID",
         "('a', '01/02/2020 13:00', 1)", "auto", "key", ("k",), "timestamp"),
    ]

    def test_cursor_from_sampled_rows_and_the_cursor_setting(self):
        for schema, rows, mode, kind, columns, ts in self.SAMPLED:
            with self.subTest(schema=schema, mode=mode):
                conn = sqlite3.connect(":memory:")
                conn.executescript(f"{schema}; INSERT INTO t VALUES {rows};")
                source = up.describe_table(conn, None, None, ":memory:", mode)
                self.assertEqual((source.cursor.kind, source.cursor.columns,
                                  source.timestamp_col), (kind, columns, ts), source.reason)
                self.assertTrue(source.reason)

    def test_an_empty_table_says_its_timestamp_is_unchecked(self):
        source = describe("CREATE TABLE t (timestamp TEXT, v)")
        self.assertEqual(source.cursor.kind, "pair")
        self.assertIn("no rows yet", source.reason)

    def test_forcing_the_timestamp_cursor_without_a_timestamp_is_a_config_error(self):
        conn = sqlite3.connect(":memory:")
        conn.executescript("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
        with self.assertRaisesRegex(up.ConfigError, "table 't' has no timestamp column"):
            up.describe_table(conn, None, None, ":memory:", "timestamp")

    def test_autoincrement_and_without_rowid_are_detected(self):
        source = describe("CREATE TABLE t (id integer primary key autoincrement, v)")
        self.assertTrue(source.autoincrement)
        self.assertFalse(source.without_rowid)
        source = describe("CREATE TABLE t (k TEXT PRIMARY KEY, v) without rowid")
        self.assertTrue(source.without_rowid)


# === Incremental runs ================================================================

class IncrementalTest(PipelineTestCase):

    def test_second_run_uploads_only_new_rows(self):
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v INTEGER)",
                       [(stamp(i), i) for i in range(5)], ["timestamp", "v"])
        self.upload(db)
        first = {r["_batch_id"] for r in self.landed("raw_readings")}
        self.insert(db, [(stamp(i), i) for i in range(5, 8)], ["timestamp", "v"])
        self.upload(db)
        rows = self.landed("raw_readings")
        self.assert_once(rows, "v", range(8))
        self.assertEqual(sorted(r["v"] for r in rows if r["_batch_id"] not in first),
                         [5, 6, 7])
        self.upload(db)  # nothing new: nothing more lands
        self.assertEqual(len(self.landed("raw_readings")), 8)
        self.assertEqual(self.position()["rows"], 8)

    def test_ties_split_across_batches_land_once_in_pair_mode(self):
        shapes = {
            "rowid": "CREATE TABLE t (timestamp TEXT NOT NULL, v INTEGER)",
            "integer_key": "CREATE TABLE t (id INTEGER PRIMARY KEY, timestamp TEXT, v INTEGER)",
            "without_rowid": "CREATE TABLE t (k TEXT PRIMARY KEY, timestamp TEXT, v INTEGER) "
                             "WITHOUT ROWID",
        }
        for where, schema in shapes.items():
            with self.subTest(shape=where):
                cols = ["k", "timestamp", "v"] if "k TEXT" in schema else ["timestamp", "v"]
                rows = [(TS, i) for i in range(10)] + [(stamp(5), 10), (stamp(5), 11)]
                if cols[0] == "k":
                    rows = [(f"k{i:02d}", ts, v) for i, (ts, v) in enumerate(rows)]
                db = self.make(schema, rows, cols, where=where)
                err = self.upload(db, "--batch-size", "3", where=where)
                self.assertEqual(self.state(where)["source"]["cursor"]["kind"], "pair")
                self.assertEqual(err.count(" rows -> raw_t"), 4, err)
                self.assert_once(self.landed("raw_t", where), "v", range(12))

    def test_rows_with_the_same_timestamp_as_the_last_uploaded_one_are_picked_up(self):
        # the seed's cursor, `timestamp > last_upload`, lost exactly these rows
        shapes = {
            "rowid": ("CREATE TABLE t (timestamp TEXT, v INTEGER)", None),
            "integer_key": ("CREATE TABLE t (id INTEGER PRIMARY KEY, timestamp TEXT, "
                            "v INTEGER)", None),
            "without_rowid": ("CREATE TABLE t (k TEXT PRIMARY KEY, timestamp TEXT, "
                              "v INTEGER) WITHOUT ROWID", "k"),
        }
        for where, (schema, key) in shapes.items():
            with self.subTest(shape=where):
                cols = ([key] if key else []) + ["timestamp", "v"]

                def rows(values, ts):
                    return [((f"k{v:02d}",) if key else ()) + (ts, v) for v in values]

                db = self.make(schema, rows([0], stamp(0)) + rows([1, 2], stamp(1)), cols,
                               where=where)
                self.upload(db, where=where)
                self.insert(db, rows([3, 4], stamp(1)), cols)  # same as the cursor's
                self.upload(db, where=where)
                self.assert_once(self.landed("raw_t", where), "v", range(5))

    def test_without_rowid_timestamp_in_key_uploads_new_rows_of_every_key(self):
        # BUG: cursor (sensor_id, timestamp) in key order; the new reading of S1 sorts
        # before the cursor ('S2', t0) and is never uploaded, in silence.
        db = self.make("CREATE TABLE readings (sensor_id TEXT, timestamp TEXT, v INTEGER, "
                       "PRIMARY KEY (sensor_id, timestamp)) WITHOUT ROWID",
                       [("S1", stamp(0), 0), ("S2", stamp(0), 1)])
        self.upload(db)
        self.insert(db, [("S1", stamp(1), 2), ("S2", stamp(1), 3)])
        self.upload(db)
        self.assert_once(self.landed("raw_readings"), "v", range(4))

    def test_column_named_rowid_does_not_hide_the_rowid(self):
        db = self.make('CREATE TABLE t ("rowid" TEXT, timestamp TEXT NOT NULL, v INTEGER)',
                       [("z", TS, 0), ("a", TS, 1), ("m", TS, 2)])
        self.upload(db, "--batch-size", "2")
        self.insert(db, [("b", TS, 3)])
        self.upload(db, "--batch-size", "2")
        rows = self.landed("raw_t")
        self.assert_once(rows, "v", range(4))
        self.assertEqual(sorted(r["rowid"] for r in rows), ["a", "b", "m", "z"])
        self.assertEqual(self.position()["cursor"], [TS, 4])

    def test_late_rows_with_an_older_timestamp_land_in_autoincrement_mode(self):
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT NOT NULL, v INTEGER)",
                       [(stamp(10), 0), (stamp(11), 1)], ["timestamp", "v"])
        self.upload(db)
        self.insert(db, [(stamp(1), 2), (stamp(10), 3), (stamp(12), 4)], ["timestamp", "v"])
        self.upload(db)
        self.assert_once(self.landed("raw_readings"), "v", range(5))
        self.assertEqual(self.position()["cursor"], [5])

    def test_text_and_epoch_timestamps_land_as_the_right_utc_time(self):
        when = up.dt.datetime(2025, 3, 1, 12, 0, tzinfo=up.dt.timezone.utc)
        epoch = int(when.timestamp())
        values = ["2025-03-01T12:00:00", "2025-03-01 12:00:00", "2025-03-01T12:00:00Z",
                  "2025-03-01 12:00:00Z", "2025-03-01T14:00:00+02:00",
                  "2025-03-01 07:00:00-05:00", epoch, epoch * 1000, float(epoch),
                  str(epoch)]
        # an untyped column keeps numbers as numbers; batch 1 is all text (Arrow's fast
        # path), batch 2 mixes text and numbers (the per-value path)
        db = self.make("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp, v INTEGER)",
                       [(ts, i) for i, ts in enumerate(values)], ["timestamp", "v"])
        self.upload(db, "--batch-size", "6")
        rows = sorted(self.landed("raw_readings"), key=lambda r: r["v"])
        self.assertEqual(helpers.delta_schema(self.lake("raw_readings"))["timestamp"],
                         "timestamp")
        self.assertEqual([r["timestamp"] for r in rows], [when] * len(values))
        self.assertEqual([r["_rescued_data"] for r in rows], [None] * len(values))

    def test_epoch_timestamps_in_pair_mode_across_runs(self):
        base = 1_735_689_600  # 2025-01-01T00:00:00Z
        db = self.make("CREATE TABLE t (ts INTEGER NOT NULL, v INTEGER)",
                       [(base + i // 2, i) for i in range(4)])
        self.upload(db)
        self.insert(db, [(base + 1, 4), (base + 2, 5)])
        self.upload(db)
        rows = sorted(self.landed("raw_t"), key=lambda r: r["v"])
        self.assert_once(rows, "v", range(6))
        self.assertEqual(rows[5]["ts"], helpers.FIXED_START + up.dt.timedelta(seconds=2))


# === cursor_lag (DESIGN 4) ===========================================================

class CursorLagTest(PipelineTestCase):
    """A pair cursor passes a row committed late with an older timestamp; cursor_lag
    leaves the newest rows for a later cycle so such a row still lands."""

    SCHEMA = "CREATE TABLE t (timestamp TEXT NOT NULL, v INTEGER)"  # pair cursor

    def ago(self, seconds):
        """ISO text of now minus `seconds`, as a sensor writes it (UTC, no zone)."""
        moment = up.dt.datetime.now(up.dt.timezone.utc) - up.dt.timedelta(seconds=seconds)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")

    def test_a_row_committed_late_within_the_lag_still_lands(self):
        for lag in ("0", "600"):
            with self.subTest(cursor_lag=lag):
                old = [(self.ago(7200 - i), i) for i in range(10)]
                recent = [(self.ago(20), 10), (self.ago(10), 11)]
                db = self.make(self.SCHEMA, old + recent, where=lag)
                log = self.upload(db, "--cursor-lag", lag, where=lag)
                landed = [r["v"] for r in self.landed("raw_t", where=lag)]
                if lag == "0":
                    self.assertEqual(sorted(landed), list(range(12)))
                else:  # the two recent rows wait
                    self.assertEqual(sorted(landed), list(range(10)))
                    self.assertIn("2 rows held back by cursor lag", log)
                # committed now, stamped 5 minutes ago: older than the recent rows
                self.insert(db, [(self.ago(300), 12)])
                log = self.upload(db, where=lag)  # the next cycle, without a lag
                rows = self.landed("raw_t", where=lag)
                if lag == "0":  # passed by the cursor: reported, not uploaded
                    self.assert_once(rows, "v", range(12))
                    self.assertIn("1 rows are behind the cursor", log)
                else:
                    self.assert_once(rows, "v", range(13))

    def test_the_cut_falls_inside_chunks_and_on_their_edges(self):
        # 4-row chunks, 8-row batches: the first recent row is inside a chunk, first
        # in a chunk (found by the one-row peek), first in a batch, or the very first.
        for old_count in (23, 24, 20, 16, 8, 4, 1, 0):
            with self.subTest(old=old_count):
                where = f"old{old_count}"
                old = [(self.ago(7200 - i), i) for i in range(old_count)]
                recent = [(self.ago(30 - i), 100 + i) for i in range(5)]
                db = self.make(self.SCHEMA, old + recent, where=where)
                with mock.patch.object(up.read_batches, "__defaults__", (4,)):
                    self.upload(db, "--cursor-lag", "600", "--batch-size", "8", where=where)
                self.assert_once(self.landed("raw_t", where=where), "v", range(old_count))
                if old_count:
                    self.assertEqual(self.position(where)["cursor"],
                                     [old[-1][0], old_count])
                self.upload(db, where=where)  # no lag: the rest follows, once
                self.assert_once(self.landed("raw_t", where=where), "v",
                                 [*range(old_count), *range(100, 105)])

    def test_epoch_timestamps(self):
        now = int(up.time.time())
        db = self.make("CREATE TABLE t (timestamp INTEGER NOT NULL, v INTEGER)",
                       [(now - 3600, 1), (now - 3000, 2), (now - 5, 3)])
        self.upload(db, "--cursor-lag", "60")
        self.assert_once(self.landed("raw_t"), "v", [1, 2])

    def test_no_effect_with_the_rowid_cursor_and_it_says_so(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v INTEGER)",
                       [(self.ago(3600), 1), (self.ago(1), 2)], ["timestamp", "v"])
        log = self.upload(db, "--cursor-lag", "600")
        self.assert_once(self.landed("raw_t"), "v", [1, 2])
        self.assertIn("cursor_lag has no effect", log)


# === The cursor in the state file ====================================================

class StateCursorTest(PipelineTestCase):

    def test_text_timestamp_stays_text(self):
        last = "2025-01-01 10:00:00.500+02:00"
        db = self.make("CREATE TABLE t (timestamp TEXT, v)",
                       [("2025-01-01 09:00:00+02:00", 1), (last, 2)])
        self.upload(db)
        pos = self.position()
        self.assertEqual(pos["cursor"], [last, 2])
        self.assertIsInstance(pos["cursor"][0], str)
        self.assertEqual(pos["last_upload"], last)

    def test_numbers_stay_numbers(self):
        cases = {"integer_ms": ("INTEGER", 1_735_689_600_123),
                 "real_seconds": ("REAL", 1_735_689_600.25)}
        for where, (decl, last) in cases.items():
            with self.subTest(decl=decl):
                db = self.make(f"CREATE TABLE t (ts {decl}, v)", [(last - 1, 1), (last, 2)],
                               where=where)
                self.upload(db, where=where)
                cursor = self.position(where)["cursor"]
                self.assertEqual(cursor, [last, 2])
                self.assertIs(type(cursor[0]), type(last))
                self.assertIs(type(cursor[1]), int)

    def test_rowid_cursor_is_the_integer_key(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v)", [(TS, 1), (TS, 2), (TS, 3)],
                       ["timestamp", "v"])
        self.upload(db)
        self.assertEqual(self.position()["cursor"], [3])
        self.assertEqual(self.state()["source"]["cursor"],
                         {"kind": "rowid", "columns": ["id"]})


# === Preflight =======================================================================

class PreflightTest(PipelineTestCase):

    def preflight_log(self, schema, rows=((TS, 1),), where=""):
        db = self.make(schema, rows, where=where)
        return self.upload(db, where=where)

    def test_pair_cursor_without_index_prints_the_create_index_fix(self):
        err = self.preflight_log("CREATE TABLE readings (timestamp TEXT NOT NULL, v)")
        self.assertIn('CREATE INDEX "idx_readings_timestamp" ON "readings"("timestamp")', err)

    def test_pair_cursor_with_index_has_no_create_index_line(self):
        err = self.preflight_log("CREATE TABLE readings (timestamp TEXT NOT NULL, v);"
                                 "CREATE INDEX by_ts ON readings(timestamp);")
        self.assertNotIn("CREATE INDEX", err)

    def test_nullable_timestamp_is_mentioned(self):
        err = self.preflight_log("CREATE TABLE readings (timestamp TEXT, v)", where="a")
        self.assertRegex(err, r"'timestamp' is nullable.*NOT NULL")
        err = self.preflight_log("CREATE TABLE readings (timestamp TEXT NOT NULL, v)",
                                 where="b")
        self.assertNotIn("nullable", err)

    def test_rowid_cursor_without_autoincrement_warns_about_reuse(self):
        err = self.preflight_log("CREATE TABLE t (id INTEGER PRIMARY KEY, v)", rows=[(1, 1)],
                                 where="a")
        self.assertRegex(err, r"rowids can be reused.*AUTOINCREMENT")
        err = self.preflight_log("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v)",
                                 rows=[(1, 1)], where="b")
        self.assertNotIn("can be reused", err)


# === NULL timestamps =================================================================

class NullTimestampTest(PipelineTestCase):

    def test_pair_mode_reports_null_timestamps_every_cycle(self):
        db = self.make("CREATE TABLE t (timestamp TEXT, v INTEGER)",
                       [(stamp(0), 0), (None, 1), (stamp(1), 2), (None, 3)])
        for _cycle in range(2):
            err = self.upload(db, "--cursor", "timestamp")
            self.assertRegex(err, r"WARNING .*\b2 rows have a NULL 'timestamp' "
                                  r"\(rowid 2\.\.4\)")
        self.assert_once(self.landed("raw_t"), "v", [0, 2])

    def test_rowid_mode_uploads_null_timestamps_like_any_row(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v INTEGER)",
                       [(stamp(0), 0), (None, 1), (stamp(1), 2)], ["timestamp", "v"])
        err = self.upload(db)
        self.assertNotIn("NULL", err)
        rows = sorted(self.landed("raw_t"), key=lambda r: r["v"])
        self.assertEqual([r["v"] for r in rows], [0, 1, 2])
        self.assertIsNone(rows[1]["timestamp"])
        self.assertIsNone(rows[1]["_rescued_data"])


# === Source replaced by an older copy ================================================

class ReplacedSourceTest(PipelineTestCase):

    SHAPES = {
        "autoincrement": "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "timestamp TEXT, v INTEGER)",
        "pair": "CREATE TABLE t (timestamp TEXT, v INTEGER)",
        "rowid": "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)",
        "without rowid": "CREATE TABLE t (timestamp TEXT, v INTEGER, PRIMARY KEY "
                         "(timestamp, v)) WITHOUT ROWID",
    }

    def test_older_copy_fails_until_reset_state(self):
        for where, schema in self.SHAPES.items():
            with self.subTest(shape=where):
                cols = ["timestamp", "v"] if "timestamp" in schema else ["v"]
                rows = [(stamp(i), i) if len(cols) == 2 else (i,) for i in range(6)]
                old = self.make(schema, rows[:3], cols, where=where, name="old.db")
                db = self.make(schema, rows, cols, where=where)
                self.upload(db, where=where)
                saved = self.position(where)
                shutil.copyfile(old, db)
                err = self.upload(db, where=where, expect=1)
                lines = error_lines(err)
                self.assertEqual(len(lines), 1, err)
                self.assertIn("--reset-state", lines[0])
                kept = self.position(where)  # nothing skipped; the error is kept
                self.assertEqual(kept.pop("last_error"), lines[0][len("error: "):])
                kept.pop("last_error_at")
                self.assertEqual(kept, saved)
                self.assertEqual(len(self.landed("raw_t", where)), 6)

                # Its rows are in the target already: a reset from the beginning would
                # send them twice, so it is refused; --start-at now goes on from its end.
                err = self.upload(db, "--reset-state", where=where, expect=2)
                self.assertIn("already holds 6 rows", error_lines(err)[0])
                self.upload(db, "--reset-state", "--start-at", "now", where=where)
                self.insert(db, [(stamp(i), i) if len(cols) == 2 else (i,)
                                 for i in range(10, 12)], cols)
                self.upload(db, where=where)
                rows = self.landed("raw_t", where)
                self.assertEqual(sorted(r["v"] for r in rows), [0, 1, 2, 3, 4, 5, 10, 11])
                backups = [n for n in os.listdir(self.env(where)["STATE_DIR"])
                           if ".reset-" in n]
                self.assertEqual(len(backups), 1)

    def shaped(self, schema, first, count, base=0):
        """Columns and rows of a SHAPES table: v = base + i, timestamps from `first`."""
        cols = ["timestamp", "v"] if "timestamp" in schema else ["v"]
        return cols, [(stamp(i), base + i) if len(cols) == 2 else (base + i,)
                      for i in range(first, first + count)]

    def edit_position(self, change, where=""):
        """Change the only position of the state file in place (as another version
        wrote it)."""
        state = self.state(where)
        change(next(iter(state["destinations"].values())))
        with open(os.path.join(self.env(where)["STATE_DIR"], up.STATE_FILE), "w",
                  encoding="utf-8") as fh:
            json.dump(state, fh)

    def test_another_file_with_more_rows_is_refused_not_skipped(self):
        # A new database under the old name (a producer that recreates its file, the
        # backup of another sensor) with more rows than the cursor: its rows before the
        # cursor are not the rows uploaded. Going on from the cursor skipped them.
        for where, schema in self.SHAPES.items():
            with self.subTest(shape=where):
                cols, rows = self.shaped(schema, 0, 6)
                db = self.make(schema, rows, cols, where=where)
                self.upload(db, where=where)
                saved = self.position(where)
                cols, rows = self.shaped(schema, 0, 10, base=100)
                os.replace(self.make(schema, rows, cols, where=where, name="new.db"), db)
                for _ in range(2):  # the refusal does not wear off
                    err = self.upload(db, where=where, expect=1)
                    lines = error_lines(err)
                    self.assertEqual(len(lines), 1, err)
                    self.assertIn(os.path.realpath(db), lines[0])
                    self.assertIn("replaced", lines[0])
                    self.assertIn("--reset-state", lines[0])
                    self.assertIn("--start-at now", lines[0])
                kept = self.position(where)
                kept.pop("last_error"), kept.pop("last_error_at")
                self.assertEqual(kept, saved)
                self.assertEqual(sorted(r["v"] for r in self.landed("raw_t", where)),
                                 list(range(6)))
                # accepted as a new file: it goes on from its current end
                self.upload(db, "--reset-state", "--start-at", "now", where=where)
                cols, rows = self.shaped(schema, 10, 2, base=100)
                self.insert(db, rows, cols)
                self.upload(db, where=where)
                self.assertEqual(sorted(r["v"] for r in self.landed("raw_t", where)),
                                 list(range(6)) + [110, 111])

    def test_another_file_whose_rows_all_follow_the_cursor_goes_on(self):
        # pair cursor: a new file whose rows are all later than the cursor skips nothing
        schema = self.SHAPES["pair"]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        self.upload(db)
        cols, rows = self.shaped(schema, 6, 4, base=0)
        os.replace(self.make(schema, rows, cols, name="new.db"), db)
        err = self.upload(db)
        self.assertIn("replaced", err)
        self.assert_once(self.landed("raw_t"), "v", range(10))

    def test_a_copy_put_in_place_goes_on_exactly_once(self):
        # cp db db.new && mv db.new db, or VACUUM INTO and a rename: the same rows
        def copy(db, new):
            shutil.copyfile(db, new)

        def vacuum_into(db, new):
            conn = sqlite3.connect(db)
            try:
                conn.execute("VACUUM INTO ?", (new,))
            finally:
                conn.close()

        for where, schema in self.SHAPES.items():
            for how in (copy, vacuum_into):
                with self.subTest(shape=where, how=how.__name__):
                    where_how = f"{where}-{how.__name__}"
                    cols, rows = self.shaped(schema, 0, 6)
                    db = self.make(schema, rows, cols, where=where_how)
                    self.upload(db, where=where_how)
                    cols, rows = self.shaped(schema, 6, 2)
                    self.insert(db, rows, cols)
                    how(db, db + ".new")
                    os.replace(db + ".new", db)
                    err = self.upload(db, where=where_how)
                    said = [line for line in err.splitlines() if "replaced" in line]
                    self.assertEqual(len(said), 1, err)
                    self.assertIn("holds the rows uploaded", said[0])
                    cols, rows = self.shaped(schema, 8, 2)
                    self.insert(db, rows, cols)
                    err = self.upload(db, where=where_how)
                    self.assertNotIn("replaced", err)
                    self.assert_once(self.landed("raw_t", where_how), "v", range(10))

    def test_a_state_written_before_row_marks_gains_them_and_guards_from_then_on(self):
        # positions of an older version have no file identity and no mark of the row at
        # the cursor: they go on as before, and the file read then is the one they mark
        schema = self.SHAPES["autoincrement"]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        self.upload(db)
        self.edit_position(lambda pos: (pos.pop("file_id"), pos.pop("cursor_row")))
        cols, rows = self.shaped(schema, 6, 2)
        self.insert(db, rows, cols)
        self.upload(db)
        self.assertIn("cursor_row", self.position())
        cols, rows = self.shaped(schema, 0, 12, base=100)
        os.replace(self.make(schema, rows, cols, name="new.db"), db)
        self.upload(db, expect=1)
        self.assert_once(self.landed("raw_t"), "v", range(8))

    def open_job(self, db):
        config = up.check_target(up.load_config(
            up.build_parser().parse_args(["--sqlite", db]), self.env()))
        job = up.open_job(config, False, up.StopFlag(), self.env())
        self.addCleanup(up.close_job, job)
        return job

    def running(self, shape):
        """A SHAPES table of 6 rows (v = 0..5) and an open job that uploaded them:
        (schema, columns, database, job)."""
        schema = self.SHAPES[shape]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        job = self.open_job(db)
        self.assertEqual(up.run_cycle(job), 6)
        return schema, cols, db, job

    def test_file_replaced_while_the_uploader_runs_is_read_and_checked(self):
        # one source in a loop: the file under the name is read again, not the old one
        # held open forever; a copy goes on, another database is refused
        schema, cols, db, job = self.running("autoincrement")
        cols, rows = self.shaped(schema, 6, 2)
        self.insert(db, rows, cols)
        shutil.copyfile(db, db + ".new")
        os.replace(db + ".new", db)
        self.insert(db, *self.shaped(schema, 8, 2)[::-1])
        with self.assertLogs("uploader", "INFO") as logs:
            self.assertEqual(up.run_cycle(job), 4)
        self.assertEqual(len([x for x in logs.output if "replaced" in x]), 2, logs.output)
        cols, rows = self.shaped(schema, 0, 12, base=100)
        os.replace(self.make(schema, rows, cols, name="other.db"), db)
        with self.assertRaisesRegex(up.SourceReplacedError, "not the row uploaded"):
            up.run_cycle(job)
        self.assert_once(self.landed("raw_t"), "v", range(10))

    def test_another_file_where_no_row_was_recorded_goes_on_with_a_warning(self):
        # the row at the cursor was not there when the file was recorded (deleted before
        # an upgrade): a file that replaces it cannot be told apart, and the log says so
        schema = self.SHAPES["rowid"]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        self.upload(db)
        self.edit_position(lambda pos: pos.update(cursor_row=None))
        cols, rows = self.shaped(schema, 0, 8, base=100)
        os.replace(self.make(schema, rows, cols, name="new.db"), db)
        err = self.upload(db)
        said = [line for line in err.splitlines() if "cannot be told" in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("WARNING", said[0])
        self.assert_once(self.landed("raw_t"), "v", [0, 1, 2, 3, 4, 5, 106, 107])

    def uploaded(self, shape):
        """A SHAPES table of 6 rows (v = 0..5), uploaded: (schema, columns, database)."""
        schema = self.SHAPES[shape]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        self.upload(db)
        return schema, cols, db

    @staticmethod
    def copy_over(db, source=None):
        """Put a copy of `source` (default: the file itself) in place of `db`, as rsync
        or a restore does: another inode under the name."""
        shutil.copyfile(source or db, db + ".tmp")
        os.replace(db + ".tmp", db)

    LOGGER = ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT, "
              "v INTEGER, last_seen TEXT)")

    def logger(self, where=""):
        """A logger that updates the 'last seen' column of its newest row in place, once
        six rows are uploaded; return the database."""
        cols = ["timestamp", "v", "last_seen"]
        db = self.make(self.LOGGER, [(stamp(i), i, stamp(i)) for i in range(6)], cols,
                       where=where)
        self.upload(db, where=where)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE t SET last_seen = ? WHERE id = 6", (stamp(40),))
        conn.close()
        return db

    def test_the_file_uploaded_whose_row_at_the_cursor_changed_in_place_goes_on(self):
        # a producer updates its newest row in place (Home Assistant's last_reported_ts,
        # a logger's last seen); then the file is the same file on another device (NFS
        # or volume remounted, an overlay) or a copy (rsync, a restore): before, every
        # cycle refused it, and the way out offered lost rows
        def other_device(db, where):
            self.edit_position(lambda pos: pos.update(
                file_id=[pos["file_id"][0] + 1, pos["file_id"][1]]), where)

        def copy(db, where):
            self.copy_over(db)

        for how, said in ((other_device, "another device"), (copy, "another inode")):
            with self.subTest(how=how.__name__):
                db = self.logger(how.__name__)
                how(db, how.__name__)
                self.insert(db, [(stamp(i), i, stamp(i)) for i in range(6, 8)],
                            ["timestamp", "v", "last_seen"])
                err = self.upload(db, where=how.__name__)
                lines = [line for line in err.splitlines() if "replaced" in line]
                self.assertEqual(len(lines), 1, err)
                self.assertIn("WARNING", lines[0])
                self.assertIn(f"({said}: replaced in place)", lines[0])
                self.assertIn("updated in place", lines[0])
                self.assertEqual(self.position(how.__name__)["file_id"][1],
                                 os.stat(db).st_ino)
                self.assert_once(self.landed("raw_t", how.__name__), "v", range(8))

    def test_a_copy_after_a_purge_and_an_update_in_place_goes_on(self):
        # the producer deleted its oldest rows (Home Assistant's nightly purge) and
        # updated its newest one in place, then the file was copied: its first row is
        # another, but the rows up to the one marked are gone and none took their place
        db = self.logger()
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM t WHERE id <= 2")
        conn.close()
        self.copy_over(db)
        self.insert(db, [(stamp(i), i, stamp(i)) for i in range(6, 8)],
                    ["timestamp", "v", "last_seen"])
        err = self.upload(db)
        said = [line for line in err.splitlines() if "replaced" in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("were deleted since", said[0])
        self.assert_once(self.landed("raw_t"), "v", range(8))

    def test_another_database_whose_row_at_the_cursor_has_another_timestamp_is_refused(
            self):
        # its first rows are those uploaded and its row at the cursor has the same key:
        # the timestamp there tells it apart (a file that went on elsewhere)
        db = self.logger()
        cols = ["timestamp", "v", "last_seen"]
        rows = [(stamp(i), i, stamp(i)) for i in range(5)] + [(stamp(30), 5, stamp(30))]
        os.replace(self.make(self.LOGGER, rows + [(stamp(31), 6, stamp(31))], cols,
                             name="new.db"), db)
        lines = error_lines(self.upload(db, expect=1))
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("(another timestamp)", lines[0])
        self.assert_once(self.landed("raw_t"), "v", range(6))

    def test_a_new_empty_database_is_not_taken_for_the_file_uploaded(self):
        # the producer recreates its database (a new empty file) and a cycle runs before
        # its first insert: before, the empty file was recorded as the file uploaded
        # from, and the rows it got then up to the cursor were skipped, unsaid
        for where, schema in (("rowid", self.SHAPES["rowid"]),
                              ("pair", self.SHAPES["pair"])):
            with self.subTest(shape=where):
                cols, rows = self.shaped(schema, 0, 6)
                db = self.make(schema, rows, cols, where=where)
                self.upload(db, where=where)
                saved = self.position(where)
                os.replace(self.make(schema, [], cols, where=where, name="new.db"), db)
                for _ in range(2):
                    err = self.upload(db, where=where)
                    said = [line for line in err.splitlines() if "replaced" in line]
                    self.assertEqual(len(said), 1, err)
                    self.assertIn("WARNING", said[0])
                    self.assertIn("is empty", said[0])
                    self.assertIn("checked again", said[0])
                    self.assertEqual(self.position(where)["file_id"], saved["file_id"])
                first = 6 if where == "pair" else 0  # (timestamps after the cursor)
                self.insert(db, self.shaped(schema, first, 10, base=100 - first)[1], cols)
                if where == "pair":  # its rows all follow the cursor: none is skipped
                    self.upload(db, where=where)
                    self.assert_once(self.landed("raw_t", where), "v",
                                     list(range(6)) + list(range(100, 110)))
                    continue
                lines = error_lines(self.upload(db, where=where, expect=1))
                self.assertEqual(len(lines), 1, lines)
                self.assertIn("not the row uploaded", lines[0])
                self.assertIn("its rows so far are not uploaded", lines[0])
                self.assertEqual(self.position(where)["cursor"], saved["cursor"])
                self.assert_once(self.landed("raw_t", where), "v", range(6))

    def test_rows_written_to_an_empty_new_file_during_its_check_are_not_read(self):
        # the producer's first rows land between the check of the empty file and the
        # read: before, they were read, and their mark let the next cycle go on after
        # the cursor, skipping the new file's rows up to it (v 100-105), unsaid
        schema = self.SHAPES["rowid"]
        cols, rows = self.shaped(schema, 0, 6)
        db = self.make(schema, rows, cols)
        self.upload(db)
        os.replace(self.make(schema, [], cols, name="new.db"), db)
        check = up.check_same_rows

        def producer_writes(job, pos, cursor):  # right after the check
            confirmed = check(job, pos, cursor)
            self.insert(db, self.shaped(schema, 0, 10, base=100)[1], cols)
            return confirmed

        with mock.patch.object(up, "check_same_rows", producer_writes):
            err = self.upload(db)
        said = [line for line in err.splitlines() if "is empty" in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("nothing is read from it until then (0 rows uploaded)", said[0])
        self.assertNotIn("batch ", err)
        self.assert_once(self.landed("raw_t"), "v", range(6))
        # the next cycle sees its rows up to the cursor: refused in one line, none skipped
        lines = error_lines(self.upload(db, expect=1))
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("not the row uploaded", lines[0])
        self.assert_once(self.landed("raw_t"), "v", range(6))

    def test_an_empty_file_under_the_name_is_said_once_while_the_uploader_runs(self):
        # one source in a loop: one WARNING while it stays empty, not an error a cycle;
        # refused once it has rows up to the cursor that are not those uploaded
        schema, cols, db, job = self.running("rowid")
        os.replace(self.make(schema, [], cols, name="new.db"), db)
        with self.assertLogs("uploader", "INFO") as logs:
            for _ in range(3):
                self.assertEqual(up.run_cycle(job), 0)
        said = [line for line in logs.output if "is empty" in line]
        self.assertEqual(len(said), 1, logs.output)
        self.assertTrue(said[0].startswith("WARNING"), said)
        self.insert(db, self.shaped(schema, 0, 10, base=100)[1], cols)
        with self.assertRaisesRegex(up.SourceReplacedError, "not the row uploaded"):
            up.run_cycle(job)
        self.assert_once(self.landed("raw_t"), "v", range(6))

    def test_an_empty_file_put_first_while_a_copy_is_restored_goes_on_once(self):
        # the producer's empty database, then the backup copied over it
        schema, cols, db = self.uploaded("rowid")
        os.link(db, self.path("backup.db"))  # (its inode is not given to another file)
        os.replace(self.make(schema, [], cols, name="new.db"), db)
        self.upload(db)
        self.copy_over(db, self.path("backup.db"))
        self.insert(db, self.shaped(schema, 6, 2)[1], cols)
        err = self.upload(db)
        self.assertIn("holds the rows uploaded", err)
        self.assertNotIn("behind the cursor", err)  # the empty file counted nothing
        self.assert_once(self.landed("raw_t"), "v", range(8))

    def test_a_mark_written_before_marks_were_keyed_is_read(self):
        # the older form: the column names and an unkeyed digest of the values; a copy
        # goes on (and its mark takes the new form), another database is refused
        schema, cols, db = self.uploaded("autoincrement")
        last = (6, stamp(5), 5)
        old = {"columns": ["id", "timestamp", "v"], "digest": hashlib.sha256(repr(
            [(type(v).__name__, v) for v in last]).encode()).hexdigest()[:16]}
        self.edit_position(lambda pos: pos.update(cursor_row=old, file_id=[0, 0]))
        self.copy_over(db)
        self.assertIn("holds the rows uploaded", self.upload(db))
        mark = self.position()["cursor_row"]
        self.assertNotIn("columns", mark)
        self.edit_position(lambda pos: pos.update(cursor_row=old, file_id=[0, 0]))
        os.replace(self.make(schema, self.shaped(schema, 0, 8, base=100)[1], cols,
                             name="new.db"), db)
        lines = error_lines(self.upload(db, expect=1))
        self.assertIn("(other values)", lines[0])
        self.assert_once(self.landed("raw_t"), "v", range(6))

    def test_a_mark_of_the_older_form_is_made_again_of_the_file_it_was_read_from(self):
        # on the file recorded, the older mark is replaced at the next cycle (rows
        # or not), so a row updated in place later is told apart from another file's
        db = self.logger()  # (its row at the cursor is updated in place)
        self.edit_position(lambda pos: pos.update(cursor_row={
            "columns": ["id", "timestamp", "v", "last_seen"], "digest": "0" * 16}))
        self.upload(db)
        self.assertNotIn("columns", self.position()["cursor_row"])
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE t SET last_seen = ? WHERE id = 6", (stamp(50),))
        conn.close()
        self.copy_over(db)
        self.assertIn("updated in place", self.upload(db))

    def test_a_column_added_before_a_copy_leaves_the_mark_of_the_row_uploaded(self):
        # a schema upgrade adds a column (ALTER TABLE ADD COLUMN), then the file is
        # copied: the row at the cursor is compared on the columns it was marked with
        schema, cols, db = self.uploaded("rowid")
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE t ADD COLUMN note TEXT")
            conn.execute("UPDATE t SET note = 'x'")
        conn.close()
        self.copy_over(db)
        err = self.upload(db)
        self.assertIn("(the same values)", err)


# === Batches and names ===============================================================

class FirstRowTest(unittest.TestCase):
    """The table's first row in a row mark: read by the table's stored order (a WITHOUT
    ROWID table's PRIMARY KEY, an index seek), once per read, and marks of before (by the
    cursor's columns) still read."""

    # the cursor (ts, sensor) and the key (sensor, ts) begin at other rows
    ROWS = [("s1", "2025-01-01T00:00:00Z", 1.0), ("s0", "2025-01-01T00:00:01Z", 2.0),
            ("s1", "2025-01-01T00:00:02Z", 3.0), ("s0", "2025-01-01T00:00:03Z", 4.0),
            ("s1", "2025-01-01T00:00:04Z", 5.0), ("s0", "2025-01-01T00:00:05Z", 6.0)]

    def setUp(self):
        self.conn = sqlite3.connect(":memory:")
        self.addCleanup(self.conn.close)
        self.conn.execute("CREATE TABLE r (sensor TEXT, ts TEXT, v REAL, "
                          "PRIMARY KEY (sensor, ts)) WITHOUT ROWID")
        self.conn.executemany("INSERT INTO r VALUES (?, ?, ?)", self.ROWS)
        self.source = up.describe_table(self.conn, "r", None, "r.db")
        self.assertEqual(self.source.cursor.columns, ("ts", "sensor"))

    def test_first_row_is_read_once_per_read_by_the_key_without_a_sort(self):
        heads = []
        self.conn.set_trace_callback(
            lambda sql: heads.append(sql) if sql.rstrip().endswith("LIMIT 1") else None)
        chunks = list(up.read_batches(self.conn, self.source, None, 2, key="k"))
        self.conn.set_trace_callback(None)
        self.assertEqual([c.count for c in chunks], [2, 2, 2, 0][:len(chunks)])
        self.assertEqual(len(heads), 1, heads)  # not one a batch
        plan = " ".join(str(r) for r in self.conn.execute("EXPLAIN QUERY PLAN " + heads[0]))
        self.assertNotIn("TEMP B-TREE", plan)  # the key's index, not a scan and a sort
        mark = chunks[-1].cursor_row
        self.assertEqual(mark["first_by"], "key")
        self.assertEqual(up.decode_cursor(mark["first_at"]), ["s0", "2025-01-01T00:00:01Z"])
        # nothing to read (an idle cycle): the first row is not read
        end = chunks[-1].cursor_end
        self.conn.set_trace_callback(
            lambda sql: heads.append(sql) if sql.rstrip().endswith("LIMIT 1") else None)
        self.assertEqual(list(up.read_batches(self.conn, self.source, end, 2, key="k")), [])
        self.conn.set_trace_callback(None)
        self.assertEqual(len(heads), 1, heads)

    def test_a_mark_of_before_by_the_cursor_columns_is_still_read(self):
        names, cursor = self.source.column_names, ["2025-01-01T00:00:04Z", "s1"]
        row = self.conn.execute("SELECT * FROM r WHERE sensor = 's1' AND ts = ?",
                                cursor[:1]).fetchone()
        # as the version before wrote it: the first row by (ts, sensor), no first_by
        first = up.read_first_row(self.conn, self.source, "k", names, by_key=False)
        old = up.row_mark(names, row, "k", stamp="ts", first=first[:2])
        self.assertEqual(up.decode_cursor(old["first_at"]), ["2025-01-01T00:00:00Z", "s1"])
        new = up.read_row_mark(self.conn, self.source, cursor, "k")
        self.conn.execute("UPDATE r SET v = 50.0 WHERE sensor = 's1' AND ts = ?", cursor[:1])
        for mark in (old, new):  # updated in place: the same file
            self.assertEqual(up.compare_mark(self.conn, self.source, cursor, mark, "k"),
                             (True, "other values, updated in place: its timestamp and "
                                    "the table's first row are those marked"))
        # a purge of the first rows (by time, the producer's order): both still go on
        self.conn.execute("DELETE FROM r WHERE ts <= '2025-01-01T00:00:01Z'")
        for mark in (old, new):
            same, what = up.compare_mark(self.conn, self.source, cursor, mark, "k")
            self.assertTrue(same, what)


class BatchTest(PipelineTestCase):

    def test_checkpoint_advances_after_each_batch(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v INTEGER)",
                       [(i,) for i in range(10)], ["v"])
        state_path = os.path.join(self.env()["STATE_DIR"], up.STATE_FILE)
        seen, write = [], up.DeltaSink.write

        def spy(sink, table, batch):
            with open(state_path, encoding="utf-8") as fh:
                pos = next(iter(json.load(fh)["destinations"].values()))
            seen.append((pos["cursor"], pos["inflight"]["cursor_end"], pos["rows"]))
            return write(sink, table, batch)

        with mock.patch.object(up.DeltaSink, "write", spy):
            err = self.upload(db, "--batch-size", "3")
        self.assertEqual(err.count(" rows -> raw_t"), 4, err)
        self.assertEqual(seen, [(None, [3], 0), ([3], [6], 3), ([6], [9], 6),
                                ([9], [10], 9)])
        pos = self.position()
        self.assertEqual((pos["cursor"], pos["rows"], pos["seq"], pos["inflight"]),
                         ([10], 10, 4, None))
        rows = self.landed("raw_t")
        self.assert_once(rows, "v", range(10))
        sizes = collections.Counter(r["_batch_id"] for r in rows)
        self.assertEqual(sorted(sizes.values()), [1, 3, 3, 3])

    def test_exact_multiple_of_batch_size(self):
        db = self.make("CREATE TABLE t (timestamp TEXT NOT NULL, v INTEGER)",
                       [(stamp(i // 2), i) for i in range(6)])
        self.upload(db, "--batch-size", "3")
        self.assert_once(self.landed("raw_t"), "v", range(6))
        self.assertEqual(self.position()["seq"], 2)

    def test_names_with_spaces_quotes_and_unicode(self):
        table, ts, col = 'we"ird tåble ✓', 'time "of" día', "tëmp 'x' \\ y"
        q = up.quote_ident
        db = self.make(f"CREATE TABLE {q(table)} ({q(ts)} TEXT NOT NULL, {q(col)} REAL)",
                       [(stamp(i // 3), i / 4) for i in range(7)])
        self.upload(db, "--timestamp-col", ts, "--batch-size", "2")
        self.insert(db, [(stamp(2), 7 / 4)])
        self.upload(db, "--timestamp-col", ts, "--batch-size", "2")
        (name,) = os.listdir(self.path("lake"))
        self.assertEqual(name, up.route_table(table))
        self.assertTrue(name.startswith("raw_"))
        rows = self.landed(name)
        self.assert_once(rows, col, [i / 4 for i in range(8)])
        self.assertEqual(helpers.delta_schema(self.lake(name))[ts], "timestamp")
        self.assertEqual(self.state()["source"]["table"], table)
        self.assertEqual(self.position()["cursor"], [stamp(2), 8])


if __name__ == "__main__":
    unittest.main()
