"""Many sources per node (issue 15): several files and tables under one state and one
lock, rotated files found by a glob, `tables: all`, and --status of every source."""

import collections
import json
import logging
import os
import shutil
import sqlite3
import unittest
from unittest import mock

from tests import producers
from tests.helpers import (PipelineTestCase, delta_rows, read_state, run_driver, run_main,
                           slow, up)

READINGS = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "timestamp TEXT NOT NULL, sensor TEXT, value REAL);"
            "CREATE INDEX idx_readings_timestamp ON readings(timestamp);")
EVENTS = "CREATE TABLE events (id INTEGER PRIMARY KEY, at TEXT NOT NULL, what TEXT);"


def readings(start, count):
    return [(f"2025-01-01T00:{(i // 60) % 60:02d}:{i % 60:02d}Z", f"s{i % 3}", i * 0.5)
            for i in range(start, start + count)]


def events(start, count, tag="e"):
    return [(f"2025-01-01T01:00:{i % 60:02d}Z", f"{tag}{i}") for i in range(start, start + count)]


class SourcesTestCase(PipelineTestCase):
    """Sensor files with two tables; runs of a YAML `sources` config."""

    def logger_file(self, name, count=10, more_events=4):
        db = self.make(READINGS + EVENTS, name=name)
        self.insert(db, readings(0, count), ["timestamp", "sensor", "value"], "readings")
        self.insert(db, events(0, more_events, name[:-3]), ["at", "what"], "events")
        return db

    def another_database(self, name, count):
        """A logger file of other rows (other times and values) than logger_file's."""
        db = self.make(READINGS + EVENTS, name=name)
        self.insert(db, [(f"2025-02-01T00:00:{i:02d}Z", "x", 1000.0 + i) for i in range(count)],
                    ["timestamp", "sensor", "value"], "readings")
        return db

    def config(self, sources, **settings):
        path = self.path("uploader.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"sources": sources, **settings}, fh)  # JSON is YAML
        return path

    def run_once(self, config, *flags, expect=0, **env):
        code, out, err = run_main(["--config", config, "--once", *flags], self.env(**env))
        self.assertEqual(code, expect, f"exit code {code}; stderr:\n{err}")
        return err

    def rows(self, table, *columns):
        return delta_rows(self.lake(table), list(columns) or "*")

    def state(self):
        return read_state(self.env()["STATE_DIR"])

    def assertOnce(self, table, key_columns, expected):
        """`table` holds exactly the rows `expected` (tuples of key_columns), each once."""
        got = collections.Counter(tuple(r[c] for c in key_columns)
                                  for r in self.rows(table, *key_columns))
        self.assertEqual(got, collections.Counter(expected))


class ConfigTest(SourcesTestCase):
    """The `sources` list and --table given more than once."""

    def test_sources_list_with_per_table_settings(self):
        path = self.config([{"sqlite": "/data/a.db", "tables": [
            "readings", {"events": {"databricks_table": "log_events", "cursor": "rowid"}}]},
            {"sqlite": "/data/sensor-*.db", "tables": "all", "enable_filter": True,
             "filter_config": {"value": {">": 1}}}])
        config = up.load_config(up.build_parser().parse_args(["--config", path]), {})
        specs = up.source_specs(config)
        self.assertEqual([s.pattern for s in specs], ["/data/a.db", "/data/sensor-*.db"])
        self.assertEqual(specs[0].tables[1]["settings"],
                         {"databricks_table": "log_events", "cursor": "rowid"})
        self.assertEqual(specs[1].tables, "all")
        self.assertTrue(specs[1].is_glob)
        table = up.spec_config(config, specs[0], "/data/a.db", specs[0].tables[1])
        self.assertEqual((table.sqlite_table_name, table.databricks_table, table.cursor),
                         ("events", "log_events", "rowid"))
        self.assertIn("sources[0].tables.events.cursor", table.origin("cursor"))
        self.assertFalse(up.is_single(specs))

    def test_bad_sources_are_one_line_errors(self):
        cases = {"unknown key": ([{"sqlite": "a.db", "tabels": "all"}], "did you mean 'tables'"),
                 "no file": ([{"tables": ["t"]}], "has no sqlite"),
                 "bad value": ([{"sqlite": "a.db", "tables": [{"t": {"cursor": "fast"}}]}],
                               "cursor must be one of auto, rowid, timestamp"),
                 "not a list": ({"sqlite": "a.db"}, "sources must be a list")}
        for name, (sources, words) in cases.items():
            with self.subTest(name):
                code, _, err = run_main(["--config", self.config(sources), "--once"],
                                        self.env())
                self.assertEqual(code, 2, err)
                self.assertIn(words, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_sqlite_and_sources_together_are_refused(self):
        code, _, err = run_main(["--config", self.config([{"sqlite": "a.db"}]), "--sqlite",
                                 "b.db", "--once"], self.env())
        self.assertEqual(code, 2)
        self.assertIn("sqlite (from --sqlite) and sources", err)

    def test_table_flag_given_twice_uploads_both_tables(self):
        db = self.logger_file("logger.db")
        err = self.upload(db, "--table", "readings", "--table", "events")
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])
        self.assertOnce("raw_events", ["id"], [(i,) for i in range(1, 5)])
        self.assertEqual(self.state()["version"], up.MANY_STATE_VERSION, err)

    def test_one_source_keeps_the_single_source_state(self):
        # a one-item list (and --sqlite alone) run as before: version 2, the old keys
        db = self.logger_file("logger.db")
        self.run_once(self.config([{"sqlite": db, "tables": ["readings"]}]))
        state = self.state()
        self.assertEqual(state["version"], up.STATE_VERSION)
        self.assertEqual([k.rsplit("/", 1)[1] for k in state["destinations"]],
                         ["raw_readings"])
        self.assertEqual(state["source"]["table"], "readings")


class ManySourcesTest(SourcesTestCase):
    """Several files and tables in one process, one state, one lock."""

    def test_three_files_two_tables_each_land_once_and_traceable(self):
        for name in ("sensor-a.db", "sensor-b.db", "sensor-c.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("sensor-*.db"),
                               "tables": ["readings", {"events": {
                                   "databricks_table": "logger_events"}}]}])
        self.run_once(config)
        files = ["sensor-a.db", "sensor-b.db", "sensor-c.db"]
        expected = [(f, i) for f in files for i in range(1, 11)]
        self.assertOnce("raw_readings", ["_source_file", "id"], expected)
        self.assertOnce("raw_logger_events", ["_source_file", "id"],
                        [(f, i) for f in files for i in range(1, 5)])
        # the batch ids of two files never meet (each position has its own tag)
        batches = {r["_batch_id"] for r in self.rows("raw_readings", "_batch_id")}
        self.assertEqual(len(batches), 3, batches)
        self.assertEqual(len(self.state()["destinations"]), 6)
        # new rows in one file: only they go, and an idle run sends nothing
        self.insert(self.path("sensor-b.db"), readings(10, 5),
                    ["timestamp", "sensor", "value"], "readings")
        self.run_once(config)
        self.run_once(config)
        expected += [("sensor-b.db", i) for i in range(11, 16)]
        self.assertOnce("raw_readings", ["_source_file", "id"], expected)
        values = {(r["_source_file"], r["id"]): r["value"]
                  for r in self.rows("raw_readings", "_source_file", "id", "value")}
        self.assertEqual(values[("sensor-b.db", 15)], 7.0)

    def test_rotated_file_is_picked_up_at_the_next_cycle(self):
        self.logger_file("sensor-2026-11-29.db")
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        self.run_once(config)
        self.logger_file("sensor-2026-11-30.db", count=7)
        err = self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-2026-11-29.db", i) for i in range(1, 11)] +
                        [("sensor-2026-11-30.db", i) for i in range(1, 8)])
        self.assertNotIn("sensor-2026-11-29.db:readings", err.split("cycle:")[-1])

    def test_failing_source_does_not_hold_up_the_others(self):
        good, locked = self.logger_file("good.db"), self.logger_file("locked.db")
        config = self.config([{"sqlite": good, "tables": ["readings"]},
                              {"sqlite": locked, "tables": ["readings"]}])
        writer = sqlite3.connect(locked, isolation_level=None)
        writer.execute("BEGIN EXCLUSIVE")  # the sensor holds a write lock
        try:
            code, _, err = run_main(["--config", config, "--once"],
                                    self.env(BUSY_TIMEOUT=0))
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        self.assertEqual(code, 1, err)
        self.assertIn(f"error: {os.path.realpath(locked)}", err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("good.db", i) for i in range(1, 11)])
        self.run_once(config)  # retried: the locked file goes, the good one not again
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("good.db", "locked.db") for i in range(1, 11)])

    def test_file_replaced_by_an_older_copy_is_an_error_for_that_file(self):
        a, b = self.logger_file("a.db"), self.logger_file("b.db")
        shutil.copyfile(a, self.path("a-old.db"))
        self.insert(a, readings(10, 5), ["timestamp", "sensor", "value"], "readings")
        config = self.config([{"sqlite": self.path("[ab].db"), "tables": ["readings"]}])
        self.run_once(config)
        os.replace(self.path("a-old.db"), a)  # put back in place: an older copy
        self.insert(b, readings(10, 2), ["timestamp", "sensor", "value"], "readings")
        err = self.run_once(config, expect=1)
        self.assertIn("ends before the saved cursor", err)
        self.assertIn("--reset-state", err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("a.db", i) for i in range(1, 16)] +
                        [("b.db", i) for i in range(1, 13)])

    def test_file_replaced_by_another_database_is_refused_the_others_go_on(self):
        a, b = self.logger_file("sensor-a.db"), self.logger_file("sensor-b.db")
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        self.run_once(config)
        os.replace(self.another_database("new.db", 15), a)  # rows 1..10 are not those sent
        self.insert(b, readings(10, 2), ["timestamp", "sensor", "value"], "readings")
        err = self.run_once(config, expect=1)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(errors), 1, err)
        self.assertIn(f"error: {os.path.realpath(a)} table readings: ", errors[0])
        self.assertIn("new name", errors[0])
        self.assertOnce("raw_readings", ["_source_file", "id", "value"],
                        [("sensor-a.db", i, (i - 1) * 0.5) for i in range(1, 11)] +
                        [("sensor-b.db", i, (i - 1) * 0.5) for i in range(1, 13)])
        # as the error says: under a new name it is a new file, uploaded from its first row
        os.rename(a, self.path("sensor-a2.db"))
        self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id", "value"],
                        [("sensor-a.db", i, (i - 1) * 0.5) for i in range(1, 11)] +
                        [("sensor-a2.db", i, 999.0 + i) for i in range(1, 16)] +
                        [("sensor-b.db", i, (i - 1) * 0.5) for i in range(1, 13)])

    def test_copy_put_in_place_goes_on_exactly_once(self):
        a = self.logger_file("sensor-a.db")
        self.logger_file("sensor-b.db")
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        self.run_once(config)
        self.insert(a, readings(10, 3), ["timestamp", "sensor", "value"], "readings")
        shutil.copyfile(a, a + ".new")
        os.replace(a + ".new", a)
        err = self.run_once(config)
        self.assertIn("holds the rows uploaded", err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-a.db", i) for i in range(1, 14)] +
                        [("sensor-b.db", i) for i in range(1, 11)])

    def test_state_of_one_source_becomes_one_of_many_without_replay(self):
        db = self.logger_file("logger.db")
        self.upload(db, "--table", "readings")
        before = self.state()
        self.assertEqual(before["version"], up.STATE_VERSION)
        (old_key, old_pos), = before["destinations"].items()
        self.insert(db, readings(10, 3), ["timestamp", "sensor", "value"], "readings")
        err = self.upload(db, "--table", "readings", "--table", "events")
        self.assertIn("it now keeps a position per source", err)
        after = self.state()
        self.assertEqual(after["version"], up.MANY_STATE_VERSION)
        self.assertEqual(after["state_id"], before["state_id"])
        moved = after["destinations"][f"{old_key} <- {os.path.realpath(db)}:readings"]
        self.assertEqual(moved["tag"], "")  # its batch ids and app id go on as they were
        self.assertEqual(moved["seq"], old_pos["seq"] + 1)
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 14)])
        self.assertOnce("raw_events", ["id"], [(i,) for i in range(1, 5)])
        batches = sorted({r["_batch_id"] for r in self.rows("raw_readings", "_batch_id")})
        self.assertEqual(batches, [f"{before['state_id']}-1", f"{before['state_id']}-2"])
        # a later run with --sqlite alone keeps the state of many
        self.upload(db, "--table", "readings")
        self.assertEqual(self.state()["version"], up.MANY_STATE_VERSION)

    def test_reset_state_of_many_sources(self):
        for name in ("a.db", "b.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("?.db"), "tables": ["readings"]}])
        self.run_once(config)
        err = self.run_once(config, "--reset-state", expect=1)  # the rows would go twice
        self.assertIn("--start-at now", err)
        self.run_once(config, "--reset-state", "--start-at", "now")
        self.assertEqual(len(os.listdir(self.env()["STATE_DIR"])), 3, "state, lock, backup")
        self.insert(self.path("b.db"), readings(10, 2), ["timestamp", "sensor", "value"],
                    "readings")
        self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("a.db", "b.db") for i in range(1, 11)] +
                        [("b.db", 11), ("b.db", 12)])

    def test_home_assistant_recorder_four_tables(self):
        db = producers.make_ha_recorder(self.path("home-assistant_v2.db"), 300)
        config = self.config([{"sqlite": db, "tables": list(producers.HA_RECORDER_TABLES)}])
        err = self.run_once(config)
        producers.make_ha_recorder(db, 200, start=300)
        self.run_once(config)
        self.assertOnce("raw_states", ["state_id"], [(i,) for i in range(1, 501)])
        self.assertOnce("raw_states_meta", ["metadata_id"], [(i,) for i in range(1, 6)])
        self.assertOnce("raw_statistics", ["id"], [(i,) for i in range(1, 51)])
        self.assertOnce("raw_statistics_meta", ["id"], [(1,), (2,)])
        # the states' entity names come from states_meta, as a user would join them
        names = {r["metadata_id"]: r["entity_id"]
                 for r in self.rows("raw_states_meta", "metadata_id", "entity_id")}
        states = self.rows("raw_states", "state_id", "metadata_id", "last_updated_ts")
        self.assertEqual(names[states[0]["metadata_id"]], "sensor.room_1_temperature")
        self.assertIn("cursor: pair (last_updated_ts, state_id) on table 'states'", err)
        self.assertIn("cursor: pair (created_ts, id) on table 'statistics'", err)
        self.assertIn("cursor: rowid (metadata_id) on table 'states_meta'", err)


class LockedReadTest(SourcesTestCase):
    """A read of one file that fails (a writer holds its lock past BUSY_TIMEOUT) is
    that file's failure: one error line, no traceback, the other files go on."""

    def test_locked_read_of_the_first_row_fails_only_that_file(self):
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        real = up.read_row_mark

        def locked(conn, *args, **kwargs):
            if conn.execute("PRAGMA database_list").fetchone()[2].endswith("sensor-1.db"):
                raise sqlite3.OperationalError("database is locked")
            return real(conn, *args, **kwargs)
        with mock.patch.object(up, "read_row_mark", locked):
            err = self.run_once(config, expect=1)
        self.assertNotIn("Traceback", err)
        said = [line for line in err.splitlines() if " ERROR " in line]
        self.assertEqual(len(said), 1, err)
        self.assertIn("database is locked", said[0])
        self.assertIn("sensor-1.db", said[0])
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 11)])
        self.run_once(config)  # the lock is gone: the file's first row is recorded
        self.assertTrue(all(p.get("first_row") for p in self.state()["destinations"].values()))
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 11)])


class WholeDatabaseTest(SourcesTestCase):
    """tables: all."""

    def make_station(self):
        db = self.logger_file("station.db")
        conn = sqlite3.connect(db)
        with conn:
            conn.executescript(
                "CREATE VIEW warm AS SELECT * FROM readings WHERE value > 2;"
                "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;"
                "INSERT INTO settings VALUES ('unit', 'C');"
                "CREATE TABLE daily (date TEXT PRIMARY KEY, high REAL) WITHOUT ROWID;"
                "INSERT INTO daily VALUES ('2025-01-01', 3.5);"
                "ANALYZE;")
        conn.close()
        return db

    def test_every_user_table_and_tables_created_later(self):
        db = self.make_station()
        config = self.config([{"sqlite": db, "tables": "all"}])
        err = self.run_once(config)
        skipped = [line for line in err.splitlines() if "tables: all skips" in line]
        self.assertEqual(len(skipped), 1, err)
        self.assertIn("views (warm)", skipped[0])
        self.assertIn("sqlite_sequence", skipped[0])
        self.assertIn("sqlite_stat1", skipped[0])
        # a key that does not follow time and no timestamp: named, not uploaded wrongly
        self.assertIn("table 'settings' in", err)
        self.assertIn("is not uploaded: a WITHOUT ROWID table keyed by (name)", err)
        self.assertFalse(os.path.exists(self.lake("raw_settings")))
        # a WITHOUT ROWID table keyed by a date that sorts as time is uploaded
        self.assertOnce("raw_daily", ["high"], [(3.5,)])
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])
        self.assertOnce("raw_events", ["id"], [(i,) for i in range(1, 5)])
        conn = sqlite3.connect(db)
        with conn:
            conn.executescript("CREATE TABLE alarms (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                               "raised_at TEXT, level INTEGER);"
                               "INSERT INTO alarms (raised_at, level) VALUES "
                               "('2025-01-02T00:00:00Z', 3);")
        conn.close()
        self.run_once(config)
        self.assertOnce("raw_alarms", ["id", "level"], [(1, 3)])
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])

    def test_full_text_index_tables_are_skipped_not_uploaded(self):
        """sqlite-utils' `enable-fts` (and Datasette, Home Assistant's logbook...) add an
        FTS5 virtual table over a user table, stored in shadow tables whose rows are
        index segments rewritten in place: none of them is data to upload."""
        db = self.make_station()
        conn = sqlite3.connect(db)
        with conn:
            conn.executescript(
                "CREATE VIRTUAL TABLE readings_fts USING fts5(value, content=readings);"
                "INSERT INTO readings_fts(readings_fts) VALUES ('rebuild');")
        conn.close()
        err = self.run_once(self.config([{"sqlite": db, "tables": "all"}]))
        skipped = [line for line in err.splitlines() if "tables: all skips" in line]
        self.assertEqual(len(skipped), 1, err)
        for name in ("readings_fts", "readings_fts_data", "readings_fts_idx",
                     "readings_fts_docsize", "readings_fts_config"):
            self.assertIn(name, skipped[0])
            self.assertFalse(os.path.exists(self.lake(f"raw_{name}")), name)
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])

    def test_tables_without_the_pragma_table_list_of_sqlite_3_37(self):
        """Older SQLite on an edge host: virtual and shadow tables told apart by name."""
        db = self.make_station()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("CREATE VIRTUAL TABLE readings_fts USING fts5(value)")

        class Old:  # no pragma_table_list, as before SQLite 3.37
            def execute(self, sql, *args):
                if "pragma_table_list" in sql:
                    raise sqlite3.OperationalError("no such table: pragma_table_list")
                return conn.execute(sql, *args)
        kinds = up.table_kinds(Old())
        conn.close()
        self.assertEqual(kinds["readings_fts"], "virtual")
        self.assertEqual(kinds["readings_fts_data"], "shadow")
        self.assertEqual(kinds["warm"], "view")
        self.assertEqual(kinds["readings"], "table")
        self.assertEqual(kinds["sqlite_stat1"], "internal")

    def test_unusable_table_named_in_the_list_is_an_error(self):
        db = self.make_station()
        err = self.run_once(self.config([{"sqlite": db, "tables": ["readings", "settings"]}]),
                            expect=1)
        self.assertIn("table 'settings'", err)
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])


class GoneFileTest(SourcesTestCase):
    """A file a glob matched that disappears is forgotten after FORGET_AFTER."""

    def open_sources(self, clock, tables=("readings",), pattern="sensor-*.db"):
        config = up.load_config(up.build_parser().parse_args(
            ["--config", self.config([{"sqlite": self.path(pattern),
                                       "tables": list(tables)}]), "--forget-after", "60"]),
            self.env())
        stop = up.StopFlag()
        self.addCleanup(stop.close)
        sources = up.open_sources(config, up.source_specs(config), False, stop, {})
        sources.clock = clock
        self.addCleanup(sources.close)
        return sources

    def test_a_new_empty_database_under_a_name_is_checked_until_it_can_be_told(self):
        # a producer recreates its file (empty) while the uploader runs: one WARNING,
        # not an error every cycle; once it has rows up to the cursor that are not
        # those uploaded, it is refused (before: taken for the file uploaded, and its
        # rows up to the cursor skipped without a word)
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        sources = self.open_sources(lambda: 1000.0, tables=("events",))
        self.assertEqual(sources.cycle(), {})
        empty = self.make(READINGS + EVENTS, name="new.db")
        os.replace(empty, self.path("sensor-1.db"))
        with self.assertLogs("uploader", logging.INFO) as logs:
            for _ in range(3):
                self.assertEqual(sources.cycle(), {})
        said = [line for line in logs.output if "is empty" in line]
        self.assertEqual(len(said), 1, logs.output)
        self.assertTrue(said[0].startswith("WARNING"), said)
        self.insert(self.path("sensor-1.db"), events(0, 6, "new"), ["at", "what"], "events")
        failed = sources.cycle()
        self.assertEqual(list(failed), [(os.path.realpath(self.path("sensor-1.db")),
                                         "events")], failed)
        self.assertIn("not the row uploaded", failed[list(failed)[0]])
        self.assertOnce("raw_events", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 5)])

    def test_fully_uploaded_file_forgotten_after_the_grace_in_one_line(self):
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        now = [1000.0]
        sources = self.open_sources(lambda: now[0])
        self.assertEqual(sources.cycle(), {})
        # the sensor adds rows, then the file is removed before the next cycle: the
        # rows are read from the file still open, then the position waits
        self.insert(self.path("sensor-1.db"), readings(10, 3),
                    ["timestamp", "sensor", "value"], "readings")
        os.remove(self.path("sensor-1.db"))
        self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-1.db", i) for i in range(1, 14)] +
                        [("sensor-2.db", i) for i in range(1, 11)])
        self.assertEqual(len(self.state()["destinations"]), 2)
        now[0] += 59
        sources.cycle()
        self.assertEqual(len(self.state()["destinations"]), 2)
        now[0] += 2
        with self.assertLogs("uploader", logging.INFO) as logs:
            sources.cycle()
        said = [line for line in logs.output if "is gone" in line]
        self.assertEqual(len(said), 1, logs.output)
        self.assertIn("after all its rows were uploaded", said[0])
        keys = list(self.state()["destinations"])
        self.assertEqual(len(keys), 1)
        self.assertIn("sensor-2.db", keys[0])

    def test_forgotten_file_has_the_sink_remove_its_status(self):
        """Once its positions are forgotten (not while the grace runs), the sink of each
        of the file's source tables is asked to remove the status it reported; the
        Delta sink has none to remove (its status is commit metadata): no line."""
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        now = [1000.0]
        sources = self.open_sources(lambda: now[0], tables=("readings", "events"))
        sources.cycle()
        os.remove(self.path("sensor-1.db"))
        asked = []
        with mock.patch.object(up.DeltaSink, "retire_status", lambda sink, table: asked.append(
                (sink.identity.source_id, sink.identity.source_file,
                 sink.identity.source_table, table))):
            sources.cycle()
            now[0] += 59
            sources.cycle()
            self.assertEqual(asked, [])
            now[0] += 2
            sources.cycle()
        self.assertEqual(sorted(asked), [
            ("test-node", "sensor-1.db", "events", "raw_events"),
            ("test-node", "sensor-1.db", "readings", "raw_readings")])
        os.remove(self.path("sensor-2.db"))
        sources.cycle()
        now[0] += 61
        with self.assertLogs("uploader", logging.DEBUG) as logs:
            sources.cycle()
        self.assertEqual([line for line in logs.output if "WARNING" in line
                          or "status of" in line or "--fleet-status" in line], [])
        self.assertEqual(self.state()["destinations"], {})

    def test_file_renamed_while_running_keeps_its_position(self):
        # logrotate's way: sensor-0.db becomes sensor-1.db and a new sensor-0.db starts
        self.logger_file("sensor-0.db")
        sources = self.open_sources(lambda: 0.0)
        sources.cycle()
        self.insert(self.path("sensor-0.db"), readings(10, 3),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        self.logger_file("sensor-0.db", count=4)
        with self.assertLogs("uploader", logging.INFO) as logs:
            self.assertEqual(sources.cycle(), {})
        said = [line for line in logs.output if "renamed" in line]
        self.assertEqual(len(said), 1, logs.output)
        got = collections.Counter((r["_batch_id"].rsplit("-", 1)[0], r["id"])
                                  for r in self.rows("raw_readings", "_batch_id", "id"))
        self.assertEqual(sorted(n for n in got.values()), [1] * 17, got)  # none twice
        self.assertEqual(len(got), 17)
        files = collections.Counter(r["_source_file"]
                                    for r in self.rows("raw_readings", "_source_file"))
        self.assertEqual(files, {"sensor-0.db": 10 + 4, "sensor-1.db": 3})
        self.assertEqual(len(self.state()["destinations"]), 2)

    def test_file_replaced_while_running_is_checked_not_skipped(self):
        # the producer recreates its file under the same name, with more rows than the
        # cursor: refused (one warning, one error), the other file goes on; a copy of
        # the file uploaded, put back, goes on from the cursor, exactly once
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        sources = self.open_sources(lambda: 0.0)
        self.assertEqual(sources.cycle(), {})
        shutil.copyfile(self.path("sensor-1.db"), self.path("kept.db"))
        os.replace(self.another_database("new.db", 12), self.path("sensor-1.db"))
        with self.assertLogs("uploader", logging.INFO) as logs:
            failed = sources.cycle()
        self.assertEqual(list(failed), [(os.path.realpath(self.path("sensor-1.db")),
                                         "readings")])
        said = [line for line in logs.output if "replaced" in line]
        self.assertEqual(len(said), 2, logs.output)  # the warning and the error
        self.assertEqual(len(sources.cycle()), 1)
        os.replace(self.path("kept.db"), self.path("sensor-1.db"))
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-1.db", i) for i in range(1, 13)] +
                        [("sensor-2.db", i) for i in range(1, 11)])

    def test_file_refused_as_replaced_then_renamed_is_a_new_file(self):
        self.logger_file("sensor-1.db")
        sources = self.open_sources(lambda: 0.0)
        sources.cycle()
        os.replace(self.another_database("new.db", 12), self.path("sensor-1.db"))
        self.assertEqual(len(sources.cycle()), 1)
        os.rename(self.path("sensor-1.db"), self.path("sensor-9.db"))
        self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["_source_file", "id", "value"],
                        [("sensor-1.db", i, (i - 1) * 0.5) for i in range(1, 11)] +
                        [("sensor-9.db", i, 999.0 + i) for i in range(1, 13)])

    def test_file_back_within_the_grace_is_kept(self):
        self.logger_file("sensor-1.db")
        now = [1000.0]
        sources = self.open_sources(lambda: now[0])
        sources.cycle()
        os.rename(self.path("sensor-1.db"), self.path("elsewhere.db"))
        sources.cycle()
        sources.cycle()  # gone and read to its end: the grace starts
        os.rename(self.path("elsewhere.db"), self.path("sensor-1.db"))
        now[0] += 30
        sources.cycle()  # back: the grace is off
        os.rename(self.path("sensor-1.db"), self.path("elsewhere.db"))
        now[0] += 40  # 70 s after it first went, 0 s after it went again
        sources.cycle()
        sources.cycle()
        self.assertEqual(len(self.state()["destinations"]), 1)
        os.rename(self.path("elsewhere.db"), self.path("sensor-1.db"))
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 13)])

    def test_file_gone_while_stopped_is_forgotten_with_a_warning_word(self):
        self.logger_file("sensor-1.db")
        self.run_once(self.config([{"sqlite": self.path("sensor-*.db"),
                                    "tables": ["readings"]}]))
        os.remove(self.path("sensor-1.db"))
        now = [5000.0]
        sources = self.open_sources(lambda: now[0])
        sources.cycle()
        now[0] += 61
        with self.assertLogs("uploader", logging.INFO) as logs:
            sources.cycle()
        self.assertIn("went while no uploader was reading it", "\n".join(logs.output))
        self.assertEqual(self.state()["destinations"], {})


class FileJoiningTableTest(SourcesTestCase):
    """A file new to the state that joins a target table other files of the state feed
    is checked against the rows that file already has there: each source row is in the
    target exactly once (rows counted per key), never sent again in silence."""

    GLOB = [{"sqlite": "sensor-*.db", "tables": ["readings"]}]
    open_sources = GoneFileTest.open_sources

    def glob_config(self, **settings):
        return self.config([{**s, "sqlite": self.path(s["sqlite"])} for s in self.GLOB],
                           **settings)

    def rows_by_origin(self):
        """Counter of (batch id prefix, id): the position that sent a row, and its key."""
        return collections.Counter((r["_batch_id"].rsplit("-", 1)[0], r["id"])
                                   for r in self.rows("raw_readings", "_batch_id", "id"))

    def test_file_renamed_while_no_uploader_runs_goes_on_under_its_new_name(self):
        # logrotate while the uploader is down: sensor-0.db becomes sensor-1.db (with 3
        # rows more) and a new sensor-0.db starts
        self.logger_file("sensor-0.db")
        config = self.glob_config()
        self.run_once(config)
        self.insert(self.path("sensor-0.db"), readings(10, 3),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        self.logger_file("sensor-0.db", count=4)
        err = self.run_once(config)
        self.assertIn("renamed", err)
        got = self.rows_by_origin()
        self.assertEqual(sorted(got.values()), [1] * 17, got)  # none twice, none lost
        files = collections.Counter(r["_source_file"]
                                    for r in self.rows("raw_readings", "_source_file"))
        self.assertEqual(files, {"sensor-0.db": 10 + 4, "sensor-1.db": 3})
        self.run_once(config)  # and nothing more on the next run
        self.assertEqual(sum(self.rows_by_origin().values()), 17)

    def test_chain_of_renames_while_no_uploader_runs(self):
        # logrotate keeping two generations: sensor.db.1 -> sensor.db.2, then
        # sensor.db -> sensor.db.1 (with 2 rows more), and a new sensor.db
        self.logger_file("sensor.db.1", count=5)
        self.logger_file("sensor.db")
        config = self.config([{"sqlite": self.path("sensor.db*"), "tables": ["readings"]}])
        self.run_once(config)
        self.insert(self.path("sensor.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("sensor.db.1"), self.path("sensor.db.2"))
        os.rename(self.path("sensor.db"), self.path("sensor.db.1"))
        self.logger_file("sensor.db", count=3)
        err = self.run_once(config)
        self.assertEqual(err.count("renamed while no uploader"), 2, err)
        got = self.rows_by_origin()
        self.assertEqual(sorted(got.values()), [1] * (5 + 12 + 3), got)
        files = collections.Counter(r["_source_file"]
                                    for r in self.rows("raw_readings", "_source_file"))
        self.assertEqual(files, {"sensor.db.1": 5 + 2, "sensor.db": 10 + 3})

    def renamed_and_changed(self, sql):
        """sensor-0.db uploaded, then renamed sensor-1.db and changed by `sql` while no
        uploader ran; return the config."""
        self.logger_file("sensor-0.db")
        config = self.glob_config()
        self.run_once(config)
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        with sqlite3.connect(self.path("sensor-1.db")) as conn:
            conn.execute(sql)
        conn.close()
        return config

    def test_renamed_file_whose_row_at_the_cursor_changed_in_place_goes_on(self):
        # the logger updated its newest row in place (a 'last seen' value), then the
        # file was renamed while no uploader ran: its timestamp and first row are those
        # marked, so it is the file uploaded (before: refused until the user said)
        config = self.renamed_and_changed("UPDATE readings SET value = -1 WHERE id = 10")
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        err = self.run_once(config)
        self.assertIn("renamed while no uploader", err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-0.db", i) for i in range(1, 11)]
                        + [("sensor-1.db", 11), ("sensor-1.db", 12)])

    def test_renamed_file_that_cannot_be_confirmed_is_refused_in_one_line(self):
        # same device and inode, but the rows are not those uploaded: it may be another
        # file that got a freed inode, or the file changed; neither its rows nor the
        # ones already sent go (again) until the user says
        config = self.renamed_and_changed("UPDATE readings SET value = -1")
        code, _, err = run_main(["--config", config, "--once"], self.env())
        self.assertEqual(code, 1, err)
        said = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(said), 1, err)
        self.assertIn("sensor-1.db", said[0])
        self.assertIn("--start-at now", said[0])
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-0.db", i) for i in range(1, 11)])

    def forget_sensor_1(self):
        """Two files uploaded; sensor-1.db moved away (to away.db) until forgotten: the
        Sources and their clock."""
        self.logger_file("sensor-1.db")
        self.logger_file("sensor-2.db")
        now = [1000.0]
        sources = self.open_sources(lambda: now[0])
        self.assertEqual(sources.cycle(), {})
        os.rename(self.path("sensor-1.db"), self.path("away.db"))
        sources.cycle()
        now[0] += 61
        sources.cycle()
        return sources, now

    def test_forgotten_file_that_comes_back_goes_on_from_its_cursor(self):
        # gone for FORGET_AFTER, then back (under its name or another the glob finds):
        # known by its inode and the row at its cursor, it goes on from there
        sources, now = self.forget_sensor_1()
        self.assertEqual(len(self.state()["destinations"]), 1)
        self.insert(self.path("away.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("away.db"), self.path("sensor-1.db"))
        with self.assertLogs("uploader", logging.INFO) as logs:
            self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 13)
                         if f == "sensor-1.db" or i < 11])
        self.assertIn("positions were forgotten, and back", "\n".join(logs.output))
        self.assertEqual(self.state()["forgotten"], [])
        # and under another name the glob finds, after it is forgotten again
        os.rename(self.path("sensor-1.db"), self.path("away.db"))
        sources.cycle()
        now[0] += 61
        sources.cycle()
        self.insert(self.path("away.db"), readings(12, 1),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("away.db"), self.path("sensor-3.db"))
        self.assertEqual(sources.cycle(), {})
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 14)] +
                        [(i,) for i in range(1, 11)])

    def test_forgotten_file_back_changed_at_its_cursor_is_refused_not_sent_again(self):
        # its inode and first row are those of the forgotten file, its row at the cursor
        # is not (another timestamp: not a value updated in place, which would be the
        # file uploaded): its rows may be in the target: refused in one line
        sources, now = self.forget_sensor_1()
        with sqlite3.connect(self.path("away.db")) as conn:
            conn.execute("UPDATE readings SET timestamp = '2031-01-01T00:00:00Z' "
                         "WHERE id = 10")
        conn.close()
        os.rename(self.path("away.db"), self.path("sensor-1.db"))
        for _ in range(2):
            (error,) = sources.cycle().values()
        self.assertIn("forgot after it was gone", error)
        self.assertIn("--start-at now", error)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 11)])

    def test_reset_state_with_several_files_feeding_one_table(self):
        # after --reset-state one file starts (here: at its end, its own start_at: now);
        # every other file of the table still holds its rows there: each is refused
        for name in ("sensor-a.db", "sensor-b.db", "sensor-c.db"):
            self.logger_file(name)
        self.run_once(self.glob_config())
        mixed = self.config([
            {"sqlite": self.path("sensor-a.db"), "tables": ["readings"], "start_at": "now"},
            {"sqlite": self.path("sensor-[bc].db"), "tables": ["readings"]}])
        err = self.run_once(mixed, "--reset-state", expect=1)
        refused = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(refused), 2, err)
        for name, line in zip(("sensor-b.db", "sensor-c.db"), refused):
            self.assertIn(f"{name} table readings: state: raw_readings already holds 10 "
                          "rows", line)
            self.assertIn("--start-at now", line)
        expected = [(f, i) for f in ("sensor-a.db", "sensor-b.db", "sensor-c.db")
                    for i in range(1, 11)]
        self.assertOnce("raw_readings", ["_source_file", "id"], expected)
        # a lost state file: the same; --start-at now is the way out, per file
        os.remove(os.path.join(self.env()["STATE_DIR"], up.STATE_FILE))
        self.run_once(self.glob_config(), expect=1)
        self.assertOnce("raw_readings", ["_source_file", "id"], expected)
        self.run_once(self.glob_config(), "--start-at", "now")
        self.insert(self.path("sensor-b.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        self.run_once(self.glob_config())
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        expected + [("sensor-b.db", 11), ("sensor-b.db", 12)])

    def test_new_file_starts_after_a_lost_state_while_the_others_are_refused(self):
        # the check is per file: a new file holds no rows in the table, whatever the
        # other files of the node hold there
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        self.run_once(self.glob_config())
        os.remove(os.path.join(self.env()["STATE_DIR"], up.STATE_FILE))
        self.logger_file("sensor-0.db", count=3)
        err = self.run_once(self.glob_config(), expect=1)
        self.assertEqual(len([x for x in err.splitlines() if x.startswith("error:")]), 2)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-a.db", "sensor-b.db") for i in range(1, 11)]
                        + [("sensor-0.db", i) for i in range(1, 4)])

    def test_new_file_in_a_table_fed_by_others_starts_from_its_beginning(self):
        self.logger_file("sensor-a.db")
        config = self.glob_config()
        self.run_once(config)
        self.logger_file("sensor-b.db", count=5)
        self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-a.db", i) for i in range(1, 11)] +
                        [("sensor-b.db", i) for i in range(1, 6)])


class RecoverStateTest(SourcesTestCase):
    """--recover-state with many sources: each file goes on after the newest batch the
    target holds from it, only when the file now under that name is the one those rows
    came from (its row at the batch's cursor end is the row uploaded)."""

    def lose_state(self):
        os.remove(os.path.join(self.env()["STATE_DIR"], up.STATE_FILE))

    def test_three_files_two_tables_recovered_each_row_once(self):
        for name in ("sensor-a.db", "sensor-b.db", "sensor-c.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("sensor-*.db"),
                               "tables": ["readings", "events"]}], batch_size=4)
        self.run_once(config)
        self.lose_state()
        self.insert(self.path("sensor-b.db"), readings(10, 3),
                    ["timestamp", "sensor", "value"], "readings")
        self.insert(self.path("sensor-c.db"), events(4, 2, "sensor-c"), ["at", "what"],
                    "events")
        err = self.run_once(config, "--recover-state")
        recovered = [line for line in err.splitlines() if "state: recovered" in line]
        self.assertEqual(len(recovered), 6, err)
        self.assertTrue(any("sensor-b.db" in line and "readings" in line and "= [10]" in line
                            for line in recovered), recovered)
        files = ("sensor-a.db", "sensor-b.db", "sensor-c.db")
        readings_rows = [(f, i) for f in files for i in range(1, 11)] + [
            ("sensor-b.db", i) for i in range(11, 14)]
        events_rows = [(f, i) for f in files for i in range(1, 5)] + [
            ("sensor-c.db", 5), ("sensor-c.db", 6)]
        self.assertOnce("raw_readings", ["_source_file", "id"], readings_rows)
        self.assertOnce("raw_events", ["_source_file", "id"], events_rows)
        # the recovered state goes on as any other: new rows once, nothing again, and
        # a copy put in place (rsync) is known by the rows marked in the new state
        self.insert(self.path("sensor-a.db"), readings(10, 1),
                    ["timestamp", "sensor", "value"], "readings")
        shutil.copyfile(self.path("sensor-a.db"), self.path("copy.tmp"))
        os.replace(self.path("copy.tmp"), self.path("sensor-a.db"))
        self.assertIn("holds the rows uploaded", self.run_once(config))
        self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        readings_rows + [("sensor-a.db", 11)])
        self.assertOnce("raw_events", ["_source_file", "id"], events_rows)

    def test_name_reused_by_rotation_is_not_skipped(self):
        # the state is lost, and while no uploader runs logrotate moves app.db (2 rows
        # more) to app.db.1 and a new app.db starts, with rows of its own: the rows
        # under the name app.db are those of app.db.1 (its row at the batch's cursor)
        self.logger_file("app.db")
        config = self.config([{"sqlite": self.path("app.db*"), "tables": ["readings"]}])
        self.run_once(config)
        self.lose_state()
        self.insert(self.path("app.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        os.rename(self.path("app.db"), self.path("app.db.1"))
        self.another_database("app.db", 12)
        self.run_once(config, "--recover-state")
        got = collections.Counter((r["timestamp"], r["value"]) for r in
                                  self.rows("raw_readings", "timestamp", "value"))
        self.assertEqual(len(got), 12 + 12, got)
        self.assertEqual(set(got.values()), {1}, got)  # each source row once
        files = collections.Counter(r["_source_file"]
                                    for r in self.rows("raw_readings", "_source_file"))
        self.assertEqual(files, {"app.db": 10 + 12, "app.db.1": 2})
        # and the next run (no flag) finds nothing to send again
        self.run_once(config)
        self.assertEqual(len(self.rows("raw_readings", "id")), 24)

    def test_purge_of_the_row_at_the_cursor_goes_on_after_it(self):
        # the state is lost, and a retention purge deleted sensor-a's rows up to past
        # the cursor (rows 11-12 with them, never uploaded): it holds no row up to the
        # cursor, only rows after it, so going on skips none of them
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"],
                               "cursor": "timestamp"}])
        self.run_once(config)
        self.lose_state()
        self.insert(self.path("sensor-a.db"), readings(10, 5),
                    ["timestamp", "sensor", "value"], "readings")
        with sqlite3.connect(self.path("sensor-a.db")) as conn:
            conn.execute("DELETE FROM readings WHERE id <= 12")
        conn.close()
        err = self.run_once(config, "--recover-state")
        self.assertIn("sensor-a.db table readings: the newest batch from its name", err)
        self.assertIn("only rows after it (the rows up to it were deleted: a purge)", err)
        self.run_once(config)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("sensor-a.db", i) for i in [*range(1, 11), 13, 14, 15]] +
                        [("sensor-b.db", i) for i in range(1, 11)])

    def test_name_reused_without_the_old_file_is_refused_in_one_line(self):
        self.logger_file("app.db")
        self.logger_file("other.db", count=3)
        config = self.config([{"sqlite": self.path("app.db"), "tables": ["readings"]},
                              {"sqlite": self.path("other.db"), "tables": ["readings"]}])
        self.run_once(config)
        self.lose_state()
        os.remove(self.path("app.db"))
        self.another_database("app.db", 12)
        err = self.run_once(config, "--recover-state", expect=1)
        (refused,) = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertIn("app.db table readings: state: raw_readings already holds 10 rows",
                      refused)
        self.assertIn("not the file", err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [("app.db", i) for i in range(1, 11)] +
                        [("other.db", i) for i in range(1, 4)])

    def test_batches_without_a_row_mark_are_not_gone_on_from(self):
        # commits of a version before uploader.cursor_row cannot tell the file: each
        # file whose rows the table holds is refused, as without --recover-state
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        metadata = up.DeltaSink.metadata

        def older(sink, batch):
            meta = metadata(sink, batch)
            del meta["uploader.cursor_row"]
            return meta

        with mock.patch.object(up.DeltaSink, "metadata", older):
            self.run_once(config)
        self.lose_state()
        err = self.run_once(config, "--recover-state", expect=1)
        self.assertEqual(err.count("records no row at its cursor"), 2, err)
        refused = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(refused), 2, err)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("sensor-a.db", "sensor-b.db") for i in range(1, 11)])

    def test_aggregate_route_recovers_its_open_windows(self):
        aggregate = {"group_by": ["sensor"], "window": "1m", "grace": "1s",
                     "aggregations": {"value": ["sum", "count"]}}

        def minute_rows(start, count):
            return [(f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z", f"s{i % 2}", float(i))
                    for i in range(start, start + count)]

        runs = {}
        for where in ("recovered", "reference"):
            os.makedirs(self.path(where), exist_ok=True)
            for name in ("a.db", "b.db"):
                self.make(READINGS, name=name, where=where)
            config = self.config([{"sqlite": self.path(where, "*.db"),
                                   "tables": ["readings"]}], batch_size=25,
                                 enable_aggregate=True, aggregate_config=aggregate)
            for step in range(3):
                for name in ("a.db", "b.db"):
                    self.insert(self.path(where, name), minute_rows(step * 90, 90),
                                ["timestamp", "sensor", "value"], "readings")
                if where == "recovered" and step == 1:
                    os.remove(os.path.join(self.env(where)["STATE_DIR"], up.STATE_FILE))
                    err = self.run_once(config, "--recover-state", where=where)
                    self.assertEqual(err.count("state: recovered"), 2, err)
                else:
                    self.run_once(config, where=where)
            runs[where] = collections.Counter(
                tuple(sorted((k, v) for k, v in row.items() if not k.startswith("_")))
                for row in delta_rows(self.lake("aggregated_readings", where)))
        self.assertGreater(len(runs["reference"]), 5)
        self.assertEqual(runs["recovered"], runs["reference"])


class RotationTest(SourcesTestCase):
    """Rotation as logrotate does it, with positions forgotten, kept apart or moved:
    every row of every generation of a file lands exactly once (rows told apart by
    their values: each generation has its own)."""

    open_sources = GoneFileTest.open_sources
    glob_config = FileJoiningTableTest.glob_config
    GLOB = FileJoiningTableTest.GLOB

    def generation(self, name, start, count):
        """A logger file whose readings have values start/2 .. (start + count - 1)/2."""
        db = self.make(READINGS + EVENTS, name=name)
        self.insert(db, readings(start, count), ["timestamp", "sensor", "value"], "readings")
        return db

    def assertValuesOnce(self, starts):
        """raw_readings holds the readings readings(start, count) makes, each once."""
        self.assertOnce("raw_readings", ["value"],
                        [(i * 0.5,) for start, count in starts for i in range(start, start + count)])

    def test_new_file_under_the_live_name_after_a_rotated_file_is_forgotten(self):
        # sensor.db becomes sensor-<day>.db each day and a new sensor.db starts; the
        # dated file is deleted and its positions forgotten: the next new sensor.db is
        # not refused for the rows its forerunners sent under that name
        self.generation("sensor.db", 0, 5)
        now = [1000.0]
        sources = self.open_sources(lambda: now[0], pattern="sensor*.db")
        self.assertEqual(sources.cycle(), {})
        for day in range(1, 5):
            os.rename(self.path("sensor.db"), self.path(f"sensor-{day}.db"))
            self.generation("sensor.db", 100 * day, 5)
            self.assertEqual(sources.cycle(), {}, f"day {day}")
            os.remove(self.path(f"sensor-{day}.db"))
            for _ in range(3):
                now[0] += 61
                self.assertEqual(sources.cycle(), {}, f"day {day}")
        self.assertValuesOnce([(100 * day, 5) for day in range(5)])
        self.assertEqual(len(self.state()["destinations"]), 1)
        self.assertEqual(len(self.state()["forgotten"]), 4)

    def test_rotate_1_while_running_reads_every_generation_once(self):
        # logrotate `rotate 1` between two cycles: sensor-1.db is deleted, sensor-0.db
        # becomes sensor-1.db and a new sensor-0.db starts; twice
        self.generation("sensor-0.db", 0, 10)
        now = [1000.0]
        sources = self.open_sources(lambda: now[0])
        self.assertEqual(sources.cycle(), {})
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        self.generation("sensor-0.db", 100, 3)
        self.assertEqual(sources.cycle(), {})
        self.insert(self.path("sensor-1.db"), readings(10, 2),  # read from the file held
                    ["timestamp", "sensor", "value"], "readings")
        self.insert(self.path("sensor-0.db"), readings(103, 2),
                    ["timestamp", "sensor", "value"], "readings")
        os.remove(self.path("sensor-1.db"))
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        self.generation("sensor-0.db", 200, 4)
        with self.assertLogs("uploader", logging.INFO) as logs:
            self.assertEqual(sources.cycle(), {})
        self.assertEqual(len([x for x in logs.output if "positions apart, as" in x]), 1, logs.output)
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 12), (100, 5), (200, 4)])
        now[0] += 61
        sources.cycle()
        now[0] += 61
        sources.cycle()  # the deleted file's positions are forgotten, its file closed
        paths = sorted(p["source"]["path"] for p in self.state()["destinations"].values())
        self.assertEqual(paths, [os.path.realpath(self.path(f"sensor-{n}.db")) for n in (0, 1)])
        self.assertEqual(sorted(sources.files), paths)
        self.insert(self.path("sensor-1.db"), readings(105, 1),
                    ["timestamp", "sensor", "value"], "readings")
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 12), (100, 6), (200, 4)])

    def test_renames_onto_each_other_while_running(self):
        # rotate 2 (.1 -> .2, then the file -> .1, a new file), then two files swap names
        self.generation("sensor.db.1", 0, 5)
        self.generation("sensor.db", 100, 5)
        sources = self.open_sources(lambda: 1000.0, pattern="sensor.db*")
        self.assertEqual(sources.cycle(), {})
        os.rename(self.path("sensor.db.1"), self.path("sensor.db.2"))
        os.rename(self.path("sensor.db"), self.path("sensor.db.1"))
        self.generation("sensor.db", 200, 5)
        self.assertEqual(sources.cycle(), {})
        os.rename(self.path("sensor.db.1"), self.path("swap.tmp"))
        os.rename(self.path("sensor.db.2"), self.path("sensor.db.1"))
        os.rename(self.path("swap.tmp"), self.path("sensor.db.2"))
        self.assertEqual(sources.cycle(), {})
        for name, start in (("sensor.db.2", 105), ("sensor.db.1", 5), ("sensor.db", 205)):
            self.insert(self.path(name), readings(start, 1),
                        ["timestamp", "sensor", "value"], "readings")
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 6), (100, 6), (200, 6)])
        self.assertEqual(len(self.state()["destinations"]), 3)

    def test_partial_move_left_by_a_crash_is_finished(self):
        # a run that moved the positions of a renamed file one by one was killed after
        # the first: the next run moves the others, nothing is sent again
        self.logger_file("sensor-0.db")
        config = self.config([{"sqlite": self.path("sensor-*.db"),
                               "tables": ["readings", "events"]}])
        self.run_once(config)
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        path = os.path.join(self.env()["STATE_DIR"], up.STATE_FILE)
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        old, new = (os.path.realpath(self.path(n)) for n in ("sensor-0.db", "sensor-1.db"))
        key = next(k for k in state["destinations"] if k.endswith(":readings"))
        pos = state["destinations"].pop(key)
        state["destinations"][key.replace(old, new)] = {**pos, "source": {**pos["source"],
                                                                           "path": new}}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        self.insert(self.path("sensor-1.db"), events(4, 1, "sensor-0"), ["at", "what"],
                    "events")
        err = self.run_once(config)
        self.assertOnce("raw_events", ["id"], [(i,) for i in range(1, 6)])
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 11)])
        self.assertIn("renamed while no uploader", err)
        self.assertTrue(all(p["source"]["path"] == new
                            for p in self.state()["destinations"].values()))

    def test_rename_while_stopped_with_another_device_number(self):
        # the volume came back with another device number (a remount): the file renamed
        # while no uploader ran is known by its inode and the row at its cursor
        self.generation("sensor-0.db", 0, 10)
        config = self.glob_config()
        self.run_once(config)
        path = os.path.join(self.env()["STATE_DIR"], up.STATE_FILE)
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        for pos in state["destinations"].values():
            pos["file_id"][0] += 1
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        err = self.run_once(config)
        self.assertValuesOnce([(0, 12)])
        self.assertIn("renamed while no uploader", err)
        self.assertNotIn("replaced in place", err)
        (pos,) = self.state()["destinations"].values()
        self.assertEqual(pos["file_id"], list(up.file_identity(self.path("sensor-1.db"))))

    def test_new_file_that_takes_a_freed_inode_is_a_new_file(self):
        # ext4 gives a new file the inode of one just deleted: the positions of the
        # deleted file recorded it; the new file has neither the row at their cursor nor
        # the first row of that file: it is uploaded as a new file, with no error
        self.generation("sensor-1.db", 0, 10)
        self.generation("sensor-2.db", 100, 10)
        sources = self.open_sources(lambda: 1000.0)
        self.assertEqual(sources.cycle(), {})
        os.remove(self.path("sensor-1.db"))
        self.assertEqual(sources.cycle(), {})  # read to its end, closed
        self.generation("sensor-3.db", 200, 4)
        taken = up.file_identity(self.path("sensor-3.db"))
        for key, pos in sources.checkpoint.data["destinations"].items():
            if pos["source"]["path"].endswith("sensor-1.db"):
                sources.checkpoint.update(key, file_id=list(taken))
        self.assertEqual(sources.cycle(), {})
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 10), (100, 10), (200, 4)])

    def forget_then_copy_back(self, archived=None):
        """sensor-1.db (readings 0..9) is uploaded, archived (copied aside) and deleted,
        and its positions are forgotten;
        then the archived copy (`archived`: a function that changes it first) is put back
        under its own name: the Sources."""
        self.generation("sensor-1.db", 0, 10)
        self.generation("sensor-2.db", 100, 3)
        now = [1000.0]
        sources = self.open_sources(lambda: now[0])
        self.assertEqual(sources.cycle(), {})
        os.makedirs(self.path("arch"))
        shutil.copy(self.path("sensor-1.db"), self.path("arch/sensor-1.db"))
        os.remove(self.path("sensor-1.db"))
        for _ in range(3):
            now[0] += 61
            self.assertEqual(sources.cycle(), {})
        self.assertEqual(len(self.state()["forgotten"]), 1)
        if archived:
            archived(self.path("arch/sensor-1.db"))
        self.put_back()
        return sources

    def put_back(self):
        """Copy arch/sensor-1.db to sensor-1.db, with another inode than the forgotten
        file's (the file system may give the copy the inode it freed)."""
        taken = self.state()["forgotten"][0]["file_id"][1]
        for n in range(20):
            shutil.copy(self.path("arch/sensor-1.db"), self.path("copy.tmp"))
            if up.file_identity(self.path("copy.tmp"))[1] != taken:
                break
            os.rename(self.path("copy.tmp"), self.path(f"arch/holds-inode-{n}"))
        os.rename(self.path("copy.tmp"), self.path("sensor-1.db"))
        self.assertNotEqual(up.file_identity(self.path("sensor-1.db"))[1], taken)

    def test_copy_of_a_forgotten_file_put_back_goes_on_from_its_cursor(self):
        # a copy (another inode) of a file whose positions were forgotten, put back
        # under its name: it holds the row uploaded at their cursor, so it is that file
        # back and goes on from there (before: uploaded again from its first row)
        sources = self.forget_then_copy_back()
        with self.assertLogs("uploader", logging.INFO) as logs:
            self.assertEqual(sources.cycle(), {})
        said = [line for line in logs.output if "its positions move with it" in line]
        self.assertEqual(len(said), 1, logs.output)
        self.assertFalse([line for line in logs.output if "is new to this state" in line],
                         logs.output)
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 12), (100, 3)])
        self.assertEqual(self.state()["forgotten"], [])

    def test_copy_of_a_forgotten_file_put_back_between_runs(self):
        # the reviewer's case, one run at a time (--forget-after 0): each row once
        self.generation("sensor-1.db", 0, 10)
        config = self.glob_config()
        self.run_once(config, "--forget-after", "0")
        os.makedirs(self.path("arch"))
        shutil.copy(self.path("sensor-1.db"), self.path("arch/sensor-1.db"))
        os.remove(self.path("sensor-1.db"))
        self.run_once(config, "--forget-after", "0")
        self.run_once(config, "--forget-after", "0")
        self.assertEqual(len(self.state()["forgotten"]), 1)
        self.put_back()
        self.insert(self.path("sensor-1.db"), readings(10, 2),
                    ["timestamp", "sensor", "value"], "readings")
        err = self.run_once(config, "--forget-after", "0")
        self.assertNotIn("is new to this state", err)
        self.assertValuesOnce([(0, 12)])

    def test_copy_of_a_forgotten_file_under_another_name_goes_on_from_its_cursor(self):
        sources = self.forget_then_copy_back()
        os.rename(self.path("sensor-1.db"), self.path("sensor-7.db"))
        self.assertEqual(sources.cycle(), {})
        self.assertValuesOnce([(0, 10), (100, 3)])

    def test_older_copy_of_a_forgotten_file_put_back_is_refused_in_one_line(self):
        # the copy put back lacks the last rows uploaded (archived before they were
        # written, or edited): it begins as the forgotten file but has not the row at
        # its cursor; its rows may be in the target: refused, nothing sent again
        def older(path):
            with sqlite3.connect(path) as conn:
                conn.execute("DELETE FROM readings WHERE id > 6")
            conn.close()
        sources = self.forget_then_copy_back(older)
        with self.assertLogs("uploader", logging.INFO) as logs:
            failed = sources.cycle()
        where = (os.path.realpath(self.path("sensor-1.db")), "")
        self.assertEqual(list(failed), [where], failed)
        self.assertIn("not the row uploaded", failed[where])
        self.assertEqual(len([x for x in logs.output if x.startswith("ERROR")]), 1,
                         logs.output)
        self.assertEqual(list(sources.cycle()), [where])  # (and at each cycle)
        self.assertValuesOnce([(0, 10), (100, 3)])


class StatusTest(SourcesTestCase):
    """--status and --status --json: one line per source."""

    def test_status_lists_every_source(self):
        for name in ("a.db", "b.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("?.db"), "tables": ["readings", "events"]}])
        self.run_once(config)
        self.insert(self.path("b.db"), readings(10, 6), ["timestamp", "sensor", "value"],
                    "readings")
        code, out, err = run_main(["--config", config, "--status", "--json"], self.env())
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        got = {(os.path.basename(x["file"]), x["source_table"]):
               (x["pending_rows"], x["uploaded_rows"], x["cursor"], x["last_error"])
               for x in report["sources"]}
        self.assertEqual(got, {("a.db", "readings"): (0, 10, [10], None),
                               ("a.db", "events"): (0, 4, [4], None),
                               ("b.db", "readings"): (6, 10, [10], None),
                               ("b.db", "events"): (0, 4, [4], None)})
        self.assertTrue(all(x["last_upload_at"] for x in report["sources"]))
        code, out, _ = run_main(["--config", config, "--status"], self.env())
        lines = [line for line in out.splitlines() if line.startswith(("a.db", "b.db"))]
        self.assertEqual(len(lines), 4, out)
        self.assertRegex(next(x for x in lines if "b.db" in x and "readings" in x),
                         r"b\.db\s+readings\s+raw_readings\s+\[10\]\s+6\s+0\s+10\s")

    def test_status_without_the_config_reads_the_sources_from_the_state(self):
        for name in ("a.db", "b.db"):
            self.logger_file(name)
        self.run_once(self.config([{"sqlite": self.path("?.db"), "tables": [
            {"readings": {"databricks_table": "logger"}}]}]))
        code, out, err = run_main(["--status", "--json"], self.env())
        self.assertEqual(code, 0, err)
        got = [(os.path.basename(x["file"]), x["target_table"], x["uploaded_rows"],
                x["pending_rows"]) for x in json.loads(out)["sources"]]
        self.assertEqual(got, [("a.db", "raw_logger", 10, 0), ("b.db", "raw_logger", 10, 0)])

    def test_status_shows_the_last_error_of_a_failing_source(self):
        a = self.logger_file("a.db")
        config = self.config([{"sqlite": a, "tables": ["readings", "events"]}])
        self.run_once(config)
        conn = sqlite3.connect(a)
        with conn:  # rows deleted behind the cursor: the table now ends before it
            conn.execute("DELETE FROM events WHERE id > 1")
        self.run_once(config, expect=1)
        code, out, _ = run_main(["--config", config, "--status", "--json"], self.env())
        errors = {x["source_table"]: x["last_error"] for x in json.loads(out)["sources"]}
        self.assertIsNone(errors["readings"])
        self.assertIn("ends before the saved cursor", errors["events"])


class SingleSourceStatusTest(SourcesTestCase):
    """One source keeps its --status block, which now names the last error."""

    def test_last_error_shown_and_cleared(self):
        db = self.logger_file("logger.db")
        self.upload(db, "--table", "events")
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("DELETE FROM events WHERE id > 1")
        self.upload(db, "--table", "events", expect=1)
        code, out, err = run_main(["--sqlite", db, "--table", "events", "--status"],
                                  self.env())
        self.assertEqual(code, 0, err)
        line = next(x for x in out.splitlines() if x.startswith("last error"))
        self.assertIn("ends before the saved cursor", line)
        self.insert(db, events(10, 5), ["at", "what"], "events")  # past the cursor again
        self.upload(db, "--table", "events")
        code, out, _ = run_main(["--sqlite", db, "--table", "events", "--status", "--json"],
                                self.env())
        self.assertIsNone(json.loads(out)["last_error"])

    def test_an_action_on_one_table_refuses_two(self):
        db = self.logger_file("logger.db")
        code, _, err = run_main(["--sqlite", db, "--table", "readings", "--table", "events",
                                 "--print-ddl"], self.env())
        self.assertEqual(code, 2)
        self.assertIn("give --table once", err)


class WarehouseTest(SourcesTestCase):
    """Many sources into the SQL warehouse (tests/fake_warehouse.py)."""

    def setUp(self):
        super().setUp()
        from tests import fake_warehouse
        self.addCleanup(setattr, fake_warehouse, "WAREHOUSE", fake_warehouse.WAREHOUSE)
        self.addCleanup(setattr, up.DatabricksSink, "connector", up.DatabricksSink.connector)
        up.DatabricksSink.connector = fake_warehouse
        self.warehouse = fake_warehouse.WAREHOUSE = fake_warehouse.Warehouse(
            self.path("warehouse"))

    def warehouse_env(self, **extra):
        return {"DATABRICKS_HOST": "dbc-1.cloud.databricks.com", "DATABRICKS_TOKEN": "t0k",
                "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/w1",
                "DATABRICKS_DATABASE": "main.sensors", "STATE_DIR": self.path("state"),
                "SOURCE_ID": "node-1", **extra}

    def test_rows_of_two_files_land_once_with_their_file(self):
        for name in ("sensor-1.db", "sensor-2.db"):
            self.logger_file(name)
        # a table made by an older version, without _source_file: it gains the column
        self.warehouse.query(
            'CREATE TABLE "main.sensors.raw_events" (id BIGINT, "at" VARCHAR, what VARCHAR, '
            "_source_id VARCHAR, _batch_id VARCHAR, _uploaded_at TIMESTAMP WITH TIME ZONE, "
            "_rescued_data VARCHAR)")
        config = self.config([{"sqlite": self.path("sensor-*.db"),
                               "tables": ["readings", "events"]}])
        for volume in ("none", "none"):  # the second run finds nothing new
            code, _, err = run_main(["--config", config, "--once"],
                                    self.warehouse_env(DATABRICKS_VOLUME=volume))
            self.assertEqual(code, 0, err)
        for table, count in (("raw_readings", 10), ("raw_events", 4)):
            got = collections.Counter((r["_source_file"], r["id"]) for r in
                                      self.warehouse.rows(f"main.sensors.{table}", "id"))
            self.assertEqual(got, collections.Counter(
                (f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, count + 1)))
        batches = {r["_batch_id"] for r in self.warehouse.rows("main.sensors.raw_readings",
                                                               "id")}
        self.assertEqual(len(batches), 2)


    def test_lost_state_refuses_each_file_whose_rows_the_table_holds(self):
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        env = self.warehouse_env(DATABRICKS_VOLUME="none")
        code, _, err = run_main(["--config", self.config([{
            "sqlite": self.path("sensor-*.db"), "tables": ["readings"]}]), "--once"], env)
        self.assertEqual(code, 0, err)
        os.remove(os.path.join(self.path("state"), up.STATE_FILE))
        self.logger_file("sensor-0.db", count=3)
        mixed = self.config([
            {"sqlite": self.path("sensor-a.db"), "tables": ["readings"], "start_at": "now"},
            {"sqlite": self.path("sensor-[0b].db"), "tables": ["readings"]}])
        code, _, err = run_main(["--config", mixed, "--once"], env)
        self.assertEqual(code, 1, err)
        (refused,) = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertIn("sensor-b.db table readings: state: raw_readings already holds 10 rows",
                      refused)
        got = collections.Counter((r["_source_file"], r["id"]) for r in
                                  self.warehouse.rows("main.sensors.raw_readings", "id"))
        self.assertEqual(got, collections.Counter(
            [(f, i) for f in ("sensor-a.db", "sensor-b.db") for i in range(1, 11)] +
            [("sensor-0.db", i) for i in range(1, 4)]))


    def test_recover_state_of_many_sources_is_refused_in_one_line(self):
        # the warehouse keeps rows, not the mark of the row at each batch's cursor
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        code, _, err = run_main(["--config", config, "--once", "--recover-state"],
                                self.warehouse_env(DATABRICKS_VOLUME="none"))
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("--recover-state with many sources is not available on the "
                      "databricks target", err)
        self.assertIn("--start-at now", err)

    def test_rows_of_a_version_before_source_file_count_for_every_file(self):
        # the node's rows in a table written before rows said their file (no
        # _source_file column) may be of any file: each file new to the state is refused
        self.warehouse.query(
            'CREATE TABLE "main.sensors.raw_readings" (id BIGINT, "timestamp" TIMESTAMP '
            "WITH TIME ZONE, sensor VARCHAR, value DOUBLE, _source_id VARCHAR, _batch_id "
            "VARCHAR, _uploaded_at TIMESTAMP WITH TIME ZONE, _rescued_data VARCHAR)")
        self.warehouse.query(
            "INSERT INTO \"main.sensors.raw_readings\" (id, _source_id, _batch_id) VALUES "
            "(1, 'node-1', 'f00d-1'), (2, 'node-1', 'f00d-1'), (1, 'node-2', 'beef-1')")
        for name in ("sensor-a.db", "sensor-b.db"):
            self.logger_file(name)
        code, _, err = run_main(["--config", self.config([{
            "sqlite": self.path("sensor-*.db"), "tables": ["readings"]}]), "--once"],
            self.warehouse_env(DATABRICKS_VOLUME="none"))
        self.assertEqual(code, 1, err)
        refused = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(refused), 2, err)
        self.assertIn("already holds 2 rows", refused[0])
        self.assertEqual(len(self.warehouse.rows("main.sensors.raw_readings", "id")), 3)


class ZerobusTest(SourcesTestCase):
    """Many sources to Zerobus Ingest (tests/zerobus_fake.py)."""

    def test_rows_of_two_files_with_the_same_keys_are_both_in_the_deduped_view(self):
        from tests.zerobus_fake import ZerobusFake
        fake = ZerobusFake()
        address = fake.start()
        self.addCleanup(fake.stop)
        for name in ("sensor-1.db", "sensor-2.db"):
            self.logger_file(name)
        env = {"TARGET": "zerobus", "DATABRICKS_HOST": address,
               "ZEROBUS_ENDPOINT": f"http://{address}",
               "ZEROBUS_WORKSPACE_ID": fake.workspace_id, "DATABRICKS_CLIENT_ID": "sp-id",
               "DATABRICKS_CLIENT_SECRET": "sp-secret", "DATABRICKS_DATABASE": "main.sensors",
               "STATE_DIR": self.path("state"), "SOURCE_ID": "node-1"}
        code, ddl, err = run_main(["--sqlite", self.path("sensor-1.db"), "--table",
                                   "readings", "--print-ddl"], env)
        self.assertEqual(code, 0, err)
        fake.create_table("main.sensors.raw_readings", ddl.split(";\n")[0])
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}])
        code, _, err = run_main(["--config", config, "--once"], env)
        self.assertEqual(code, 0, err)
        # ids 1..10 in each file: the same row keys, two files
        got = collections.Counter((r["_source_file"], r["id"])
                                  for r in fake.deduped("main.sensors.raw_readings"))
        self.assertEqual(got, collections.Counter(
            (f, i) for f in ("sensor-1.db", "sensor-2.db") for i in range(1, 11)))


@slow
class CrashTest(SourcesTestCase):
    """A kill in one source's batch never replays another's."""

    def test_kill_in_one_source_replays_nothing_of_another(self):
        # a.db and b.db are read by two workers at once, each file's readings (5 batches
        # of 7) then events: each kill falls in some source's batch while positions of
        # other files write to the same target tables; a Delta app id or batch ids shared
        # between files would settle a batch that did not land as landed (rows lost) or
        # one that did as not (rows twice)
        for hook, k in (("delta-before", 1), ("delta-after", 2), ("delta-before", 4),
                        ("delta-after", 6), ("delta-before", 7), ("delta-after", 9)):
            with self.subTest(hook=hook, k=k):
                done = self.kill_and_run_again(hook, k)
                # (two files are read at once: a kill may leave a batch of each in flight)
                settled = [line for line in done.stderr.splitlines()
                           if "state: in-flight batch" in line]
                self.assertIn(len(settled), (1, 2), done.stderr)

    def kill_and_run_again(self, hook, k, *flags, between=None):
        """a.db and b.db (readings: 30 rows, events: 4) uploaded in batches of 7, killed
        at hook `hook`'s k-th time, `between(env)`, then run again with `flags`: every
        row once. The second run's CompletedProcess."""
        self.setUp()
        for name in ("a.db", "b.db"):
            self.logger_file(name, count=30)
        config = self.config([{"sqlite": self.path("?.db"),
                               "tables": ["readings", "events"]}], batch_size=7)
        env = self.env()
        died = run_driver(hook, k, ["--config", config, "--once"], env)
        self.assertEqual(died.returncode, -9, died.stderr)
        if between:
            between(env)
        done = run_driver("none", 0, ["--config", config, "--once", *flags], env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertOnce("raw_readings", ["_source_file", "id"],
                        [(f, i) for f in ("a.db", "b.db") for i in range(1, 31)])
        self.assertOnce("raw_events", ["_source_file", "id"],
                        [(f, i) for f in ("a.db", "b.db") for i in range(1, 5)])
        return done

    def test_kill_then_state_lost_then_recover_state(self):
        # the state goes with the kill: --recover-state takes each file up after its
        # newest commit (a batch in flight landed or not), so nothing goes twice or is lost
        for hook, k in (("delta-before", 3), ("delta-after", 5)):
            with self.subTest(hook=hook, k=k):
                done = self.kill_and_run_again(
                    hook, k, "--recover-state",
                    between=lambda env: os.remove(os.path.join(env["STATE_DIR"],
                                                               up.STATE_FILE)))
                self.assertIn("state: recovered", done.stderr)

    def test_kill_in_the_first_batch_then_renamed_while_down(self):
        # killed after the first batch's commit, before the checkpoint: no cursor yet, a
        # batch in flight; renamed while down, the file is recognised by the row at the
        # end of that batch, and the batch is settled, not sent again
        self.logger_file("sensor-0.db", count=20)
        config = self.config([{"sqlite": self.path("sensor-*.db"), "tables": ["readings"]}],
                             batch_size=7)
        died = run_driver("delta-after", 1, ["--config", config, "--once"], self.env())
        self.assertEqual(died.returncode, -9, died.stderr)
        os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
        done = run_driver("none", 0, ["--config", config, "--once"], self.env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("renamed while no uploader", done.stderr)
        self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 21)])

    def test_kill_while_the_positions_of_a_renamed_file_move(self):
        # renamed while no uploader ran; the next run is killed at its first state writes
        # (the move of both tables' positions, then the first batch): nothing twice
        for hook, k in (("save-before", 1), ("save-after", 1), ("save-after", 2),
                        ("torn-state", 1)):
            with self.subTest(hook=hook, k=k):
                self.setUp()
                self.logger_file("sensor-0.db")
                config = self.config([{"sqlite": self.path("sensor-*.db"),
                                       "tables": ["readings", "events"]}])
                self.run_once(config)
                self.insert(self.path("sensor-0.db"), readings(10, 3),
                            ["timestamp", "sensor", "value"], "readings")
                os.rename(self.path("sensor-0.db"), self.path("sensor-1.db"))
                died = run_driver(hook, k, ["--config", config, "--once"], self.env())
                self.assertEqual(died.returncode, -9, died.stderr)
                done = run_driver("none", 0, ["--config", config, "--once"], self.env())
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertOnce("raw_readings", ["id"], [(i,) for i in range(1, 14)])
                self.assertOnce("raw_events", ["id"], [(i,) for i in range(1, 5)])

    def test_signal_mid_cycle_exits_0_and_the_next_run_goes_on(self):
        # the signal lands while the main thread waits for the two workers: each
        # finishes the batch it has, no new one starts, nothing is left in flight
        for signame in ("SIGTERM", "SIGINT"):
            with self.subTest(signal=signame):
                self.setUp()
                for name in ("a.db", "b.db"):
                    self.logger_file(name, count=30)
                config = self.config([{"sqlite": self.path("?.db"),
                                       "tables": ["readings", "events"]}], batch_size=7)
                stopped = run_driver(f"{signame.lower()}-delta-before", 3,
                                     ["--config", config, "--interval", "0.2"], self.env(),
                                     timeout=60)
                self.assertEqual(stopped.returncode, 0, stopped.stderr)
                self.assertIn(f"signal {signame}", stopped.stderr)
                self.assertNotIn("Traceback", stopped.stderr)
                positions = self.state()["destinations"].values()
                self.assertEqual([p["inflight"] for p in positions], [None] * len(positions))
                self.assertLess(sum(p["rows"] for p in positions), 68)
                done = run_driver("none", 0, ["--config", config, "--once"], self.env())
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertOnce("raw_readings", ["_source_file", "id"],
                                [(f, i) for f in ("a.db", "b.db") for i in range(1, 31)])
                self.assertOnce("raw_events", ["_source_file", "id"],
                                [(f, i) for f in ("a.db", "b.db") for i in range(1, 5)])


if __name__ == "__main__":
    unittest.main()
