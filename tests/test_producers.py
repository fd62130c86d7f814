"""The whole pipeline on databases as real edge producers write them (tests/producers.py):
rows in = rows landed, values and types against sqlite3, the cursor chosen and the log
line that says why, values that cannot be read counted and kept in _rescued_data."""

import datetime as dt
import json
import os
import shutil
import signal
import sqlite3

from tests import producers
from tests.helpers import (PipelineTestCase, delta_rows, delta_schema, run_driver, run_main,
                           slow, up)
from tests.test_databricks import WarehouseTestCase

UTC = dt.timezone.utc
LINEAGE = set(up.LINEAGE_COLUMNS)


def epoch(seconds):
    """An epoch number as the instant a TIMESTAMP column must hold (microseconds)."""
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=round(seconds * 1e6))


def us_text(text):
    """'01/02/2020 13:00' as a US spreadsheet means it (month first), in UTC."""
    return dt.datetime.strptime(text, "%m/%d/%Y %H:%M").replace(tzinfo=UTC)


def source_rows(db, table):
    """Every row of the source table as dicts, in rowid order."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid')]
    finally:
        conn.close()


def comparable(row):
    """A landed row without lineage columns, its datetimes in one tzinfo."""
    return {k: v.astimezone(UTC) if isinstance(v, dt.datetime) else v
            for k, v in row.items() if k not in LINEAGE}


def make_julian(path, rows):
    """A log table stamped by the SQLite idiom DEFAULT (julianday('now')), 7 s apart."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, "
                     "ts REAL NOT NULL DEFAULT (julianday('now')), v REAL)")
        conn.executemany("INSERT INTO log (ts, v) VALUES "
                         "(julianday('2024-05-01 12:00:00', ? || ' seconds'), ?)",
                         [(str(7 * i), i / 3) for i in range(rows)])
    conn.close()
    return path


class ProducerTestCase(PipelineTestCase):

    def assert_landed_as_source(self, db, table, target, times):
        """Target rows == source rows, exactly once, the columns in `times` converted
        by their function (each row's other values as sqlite3 returns them)."""
        expected = [{k: (times[k](v) if k in times and v is not None else v)
                     for k, v in row.items()} for row in source_rows(db, table)]
        landed = [comparable(r) for r in self.landed(target)]
        self.assertEqual(len(landed), len(expected), "rows in != rows landed")
        self.assertEqual(sorted(landed, key=repr), sorted(expected, key=repr))

    def two_cycles(self, make, name, first, more, *flags, **kw):
        """The producer writes `first` rows, a cycle runs, it writes `more`, a cycle
        runs; return the database and the first cycle's log."""
        db = make(self.path(name), first, **kw)
        log = self.upload(db, *flags)
        make(db, more, start=first, **kw)
        self.upload(db, *flags)
        return db, log

    def assert_types(self, target, **kinds):
        schema = delta_schema(self.lake(target))
        self.assertEqual({k: schema[k] for k in kinds}, kinds)

    def status(self, db, *flags):
        code, out, err = run_main(["--sqlite", db, "--status", *flags], self.env())
        self.assertEqual(code, 0, err)
        return out


class WeewxTest(ProducerTestCase):
    """weewx archive: dateTime INTEGER PRIMARY KEY (epoch s), 118 columns, mostly NULL."""

    def test_archive_lands_whole_with_datetime_typed_and_the_rowid_cursor(self):
        db, log = self.two_cycles(producers.make_weewx, "weewx.sdb", 700, 300,
                                  "--batch-size", "256")
        self.assert_landed_as_source(db, "archive", "raw_archive", {"dateTime": epoch})
        self.assert_types("raw_archive", dateTime="timestamp", usUnits="long",
                          outTemp="double", windDir="double")
        self.assertRegex(log, r"cursor: rowid \(dateTime\) on table 'archive': 'dateTime' "
                              r"is the table's INTEGER PRIMARY KEY")
        self.assertIn("timestamp: 'dateTime' read as epoch numbers", log)
        self.assertRegex(self.status(db), r"why +'dateTime' is the table's INTEGER PRIMARY")


class HomeAssistantTest(ProducerTestCase):
    """Home Assistant recorder states: epoch FLOAT last_updated_ts beside legacy columns
    that are always NULL; last_changed_ts NULL for most rows."""

    TIMES = {"last_updated_ts": epoch}

    def test_a_legacy_datetime_column_that_is_always_null_is_never_the_cursor(self):
        # today: the DATETIME column last_changed (all NULL) leads a pair cursor, so no
        # row is ever uploaded and each cycle only warns
        db, log = self.two_cycles(producers.make_ha_states, "home-assistant_v2.db", 500,
                                  250, "--batch-size", "128")
        self.assert_landed_as_source(db, "states", "raw_states", self.TIMES)
        self.assert_types("raw_states", last_updated_ts="timestamp",
                          last_changed_ts="double", last_changed="timestamp",
                          context_id_bin="binary", state="string")
        self.assertRegex(log, r"cursor: pair \(last_updated_ts, state_id\) on table "
                              r"'states': 'last_updated_ts' sorts as time and is not NULL "
                              r"in the sampled rows; passed over: 'last_changed_ts' is NULL")
        self.assertNotIn("NULL 'last_changed'", log)
        status = self.status(db)
        self.assertRegex(status, r"unordered +0 rows\n")
        self.assertRegex(status, r"pending +0 rows")

    def test_a_fresh_database_types_last_updated_ts_as_a_timestamp(self):
        # today: no column is recognised, last_updated_ts lands as a DOUBLE
        db = producers.make_ha_states(self.path("home-assistant_v2.db"), 300, legacy=False)
        self.upload(db)
        self.assert_landed_as_source(db, "states", "raw_states", self.TIMES)
        self.assert_types("raw_states", last_updated_ts="timestamp", last_changed="string")

    def test_events_are_ordered_by_time_fired_ts(self):
        # today: no column is recognised, time_fired_ts lands as a DOUBLE
        db, log = self.two_cycles(producers.make_ha_events, "home-assistant_v2.db", 300,
                                  120, "--batch-size", "64")
        self.assert_landed_as_source(db, "events", "raw_events", {"time_fired_ts": epoch})
        self.assert_types("raw_events", time_fired_ts="timestamp", time_fired="string")
        self.assertIn("cursor: pair (time_fired_ts, event_id) on table 'events'", log)

    def test_rows_the_pair_cursor_cannot_order_are_said_each_cycle_and_in_status(self):
        db = producers.make_ha_states(self.path("home-assistant_v2.db"), 100)
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE states SET last_updated_ts = NULL WHERE state_id IN (1, 7)")
        conn.close()
        forced = ("--cursor", "timestamp", "--timestamp-col", "last_updated_ts")
        log = self.upload(db, *forced)
        self.assertIn("2 rows have a NULL 'last_updated_ts' (rowid 1..7) and are not "
                      "uploaded", log)
        self.assertEqual(len(self.landed("raw_states")), 98)
        self.assertRegex(self.status(db, *forced),
                         r"unordered +2 rows with a NULL last_updated_ts \(rowid 1\.\.7\)")
        # left to choose, the tool gives such a table the rowid cursor: every row lands
        log = self.upload(db, where="auto")
        self.assertIn("passed over: 'last_updated_ts' is NULL in 2 of the sampled rows", log)
        self.assertEqual(len(self.landed("raw_states", where="auto")), 100)

    def test_a_changed_cursor_on_existing_state_is_one_line_with_the_fix(self):
        db = producers.make_ha_states(self.path("home-assistant_v2.db"), 50, legacy=False)
        self.upload(db, "--cursor", "rowid")
        # cursor: auto keeps the cursor the state was written with while it fits
        code, _out, err = run_main(["--sqlite", db, "--once"], self.env())
        self.assertEqual(code, 0, err)
        self.assertIn("cursor: keeping rowid (state_id), recorded in the state, over "
                      "today's choice pair (last_updated_ts, state_id)", err)
        code, out, err = run_main(["--sqlite", db, "--status"], self.env())  # so does status
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"cursor\s+rowid \(state_id\)")
        # a cursor forced to another kind is refused in one line that names the fix
        code, _out, err = run_main(["--sqlite", db, "--once", "--cursor", "timestamp"],
                                   self.env())
        self.assertEqual(code, 2, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("was written with the cursor rowid (state_id), but this run chose "
                      "pair (last_updated_ts, state_id); to keep the old cursor set "
                      "--cursor rowid (CURSOR), or --reset-state", err)
        self.upload(db, "--cursor", "rowid")  # the fix it names works

    def test_a_copy_after_the_recorder_updated_rows_in_place_goes_on(self):
        # since 2024.4 the recorder keeps last_reported_ts: an entity that reports the
        # same state again has its newest row updated in place, the row at the cursor
        # among them. The file copied then (rsync, a restore) or on another device (a
        # volume remounted) is the file uploaded: before, it was refused every cycle
        db = producers.make_ha_states(self.path("home-assistant_v2.db"), 40, legacy=False)

        def write(conn, start, count):
            rows = [producers.ha_state_row(i) for i in range(start, start + count)]
            conn.executemany(f"INSERT INTO states VALUES ({', '.join('?' * 20)})",
                             [row + (row[8],) for row in rows])

        conn = sqlite3.connect(db)
        with conn:
            conn.execute("ALTER TABLE states ADD COLUMN last_reported_ts FLOAT")
            conn.execute("UPDATE states SET last_reported_ts = last_updated_ts")
        self.upload(db)
        with conn:  # the 5 entities report their states again
            conn.execute("UPDATE states SET last_reported_ts = last_reported_ts + 60 "
                         "WHERE state_id > 35")
        conn.close()
        shutil.copyfile(db, db + ".tmp")
        os.replace(db + ".tmp", db)
        conn = sqlite3.connect(db)
        with conn:
            write(conn, 40, 10)
        conn.close()
        err = self.upload(db)
        self.assertIn("(another inode: replaced in place)", err)
        self.assertIn("updated in place", err)
        self.assert_once(self.landed("raw_states"), "state_id", range(1, 51))
        self.assertEqual({r["last_reported_ts"] for r in self.landed("raw_states")
                          if r["state_id"] == 40}, {producers.ha_state_row(39)[8]})


class CsvImportTest(ProducerTestCase):
    """A CSV imported with the sqlite3 shell: all TEXT, dates like '12/31/2019 23:00'."""

    def test_us_dates_get_the_rowid_cursor_and_land_as_timestamps(self):
        # today: the text is ordered alphabetically, so the January rows added after
        # '12/31/2019 ...' sort before the cursor and are never uploaded; and no value
        # parses, so every Date lands NULL
        db, log = self.two_cycles(producers.make_csv_import, "import.db", 40, 60,
                                  "--batch-size", "16")
        self.assert_landed_as_source(db, "readings", "raw_readings", {"Date": us_text})
        self.assert_types("raw_readings", Date="timestamp", Temperature="string")
        self.assertRegex(log, r"cursor: rowid \(rowid\) on table 'readings': 'Date' does "
                              r"not sort as time: text in %m/%d/%Y %H:%M sorts "
                              r"alphabetically, not as time, so it cannot order the rows; "
                              r"'Date' is still typed TIMESTAMP")

    def test_a_value_that_cannot_be_read_is_rescued_and_counted(self):
        db = producers.make_csv_import(self.path("import.db"), 30)
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("INSERT INTO readings VALUES ('n/a', '20.0', '41')")
        conn.close()
        log = self.upload(db)
        bad = [r for r in self.landed("raw_readings") if r["_rescued_data"]]
        self.assertEqual([(r["Date"], json.loads(r["_rescued_data"])) for r in bad],
                         [(None, {"Date": "n/a"})])
        self.assertRegex(log, r"31 rows -> raw_readings .*, 1 rows with rescued values")

    def test_day_and_month_that_read_both_ways_are_said_and_can_be_forced(self):
        db = self.make(producers.CSV_IMPORT_DDL, [
            (f"{d:02d}/02/2020 13:00", "20.5", "40") for d in range(1, 13)])
        log = self.upload(db)
        self.assertIn("every sampled value such as '01/02/2020 13:00' reads as "
                      "%m/%d/%Y %H:%M and as %d/%m/%Y %H:%M: chose %m/%d/%Y %H:%M; to "
                      "read it the other way, set --timestamp-format '%d/%m/%Y %H:%M'", log)
        self.assertEqual(min(r["Date"] for r in self.landed("raw_readings")),
                         dt.datetime(2020, 1, 2, 13, tzinfo=UTC))
        self.upload(db, "--timestamp-format", "%d/%m/%Y %H:%M", where="forced")
        self.assertEqual(sorted(r["Date"] for r in self.landed("raw_readings", "forced")),
                         [dt.datetime(2020, 2, d, 13, tzinfo=UTC) for d in range(1, 13)])

    def test_one_value_that_reads_only_day_first_decides(self):
        db = self.make(producers.CSV_IMPORT_DDL, [
            ("01/02/2020 13:00", "1", "1"), ("25/02/2020 13:00", "2", "2")])
        self.upload(db)
        self.assertEqual(sorted(r["Date"] for r in self.landed("raw_readings")),
                         [dt.datetime(2020, 2, 1, 13, tzinfo=UTC),
                          dt.datetime(2020, 2, 25, 13, tzinfo=UTC)])

    def test_a_text_column_passed_over_keeps_its_text(self):
        # 'time' is a candidate by name but loses to 'date'; it stays STRING, as stored
        db = self.make('CREATE TABLE "log"("date" TEXT, "time" TEXT, "v" TEXT)',
                       [("2020-01-02", "Jan 2 2020", "a"), ("2020-01-03", "Jan 3 2020", "b")])
        log = self.upload(db)
        self.assertIn("cursor: pair (date, rowid)", log)
        self.assertEqual(sorted(r["time"] for r in self.landed("raw_log")),
                         ["Jan 2 2020", "Jan 3 2020"])

    def test_forcing_the_timestamp_cursor_on_text_that_sorts_alphabetically_is_exit_2(self):
        db = producers.make_csv_import(self.path("import.db"), 5)
        code, _out, err = run_main(["--sqlite", db, "--once", "--cursor", "timestamp"],
                                   self.env())
        self.assertEqual(code, 2)
        self.assertEqual(err, "error: config: cursor is timestamp, but 'Date' does not "
                              "sort as time: text in %m/%d/%Y %H:%M sorts alphabetically, "
                              "not as time; set --cursor (CURSOR) to auto or rowid\n")


class TelegrafTest(ProducerTestCase):
    """Telegraf outputs.sql: RFC 3339 text, no key, four rows per timestamp."""

    def test_rows_sharing_a_timestamp_land_once_across_batch_edges(self):
        db, log = self.two_cycles(producers.make_telegraf, "metrics.db", 203, 101,
                                  "--batch-size", "7")
        self.assert_landed_as_source(db, "cpu", "raw_cpu",
                                     {"timestamp": dt.datetime.fromisoformat})
        self.assert_types("raw_cpu", timestamp="timestamp", usage_idle="double")
        self.assertIn("cursor: pair (timestamp, rowid) on table 'cpu': 'timestamp' sorts "
                      "as time", log)


class JuliandayTest(ProducerTestCase):
    """The SQLite idiom `DEFAULT (julianday('now'))`: REAL day numbers around 2.46e6."""

    def test_julian_days_land_as_their_instants(self):
        # today: read as epoch seconds, every row lands in January 1970
        db = make_julian(self.path("julian.db"), 200)
        conn = sqlite3.connect(db)
        truth = dict(conn.execute("SELECT id, strftime('%Y-%m-%d %H:%M:%f', ts) FROM log"))
        conn.close()
        log = self.upload(db, "--batch-size", "50")
        self.assertIn("timestamp: 'ts' read as julianday() numbers", log)
        for row in self.landed("raw_log"):
            expected = dt.datetime.fromisoformat(truth[row["id"]]).replace(tzinfo=UTC)
            self.assertEqual(row["ts"], expected, row)


class JulianLagTest(ProducerTestCase):

    def test_cursor_lag_reads_julian_days(self):
        # today: julianday() read as epoch seconds is always older than the lag, so the
        # row stamped now is not held back
        db = self.make("CREATE TABLE log (id INTEGER PRIMARY KEY, "
                       "ts REAL NOT NULL DEFAULT (julianday('now')), v REAL)")
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("INSERT INTO log (ts, v) VALUES (julianday('now', '-2 hours'), 1)")
            conn.execute("INSERT INTO log (v) VALUES (2)")
        conn.close()
        log = self.upload(db, "--cursor-lag", "3600")
        self.assertEqual([r["v"] for r in self.landed("raw_log")], [1.0])
        self.assertIn("1 rows held back by cursor lag", log)


class AggregateWindowTest(ProducerTestCase):
    """The aggregate stage reads the timestamp as the sinks do, in any detected format."""

    def test_hourly_windows_of_a_csv_import(self):
        # today: no '%m/%d/%Y %H:%M' value parses, so every row is 'untimed' and dropped
        db = producers.make_csv_import(self.path("import.db"), 30)
        spec = '{"window": "1h", "aggregations": {"records": "count"}}'
        self.upload(db, "--enable-aggregate", "--aggregate-config", spec)
        windows = sorted(r["window_start"] for r in self.landed("aggregated_readings"))
        # closed windows only: the last hour is still open
        self.assertEqual(windows, [producers.CSV_START.replace(tzinfo=UTC)
                                   + dt.timedelta(hours=h) for h in range(29)])


@slow
class KilledProducerTest(ProducerTestCase):
    """A SIGKILL in the middle of uploading a producer's database: still exactly once."""

    def kill_loop(self, db, hook, between=None):
        """Run the kill driver, killed at the k-th `hook` (k = 1, 2, ...), until a run
        completes; `between(k)` runs after each kill (the producer writing more)."""
        argv = ["--sqlite", db, "--once", "--batch-size", "20"]
        for k in range(1, 40):
            done = run_driver(hook, k, argv, self.env())
            if done.returncode == 0:
                return k - 1
            self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
            if between:
                between(k)
        self.fail("no run completed")

    def test_csv_import_killed_between_delta_commit_and_checkpoint(self):
        db = producers.make_csv_import(self.path("import.db"), 90)

        def more(k):
            if k == 2:
                producers.make_csv_import(db, 30, start=90)
        self.assertGreater(self.kill_loop(db, "delta-after", more), 2)
        self.assert_landed_as_source(db, "readings", "raw_readings", {"Date": us_text})

    def test_home_assistant_pair_cursor_killed_anywhere_in_a_batch(self):
        # the cursor is (float, integer): it must survive the state file exactly
        db = producers.make_ha_states(self.path("home-assistant_v2.db"), 100)

        def more(_k):
            producers.make_ha_states(db, 7, start=len(source_rows(db, "states")))
        for hook in ("delta-before", "commit-after", "save-before"):
            self.assertGreater(self.kill_loop(db, hook, more), 0)
            more(0)  # the next hook starts with rows to upload
        self.upload(db)
        self.assert_landed_as_source(db, "states", "raw_states", HomeAssistantTest.TIMES)


def as_utc(moment):
    """A datetime in UTC (a naive one is taken as UTC, as the warehouse double gives)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class BothSinksTest(WarehouseTestCase):
    """The warehouse sink (values one by one) and the Delta sink (through Arrow) land the
    same instants from the same non-ISO source."""

    def test_csv_import_and_julian_days_land_the_same_on_both_sinks(self):
        for make, table, stamps in ((producers.make_csv_import, "readings", "Date"),
                                    (make_julian, "log", "ts")):
            with self.subTest(table=table):
                self.fresh()
                db = make(self.path("source.db"), 40)
                self.assertUploaded(self.upload(db))
                warehouse = [r[stamps] for r in self.rows(f"main.sensors.raw_{table}",
                                                           order_by=None)]
                env = {"STATE_DIR": self.path("state2"), "DELTA_URI": self.path("lake"),
                       "SOURCE_ID": "node-1"}
                code, _out, err = run_main(["--sqlite", db, "--once"], env)
                self.assertEqual(code, 0, err)
                delta = [r[stamps] for r in delta_rows(self.path("lake", f"raw_{table}"))]
                self.assertEqual(len(warehouse), 40)
                self.assertNotIn(None, warehouse)
                self.assertEqual(sorted(map(as_utc, warehouse)), sorted(map(as_utc, delta)))
